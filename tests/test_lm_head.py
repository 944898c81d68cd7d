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
    assert "cpp" in KERNEL_BACKENDS, "the C++ extension is built by `make build`; rlkern._C failed to import"
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_size", [None, 64])
def test_backward_worker_split_cpp(dtype, chunk_size):
    """The C++ backward splits the vocabulary tiles among threads (one parallel region, a d hidden
    partial per worker summed in worker order): at 1, 2 and 3 threads the gradients match the fp64
    oracle (the tolerances of test_backward_matches_reference), and at a fixed thread count two calls
    give the same bits (the split depends on the worker count only, never on scheduling). V = 1000
    gives several tiles per worker; chunk_size=64 with the token tile patched to 8 rows several token
    tiles per vocabulary tile (d weight and d bias accumulated over them)."""
    hidden, weight, b, labels = _make((5, 9), 24, 1000, dtype, bias=True)
    temps = torch.rand(5, 1) + 0.5
    g_lp, g_ent = torch.randn(5, 9), torch.randn(5, 9)
    h64, w64, b64 = (t.double().requires_grad_(True) for t in (hidden, weight, b))
    lp64, ent64 = reference.linear_logprobs_options(h64, w64, labels, bias=b64, temperature=temps.double(),
                                                    return_entropy=True)
    want = torch.autograd.grad((lp64 * g_lp).sum() + (ent64 * g_ent).sum(), (h64, w64, b64))
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2, 3):
            torch.set_num_threads(n_threads)
            runs = []
            for _ in range(2):
                h, w, bb = (t.clone().requires_grad_(True) for t in (hidden, weight, b))
                with rlkern.use_backend("cpp"), pytest.MonkeyPatch.context() as mp:
                    if chunk_size is not None:
                        mp.setattr(lm_tiles, "_MAX_TOKEN_TILE", 8)
                    lp, ent = linear_logprobs(h, w, labels, bias=bb, temperature=temps, return_entropy=True,
                                              chunk_size=chunk_size)
                    runs.append(torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), (h, w, bb)))
            for a, e in zip(runs[0], runs[1]):
                assert torch.equal(a, e), n_threads
            u = UNIT_ROUNDOFF[dtype]
            for a, e in zip(runs[0], want):
                scale = e.abs().max().item()
                fp32 = dtype == torch.float32
                atol = 1e-5 * (1 + scale) if fp32 else 16 * u * (1 + scale)  # as the policy-loss test
                torch.testing.assert_close(a.double(), e, atol=atol, rtol=1e-4 if fp32 else 0.05)
    finally:
        torch.set_num_threads(threads)


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
    inv_rows = torch.rand(6) + 0.5
    for options in ((None, False), (inv_rows, True)):
        fwd_args = (hidden, True, weight, bias, labels, 0.9, -100, 16, backend_name, precision, *options)
        torch.library.opcheck(torch.ops.rlkern.linear_logprobs_fwd.default, fwd_args)
    with torch.no_grad():
        _, lse, ent, p2 = torch.ops.rlkern.linear_logprobs_fwd(*fwd_args)
    assert p2.shape == (6,)
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
    for inv in (None, inv_rows):
        torch.library.opcheck(torch.ops.rlkern.linear_logprobs_bwd.default, (*bwd_args, inv))


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
@pytest.mark.parametrize("chunk_size, temp_kind", [(None, "scalar"), (4, "scalar"), (None, "sequence"),
                                                   (4, "token")])
def test_linear_policy_loss_matches_reference_composition(backend_name, dtype, loss_type, beta, chunk_size,
                                                          temp_kind):
    """linear_policy_loss == reference.grpo_loss(reference.linear_logprobs(...)) in float64, value
    and d hidden / d weight. chunk_size=4 cuts the vocabulary (70) into 18 tiles, the last one of 2
    rows. fp32: atol 1e-5 (1 + max|.|), the
    fp32 GEMM rounding; bf16: 8 u max|.| as for linear_logprobs' gradients (logits rounded once).
    The temperature is 0.9, or a tensor of one per sequence ([B, 1]) or per token in [0.5, 1.5]
    (used as float32(1 / T): a relative change of ~6e-8 in the logits, inside the fp32 tolerance)."""
    if backend_name not in ALL_BACKENDS:
        pytest.skip(f"backend {backend_name} is not available here")
    hidden, weight, _, labels = _make((3, 6), 16, 70, dtype, ignore=0.0)
    mask = torch.rand(3, 6) < 0.8
    mask[2] = False  # a sequence with no valid token
    old = reference.linear_logprobs(hidden, weight, labels) + 0.3 * torch.randn(3, 6)
    ref = old + 0.2 * torch.randn(3, 6)
    adv = torch.randn(3)
    temperature = 0.9 if temp_kind == "scalar" else _temperatures(temp_kind, (3, 6))
    t64 = temperature if temp_kind == "scalar" else temperature.double().expand(3, 6)
    t_min = 0.9 if temp_kind == "scalar" else temperature.min().item()
    kw = dict(ref_logp=ref, beta=beta, clip_low=0.2, clip_high=0.28, loss_type=loss_type,
              temperature=temperature)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with rlkern.use_backend(backend_name):
        loss, stats = rlkern.ops.linear_policy_loss(h, w, labels, old, adv, mask, chunk_size=chunk_size, **kw)
    (3.0 * loss).backward()
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    logp64 = reference.linear_logprobs(h64, w64, labels, temperature=t64)
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
    zmax = (hidden.double() @ weight.double().T).abs().max().item() / t_min
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
            cpp_kernels().lm_fold(tile, bad_bias, labels, 1.0, -100, 0, False, *state, None, None)
    with pytest.raises(
        RuntimeError, match="labels must be a contiguous int64 tensor with one entry per tile row"
    ):
        cpp_kernels().lm_fold(tile, None, labels[:2], 1.0, -100, 0, False, *state, None, None)
    for inv, q, what in ((torch.ones(2), None, "inv_temp_rows"), (None, torch.zeros(4), "q")):
        with pytest.raises(RuntimeError, match=f"{what} must be a contiguous float32 tensor"):
            cpp_kernels().lm_fold(tile, None, labels, 1.0, -100, 0, False, *state, inv, q)
    with pytest.raises(RuntimeError, match="lse must be a contiguous float32 tensor"):
        cpp_kernels().lm_grad(tile, None, labels, torch.zeros(3), None, torch.zeros(2), None, 1.0, -100, 0,
                              None)
    with pytest.raises(RuntimeError, match="inv_temp_rows must be a contiguous float32 tensor"):
        cpp_kernels().lm_grad(tile, None, labels, torch.zeros(3), None, torch.zeros(3), None, 1.0, -100, 0,
                              torch.ones(2))
    with pytest.raises(RuntimeError, match="want_entropy needs an ent output"):
        cpp_kernels().linear_logprobs_fwd(
            torch.randn(3, 4), torch.randn(10, 4), None, labels, 1.0, -100, 0, True, 3, 10, "ieee",
            torch.empty(3), None, torch.empty(3), None, None,
        )
    for inv, p2, what in ((torch.ones(2), None, "inv_temp_rows"), (None, torch.empty(4), "sum_p2"),
                          (torch.ones(3, dtype=torch.float64), None, "inv_temp_rows")):
        with pytest.raises(RuntimeError, match=f"{what} must be a contiguous float32 tensor"):
            cpp_kernels().linear_logprobs_fwd(
                torch.randn(3, 4), torch.randn(10, 4), None, labels, 1.0, -100, 0, False, 3, 10, "ieee",
                torch.empty(3), None, torch.empty(3), inv, p2,
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


# ---- The options of issue 13: rows, per-row temperature, return_sum_p2, long rows ---------------------
# Tolerances: as above (fp32 atol 5e-5 + rtol 1e-5; bf16 / fp16 the same plus 2 u max|z| of slack, in
# the Cut Cross-Entropy rule). sum p^2 in [0, 1] moves by at most 2 max p |dz| <= 2 |dz| for an error
# dz in the logits, so it gets twice the log-prob slack. Gradients as in test_backward_matches_reference.


def _temperatures(kind, lead, dtype=torch.float32):
    """A scalar, one temperature per token, or one per sequence ([B, 1]), all in [0.5, 1.5]."""
    if kind == "scalar":
        return 0.8
    shape = lead if kind == "token" else (*lead[:-1], 1)
    return (torch.rand(shape) + 0.5).to(dtype)


def _options_oracle(hidden, weight, labels, bias, temperature, rows, **kw):
    """(float64 oracle, the same maths in the input dtype) of reference.linear_logprobs_options."""
    up = lambda t: None if t is None else t.double()  # noqa: E731
    oracle = reference.linear_logprobs_options(up(hidden), up(weight), labels, bias=up(bias),
                                               temperature=temperature, rows=rows, **kw)
    same = reference.linear_logprobs_options(hidden, weight, labels, bias=bias, temperature=temperature,
                                             rows=rows, **kw)
    return oracle, same


def _some_rows(lead, fraction=0.4, kind="index"):
    n = math.prod(lead)
    keep = torch.rand(n) < fraction
    keep[0] = n > 0 and not keep[0] if n > 1 else keep[0]  # vary the first row too
    if kind == "mask":
        return keep.view(lead)
    return keep.nonzero().squeeze(1)[torch.randperm(int(keep.sum()))]  # any order


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead, vocab", [((3, 5), 100), ((1,), 7), ((2, 9), 1), ((4, 33), 600)])
@pytest.mark.parametrize("temp_kind", ["scalar", "token", "sequence"])
@pytest.mark.parametrize("rows_kind", [None, "index", "mask"])
def test_options_match_oracle(backend, dtype, lead, vocab, temp_kind, rows_kind):
    hidden, weight, b, labels = _make(lead, 24, vocab, dtype, bias=True)
    temperature = _temperatures(temp_kind, lead)
    rows = None if rows_kind is None else _some_rows(lead, kind=rows_kind)
    logp, ent, p2 = linear_logprobs(hidden, weight, labels, bias=b, temperature=temperature, rows=rows,
                                    return_entropy=True, return_sum_p2=True, chunk_size=64)
    oracle, same = _options_oracle(hidden, weight, labels, b, temperature, rows, return_entropy=True,
                                   return_sum_p2=True)
    t_min = temperature if isinstance(temperature, float) else temperature.min().item()
    atol = _fwd_atol(dtype, hidden, weight, b, t_min)
    for name, got, o, s, tol in zip(("logprobs", "entropy", "sum_p2"), (logp, ent, p2), oracle, same,
                                    (atol, atol, 2 * atol)):
        assert got.dtype == torch.float32 and got.shape == labels.shape, name
        assert_close_to_oracle(got, o, s, atol=tol, rtol=1e-5, what=name)
    if rows is not None:  # skipped tokens hold exactly 0 in every output
        skipped = torch.ones(labels.numel(), dtype=torch.bool)
        skipped[rows.reshape(-1).nonzero().squeeze(1) if rows.dtype == torch.bool else rows] = False
        for got in (logp, ent, p2):
            assert torch.equal(got.reshape(-1)[skipped], torch.zeros(int(skipped.sum())))
    # Each output alone is the same numbers (the options do not change the sweep's arithmetic).
    alone = linear_logprobs(hidden, weight, labels, bias=b, temperature=temperature, rows=rows, chunk_size=64)
    assert torch.equal(alone, logp)
    lp2, p2_alone = linear_logprobs(hidden, weight, labels, bias=b, temperature=temperature, rows=rows,
                                    return_sum_p2=True, chunk_size=64)
    assert torch.equal(lp2, logp) and torch.equal(p2_alone, p2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temp_kind, rows_kind",
                         [("token", None), ("sequence", "index"), ("scalar", "index")])
def test_options_backward_matches_oracle(backend, dtype, temp_kind, rows_kind, monkeypatch):
    """Gradients with a per-row temperature and with rows: against float64 autograd through the
    reference; the skipped tokens' hidden states get an exactly-0 gradient."""
    monkeypatch.setattr(lm_tiles, "_MAX_TOKEN_TILE", 4)
    lead = (2, 7)
    hidden, weight, bias, labels = _make(lead, 24, 75, dtype, bias=True)
    temperature = _temperatures(temp_kind, lead)
    rows = None if rows_kind is None else _some_rows(lead, 0.5)
    seeds = (torch.randn(lead), torch.randn(lead))

    def run(impl, cast):
        return _grads(lambda h, w, b_: impl(cast(h), cast(w), labels, bias=cast(b_), temperature=temperature,
                                            rows=rows, return_entropy=True),
                      hidden, weight, bias, "both", seeds)

    ours = _grads(lambda h, w, b_: linear_logprobs(h, w, labels, bias=b_, temperature=temperature, rows=rows,
                                                   return_entropy=True, chunk_size=32),
                  hidden, weight, bias, "both", seeds)
    oracle = run(reference.linear_logprobs_options, lambda t: t.double())
    same = run(reference.linear_logprobs_options, lambda t: t)
    for name, a, o, s, src in zip(("hidden", "weight", "bias"), ours, oracle, same, (hidden, weight, bias)):
        assert a.dtype == src.dtype, f"d {name} must come back in {name}'s dtype"
        scale = o.abs().max().item()
        atol = 1e-5 * (1 + scale) if dtype == torch.float32 else 8 * UNIT_ROUNDOFF[dtype] * scale
        assert_close_to_oracle(a, o, s, atol=atol, what=f"d {name}")
    if rows is not None:
        skipped = torch.ones(labels.numel(), dtype=torch.bool)
        skipped[rows] = False
        gh = ours[0].reshape(-1, hidden.shape[-1])
        assert torch.equal(gh[skipped], torch.zeros_like(gh[skipped]))


def test_gradcheck_options_reference_and_kernels():
    """float64 gradcheck of the reference with a per-row temperature and rows; fp32 kernels with the
    loose fast-mode tolerances of test_gradcheck_kernels_fp32."""
    lead = (2, 3)
    temperature = _temperatures("token", lead)
    rows = torch.tensor([4, 0, 3])
    hidden, weight, bias, labels = _make(lead, 6, 9, torch.float64, bias=True)
    args = [t.requires_grad_(True) for t in (hidden, weight, bias)]
    assert torch.autograd.gradcheck(lambda h, w, b: reference.linear_logprobs_options(
        h, w, labels, bias=b, temperature=temperature, rows=rows, return_entropy=True), args)
    for backend_name in KERNEL_BACKENDS:
        args32 = [t.detach().float().requires_grad_(True) for t in (hidden, weight, bias)]

        def fn(h, w, b, backend_name=backend_name):
            with rlkern.use_backend(backend_name):
                return linear_logprobs(h, w, labels, bias=b, temperature=temperature, rows=rows,
                                       return_entropy=True, chunk_size=4)

        assert torch.autograd.gradcheck(fn, args32, eps=1e-2, atol=1e-2, rtol=1e-2, fast_mode=True)


def test_rows_cost_only_the_selected_rows(backend, monkeypatch):
    """The skipped tokens never reach a kernel: the kernels (and the torch backend's GEMM) see
    len(rows) rows, forward and backward (the cost is the selected fraction; measured in the report:
    benchmarks, 25% of the rows)."""
    from rlkern.ops import lm_head

    seen = []
    for name in ("shard_stats", "shard_grads"):
        real = getattr(lm_head, name)
        monkeypatch.setattr(lm_head, name, lambda *a, _real=real, _n=name, **k: seen.append(
            (_n, a[0 if _n == "shard_stats" else 2].shape[0])) or _real(*a, **k))
    real_ref = reference.linear_logprobs_options
    monkeypatch.setattr(reference, "linear_logprobs_options", lambda h, *a, **k: seen.append(
        ("reference", h.shape[0])) or real_ref(h, *a, **k))
    hidden, weight, _, labels = _make((4, 25), 16, 50, torch.float32)
    rows = torch.arange(3, 100, 4)  # 25 of 100 tokens
    h = hidden.clone().requires_grad_(True)
    logp, ent = linear_logprobs(h, weight, labels, rows=rows, return_entropy=True)
    (logp.sum() + ent.sum()).backward()
    assert seen and all(n == 25 for _, n in seen), seen
    assert {s[0] for s in seen} == ({"reference"} if backend == "torch" else {"shard_stats", "shard_grads"})


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"rows": torch.tensor([0, 3])}, ValueError, r"rows must index the 3 tokens"),
        ({"rows": torch.tensor([-1])}, ValueError, r"rows must index"),
        ({"rows": torch.tensor([1, 1])}, ValueError, "must not repeat"),
        ({"rows": torch.tensor([0.0])}, TypeError, "rows must be a 1-d int32 / int64"),
        ({"rows": torch.zeros(2, dtype=torch.bool)}, ValueError, "bool rows mask"),
        ({"rows": [0, 1]}, TypeError, "rows must be None or a tensor"),
        ({"temperature": torch.tensor([1.0, 0.0, 1.0])}, ValueError, r"entry \(1,\) is 0.0"),
        ({"temperature": torch.tensor([1.0, float("nan"), 1.0])}, ValueError, "temperature must be finite"),
        ({"temperature": torch.ones(2)}, ValueError, "must broadcast to the tokens' shape"),
        ({"temperature": torch.ones(3, dtype=torch.int64)}, TypeError, "floating point"),
    ],
)
def test_options_bad_values(kwargs, error, match):
    hidden, weight, _, labels = _make((3,), 8, 20, torch.float32)
    with pytest.raises(error, match=match):
        linear_logprobs(hidden, weight, labels, **kwargs)
    if "temperature" in kwargs:  # linear_policy_loss checks a temperature tensor the same way
        with pytest.raises(error, match=match):
            rlkern.ops.linear_policy_loss(hidden, weight, labels.clamp(min=0), torch.zeros(3),
                                          torch.zeros(()), torch.ones(3), **kwargs)


def test_options_on_a_one_rank_process_group(tmp_path):
    """process_group takes every option (tests/test_vocab_parallel.py runs 2 ranks): with one rank the
    vocabulary-parallel head gives the single-device results."""
    import torch.distributed as dist

    hidden, weight, _, labels = _make((2, 3), 8, 20, torch.float32, ignore=0.0)
    temps = torch.rand(2, 1) + 0.5
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        for kw in ({"temperature": temps, "return_sum_p2": True, "return_entropy": True},
                   {"rows": torch.tensor([5, 1]), "temperature": temps, "return_sum_p2": True}):
            got = linear_logprobs(hidden, weight, labels, process_group=dist.group.WORLD, **kw)
            want = linear_logprobs(hidden, weight, labels, **kw)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    finally:
        dist.destroy_process_group()


def test_sum_p2_is_not_differentiable(backend):
    hidden, weight, _, labels = _make((5,), 8, 20, torch.float32)
    h = hidden.clone().requires_grad_(True)
    logp, p2 = linear_logprobs(h, weight, labels, return_sum_p2=True)
    assert logp.requires_grad and not p2.requires_grad
    # Dead rows (every logit -inf) get sum p^2 = 0, NaN logits NaN, on every backend.
    bias = torch.zeros(20)
    bias[:] = -math.inf
    _, p2_dead = linear_logprobs(hidden, weight, labels.clamp(min=0), bias=bias, return_sum_p2=True)
    assert torch.equal(p2_dead, torch.zeros(5))
    bad = hidden.clone()
    bad[2, 0] = math.nan
    _, p2_nan = linear_logprobs(bad, weight, labels, return_sum_p2=True)
    assert p2_nan[2].isnan() and not p2_nan[[0, 1, 3, 4]].isnan().any()


@pytest.mark.parametrize("case", ["plain", "bias-temperature-scale", "bf16-head"])
def test_trl_log_sum_sq_probs_fused_matches_trl(case):
    """TRL 1.16's fused-head output log_sum_sq_probs (log sum p^2, DPO's use_weighting) no longer
    falls back: rlkern's stand-in against TRL's real ChunkedLogProbFunction (its CPU path), with
    every output requested, values and gradients."""
    from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction as trl_head

    from rlkern.compat import _trl_fused

    stand_in = _trl_fused.wrap_chunked_logprob(trl_head)
    n, h, v = 13, 8, 37
    hidden, weight = torch.randn(n, h), torch.randn(v, h) * 0.5
    bias, temperature, scale = None, 1.0, 1.0
    if case == "bias-temperature-scale":
        bias, temperature, scale = torch.randn(v), 0.7, 2.5
    if case == "bf16-head":
        weight = weight.bfloat16()
    targets = torch.randint(0, v, (n,))
    grads = torch.randn(2, n)
    results = []
    before = dict(_trl_fused.calls)
    for head in (trl_head, stand_in):
        hh, ww = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp, ent, lsq, _, _ = head.apply(hh, ww, bias, targets, temperature, 32768, None, scale,
                                        OPTIONAL_OUTPUTS)
        (lp * grads[0] + ent * grads[1]).sum().backward()
        results.append((lp, ent, lsq, hh.grad, ww.grad))
    assert _trl_fused.calls["linear_logprobs"] == before.get("linear_logprobs", 0) + 1
    assert not any(k.startswith("fallback") and _trl_fused.calls[k] != before.get(k, 0)
                   for k in _trl_fused.calls)
    want, got = results
    assert not got[2].requires_grad and got[2].shape == (n,)
    for w, x, what in zip(want, got, ("log_probs", "entropy", "log_sum_sq_probs", "d hidden", "d weight")):
        torch.testing.assert_close(x.float(), w.float(), rtol=1e-5, atol=1e-4, msg=what)


# Long rows: N >= 65,536 tokens (Liger's Triton GRPO kernel put the sequence on grid dim 1 and failed
# there, Liger-Kernel #1294) and N * V > 2^31 (a flat [N, V] offset in int32 would wrap).
_LONG_N = 65_600


def _long_inputs(vocab, hidden_size=8):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, _LONG_N, hidden_size, generator=g)
    weight = torch.randn(vocab, hidden_size, generator=g) / math.sqrt(hidden_size) * 3
    labels = torch.randint(0, vocab, (1, _LONG_N), generator=g)
    labels[0, -64:] = vocab - 1  # the last ids in the last rows: the largest offsets of all
    return hidden, weight, labels


def _check_long(hidden, weight, labels, check_rows, **kw):
    """Forward and backward on all N tokens; checked against the float64 oracle on check_rows."""
    h = hidden.clone().requires_grad_(True)
    logp, ent = linear_logprobs(h, weight, labels, return_entropy=True, **kw)
    g = torch.zeros_like(logp)
    g[0, check_rows] = 1.0
    (logp * g).sum().backward()
    sub = (hidden[:, check_rows].double(), weight.double(), labels[:, check_rows])
    ref_lp, ref_h = reference.linear_logprobs(*sub, return_entropy=True)
    torch.testing.assert_close(logp[:, check_rows].double(), ref_lp, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(ent[:, check_rows].double(), ref_h, atol=5e-5, rtol=1e-5)
    hs = sub[0].clone().requires_grad_(True)
    reference.linear_logprobs(hs, *sub[1:]).sum().backward()
    torch.testing.assert_close(h.grad[:, check_rows].double(), hs.grad, atol=1e-5, rtol=1e-4)
    others = torch.ones(_LONG_N, dtype=torch.bool)
    others[check_rows] = False
    assert torch.equal(h.grad[0, others], torch.zeros_like(h.grad[0, others]))


@pytest.mark.slow  # ~50 s (cpp, N * V > 2^31) and ~100 s (Triton interpreter, 65,600 tokens)
def test_long_rows_cpp_n_times_v_past_2_31():
    """One sequence of 65,600 tokens x V = 32,769 (N * V = 2.15e9 > 2^31) on the C++ backend: every
    index there is int64 (the fold, the GEMM's row offsets, the per-tile state [tiles, N])."""
    assert "cpp" in KERNEL_BACKENDS, "the C++ extension is built by `make build`; rlkern._C failed to import"
    vocab = 32_769
    assert _LONG_N * vocab > 2**31
    hidden, weight, labels = _long_inputs(vocab)
    check_rows = torch.tensor([0, 1, 65_535, 65_536, _LONG_N - 1])
    with rlkern.use_backend("cpp"):
        _check_long(hidden, weight, labels, check_rows)


@pytest.mark.slow  # ~50 s (cpp, N * V > 2^31) and ~100 s (Triton interpreter, 65,600 tokens)
@pytest.mark.parametrize("backend_name", ALL_BACKENDS)
def test_long_rows_every_backend(backend_name):
    """65,600 tokens in one row on every backend (Triton through the interpreter: a small vocabulary
    so that it runs in seconds; its kernels never form an [N, V] offset, see
    test_triton_grid_and_offsets_for_long_rows)."""
    hidden, weight, labels = _long_inputs(7 if backend_name == "triton" else 300, 16)
    check_rows = torch.tensor([0, 65_535, 65_536, _LONG_N - 1])
    with rlkern.use_backend(backend_name):
        _check_long(hidden, weight, labels, check_rows)


def test_triton_grid_and_offsets_for_long_rows(monkeypatch):
    """The Triton launches at N = 2^20 tokens x V = 262,144 (N * V = 2^38, N * H = 2^32): the grids
    stay within CUDA's limits (token blocks on dim 0, which allows 2^31 - 1; vocabulary tiles on
    dim 1, 4,096 of the 65,535 allowed), and the kernels' pointer offsets are int64 wherever a row
    index is multiplied (checked in the source: no [N, V] offset exists, the logits stay in
    registers)."""
    pytest.importorskip("triton")
    import inspect

    from rlkern.kernels import lm_head as llp

    grids = {}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            grids[self.name] = grid
            return lambda *a, **k: None

    monkeypatch.setattr(llp, "_linear_logprobs_fwd_kernel", Recorder("fwd"))
    monkeypatch.setattr(llp, "_linear_logprobs_bwd_kernel", Recorder("bwd"))
    n, v, hs = 2**20, 262_144, 4096
    meta = lambda *shape, dtype=torch.float32: torch.empty(shape, dtype=dtype, device="meta")  # noqa: E731
    hidden, weight, labels = meta(n, hs, dtype=torch.bfloat16), meta(v, hs, dtype=torch.bfloat16), meta(
        n, dtype=torch.int64)
    llp.linear_logprobs_fwd(hidden, weight, None, labels, 1.0, -100, 0, True, 1, 1, "ieee", meta(n), meta(n),
                            meta(n), meta(n), meta(n))
    llp.linear_logprobs_bwd(meta(n), None, hidden, weight, None, labels, meta(n), None, 1.0, -100, 0, 1, 1,
                            "ieee", meta(n, hs), meta(v, hs, dtype=torch.bfloat16), None, meta(n))
    assert grids["fwd"] == (n // 64,) and grids["bwd"] == (n // 64, v // 64)
    assert grids["bwd"][1] <= llp.GRID_DIM12_MAX
    with pytest.raises(ValueError, match="grid"):
        llp.bwd_grid(1, 64 * 65_536, {"BLOCK_N": 64, "BLOCK_V": 64})
    src = inspect.getsource(llp)
    # Row offsets: the token index is int64 from the program id on; weight rows are cast before the multiply.
    assert src.count("tl.program_id(0).to(tl.int64) * BLOCK_N") == 2
    assert src.count("(v0 + cols).to(tl.int64)[:, None] * hidden_size") == 2


def test_torch_compile_fullgraph_with_options():
    """rows (int indices), a per-token temperature tensor and return_sum_p2 trace without graph
    breaks (the host-side checks are skipped while compiling) and give the eager results."""
    hidden, weight, bias, labels = _make((2, 7), 16, 50, torch.float32, bias=True)
    temperature = _temperatures("token", (2, 7))
    rows = torch.tensor([1, 4, 8, 13])

    def step(h, w):
        lp, ent, p2 = linear_logprobs(h, w, labels, bias=bias, temperature=temperature, rows=rows,
                                      return_entropy=True, return_sum_p2=True)
        return (lp * 2).sum() + ent.mean(), p2

    compiled = torch.compile(step, fullgraph=True)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with rlkern.use_backend("cpp"):
        (out_c, p2_c), (out_e, p2_e) = compiled(h1, w1), step(h2, w2)
    out_c.backward()
    out_e.backward()
    for a, b in ((out_c, out_e), (p2_c, p2_e), (h1.grad, h2.grad), (w1.grad, w2.grad)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("lead", [(0,), (2, 3)])
def test_options_with_no_rows_selected(backend, lead):
    """No token selected (or none at all): zeros of the full shape, zero gradients, nothing NaN."""
    hidden, weight, _, labels = _make(lead, 8, 11, torch.float32)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    outs = linear_logprobs(h, w, labels, rows=torch.zeros(0, dtype=torch.long), return_entropy=True,
                           temperature=torch.full(lead, 0.7), return_sum_p2=True)
    (outs[0].sum() + outs[1].sum()).backward()
    for o in outs:
        assert torch.equal(o, torch.zeros(lead))
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))
