"""logprobs / entropy on hostile input (issue 9, part A): every backend gives the same answer.

The policy under test (rlkern/ops/logits.py): a NaN or +inf logit makes its row's log-prob
(unless ignored), entropy and gradient row NaN, or raises with nan_check=True; -inf is a banned
token; the kernels' padded lanes never count. Accuracy: |rlkern - float64| <= |torch fp32 - float64|
+ 2e-6 at any scale of z = logits / temperature that is finite in fp32. In-place backward never
writes a gradient where it would be wrong. Tests named after a peer's bug fail if that bug returns.
The Triton kernels run through the interpreter here (one Python-level program per row), so their
cases keep the row count small.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import rlkern
from rlkern import reference
from tests.conftest import ALL_BACKENDS, assert_close_to_oracle

ops = rlkern.ops
NAN, INF = float("nan"), float("inf")
# The Triton interpreter runs the kernels in numpy, which warns on the NaN / inf this file feeds in.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]


def _is_triton() -> bool:
    return rlkern.backend.requested() == "triton"


# ---------------------------------------------------------------------------------------------
# Non-finite policy
# ---------------------------------------------------------------------------------------------

# 4100 logits: two of the C++ kernel's 2048-logit blocks plus a 4-logit third one, which is read as
# one 16-lane vector padded with 12 lanes; the Triton kernel's 4096-wide blocks end at 4096.
V_POISON = 4100
POSITIONS = {
    "first": [0],
    "cpp_block_end": [2047],
    "cpp_block_start": [2048],
    "triton_block_start": [4096],
    "tail": [4099],
    "all": list(range(V_POISON)),
}


def _poisoned_rows(value: float, where: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0 clean, rows 1 and 2 poisoned at `where` (row 2's label ignored), row 3 poisoned after
    a first block of banned tokens (the exp pass skips such a block)."""
    logits = torch.randn(4, V_POISON) * 3
    logits[1, where] = value
    logits[2, where] = value
    logits[3, :2048] = -INF
    logits[3, [w for w in where if w < 2048] or [5]] = value
    labels = torch.tensor([7, 4098, -100, 2500])
    return logits, labels


@pytest.mark.parametrize("value", [NAN, INF], ids=["nan", "posinf"])
@pytest.mark.parametrize("position", list(POSITIONS))
def test_nan_and_posinf_poison_the_row(backend, value, position):
    logits, labels = _poisoned_rows(value, POSITIONS[position])
    x = logits.clone().requires_grad_()
    logp, ent = ops.logprobs_and_entropy(x, labels)
    assert logp[[1, 3]].isnan().all() and ent[1:].isnan().all()
    assert logp[2] == 0  # an ignored label's log-prob is 0 whatever its row holds
    ref_lp, ref_h = reference.logprobs_and_entropy(logits[:1].double(), labels[:1])
    assert_close_to_oracle(logp[:1], ref_lp, ref_lp, atol=2e-5, what="clean row logp")
    assert_close_to_oracle(ent[:1], ref_h, ref_h, atol=2e-5, what="clean row entropy")
    (logp.sum() + ent.sum()).backward()
    assert torch.isfinite(x.grad[0]).all()
    assert x.grad[1:].isnan().all(), "every gradient entry of a poisoned row is NaN (torch gives NaN * 0)"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_poison_in_half_dtypes(backend, dtype):
    """bf16 / fp16 NaN and +inf survive the kernels' widening loads and the gradient's narrowing store."""
    logits, labels = _poisoned_rows(NAN, [2048])
    logits[2, 9] = INF
    x = logits.to(dtype).requires_grad_()
    logp, ent = ops.logprobs_and_entropy(x, labels)
    assert torch.isfinite(logp[0]) and logp[[1, 3]].isnan().all() and ent[1:].isnan().all() and logp[2] == 0
    (logp.sum() + ent.sum()).backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad[0]).all() and x.grad[1:].isnan().all()


@pytest.mark.parametrize("value, match", [(NAN, "NaN"), (INF, r"\+inf")])
def test_nan_check_raises_with_first_index(backend, value, match):
    logits = torch.randn(3, 2, 50)
    logits[1, 0, 33] = value
    logits[2, 1, 0] = value
    with pytest.raises(ValueError, match=rf"logits holds {match}.*\(1, 0, 33\)"):
        ops.logprobs(logits, torch.zeros(3, 2, dtype=torch.long), nan_check=True)
    with pytest.raises(ValueError, match=rf"logits holds {match}"):
        ops.entropy(logits, nan_check=True)
    logits[logits.isnan() | logits.isposinf()] = -INF  # -inf is a banned token, not an error
    ops.logprobs_and_entropy(logits, torch.zeros(3, 2, dtype=torch.long), nan_check=True)


def test_banned_rows_and_padding(backend):
    """-inf is p = 0; a fully banned row is (-inf, 0); padding lanes add nothing even when the row
    has a single finite logit (entropy exactly 0, log-prob exactly 0)."""
    for vocab in (1, 3, 17, 2049):
        logits = torch.full((3, vocab), -INF)
        logits[1, vocab - 1] = 5e9
        logits[2, 0] = -3e38
        labels = torch.tensor([0, vocab - 1, 0])
        logp, ent = ops.logprobs_and_entropy(logits, labels)
        assert logp.tolist() == [-INF, 0.0, 0.0] and ent.tolist() == [0.0, 0.0, 0.0], (vocab, logp, ent)


# ---------------------------------------------------------------------------------------------
# Accuracy at any scale
# ---------------------------------------------------------------------------------------------


def _scaled_rows(scale: float, temperature: float, vocab: int) -> torch.Tensor:
    """Rows whose z = logits / temperature reaches |z| ~ scale: Gaussian rows, and rows clustered
    within a few ulps of one large value (near-ties, where the rounding of z matters most)."""
    gauss = torch.randn(6, vocab, dtype=torch.float64) * (scale * temperature)
    center = torch.tensor(scale * temperature, dtype=torch.float32)
    ulp = float(torch.nextafter(center, torch.tensor(INF)) - center)
    cluster = float(center) + ulp * torch.randint(-40, 1, (4, vocab)).double()
    logits = torch.cat([gauss, cluster, -cluster[:1]]).float()
    assert torch.isfinite(logits).all()
    return logits


@pytest.mark.parametrize("scale", [1e2, 1e4, 1e8, 1e16, 1e30])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1e-3])
def test_accuracy_at_any_scale(backend, scale, temperature):
    vocab = 61 if _is_triton() else 2500
    logits = _scaled_rows(scale, temperature, vocab)
    labels = torch.randint(0, vocab, (logits.shape[0],))
    labels[::2] = logits[::2].argmax(-1)
    logp, ent = ops.logprobs_and_entropy(logits, labels, temperature=temperature)
    ref_lp, ref_h = reference.logprobs_and_entropy(logits.double(), labels, temperature=temperature)
    f32_lp, f32_h = reference.logprobs_and_entropy(logits, labels, temperature=temperature)
    assert_close_to_oracle(logp, ref_lp, f32_lp, atol=2e-6, what="logprobs")
    assert_close_to_oracle(ent, ref_h, f32_h, atol=2e-6, what="entropy")
    assert (logp <= 0).all() and (ent >= 0).all() and (ent <= math.log(vocab) + 1e-6).all()


SIGMAS = (1.0, 30.0, 1000.0)


@pytest.mark.parametrize("temperature", [1e-3, 1.0, 10.0])
def test_invariants_sweep(backend, temperature):
    """N(0, sigma) logits for sigma in {1, 30, 1000}, 1000 rows each (Triton: V = 257, as the
    interpreter runs one Python-level program per row): logp <= 0, entropy in [0, log V] (plus
    1e-6: float32's log V may round up by half an ulp), and sum_j exp(logp_j) = 1 within 1e-5."""
    triton = _is_triton()
    per_sigma, vocab = (1000, 257) if triton else (1000, 1031)
    logits = torch.cat([torch.randn(per_sigma, vocab) * s for s in SIGMAS])
    rows = logits.shape[0]
    labels = torch.randint(0, vocab, (rows,))
    logp, ent = ops.logprobs_and_entropy(logits, labels, temperature=temperature)
    assert not logp.isnan().any() and not ent.isnan().any()
    assert (logp <= 0).all(), f"logp up to {logp.max().item()}"
    assert (ent >= 0).all() and (ent <= math.log(vocab) + 1e-6).all(), (ent.min().item(), ent.max().item())
    # Every label of a few rows: the rows expanded V times (a stride-0 view, no copy) against labels
    # 0..V-1. One interpreted Triton program per (row, label): there, one row, its sigma rotating
    # with the temperature; elsewhere 8 rows of each sigma.
    if triton:
        pick = torch.tensor([(1, 0, 2)[[1e-3, 1.0, 10.0].index(temperature)] * per_sigma])
    else:
        pick = torch.cat([torch.arange(8) + i * per_sigma for i in range(len(SIGMAS))])
    every = logits[pick].unsqueeze(0).expand(vocab, len(pick), vocab)
    all_labels = torch.arange(vocab).unsqueeze(1).expand(vocab, len(pick))
    total = ops.logprobs(every, all_labels, temperature=temperature).double().exp().sum(0)
    torch.testing.assert_close(total, torch.ones(len(pick), dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1e-45, 1e-39, 2.9e-39, 1e39, 1e300])
def test_temperature_with_overflowing_reciprocal_is_refused(backend, temperature):
    with pytest.raises(ValueError, match="temperature"):
        ops.logprobs(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        ops.entropy(torch.randn(2, 5), temperature=temperature)


def test_tiny_temperature_still_accepted(backend):
    logits = torch.randn(3, 40)
    lp, h = ops.logprobs_and_entropy(logits, logits.argmax(-1), temperature=1e-30)
    assert (lp == 0).all() and (h >= 0).all() and (h < 1e-6).all()


# ---------------------------------------------------------------------------------------------
# In-place backward
# ---------------------------------------------------------------------------------------------


def _grads(make_logits, labels, inplace):
    leaf = _source().requires_grad_()
    x = make_logits(leaf)
    w = torch.linspace(-2, 3, labels.numel()).reshape(labels.shape)
    lp, h = ops.logprobs_and_entropy(x, labels, temperature=0.8, inplace_backward=inplace)
    ((lp * w).sum() + (h * w.flip(-1)).sum()).backward()
    return leaf.grad, leaf.detach().clone()


SRC_SHAPE = (2, 4, 4, 40)


def _source() -> torch.Tensor:
    """The same values every call (a seeded CPU generator), on the suite's default device."""
    cpu = torch.randn(*SRC_SHAPE, generator=torch.Generator().manual_seed(0), device="cpu")
    return cpu.to(torch.get_default_device())
UNSAFE_LAYOUTS = {
    # prompt logits expanded over a group of 3 samples: three rows share one memory row
    "expanded": (lambda leaf: (leaf * 1.0)[0, 0].unsqueeze(0).expand(3, 4, 40), (3, 4)),
    # rows 20 elements apart: each overlaps the next
    "overlapping": (lambda leaf: (leaf * 1.0).reshape(-1).as_strided((6, 40), (20, 1)), (6,)),
    # the last dim has stride 2: the kernels would get a copy
    "strided_last_dim": (lambda leaf: (leaf * 1.0)[..., ::2], (2, 4, 4)),
    # three leading dims that fold into no two strides: the kernels would get a copy
    "three_groups": (lambda leaf: (leaf * 1.0)[:, :2, :3], (2, 2, 3)),
    # a leaf that requires grad, and a view of one: torch forbids overwriting them
    "leaf": (lambda leaf: leaf, (2, 4, 4)),
    "view_of_leaf": (lambda leaf: leaf[:, :, :3], (2, 4, 3)),
}


@pytest.mark.parametrize("layout", list(UNSAFE_LAYOUTS))
def test_inplace_backward_falls_back_where_unsafe(kernel_backend, layout):
    make, label_shape = UNSAFE_LAYOUTS[layout]
    labels = torch.randint(0, 20, label_shape)
    expected, _ = _grads(make, labels, inplace=False)
    got, leaf_after = _grads(make, labels, inplace=True)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(leaf_after, _source()), "the leaf's values were overwritten"


def test_inplace_backward_still_in_place_for_sliced_logits(kernel_backend):
    """The common safe case keeps its memory saving: logits[:, :-1] of an activation."""
    act = torch.randn(3, 5, 30).requires_grad_() * 1.0
    x = act[:, :-1]
    labels = torch.randint(0, 30, (3, 4))
    lp = ops.logprobs(x, labels, inplace_backward=True)
    ref = x.detach().clone().requires_grad_()
    ops.logprobs(ref, labels).sum().backward()
    lp.sum().backward()
    assert torch.allclose(act.detach()[:, :-1], ref.grad, atol=1e-6), "gradient written over the logits"


# ---------------------------------------------------------------------------------------------
# Odd arguments: one answer on every backend
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ignore_index", [5.5, 5.0, True, "5", torch.tensor(5)])
def test_non_integer_ignore_index_is_refused(backend, ignore_index):
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        ops.logprobs(torch.randn(3, 9), torch.tensor([5, 1, 2]), ignore_index=ignore_index)


def test_numpy_integer_ignore_index(backend):
    logits, labels = torch.randn(3, 9), torch.tensor([5, 1, 2])
    logp = ops.logprobs(logits, labels, ignore_index=np.int64(5))
    assert logp[0] == 0 and logp[1] < 0


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_wide_unsigned_labels_refused(backend, dtype):
    with pytest.raises(TypeError, match=r"labels must be .* convert with labels.long\(\)"):
        ops.logprobs(torch.randn(2, 9), torch.tensor([1, 2]).to(dtype))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_narrow_integer_labels_work(backend, dtype):
    logits, labels = torch.randn(4, 9), torch.tensor([1, 2, 8, 0])
    torch.testing.assert_close(ops.logprobs(logits, labels.to(dtype)), reference.logprobs(logits, labels),
                               atol=2e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Peers' bugs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inplace", [False, True])
def test_liger_1298_non_uniform_upstream_gradients(backend, inplace):
    """Liger #1298: a kernel that assumed one upstream gradient for every token (a mean-reduced
    loss) was wrong for per-token weights. Here they are zeros, negatives and 1e3 at once."""
    logits = torch.randn(3, 5, 300) * 2
    labels = torch.randint(0, 300, (3, 5))
    labels[0, 1] = -100
    g_lp = torch.tensor([0.0, -1.0, 1e3, 0.5, -7.0]).repeat(3, 1) * torch.randn(3, 1)
    g_h = torch.randn(3, 5) * 10
    act = logits.clone().requires_grad_()
    x = act * 1.0
    lp, h = ops.logprobs_and_entropy(x, labels, temperature=0.7, inplace_backward=inplace)
    torch.autograd.backward([lp, h], [g_lp, g_h])
    ref = logits.double().requires_grad_()
    r_lp, r_h = reference.logprobs_and_entropy(ref, labels, temperature=0.7)
    torch.autograd.backward([r_lp, r_h], [g_lp.double(), g_h.double()])
    f32 = logits.clone().requires_grad_()
    f_lp, f_h = reference.logprobs_and_entropy(f32, labels, temperature=0.7)
    torch.autograd.backward([f_lp, f_h], [g_lp, g_h])
    assert_close_to_oracle(act.grad, ref.grad, f32.grad, atol=1e-5, rtol=1e-5, what="d logits")


def test_verl_7439_skyrl_2141_all_negative_logits(backend):
    """verl #7439 / SkyRL #2141: a running max started at 0 instead of -inf; with every logit
    negative (here down to -3e38) exp(z - 0) underflows and the log-probs collapse."""
    vocab = 70 if _is_triton() else 5000
    logits = -(torch.rand(4, vocab) * 50 + 1000)
    logits[1] = -1e30 - torch.rand(vocab) * 1e29
    logits[2] = -3e38
    logits[3, :vocab // 2] = -INF
    labels = torch.tensor([0, 1, 2, vocab - 1])
    logp, ent = ops.logprobs_and_entropy(logits, labels)
    ref_lp, ref_h = reference.logprobs_and_entropy(logits.double(), labels)
    f32_lp, f32_h = reference.logprobs_and_entropy(logits, labels)
    assert_close_to_oracle(logp, ref_lp, f32_lp, atol=2e-6, what="logprobs")
    assert_close_to_oracle(ent, ref_h, f32_h, atol=2e-6, what="entropy")
    assert abs(ent[2].item() - math.log(vocab)) < 1e-5


def test_verl_2656_logp_never_positive(backend):
    """verl #2656: its fused kernel returned log-probs above 0 and the run collapsed. Cases that
    gave logp > 0 or NaN on rlkern's earlier C++ kernel (log2 units)."""
    near_one_hot = True  # at these scales the argmax's log-prob is exactly 0
    cases = [
        (torch.randn(16, 500) * 30, 1.0, not near_one_hot),
        (torch.randn(8, 500), 1e-5, near_one_hot),
        (torch.randn(8, 500), 1e-8, near_one_hot),
        (torch.randn(8, 500), 1e-9, near_one_hot),
        (torch.tensor([[1e12, 0.0, 1.0]]), 1.0, near_one_hot),
        (torch.tensor([[5e9, 0.0, 1.0]]), 1.0, near_one_hot),
    ]
    for logits, temperature, one_hot in cases:
        vocab = logits.shape[-1]
        if _is_triton():  # interpreted programs: 2 rows, the argmax and 7 random labels each
            logits = logits[:2]
            top = logits.argmax(-1, keepdim=True).t()
            labels = torch.cat([top, torch.randint(0, vocab, (7, len(logits)))])
        else:  # every label of every row
            labels = torch.arange(vocab).unsqueeze(1).expand(vocab, len(logits))
        every = logits.unsqueeze(0).expand(len(labels), *logits.shape)  # stride-0 view, no copy
        logp, ent = ops.logprobs_and_entropy(every, labels, temperature=temperature)
        assert not logp.isnan().any() and (logp <= 0).all(), (temperature, logp.max().item())
        assert (ent >= 0).all() and (ent <= math.log(vocab) + 1e-6).all()
        if one_hot:
            assert (logp.max(0).values == 0).all() and (ent == 0).all()


def test_openrlhf_1319_temperature_reaches_entropy(backend):
    """OpenRLHF #1319: entropy was computed from the unscaled logits while log-probs used the
    temperature. Both must see z = logits / T, in value and in gradient."""
    logits = torch.randn(4, 50) * 2
    labels = torch.randint(0, 50, (4,))
    x = logits.clone().requires_grad_()
    lp, h = ops.logprobs_and_entropy(x, labels, temperature=0.5)
    h.sum().backward()
    torch.testing.assert_close(h, reference.entropy(logits / 0.5), atol=2e-5, rtol=0)
    torch.testing.assert_close(lp, reference.logprobs(logits / 0.5, labels), atol=2e-5, rtol=0)
    assert (h - reference.entropy(logits)).abs().min() > 1e-2
    z = (logits / 0.5).requires_grad_()
    reference.entropy(z).sum().backward()
    torch.testing.assert_close(x.grad, z.grad / 0.5, atol=1e-5, rtol=1e-4)


def test_trl_7266_offsets_beyond_2_31(backend):
    """TRL #7266: int32 row offsets overflow once N * V > 2^31. Two rows 2^31 + 128 elements apart
    in one 4 GiB allocation that is never touched except where the rows lie (untouched pages take
    no memory); the second row sits beyond any int32 offset."""
    vocab, stride = 64, 2**31 + 128
    storage = torch.empty(stride + vocab, dtype=torch.bfloat16)
    x = storage.as_strided((2, vocab), (stride, 1))
    values = torch.randn(2, vocab).bfloat16()
    x.copy_(values)
    labels = torch.tensor([3, 60])
    logp, ent = ops.logprobs_and_entropy(x, labels)
    ref_lp, ref_h = reference.logprobs_and_entropy(values.double(), labels)
    torch.testing.assert_close(logp.double(), ref_lp, atol=2e-5, rtol=0)
    torch.testing.assert_close(ent.double(), ref_h, atol=2e-5, rtol=0)
    # The per-row temperature and sum p^2 paths read the same rows (and backward writes a fresh
    # gradient from them).
    temps = torch.tensor([0.6, 1.5])
    xg = x.detach().requires_grad_()
    logp, ent, p2 = ops.logprobs_and_entropy(xg, labels, temperature=temps, return_sum_p2=True)
    v = values.double().requires_grad_()
    ref = (reference.logprobs(v, labels, temperature=temps.double()),
           reference.entropy(v, temperature=temps.double()))
    ref_p2 = reference.sum_p2(values.double(), temperature=temps.double())
    for got, want in zip((logp, ent, p2), (*ref, ref_p2)):
        torch.testing.assert_close(got.double(), want.detach(), atol=2e-5, rtol=0)
    (logp.sum() + ent.sum()).backward()
    (ref[0].sum() + ref[1].sum()).backward()
    # Baseline: torch on the bf16 values (its gradient is rounded to bf16 once per output).
    same = values.clone().requires_grad_()
    same_loss = reference.logprobs(same, labels, temperature=temps).sum()
    (same_loss + reference.entropy(same, temperature=temps).sum()).backward()
    assert_close_to_oracle(xg.grad, v.grad, same.grad, atol=1e-6, rtol=2**-7, what="d logits")


@pytest.mark.slow
@pytest.mark.skipif(rlkern.backend.cpp_import_error() is not None, reason="C++ extension not built")
def test_dense_65537_rows_of_32768_beyond_2_31():
    """A real contiguous tensor with N >= 65,536 rows and N * V = 2^31 + 2^15 > 2^31 elements (bf16,
    4 GiB) through the C++ kernels, forward (logp, entropy, sum p^2, per-row temperatures) and an in-place
    backward into the same storage. Each row holds a spike at a row-dependent column, so a row read
    at a wrapped int32 offset (row r as row r - 65,536) gives a different answer; sampled rows, the
    last ones beyond 2^31 among them, are checked against the float64 oracle."""
    from rlkern.ops._registry import cpp_kernels

    rows, vocab = 65_537, 32_768
    x = torch.empty(rows, vocab, dtype=torch.bfloat16)
    x.copy_((torch.randn(vocab) * 2).bfloat16().expand(rows, vocab))
    cols = (torch.arange(rows) * 7919 + 13) % vocab
    x[torch.arange(rows), cols] = torch.linspace(4.0, 12.0, rows).bfloat16()
    labels = torch.where(torch.arange(rows) % 2 == 0, cols, (cols + 1) % vocab)
    temps = torch.rand(rows) + 0.5
    pick = torch.tensor([0, 1, 2**15, 65_534, 65_535, 65_536])  # row 65,536 starts at element 2^31
    pick = torch.cat([pick, torch.randint(0, rows, (10,))])
    sample = x[pick].clone()
    with rlkern.use_backend("cpp"):
        logp, ent, p2 = ops.logprobs_and_entropy(x, labels, temperature=temps, return_sum_p2=True)
    v = sample.double().requires_grad_()
    t = temps[pick].double()
    ref_lp, ref_h = reference.logprobs(v, labels[pick], temperature=t), reference.entropy(v, temperature=t)
    for got, want in ((logp, ref_lp), (ent, ref_h), (p2, reference.sum_p2(sample.double(), temperature=t))):
        torch.testing.assert_close(got[pick].double(), want.detach(), atol=5e-5, rtol=1e-5)
    # Backward straight through the kernel, writing d logits over the logits (4 GiB, no second copy).
    g_lp, g_h = torch.randn(rows), torch.randn(rows)
    lse = torch.logsumexp(sample.float() / temps[pick, None], -1)  # only for the sampled rows' check
    full_lse = torch.empty(rows)
    cpp_kernels().logprobs_fwd(x.view(1, rows, vocab), labels, 1.0, temps, -100, None, full_lse, None, None)
    torch.testing.assert_close(full_lse[pick], lse, atol=5e-5, rtol=1e-6)
    cpp_kernels().logprobs_bwd(g_lp, g_h, x.view(1, rows, vocab), labels, full_lse, ent, 1.0, temps, -100,
                               x.view(1, rows, vocab))
    (ref_lp * g_lp[pick]).sum().add((ref_h * g_h[pick]).sum()).backward()
    torch.testing.assert_close(x[pick].double(), v.grad, atol=1e-6, rtol=2**-7)


def test_liger_1294_rows_beyond_65535(backend):
    """Liger #1294: a launch grid with the rows on a dimension limited to 65,535 failed for longer
    batches. 70,000 rows on torch and cpp; on Triton (too slow to run 70,000 interpreted programs)
    the launcher's grid is recorded instead: the rows must go on axis 0 (limit 2^31 - 1)."""
    rows, vocab = 70_000, 5
    logits = torch.randn(rows, vocab)
    labels = torch.randint(0, vocab, (rows,))
    if not _is_triton():
        logp, ent = ops.logprobs_and_entropy(logits, labels)
        torch.testing.assert_close(logp, reference.logprobs(logits, labels), atol=2e-6, rtol=0)
        torch.testing.assert_close(ent, reference.entropy(logits), atol=2e-6, rtol=0)
        return
    from rlkern.kernels import logits as tk

    grids = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            grids.append(tuple(grid))
            return lambda *args, **kwargs: None

    mp = pytest.MonkeyPatch()
    with mp.context() as m:
        m.setattr(tk, "_logprobs_fwd_kernel", Recorder(tk._logprobs_fwd_kernel))
        m.setattr(tk, "_logprobs_bwd_kernel", Recorder(tk._logprobs_bwd_kernel))
        rows_view = logits.view(1, rows, vocab)
        out = torch.empty(rows)
        tk.logprobs_fwd(rows_view, labels, 1.0, out, -100, out, torch.empty(rows), torch.empty(rows), out)
        tk.logprobs_bwd(out, out, rows_view, labels, out, out, 1.0, out, -100, torch.empty_like(rows_view))
    assert len(grids) == 2
    for grid in grids:
        covered = grid[0] * max(getattr(tk, "ROWS_PER_PROGRAM", 1), 1)
        assert covered >= rows and grid[0] < 2**31 and all(g <= 65535 for g in grid[1:]), grid


@pytest.mark.parametrize("backend_name", ALL_BACKENDS)
def test_backends_agree_on_hostile_rows(backend_name):
    """One batch holding every hostile row at once gives the same classes of answer everywhere."""
    vocab = 40
    logits = torch.randn(6, vocab)
    logits[0, 3] = NAN
    logits[1, 7] = INF
    logits[2] = -INF
    logits[3, :20] = -INF
    logits[4] = -1e30
    labels = torch.tensor([1, 2, 3, 25, 4, -100])
    with rlkern.use_backend(backend_name):
        logp, ent = ops.logprobs_and_entropy(logits, labels)
    assert logp[:2].isnan().all() and ent[:2].isnan().all()
    assert logp[2] == -INF and ent[2] == 0
    assert torch.isfinite(logp[3:5]).all() and (logp[3:] <= 0).all() and logp[5] == 0
    assert abs(ent[4].item() - math.log(vocab)) < 1e-5



# ---------------------------------------------------------------------------------------------
# Every ISA level of the C++ kernels
# ---------------------------------------------------------------------------------------------

# csrc/logits.cpp compiles its kernels per ISA level (5: AVX-512 + BF16, 4: AVX-512, 3: AVX2, 0:
# baseline) and runs the best the CPU has; RLKERN_LOGITS_ISA caps it, so one machine runs them all.
_ISA_SCRIPT = r"""
import sys, torch, rlkern
out = []
for logits, labels, temperature, g_lp, g_h in torch.load(sys.argv[1]):
    with rlkern.use_backend("cpp"):
        x = logits.clone().requires_grad_(True)
        lp, h = rlkern.ops.logprobs_and_entropy(x, labels, temperature=temperature)
        (gx,) = torch.autograd.grad((lp, h), x, (g_lp, g_h))
        y = logits.clone().requires_grad_(True)
        (gy,) = torch.autograd.grad(rlkern.ops.logprobs(y, labels, temperature=temperature), y, g_lp)
        # Per-row temperatures (exact and corrected rows mixed) and sum p^2.
        temps = torch.linspace(0.5, 1.5, logits.shape[0]) * temperature
        z = logits.clone().requires_grad_(True)
        lp_t, h_t, p2_t = rlkern.ops.logprobs_and_entropy(z, labels, temperature=temps, return_sum_p2=True)
        (gz,) = torch.autograd.grad((lp_t, h_t), z, (g_lp, g_h))
    out.append((lp, h, gx, gy, lp_t, h_t, p2_t, gz))
torch.save(out, sys.argv[2])
"""


@pytest.mark.skipif(rlkern.backend.cpp_import_error() is not None, reason="C++ extension not built")
def test_every_isa_level_agrees(tmp_path):
    """The AVX2 and baseline kernels (and AVX-512 without BF16) give what the best level gives, on
    hostile rows too (NaN, +inf, banned, all banned; 4100 logits: two 2048 blocks and a tail), for
    every dtype, with an exact (1.0) and a Markstein-corrected (0.6) temperature. Tolerances: the
    levels differ in FMA contraction (the baseline has none) and bf16 rounding hardware (values
    below 2^-126 flush to 0): a few fp32 ulp forward, one ulp of the storage dtype backward."""
    gen = torch.Generator().manual_seed(0)
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for temperature in (1.0, 0.6):
            logits = (torch.randn(7, 4100, generator=gen) * 4).to(dtype)
            logits[1, 3000] = NAN
            logits[2, 5] = INF
            logits[3, :4000] = -INF
            logits[4] = -INF
            labels = torch.randint(0, 4100, (7,), generator=gen)
            labels[5] = -100
            grads = torch.randn(2, 7, generator=gen)
            cases.append((logits, labels, temperature, grads[0], grads[1]))
    torch.save(cases, tmp_path / "in.pt")

    def run(level: int):
        out = tmp_path / f"{level}.pt"
        subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(tmp_path / "in.pt"), str(out)], check=True,
                       env={**os.environ, "RLKERN_LOGITS_ISA": str(level)})
        return torch.load(out)

    best = run(99)
    for level in (4, 3, 0):
        for (logits, *_), got, want in zip(cases, run(level), best):
            rtol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[logits.dtype]
            names = ("logp", "entropy", "d logits", "d logits (logprobs only)", "logp (row T)",
                     "entropy (row T)", "sum p^2 (row T)", "d logits (row T)")
            for name, g, w in zip(names, got, want, strict=True):
                tol = dict(atol=2e-5, rtol=1e-6) if g.dtype == torch.float32 and g.dim() == 1 else \
                    dict(atol=1e-6, rtol=rtol)
                torch.testing.assert_close(g, w, equal_nan=True, **tol,
                                           msg=lambda m, n=name, lv=level: f"level {lv} {n}: {m}")
