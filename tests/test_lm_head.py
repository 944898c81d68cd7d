"""rlkern.ops.linear_logprobs against the float64 oracle (matmul + log-softmax), every backend.

Tolerances (the Cut Cross-Entropy rule of tests/conftest.py: rlkern may be as far from float64 as
torch in the input dtype is, plus a stated slack):
- fp32: atol 5e-5 + rtol 1e-5. The logits come from GEMMs that sum H products in a different
  order than torch's single GEMM (tiles, MKL/oneDNN/tl.dot blocking), a few ulp of |z| <~ 20.
- bf16 / fp16: the logits are fp32 sums of exact products on every backend (never rounded to the
  input dtype), so they are as accurate as fp32; the slack, 2 u max|z| (u = 2^-8 / 2^-11), is the
  looser bound of a GEMM that rounds its output once, kept so the bound also covers a GPU GEMM.
- gradients: fp32 atol 1e-5 * (1 + max|grad|). bf16 / fp16: the per-tile d logits are rounded to
  the input dtype and each tile's GEMM output is rounded once before the fp32 sum over tiles, so
  the error is a few u of the largest partial; slack 8 u max|grad|.
"""

from __future__ import annotations

import math

import pytest
import torch

import rlkern
from rlkern import reference
from rlkern.ops import lm_tiles
from rlkern.ops._registry import cpp_kernels
from tests.conftest import ALL_BACKENDS, DTYPES, KERNEL_BACKENDS, assert_close_to_oracle

linear_logprobs = rlkern.ops.linear_logprobs
UNIT_ROUNDOFF = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _make(lead, hidden_size, vocab, dtype, *, bias=False, ignore=0.15, scale=1.0):
    hidden = (torch.randn(*lead, hidden_size) * scale).to(dtype)
    weight = (torch.randn(vocab, hidden_size) / math.sqrt(hidden_size) * 3).to(dtype)
    b = torch.randn(vocab).to(dtype) if bias else None
    labels = torch.randint(0, vocab, lead)
    labels = labels.masked_fill(torch.rand(lead) < ignore, -100)
    return hidden, weight, b, labels


def _naive_same_dtype(hidden, weight, labels, bias, temperature, ignore_index=-100):
    """What a user would write in the input dtype: logits = hidden @ weight.T + bias in that dtype."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return reference.logprobs_and_entropy(
        logits.float(), labels, temperature=temperature, ignore_index=ignore_index
    )


def _oracle(hidden, weight, labels, bias, temperature, ignore_index=-100):
    return reference.linear_logprobs(
        hidden.double(),
        weight.double(),
        labels,
        bias=None if bias is None else bias.double(),
        temperature=temperature,
        ignore_index=ignore_index,
        return_entropy=True,
    )


def _fwd_atol(dtype, hidden, weight, bias, temperature):
    if dtype == torch.float32:
        return 5e-5
    logits = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    zmax = logits.abs().max().item() / temperature if logits.numel() else 0.0
    return 2 * UNIT_ROUNDOFF[dtype] * zmax + 5e-5


def _check_forward(hidden, weight, labels, bias=None, temperature=1.0, chunk_size=None):
    logp, ent = linear_logprobs(
        hidden, weight, labels, bias=bias, temperature=temperature, return_entropy=True, chunk_size=chunk_size
    )
    ref_lp, ref_h = _oracle(hidden, weight, labels, bias, temperature)
    same_lp, same_h = _naive_same_dtype(hidden, weight, labels, bias, temperature)
    atol = _fwd_atol(hidden.dtype, hidden, weight, bias, temperature)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    assert logp.shape == labels.shape and ent.shape == labels.shape
    assert_close_to_oracle(logp, ref_lp, same_lp, atol=atol, rtol=1e-5, what="logprobs")
    assert_close_to_oracle(ent, ref_h, same_h, atol=atol, rtol=1e-5, what="entropy")
    # Log-probs alone are the same numbers as with the entropy.
    alone = linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature, chunk_size=chunk_size)
    assert torch.equal(alone, logp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 7, 100])
@pytest.mark.parametrize("bias_temp", [(False, 1.0), (True, 0.7)])
@pytest.mark.parametrize("chunk_size", [None, 32])
def test_matches_oracle(backend, dtype, vocab, bias_temp, chunk_size):
    bias, temperature = bias_temp
    hidden, weight, b, labels = _make((3, 5), 24, vocab, dtype, bias=bias)
    _check_forward(hidden, weight, labels, b, temperature, chunk_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen_vocab_cpp(dtype):
    hidden, weight, b, labels = _make((6,), 64, 151936, dtype, bias=True)
    with rlkern.use_backend("cpp"):
        _check_forward(hidden, weight, labels, b, 0.9)


@pytest.mark.parametrize("lead", [(1,), (), (0,), (2, 0), (1, 1, 1)])
def test_odd_leading_shapes(backend, lead):
    hidden, weight, b, labels = _make(lead, 16, 19, torch.float32, bias=True)
    _check_forward(hidden, weight, labels, b)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    linear_logprobs(hidden, weight, labels, bias=b).sum().backward()
    assert hidden.grad.shape == hidden.shape and not hidden.grad.isnan().any()
    assert weight.grad.shape == weight.shape and not weight.grad.isnan().any()
    if hidden.numel() == 0:
        assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_banned_tokens_and_dead_rows(backend):
    """A -inf bias bans a token (p = 0, log-prob -inf when it is the label); a bias of all -inf
    leaves no distribution: every log-prob -inf, entropy 0, no gradient, never NaN."""
    hidden, weight, _, labels = _make((9,), 16, 40, torch.float32, ignore=0.0)
    bias = torch.zeros(40)
    bias[::3] = -math.inf
    labels[0], labels[1] = 3, 4  # a banned label and an allowed one
    _check_forward(hidden, weight, labels, bias)
    logp = linear_logprobs(hidden, weight, labels, bias=bias)
    assert logp[0] == -math.inf and math.isfinite(logp[1])

    dead = torch.full((40,), -math.inf)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    lp, ent = linear_logprobs(h, w, labels, bias=dead, return_entropy=True)
    assert bool((lp == -math.inf).all()) and torch.equal(ent, torch.zeros_like(ent))
    ent.sum().backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_ignore_index(backend):
    hidden, weight, _, labels = _make((4, 6), 16, 30, torch.float32, ignore=0.0)
    labels[0] = 7
    labels[1, :3] = 7
    logp = linear_logprobs(hidden, weight, labels, ignore_index=7)
    assert torch.equal(logp[0], torch.zeros(6)) and torch.equal(logp[1, :3], torch.zeros(3))
    ref = reference.linear_logprobs(hidden.double(), weight.double(), labels, ignore_index=7)
    same = reference.linear_logprobs(hidden, weight, labels, ignore_index=7)
    assert_close_to_oracle(logp, ref, same, atol=5e-5, what="logprobs")
    # Ignored tokens get no gradient through their log-prob.
    h = hidden.clone().requires_grad_(True)
    linear_logprobs(h, weight, labels, ignore_index=7).sum().backward()
    assert torch.equal(h.grad[0], torch.zeros_like(h.grad[0]))


def _grads(fn, hidden, weight, bias, which, seed_grads):
    tensors = [t.detach().clone().requires_grad_(True) for t in (hidden, weight)]
    b = bias.detach().clone().requires_grad_(True) if bias is not None else None
    lp, ent = fn(tensors[0], tensors[1], b)
    g_lp, g_ent = seed_grads
    loss = 0
    if which in ("logp", "both"):
        loss = loss + (lp * g_lp).sum()
    if which in ("entropy", "both"):
        loss = loss + (ent * g_ent).sum()
    loss.backward()
    return [t.grad for t in tensors] + ([b.grad] if b is not None else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["logp", "entropy", "both"])
def test_backward_matches_reference(backend, dtype, which, monkeypatch):
    # Four tokens per tile and 32 vocabulary rows per tile: several tiles both ways, ragged at the end
    # (the fp32 in-place accumulation and the bf16/fp16 fp32 accumulator paths of d weight).
    monkeypatch.setattr(lm_tiles, "_MAX_TOKEN_TILE", 4)
    hidden, weight, bias, labels = _make((2, 5), 24, 75, dtype, bias=True)
    temperature = 0.8
    seeds = (torch.randn(labels.shape), torch.randn(labels.shape))
    ours = _grads(
        lambda h, w, b: linear_logprobs(
            h, w, labels, bias=b, temperature=temperature, return_entropy=True, chunk_size=32
        ),
        hidden,
        weight,
        bias,
        which,
        seeds,
    )
    oracle = _grads(
        lambda h, w, b: _oracle(h.double(), w.double(), labels, b.double(), temperature),
        hidden,
        weight,
        bias,
        which,
        seeds,
    )
    same = _grads(
        lambda h, w, b: _naive_same_dtype(h, w, labels, b, temperature), hidden, weight, bias, which, seeds
    )
    for name, a, o, s, src in zip(("hidden", "weight", "bias"), ours, oracle, same, (hidden, weight, bias)):
        assert a.dtype == src.dtype, f"d {name} must come back in {name}'s dtype"
        scale = o.abs().max().item()
        atol = 1e-5 * (1 + scale) if dtype == torch.float32 else 8 * UNIT_ROUNDOFF[dtype] * scale
        assert_close_to_oracle(a, o, s, atol=atol, what=f"d {name}")


def test_chunk_size_does_not_change_fp32_results_beyond_rounding():
    hidden, weight, bias, labels = _make((33,), 32, 300, torch.float32, bias=True)
    with rlkern.use_backend("cpp"):
        base = linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True)
        for chunk in (1, 17, 64, 1000):
            other = linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, chunk_size=chunk)
            for a, b in zip(base, other):
                torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_invariance_cpp(dtype):
    """verl #6280: on-policy log-probs must not depend on the micro-batch. A token's log-prob and
    entropy are the same bits alone or among 300 tokens (any position), and with 1 or 2 threads."""
    if "cpp" not in KERNEL_BACKENDS:
        pytest.skip("needs the C++ extension")
    hidden, weight, _, labels = _make((300,), 96, 5000, dtype, ignore=0.0)
    with rlkern.use_backend("cpp"):
        lp_all, h_all = linear_logprobs(hidden, weight, labels, return_entropy=True)
        for r in (0, 17, 299):
            lp_one, h_one = linear_logprobs(
                hidden[r : r + 1].clone(), weight, labels[r : r + 1], return_entropy=True
            )
            assert torch.equal(lp_one, lp_all[r : r + 1]) and torch.equal(h_one, h_all[r : r + 1])
        threads = torch.get_num_threads()
        torch.set_num_threads(1 if threads > 1 else 2)
        try:
            lp_other, h_other = linear_logprobs(hidden, weight, labels, return_entropy=True)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(lp_other, lp_all) and torch.equal(h_other, h_all)


def test_tile_sizes_respect_budget():
    for n, v in [(1, 1), (7, 100), (1024, 32768), (2048, 151936), (16384, 151936), (100000, 7)]:
        tn, tv = lm_tiles.tile_sizes(n, v)
        assert 1 <= tn <= n and 1 <= tv <= max(v, lm_tiles._VOCAB_ALIGN)
        budget = min(max(n * v * 4 // lm_tiles._BUDGET_FRACTION, lm_tiles._BUDGET_MIN), lm_tiles._BUDGET_MAX)
        assert tn * min(tv, v) * 4 <= max(budget, tn * lm_tiles._VOCAB_ALIGN * 4)
    assert lm_tiles.tile_sizes(100, 1000, chunk_size=50) == (100, 50)
    # The vocabulary tile never depends on N (batch invariance of the fold order).
    assert len({lm_tiles.tile_sizes(n, 151936)[1] for n in (1, 7, 300, 4096, 100000)}) == 1


def test_gradcheck_reference():
    hidden, weight, bias, labels = _make((5,), 6, 9, torch.float64, bias=True)
    args = [t.requires_grad_(True) for t in (hidden, weight, bias)]

    def fn(h, w, b):
        return reference.linear_logprobs(h, w, labels, bias=b, temperature=0.8, return_entropy=True)

    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_gradcheck_kernels_fp32(backend_name):
    """The kernels run in fp32 only: finite differences with eps = 1e-2 on O(1) inputs have a
    truncation error ~eps^2 and an fp32 rounding error ~1e-7/eps, both well under the 1e-2 slack."""
    hidden, weight, bias, labels = _make((4,), 8, 11, torch.float32, bias=True)
    args = [t.requires_grad_(True) for t in (hidden, weight, bias)]

    def fn(h, w, b):
        with rlkern.use_backend(backend_name):
            return linear_logprobs(h, w, labels, bias=b, temperature=0.8, return_entropy=True, chunk_size=4)

    assert torch.autograd.gradcheck(fn, args, eps=1e-2, atol=1e-2, rtol=1e-2, fast_mode=True)


@pytest.mark.parametrize(
    "make_args, error, match",
    [
        (lambda h, w, y: ("h", w, y), TypeError, "hidden must be a torch.Tensor"),
        (lambda h, w, y: (h, w[:, :-1], y), ValueError, r"weight must have shape \[V, H\]"),
        (lambda h, w, y: (h, w.double(), y), TypeError, "weight must have hidden's dtype"),
        (lambda h, w, y: (h, w, y[:-1]), ValueError, "labels must have shape"),
        (lambda h, w, y: (h, w, y.float()), TypeError, "labels must be an integer tensor"),
        (lambda h, w, y: (h, w, y + 1000), IndexError, r"labels must lie in \[0, 20\)"),
        (lambda h, w, y: (h[:, :0], w[:, :0], y), ValueError, "hidden must have shape"),
        (lambda h, w, y: (h, w[:0], y), ValueError, "weight must have shape"),
    ],
)
def test_bad_input(backend, make_args, error, match):
    hidden, weight, _, labels = _make((3,), 8, 20, torch.float32, ignore=0.0)
    with pytest.raises(error, match=match):
        linear_logprobs(*make_args(hidden, weight, labels))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
        ({"temperature": float("nan")}, ValueError, "temperature"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be None or an int >= 1"),
        ({"chunk_size": 2.5}, ValueError, "chunk_size"),
        ({"bias": torch.zeros(19)}, ValueError, r"bias must have shape \[V\] = \[20\]"),
    ],
)
def test_bad_keywords(kwargs, error, match):
    hidden, weight, _, labels = _make((3,), 8, 20, torch.float32)
    with pytest.raises(error, match=match):
        linear_logprobs(hidden, weight, labels, **kwargs)


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_opcheck(backend_name, precision):
    hidden, weight, bias, labels = _make((6,), 16, 40, torch.float32, bias=True)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    fwd_args = (hidden, True, weight, bias, labels, 0.9, -100, 16, backend_name, precision)
    torch.library.opcheck(torch.ops.rlkern.linear_logprobs_fwd.default, fwd_args)
    with torch.no_grad():
        _, lse, ent = torch.ops.rlkern.linear_logprobs_fwd(*fwd_args)
    bwd_args = (
        hidden.detach(),
        weight.detach(),
        bias,
        torch.randn(6),
        torch.randn(6),
        labels,
        lse,
        ent,
        0.9,
        -100,
        16,
        backend_name,
        precision,
    )
    torch.library.opcheck(torch.ops.rlkern.linear_logprobs_bwd.default, bwd_args)


def test_torch_compile_fullgraph():
    hidden, weight, bias, labels = _make((2, 7), 16, 50, torch.float32, bias=True)

    def step(h, w):
        lp, ent = linear_logprobs(h, w, labels, bias=bias, temperature=0.9, return_entropy=True)
        return (lp * 2).sum() + ent.mean()

    compiled = torch.compile(step, fullgraph=True)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with rlkern.use_backend("cpp"):
        out_c = compiled(h1, w1)
        out_e = step(h2, w2)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


@pytest.mark.parametrize("backend_name", ALL_BACKENDS)
def test_float64_runs_reference_or_says_why(backend_name):
    hidden, weight, _, labels = _make((3,), 8, 20, torch.float64)
    with rlkern.use_backend(backend_name):
        if backend_name == "torch":
            out = linear_logprobs(hidden, weight, labels)
            assert out.dtype == torch.float64
        else:
            with pytest.raises(rlkern.backend.BackendUnavailable, match="float64"):
                linear_logprobs(hidden, weight, labels)


@pytest.mark.parametrize(
    "backend_name, dtype",
    [("torch", torch.float32), ("cpp", torch.float32), ("cpp", torch.bfloat16), ("triton", torch.float32)],
)
@pytest.mark.parametrize("loss_type, beta", [("grpo", 0.0), ("bnpo", 0.04), ("dr_grpo", 0.1)])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_linear_policy_loss_matches_reference_composition(backend_name, dtype, loss_type, beta, chunk_size):
    """linear_policy_loss == reference.grpo_loss(reference.linear_logprobs(...)) in float64, value
    and d hidden / d weight. chunk_size=4 cuts the fp32 single pass into 5 token tiles (the gradient
    of each tile computed while later tokens hold placeholders). fp32: atol 1e-5 (1 + max|.|), the
    fp32 GEMM rounding; bf16: 8 u max|.| as for linear_logprobs' gradients (logits rounded once)."""
    if backend_name not in ALL_BACKENDS:
        pytest.skip(f"backend {backend_name} is not available here")
    hidden, weight, _, labels = _make((3, 6), 16, 70, dtype, ignore=0.0)
    mask = torch.rand(3, 6) < 0.8
    mask[2] = False  # a sequence with no valid token
    old = reference.linear_logprobs(hidden, weight, labels) + 0.3 * torch.randn(3, 6)
    ref = old + 0.2 * torch.randn(3, 6)
    adv = torch.randn(3)
    kw = dict(ref_logp=ref, beta=beta, clip_low=0.2, clip_high=0.28, loss_type=loss_type, temperature=0.9)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with rlkern.use_backend(backend_name):
        loss, stats = rlkern.ops.linear_policy_loss(h, w, labels, old, adv, mask, chunk_size=chunk_size, **kw)
    (3.0 * loss).backward()
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    logp64 = reference.linear_logprobs(h64, w64, labels, temperature=0.9)
    loss64, stats64 = reference.grpo_loss(
        logp64,
        old.double(),
        ref.double(),
        adv.double(),
        mask,
        beta=beta,
        clip_low=0.2,
        clip_high=0.28,
        loss_type=loss_type,
    )
    (3.0 * loss64).backward()
    u = UNIT_ROUNDOFF[dtype]
    # bf16: each log-prob is off by up to 2 u max|z| (see the module doc); the loss is a weighted
    # mean of per-token terms whose slope in logp is about ratio (1 + clip_high) |A| + beta (e^d + 1)
    # with ratio and e^d within e^{+-1} here, so 8 u max|z| (1 + max|A|) bounds the loss error.
    zmax = (hidden.double() @ weight.double().T).abs().max().item() / 0.9
    val_tol = 1e-5 if dtype == torch.float32 else 8 * u * zmax * (1 + adv.abs().max().item())
    torch.testing.assert_close(loss.double(), loss64, atol=val_tol, rtol=1e-5)
    for key in stats64:
        torch.testing.assert_close(
            stats[key].double(), stats64[key].double(), atol=max(val_tol, 1e-5), rtol=1e-5
        )
    for a, o, src in ((h.grad, h64.grad, hidden), (w.grad, w64.grad, weight)):
        assert a.dtype == src.dtype
        scale = o.abs().max().item()
        atol = 1e-5 * (1 + scale) if dtype == torch.float32 else 16 * u * (1 + scale)
        torch.testing.assert_close(a.double(), o, atol=atol, rtol=1e-4 if dtype == torch.float32 else 0.05)


def test_linear_policy_loss_needs_ref_logp_for_kl():
    hidden, weight, _, labels = _make((2, 3), 8, 20, torch.float32, ignore=0.0)
    with pytest.raises(ValueError, match="ref_logp is required when beta > 0"):
        rlkern.ops.linear_policy_loss(
            hidden,
            weight,
            labels,
            torch.zeros(2, 3),
            torch.zeros(2),
            torch.ones(2, 3, dtype=torch.bool),
            beta=0.1,
        )


def test_cpp_epilogues_check_their_arguments():
    """The raw C++ kernels reject inconsistent buffers with a message instead of reading past them;
    an absent tensor is None (an empty tensor is a wrong-sized one, not "absent")."""
    tile = torch.randn(3, 10)
    state = [torch.zeros(3) for _ in range(4)]
    labels = torch.zeros(3, dtype=torch.long)
    bias_msg = "bias must be a contiguous float32 slice with one entry per tile column"
    for bad_bias in (torch.zeros(9), torch.zeros(0)):
        with pytest.raises(RuntimeError, match=bias_msg):
            cpp_kernels().lm_fold(tile, bad_bias, labels, 1.0, -100, 0, False, *state)
    with pytest.raises(
        RuntimeError, match="labels must be a contiguous int64 tensor with one entry per tile row"
    ):
        cpp_kernels().lm_fold(tile, None, labels[:2], 1.0, -100, 0, False, *state)
    with pytest.raises(RuntimeError, match="lse must be a contiguous float32 tensor"):
        cpp_kernels().lm_grad(tile, None, labels, torch.zeros(3), None, torch.zeros(2), None, 1.0, -100, 0)
    with pytest.raises(RuntimeError, match="want_entropy needs an ent output"):
        cpp_kernels().linear_logprobs_fwd(
            torch.randn(3, 4), torch.randn(10, 4), None, labels, 1.0, -100, 0, True, 3, 10, "ieee",
            torch.empty(3), None, torch.empty(3),
        )
    with pytest.raises(RuntimeError, match="part must be contiguous with acc's shape"):
        cpp_kernels().lm_accumulate(torch.zeros(4, 3), torch.zeros(3, 4).t())


def test_linear_policy_loss_single_backward_and_upstream_scale():
    hidden, weight, _, labels = _make((2, 3), 8, 20, torch.float32, ignore=0.0)
    args = (labels, torch.zeros(2, 3) - 3.0, torch.tensor([1.0, -1.0]), torch.ones(2, 3, dtype=torch.bool))
    grads = []
    for scale in (1.0, -2.5):
        h = hidden.clone().requires_grad_(True)
        loss, _ = rlkern.ops.linear_policy_loss(h, weight, *args)
        (scale * loss).backward(retain_graph=True)
        grads.append(h.grad.clone())
        with pytest.raises(RuntimeError, match="single backward pass"):
            loss.backward()
    torch.testing.assert_close(grads[1], -2.5 * grads[0])


# ------------------------------------------------------------------------------------------------
# precision= ("ieee" | "tf32"): the Triton GEMMs' fp32 mode (issue #8 item 3)
# ------------------------------------------------------------------------------------------------


def _policy_args(lead=(2, 3)):
    return (torch.zeros(*lead) - 3.0, torch.tensor([1.0, -1.0]), torch.ones(*lead, dtype=torch.bool))


@pytest.mark.parametrize("bad", ["fp32", "TF32", "highest", "", None, 1])
def test_precision_bad_values(bad):
    hidden, weight, _, labels = _make((2, 3), 8, 20, torch.float32, ignore=0.0)
    match = r"precision must be one of \('ieee', 'tf32'\)"
    with pytest.raises(ValueError, match=match):
        linear_logprobs(hidden, weight, labels, precision=bad)
    with pytest.raises(ValueError, match=match):
        rlkern.ops.linear_policy_loss(hidden, weight, labels, *_policy_args(), precision=bad)
    # Checked before any collective: no process group is needed to get the error.
    with pytest.raises(ValueError, match=match):
        linear_logprobs(hidden, weight, labels, process_group=object(), precision=bad)
    from rlkern.ops.vocab_parallel import vocab_parallel_linear_logprobs

    with pytest.raises(ValueError, match=match):
        vocab_parallel_linear_logprobs(hidden, weight, labels, object(), precision=bad)


@pytest.mark.parametrize("backend_name", [b for b in ALL_BACKENDS if b != "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_precision_changes_nothing_on_cpp_and_torch(backend_name, dtype):
    """The cpp loop and the torch reference multiply fp32 in IEEE whatever precision says: "tf32"
    must give the same bits as "ieee" there, forward and backward."""
    hidden, weight, bias, labels = _make((2, 5), 16, 40, dtype, bias=True)
    runs = []
    for precision in ("ieee", "tf32"):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with rlkern.use_backend(backend_name):
            lp, ent = linear_logprobs(
                h, w, labels, bias=bias, temperature=0.9, return_entropy=True, precision=precision
            )
            (lp.sum() + ent.sum()).backward()
            hp, wp = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
            loss, _ = rlkern.ops.linear_policy_loss(
                hp, wp, labels.clamp(min=0), *_policy_args((2, 5)), precision=precision
            )
            loss.backward()
        runs.append((lp, ent, h.grad, w.grad, loss, hp.grad, wp.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


class _LauncherSpy:
    """Wraps the Triton launchers of rlkern.kernels.lm_head: records the precision each call
    got (a positional argument, as for rlkern._C's kernels) and runs the real kernel."""

    def __init__(self, monkeypatch):
        from rlkern.kernels import lm_head as tk

        self.calls = {"fwd": [], "bwd": []}
        for kind, where in (("fwd", 10), ("bwd", 13)):
            real = getattr(tk, f"linear_logprobs_{kind}")

            def spy(*args, _real=real, _kind=kind, _where=where):
                self.calls[_kind].append(args[_where])
                return _real(*args)

            monkeypatch.setattr(tk, f"linear_logprobs_{kind}", spy)


def _needs_triton():
    if "triton" not in KERNEL_BACKENDS:
        pytest.skip("the triton backend is not available here")


@pytest.mark.parametrize("precision", [None, "ieee", "tf32"])
def test_precision_reaches_triton_launcher(precision, monkeypatch):
    _needs_triton()
    spy = _LauncherSpy(monkeypatch)
    kw = {} if precision is None else {"precision": precision}
    expected = precision or "ieee"
    hidden, weight, bias, labels = _make((2, 3), 16, 40, torch.float32, bias=True, ignore=0.0)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with rlkern.use_backend("triton"):
        lp, ent = linear_logprobs(h, w, labels, bias=bias, return_entropy=True, **kw)
        assert spy.calls == {"fwd": [expected], "bwd": []}
        (lp.sum() + ent.sum()).backward()
        assert spy.calls == {"fwd": [expected], "bwd": [expected]}
        hp = hidden.clone().requires_grad_(True)
        loss, _ = rlkern.ops.linear_policy_loss(hp, weight, labels, *_policy_args(), **kw)
        loss.backward()
    assert spy.calls == {"fwd": [expected] * 2, "bwd": [expected] * 2}
    # The interpreter may or may not emulate TF32's rounding; either way the results stay close to
    # the float64 oracle (TF32: ~1e-3 relative per product, |z| < ~10 here).
    ref_lp, _ = _oracle(hidden, weight, labels, bias, 1.0)
    torch.testing.assert_close(lp.double(), ref_lp, atol=5e-2 if expected == "tf32" else 5e-5, rtol=0)


def test_precision_reaches_triton_launcher_vocab_parallel(monkeypatch, tmp_path):
    """process_group= path: shard_stats / shard_grads get the precision too (one-rank gloo group)."""
    _needs_triton()
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    spy = _LauncherSpy(monkeypatch)
    hidden, weight, _, labels = _make((2, 3), 16, 40, torch.float32, ignore=0.0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        h = hidden.clone().requires_grad_(True)
        with rlkern.use_backend("triton"):
            lp = linear_logprobs(h, weight, labels, process_group=dist.group.WORLD, precision="tf32")
            lp.sum().backward()
    finally:
        dist.destroy_process_group()
    assert spy.calls == {"fwd": ["tf32"], "bwd": ["tf32"]}


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.int64, torch.int32, torch.uint8, torch.bfloat16])
def test_linear_policy_loss_reads_masks_of_any_dtype(backend, mask_dtype):
    """TRL passes an int completion_mask, verl a float response_mask: the same 0/1 values in any
    dtype give the same loss and gradients as the bool mask (read natively, "nonzero = valid"; the
    same kernels run, so only the mask's load differs: tolerance 1e-6 relative)."""
    hidden, weight, _, labels = _make((2, 5), 16, 40, torch.float32, ignore=0.0)
    old, adv = torch.full((2, 5), -3.0), torch.tensor([1.0, -1.0])
    mask = torch.rand(2, 5) < 0.7
    mask[0, 0] = True
    runs = []
    for m in (mask, mask.to(mask_dtype)):
        h = hidden.clone().requires_grad_(True)
        loss, _ = rlkern.ops.linear_policy_loss(h, weight, labels, old, adv, m)
        loss.backward()
        runs.append((loss, h.grad))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
