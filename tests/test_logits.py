"""rlkern.ops.logprobs / entropy / logprobs_and_entropy against the float64 oracle, every backend.

Tolerances: the kernels compute in fp32 whatever the input dtype (bf16/fp16 logits are exact in
fp32), so the comparison baseline is the reference run on the same logits upcast to fp32 (stricter
than "torch in the input dtype"). On top of its error we allow atol = 2e-5 + 2e-6 * log(V) nats:
the kernel's sum-exp is accumulated in a different order than torch's (blocked, 16 lanes) and its
exp polynomial is within ~2 ulp, so lse may differ by a few ulp of its magnitude (|lse| <~ 30).
"""

from __future__ import annotations

import math

import pytest
import torch

import rlkern
from rlkern import reference
from rlkern.backend import BackendUnavailable
from rlkern.ops._registry import cpp_kernels
from tests.conftest import ALL_BACKENDS, DTYPES, KERNEL_BACKENDS, assert_close_to_oracle

ops = rlkern.ops


def _tol(vocab: int) -> float:
    return 2e-5 + 2e-6 * math.log(vocab + 1)


def _make(shape, vocab, dtype, *, scale=3.0, banned=0.0, ignore=0.1):
    logits = (torch.randn(*shape, vocab) * scale).to(dtype)
    if banned:
        logits = logits.masked_fill(torch.rand(*shape, vocab) < banned, float("-inf"))
    labels = torch.randint(0, vocab, shape)
    labels = labels.masked_fill(torch.rand(shape) < ignore, -100)
    return logits, labels


def _check_forward(logits, labels, temperature=1.0):
    logp, ent = ops.logprobs_and_entropy(logits, labels, temperature=temperature)
    ref_lp, ref_h = reference.logprobs_and_entropy(logits.double(), labels, temperature=temperature)
    f32_lp, f32_h = reference.logprobs_and_entropy(logits.float(), labels, temperature=temperature)
    tol = _tol(logits.shape[-1])
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    assert_close_to_oracle(logp, ref_lp, f32_lp, atol=tol, what="logprobs")
    assert_close_to_oracle(ent, ref_h, f32_h, atol=tol, what="entropy")
    # The single-output entry points give the same numbers as the fused one.
    assert torch.equal(ops.logprobs(logits, labels, temperature=temperature), logp)
    assert torch.equal(ops.entropy(logits, temperature=temperature), ent)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 7, 33, 4097])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_matches_oracle(backend, dtype, vocab, temperature):
    logits, labels = _make((3, 5), vocab, dtype)
    _check_forward(logits, labels, temperature)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen_vocab(kernel_backend, dtype):
    logits, labels = _make((2,), 151936, dtype, scale=4.0)
    _check_forward(logits, labels, 0.9)


@pytest.mark.parametrize("shape", [(1,), (), (0,), (4, 0), (1, 1, 1)])
def test_odd_leading_shapes(backend, shape):
    logits, labels = _make(shape, 19, torch.float32)
    logp, ent = ops.logprobs_and_entropy(logits, labels)
    assert logp.shape == shape and ent.shape == shape
    _check_forward(logits, labels)


def test_strided_leading_dims_are_not_copied_and_correct(backend):
    base, labels = _make((3, 6), 50, torch.float32)
    shifted = base[:, :-1]  # the usual logits[:, :-1] of a causal LM: not contiguous
    _check_forward(shifted, labels[:, 1:])
    _check_forward(base.transpose(0, 1), labels.t())  # leading dims in the "wrong" order
    _check_forward(base[::2, ::3], labels[::2, ::3])


def test_non_contiguous_last_dim(backend):
    logits = torch.randn(4, 30, 3)[..., 1].transpose(0, 1)  # last-dim stride 3: copied, still right
    labels = torch.randint(0, 4, (30,))
    _check_forward(logits, labels)


def test_banned_tokens(backend):
    logits, labels = _make((4, 7), 300, torch.float32, banned=0.5, ignore=0.0)
    logits[0, 0] = float("-inf")  # a fully banned row: log-prob -inf, entropy 0
    labels[1, 1] = int(logits[1, 1].isinf().nonzero()[0])  # a label on a banned token: -inf
    allowed = torch.isfinite(logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1))
    logp, ent = ops.logprobs_and_entropy(logits, labels)
    assert torch.isfinite(logp[allowed]).all() and torch.isfinite(ent).all()
    assert logp[0, 0] == float("-inf") and ent[0, 0] == 0 and logp[1, 1] == float("-inf")
    _check_forward(logits, labels)


def test_ignore_index(backend):
    logits, labels = _make((2, 9), 40, torch.float32, ignore=0.5)
    labels[0, 0] = -100
    logp = ops.logprobs(logits, labels)
    assert (logp[labels == -100] == 0).all()
    other = labels.masked_fill(labels == -100, 7)
    custom = ops.logprobs(logits, other.masked_fill(labels == -100, 3), ignore_index=3)
    assert (custom[other.masked_fill(labels == -100, 3) == 3] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["logprobs", "entropy", "both"])
@pytest.mark.parametrize("row_t", [False, True], ids=["scalar_t", "row_t"])
def test_backward_matches_reference(backend, dtype, which, row_t):
    logits, labels = _make((3, 6), 333, dtype, banned=0.1)
    w_lp, w_h = torch.randn(3, 6), torch.randn(3, 6)
    temp = _row_temps((3, 6)) if row_t else 0.8  # per-row: float32, read as such by every backend

    def loss(fn_lp, fn_h, x):
        total = 0.0
        if which in ("logprobs", "both"):
            total = total + (fn_lp(x, labels, temperature=temp) * w_lp).sum()
        if which in ("entropy", "both"):
            total = total + (fn_h(x, temperature=temp) * w_h).sum()
        return total

    x = logits.clone().requires_grad_()
    if which == "both":
        out = ops.logprobs_and_entropy(x, labels, temperature=temp, return_sum_p2=row_t)
        total = (out[0] * w_lp).sum() + (out[1] * w_h).sum()
        (total + out[2].sum() if row_t else total).backward()  # sum p^2: a constant to autograd
    else:
        loss(ops.logprobs, ops.entropy, x).backward()
    ref_x = logits.double().requires_grad_()
    loss(reference.logprobs, reference.entropy, ref_x).backward()
    # Baseline: plain torch on the same-dtype logits (the reference upcasts to fp32 inside and its
    # gradient is rounded back to the logits' dtype, once per output it flows through).
    same_x = logits.clone().requires_grad_()
    loss(reference.logprobs, reference.entropy, same_x).backward()
    assert x.grad.dtype == dtype and x.grad.shape == logits.shape
    # Storing the fp32 gradient as bf16/fp16 costs up to one ulp of that dtype on top (half an ulp
    # with round-to-nearest; the Triton interpreter's float -> bf16 conversion truncates).
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    # The saved fp32 entropy's error (~1e-6 nats at most here) enters a whole row's d logits times
    # h / T (at the argmax p ~ 1): per-row temperatures down to 0.3 scale it past the scalar case's 1e-6.
    atol = 2e-6 * w_h.abs().max().item() / temp.min().item() if row_t else 1e-6
    assert_close_to_oracle(x.grad, ref_x.grad, same_x.grad, atol=atol, rtol=rtol, what="d logits")
    # Banned tokens get no gradient (the label's own logit gets g * (1 - p) = g even when banned).
    not_label = torch.ones_like(logits, dtype=torch.bool).scatter(-1, labels.clamp(min=0).unsqueeze(-1),
                                                                  False)
    assert (x.grad[logits.isinf() & not_label] == 0).all()


def test_inplace_backward(kernel_backend):
    logits, labels = _make((2, 5), 100, torch.float32)
    w = torch.randn(2, 5)
    expected_x = logits.clone().requires_grad_()
    lp, h = ops.logprobs_and_entropy(expected_x, labels)
    ((lp * w).sum() + h.sum()).backward()

    leaf = logits.clone().requires_grad_()
    y = leaf * 1.0  # a non-leaf activation whose storage the backward may overwrite
    lp, h = ops.logprobs_and_entropy(y, labels, inplace_backward=True)
    storage = y.data_ptr()
    ((lp * w).sum() + h.sum()).backward()
    assert torch.equal(leaf.grad, expected_x.grad)
    assert torch.equal(y.detach(), expected_x.grad) and y.data_ptr() == storage  # written in place


def test_gradcheck_reference():
    logits = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 6, (2, 3))
    labels[0, 0] = -100

    def fn(x):
        lp, h = reference.logprobs_and_entropy(x, labels, temperature=0.7)
        return lp, h

    assert torch.autograd.gradcheck(fn, (logits,))


def test_gradcheck_cpp():
    # The C++ kernel computes in fp32, so finite differences need a large step and loose bounds;
    # a wrong formula (sign, missing 1/T, missing entropy term) is off by O(1), far above them.
    logits = torch.randn(2, 3, 6, dtype=torch.float32, requires_grad=True)
    labels = torch.randint(0, 6, (2, 3))
    labels[0, 0] = -100
    with rlkern.use_backend("cpp"):
        assert torch.autograd.gradcheck(lambda x: ops.logprobs_and_entropy(x, labels, temperature=0.7),
                                        (logits,), eps=1e-2, atol=2e-3, rtol=2e-2, fast_mode=False,
                                        nondet_tol=0.0)


def test_batch_invariance(kernel_backend):
    """A row's outputs are the same bits alone or among 1000 rows (and under any row position)."""
    vocab = 3001 if kernel_backend == "cpp" else 257
    rows = 1000 if kernel_backend == "cpp" else 64
    logits, labels = _make((rows,), vocab, torch.bfloat16, ignore=0.0)
    lp_all, h_all = ops.logprobs_and_entropy(logits, labels)
    for r in (0, 17, rows - 1):
        lp_one, h_one = ops.logprobs_and_entropy(logits[r : r + 1].clone(), labels[r : r + 1])
        assert torch.equal(lp_one, lp_all[r : r + 1]) and torch.equal(h_one, h_all[r : r + 1])
    torch.set_num_threads(1)
    try:
        lp_serial, _ = ops.logprobs_and_entropy(logits, labels)
    finally:
        torch.set_num_threads(2)
    assert torch.equal(lp_serial, lp_all)


@pytest.mark.parametrize(
    "make_args, error, match",
    [
        (lambda: (torch.randn(3, 5), torch.randint(0, 5, (4,))), ValueError,
         r"labels must have shape \(3,\)"),
        (lambda: (torch.randn(3, 5), torch.rand(3)), TypeError, "labels must be an integer tensor"),
        (lambda: (torch.randn(3, 5), torch.tensor([0, 5, 1])), IndexError, r"labels must lie in \[0, 5\)"),
        (lambda: (torch.randn(3, 5), torch.tensor([0, -1, 1])), IndexError, r"labels must lie in \[0, 5\)"),
        (lambda: (torch.randn(3, 0), torch.zeros(3, dtype=torch.long)), ValueError, "V >= 1"),
        (lambda: (torch.tensor(1.0), torch.tensor(0)), ValueError, "V >= 1"),
        (lambda: (torch.randint(0, 5, (3, 5)), torch.zeros(3, dtype=torch.long)), TypeError,
         "logits must be float"),
        (lambda: ([[0.1, 0.2]], torch.zeros(1, dtype=torch.long)), TypeError,
         "logits must be a torch.Tensor"),
    ],
)
def test_bad_input(backend, make_args, error, match):
    logits, labels = make_args()
    with pytest.raises(error, match=match):
        ops.logprobs(logits, labels)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        ops.entropy(torch.randn(2, 3), temperature=temperature)


def test_cpp_kernel_checks_labels_itself():
    """Called directly (bypassing the Python checks) the C++ kernel still refuses a bad label."""
    rows = torch.randn(1, 2, 5)
    with pytest.raises(IndexError, match="labels must lie in"):
        cpp_kernels().logprobs_fwd(rows, torch.tensor([1, 9]), 1.0, None, -100, torch.empty(2),
                                   torch.empty(2), None, None)


@pytest.mark.parametrize("temperature", [1e-45, 0.0, -1.0, 1e39])
def test_cpp_kernel_checks_temperature_itself(temperature):
    """Called directly, the C++ kernel refuses a temperature that is not a positive float32 with a
    finite reciprocal (it divides by float32(T) and multiplies by float32(1/T))."""
    out = [torch.empty(2), torch.empty(2), None, None]
    with pytest.raises(RuntimeError, match="temperature must be a positive float32"):
        cpp_kernels().logprobs_fwd(torch.randn(1, 2, 5), torch.tensor([1, 2]), temperature, None, -100, *out)
    # A per-row temperature too, naming the first bad row (a ValueError: it is the caller's data).
    temps = torch.tensor([0.5, temperature], dtype=torch.float32)
    with pytest.raises(ValueError, match="temperature must be a positive float32 .* at flat position 1"):
        cpp_kernels().logprobs_fwd(torch.randn(1, 2, 5), torch.tensor([1, 2]), 1.0, temps, -100, *out)


def test_backend_selection(monkeypatch):
    logits, labels = _make((2,), 9, torch.float32)
    monkeypatch.setenv("RLKERN_BACKEND", "torch")
    torch_lp = ops.logprobs(logits, labels)
    monkeypatch.setenv("RLKERN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="RLKERN_BACKEND must be one of"):
        ops.logprobs(logits, labels)
    monkeypatch.delenv("RLKERN_BACKEND")
    with pytest.raises(ValueError, match="backend must be one of"):
        with rlkern.use_backend("cuda"):
            pass
    with rlkern.use_backend("cpp"):
        with pytest.raises(BackendUnavailable, match="float64 inputs run on the torch backend only"):
            ops.logprobs(logits.double(), labels)
    torch.testing.assert_close(ops.logprobs(logits, labels), torch_lp, atol=1e-5, rtol=0)
    # float64 under `auto` runs the reference and keeps float64.
    assert ops.logprobs(logits.double(), labels).dtype == torch.float64


def test_triton_unavailable_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the triton backend runs CUDA tensors")
    with rlkern.use_backend("triton"):
        with pytest.raises(BackendUnavailable, match="needs CUDA tensors"):
            ops.logprobs(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("has_labels, want_entropy, want_p2, row_t",
                         [(True, True, False, False), (True, False, False, False),
                          (False, True, False, False), (True, True, True, True), (False, False, True, False),
                          (True, False, False, True)])
def test_opcheck(backend_name, has_labels, want_entropy, want_p2, row_t):
    logits, labels = _make((3,), 37, torch.float32, ignore=0.3)
    labels = labels if has_labels else None
    temps = torch.rand(3) + 0.5 if row_t else None
    x = logits.requires_grad_()
    args_fwd = (x, labels, 0.9, temps, -100, want_entropy, want_p2, False, backend_name)
    torch.library.opcheck(torch.ops.rlkern.logprobs_fwd.default, args_fwd)
    lp, lse, ent, p2 = torch.ops.rlkern.logprobs_fwd(*args_fwd)
    assert p2.shape == ((3,) if want_p2 else (0,)) and not p2.requires_grad
    # An absent upstream gradient (and an absent label / entropy) is None in every layer.
    args_bwd = (torch.randn(3) if has_labels else None, torch.randn(3) if want_entropy else None,
                logits.detach(), labels, lse.detach(), ent.detach() if want_entropy else None, 0.9, temps,
                -100, backend_name)
    torch.library.opcheck(torch.ops.rlkern.logprobs_bwd.default, args_bwd)
    torch.library.opcheck(torch.ops.rlkern.logprobs_bwd_.default, args_bwd[:2] + (logits.detach().clone(),)
                          + args_bwd[3:])


def test_eager_calls_skip_the_registered_op(monkeypatch):
    """Outside torch.compile the public ops run the kernels directly (rlkern/ops/_registry.py):
    the torch.library op, ~100 us of dispatcher per call, is only for tracing."""
    from rlkern.ops import logits as module

    def refuse(*args, **kwargs):
        raise AssertionError("eager call went through the registered op")

    for op in (module._logprobs_fwd, module._logprobs_bwd, module._logprobs_bwd_inplace):
        monkeypatch.setattr(op, "op", refuse)
    logits, labels = _make((2, 3), 50, torch.float32)
    for inplace in (False, True):
        x = logits.clone().requires_grad_()
        lp, h = ops.logprobs_and_entropy(x * 1.0, labels, inplace_backward=inplace)
        (lp.sum() + h.sum()).backward()
        assert torch.isfinite(x.grad).all()
    ops.entropy(logits)


def test_first_call_imports_neither_triton_nor_sympy():
    """A fresh process: the first call of logprobs (and its backward) on CPU tensors imports neither
    triton, sympy nor dynamo, which the torch.library dispatcher's first call would (1.2 s). The
    time is printed, not asserted (the machine is shared); it was ~1 ms against a 0.3 s budget."""
    import subprocess
    import sys

    code = (
        "import sys, time, torch, rlkern\n"
        "x = torch.randn(4, 1000); y = torch.randint(0, 1000, (4,))\n"
        "start = time.perf_counter()\n"
        "rlkern.ops.logprobs(x, y)\n"
        "first = time.perf_counter() - start\n"
        "xg = x.clone().requires_grad_()\n"
        "lp, h = rlkern.ops.logprobs_and_entropy(xg, y)\n"
        "(lp.sum() + h.sum()).backward()\n"
        "print(f'first call {first:.4f} s')\n"
        "print(sorted(m for m in ('triton', 'sympy', 'torch._dynamo') if m in sys.modules))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["RLKERN_BACKEND"] = "auto"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    lines = out.stdout.strip().splitlines()
    print(lines[0])
    assert lines[-1] == "[]", f"the first call imported {lines[-1]}"


def test_torch_compile_fullgraph():
    logits, labels = _make((2, 5), 64, torch.float32)

    def step(x, y):
        lp, h = ops.logprobs_and_entropy(x, y, temperature=0.7)
        return (lp * 2).sum() + h.mean()

    compiled = torch.compile(step, fullgraph=True)  # inductor: the custom ops stay opaque calls
    x1 = logits.clone().requires_grad_()
    x2 = logits.clone().requires_grad_()
    out_c = compiled(x1, labels)
    out_e = step(x2, labels)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("backend_name", ALL_BACKENDS)
def test_all_backends_agree_bitwise_on_ignored_rows(backend_name):
    logits, labels = _make((4,), 11, torch.float32, ignore=1.0)
    with rlkern.use_backend(backend_name):
        assert torch.equal(ops.logprobs(logits, labels), torch.zeros(4))


# ---------------------------------------------------------------------------------------------
# Per-row temperature and sum p^2 (issue 13, log-prob ops)
# ---------------------------------------------------------------------------------------------
# Tolerances as above (_tol: a few fp32 ulp of lse); sum p^2 lies in [1/V, 1] and is Q / S^2 of two
# fp32 sums: relative 1e-5 on top of the fp32 reference's own error (assert_close_to_oracle).


def _row_temps(shape, *, exact_rows=True):
    """Temperatures in [0.3, 2.3), with some powers of two (the kernels' plain-multiply path)."""
    temps = torch.rand(shape) * 2 + 0.3
    if exact_rows and temps.numel() > 1:
        flat = temps.view(-1)
        flat[::3] = torch.tensor([0.5, 1.0, 2.0]).repeat(flat[::3].numel())[: flat[::3].numel()]
    return temps


def _check_all_outputs(logits, labels, temperature):
    logp, ent, p2 = ops.logprobs_and_entropy(logits, labels, temperature=temperature, return_sum_p2=True)
    t64 = temperature.double() if isinstance(temperature, torch.Tensor) else temperature
    ref = (reference.logprobs(logits.double(), labels, temperature=t64),
           reference.entropy(logits.double(), temperature=t64),
           reference.sum_p2(logits.double(), temperature=t64))
    f32 = (reference.logprobs(logits.float(), labels, temperature=temperature),
           reference.entropy(logits.float(), temperature=temperature),
           reference.sum_p2(logits.float(), temperature=temperature))
    tol = _tol(logits.shape[-1])
    for name, got, want, same in zip(("logprobs", "entropy", "sum_p2"), (logp, ent, p2), ref, f32):
        assert got.dtype == torch.float32 and got.shape == logits.shape[:-1]
        assert_close_to_oracle(got, want, same, atol=tol if name != "sum_p2" else 1e-7,
                               rtol=0 if name != "sum_p2" else 1e-5, what=name)
    # Each single-output entry point gives the same bits as the fused one.
    lp1, p2_lp = ops.logprobs(logits, labels, temperature=temperature, return_sum_p2=True)
    ent1, p2_ent = ops.entropy(logits, temperature=temperature, return_sum_p2=True)
    assert torch.equal(lp1, logp) and torch.equal(ent1, ent)
    assert torch.equal(p2_lp, p2) and torch.equal(p2_ent, p2)
    assert torch.equal(ops.logprobs(logits, labels, temperature=temperature), logp)
    return logp, ent, p2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1, 7, 4097])
@pytest.mark.parametrize("row_t", [False, True], ids=["scalar_t", "row_t"])
def test_row_temperature_and_sum_p2_match_oracle(backend, dtype, vocab, row_t):
    logits, labels = _make((3, 5), vocab, dtype, banned=0.1 if vocab > 1 else 0.0)
    logits[0, 0] = float("-inf")  # a fully banned row: sum p^2 = 0, as its entropy
    temperature = _row_temps((3, 5)) if row_t else 0.7
    logp, ent, p2 = _check_all_outputs(logits, labels, temperature)
    assert p2[0, 0] == 0 and ent[0, 0] == 0
    live = torch.ones(3, 5, dtype=torch.bool)
    live[0, 0] = False
    assert (p2[live] >= 1 / vocab * (1 - 1e-5)).all() and (p2 <= 1 + 1e-6).all()


def test_row_temperature_equals_scalar_per_row(backend):
    """A row at temperature t gives the bits a scalar call at t gives (same kernel path per row)."""
    logits, labels = _make((4, 3), 300, torch.bfloat16)
    temps = torch.tensor([0.5, 0.7, 1.3, 1.0]).unsqueeze(-1).expand(4, 3).contiguous()
    lp, ent, p2 = ops.logprobs_and_entropy(logits, labels, temperature=temps, return_sum_p2=True)
    for i, t in enumerate(temps[:, 0].tolist()):
        lp_s, ent_s, p2_s = ops.logprobs_and_entropy(logits[i], labels[i], temperature=t, return_sum_p2=True)
        torch.testing.assert_close(lp[i], lp_s, atol=0, rtol=0)
        torch.testing.assert_close(ent[i], ent_s, atol=0, rtol=0)
        torch.testing.assert_close(p2[i], p2_s, atol=0, rtol=0)


def test_sum_p2_is_not_differentiable(backend):
    """sum p^2 carries no gradient on any backend (verl's optimal token baseline and TRL's WPO
    weighting use it under no_grad; TRL marks its log_sum_sq_probs non-differentiable)."""
    logits, labels = _make((2, 4), 50, torch.float32)
    x = logits.clone().requires_grad_()
    lp, p2 = ops.logprobs(x, labels, return_sum_p2=True)
    assert lp.requires_grad and not p2.requires_grad and p2.grad_fn is None
    (lp.sum() + p2.sum()).backward()
    y = logits.clone().requires_grad_()
    ops.logprobs(y, labels).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, atol=0, rtol=0)
    ent, p2 = ops.entropy(logits.clone().requires_grad_(), return_sum_p2=True)
    assert ent.requires_grad and not p2.requires_grad


def test_sum_p2_matches_verl_and_trl(backend):
    """verl 0.9.1's calculate_sum_pi_squared_from_logits (on logits / T, as its FSDP engine calls it)
    and TRL 1.16's ChunkedLogProbFunction log_sum_sq_probs = log sum p^2 (its torch path on CPU)."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from verl.utils.torch_functional import calculate_sum_pi_squared_from_logits

    hidden, weight = torch.randn(6, 16, dtype=torch.float64), torch.randn(101, 16, dtype=torch.float64) * 0.5
    logits = (hidden @ weight.T).float()
    labels = torch.randint(0, 101, (6,))
    _, p2 = ops.logprobs(logits, labels, temperature=0.8, return_sum_p2=True)
    verl_p2 = calculate_sum_pi_squared_from_logits(logits.double() / 0.8)
    torch.testing.assert_close(p2.double(), verl_p2, atol=1e-7, rtol=1e-5)
    out = ChunkedLogProbFunction.apply(hidden, weight, None, labels, 0.8, 64, None, 1.0,
                                       ("log_sum_sq_probs",))
    torch.testing.assert_close(p2.double().log(), out[2].double(), atol=1e-6, rtol=1e-5)
    # A per-row temperature: verl's per-token temperature divides each row (verl FSDP engine,
    # _scale_logits_by_temperature).
    temps = _row_temps((6,))
    _, p2_rows = ops.logprobs(logits, labels, temperature=temps, return_sum_p2=True)
    verl_rows = calculate_sum_pi_squared_from_logits(logits.double() / temps.double()[:, None])
    torch.testing.assert_close(p2_rows.double(), verl_rows, atol=1e-7, rtol=1e-5)


def test_sum_p2_feeds_optimal_token_baseline():
    """sum_p2 is what verl's optimal_token_baseline takes as sum_pi_squared: rlkern's estimator and
    verl's give the same advantages from it as from verl's own sum_pi_squared."""
    import numpy as np
    from verl.trainer.ppo.core_algos import compute_optimal_token_baseline_advantage
    from verl.utils.torch_functional import calculate_sum_pi_squared_from_logits

    b, t, vocab = 6, 9, 64
    logits = torch.randn(b, t, vocab) * 2
    labels = torch.randint(0, vocab, (b, t))
    temps = _row_temps((b, t))
    logp, p2 = ops.logprobs(logits, labels, temperature=temps, return_sum_p2=True)
    rewards, mask = torch.randn(b, t), (torch.rand(b, t) < 0.8).float()
    ids = torch.tensor([0, 0, 1, 1, 1, 2])
    ours = ops.optimal_token_baseline(rewards, mask, ids, 3, logp, p2)
    verl_p2 = calculate_sum_pi_squared_from_logits(logits / temps[..., None])
    theirs = compute_optimal_token_baseline_advantage(rewards, mask, np.array(ids.tolist()), logp, verl_p2)
    for a, c in zip(ours, theirs):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), 1e-45])
def test_bad_row_temperature_refused(backend, bad):
    logits, labels = _make((2, 3), 20, torch.float32)
    temps = torch.rand(2, 3) + 0.5
    temps[1, 2] = bad
    with pytest.raises(ValueError, match="temperature"):
        ops.logprobs(logits, labels, temperature=temps)
    with pytest.raises(ValueError, match="temperature"):
        ops.entropy(logits, temperature=temps, return_sum_p2=True)


@pytest.mark.parametrize(
    "make_temps, error, match",
    [
        (lambda: torch.ones(2), ValueError, r"leading shape \(2, 3\)"),
        (lambda: torch.ones(2, 3, 1), ValueError, r"leading shape \(2, 3\)"),
        (lambda: torch.tensor(0.7), ValueError, r"leading shape \(2, 3\)"),
        (lambda: torch.ones(2, 3, dtype=torch.long), TypeError, "temperature must be float"),
        (lambda: torch.ones(2, 3, requires_grad=True), ValueError, "must not require grad"),
    ],
)
def test_bad_temperature_tensor(backend, make_temps, error, match):
    logits, labels = _make((2, 3), 20, torch.float32)
    with pytest.raises(error, match=match):
        ops.logprobs(logits, labels, temperature=make_temps())


def test_temperature_tensor_dtypes_and_layouts(backend):
    """bf16/fp16/fp64 temperature tensors are read as float32; a strided one is copied."""
    logits, labels = _make((4, 3), 30, torch.float32)
    temps = _row_temps((4, 3))
    want = ops.logprobs(logits, labels, temperature=temps)
    for t in (temps.double(), temps.t().contiguous().t()):
        assert torch.equal(ops.logprobs(logits, labels, temperature=t), want)
    half = temps.half()
    torch.testing.assert_close(ops.logprobs(logits, labels, temperature=half),
                               ops.logprobs(logits, labels, temperature=half.float()), atol=0, rtol=0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN / inf / 0 divisions
def test_triton_kernel_poisons_rows_with_invalid_temperature():
    """On CUDA the ops layer does not sync to check a temperature tensor (unless nan_check or
    RLKERN_STRICT_TEMPERATURE=1): the Triton kernel gives a row with an invalid temperature the
    outputs of a row holding a NaN logit, and leaves the other rows exact. Run through the
    interpreter, calling the launcher directly (the CPU ops layer would refuse first)."""
    from rlkern.kernels import logits as tk

    rows, vocab = 6, 40
    x = torch.randn(1, rows, vocab)
    labels = torch.randint(0, vocab, (rows,))
    labels[4] = -100
    temps = torch.tensor([0.7, float("nan"), -1.0, 0.0, float("inf"), 1e-45])
    lp, lse, ent, p2 = (torch.full((rows,), 5.0) for _ in range(4))
    tk.logprobs_fwd(x, labels, 1.0, temps, -100, lp, lse, ent, p2)
    assert lse[1:].isnan().all() and ent[1:].isnan().all() and p2[1:].isnan().all()
    assert lp[[1, 2, 3, 5]].isnan().all() and lp[4] == 0  # an ignored label stays 0
    want = reference.logprobs(x[0, 0].double(), labels[0], temperature=0.7)
    torch.testing.assert_close(lp[0].double(), want, atol=2e-6, rtol=0)
    grad = torch.full_like(x, 5.0)
    tk.logprobs_bwd(torch.ones(rows), torch.ones(rows), x, labels, lse, ent, 1.0, temps, -100, grad)
    assert grad[0, 1:].isnan().all() and torch.isfinite(grad[0, 0]).all()


def test_strict_temperature_switch_checks_on_any_device():
    """RLKERN_STRICT_TEMPERATURE=1 (read at import) is the CUDA-side opt-in check; on CPU the check
    always runs. The switch's code path is the one nan_check=True takes."""
    from rlkern.ops import logits as module

    temps = torch.tensor([0.5, float("nan")])
    with pytest.raises(ValueError, match=r"temperature holds .* first at index \(1,\)"):
        module._check_row_temperatures(temps, torch.Size([2]), "triton", nan_check=True)
    # The unchecked CUDA path of the torch backend: invalid temperatures become NaN (a meta tensor
    # stands in for a non-CPU device: no sync, no check, no error).
    meta = temps.to("meta")
    assert module._check_row_temperatures(meta, torch.Size([2]), "triton", nan_check=False) is meta
    filled = module._check_row_temperatures(meta, torch.Size([2]), "torch", nan_check=False)
    assert filled.device.type == "meta"
    assert module._invalid_temperatures(temps).tolist() == [False, True]


def test_gradcheck_cpp_row_temperature():
    logits = torch.randn(2, 3, 6, dtype=torch.float32, requires_grad=True)
    labels = torch.randint(0, 6, (2, 3))
    labels[0, 0] = -100
    temps = _row_temps((2, 3))
    with rlkern.use_backend("cpp"):
        assert torch.autograd.gradcheck(
            lambda x: ops.logprobs_and_entropy(x, labels, temperature=temps), (logits,), eps=1e-2, atol=2e-3,
            rtol=2e-2, fast_mode=False, nondet_tol=0.0)


def test_torch_compile_fullgraph_row_temperature_and_sum_p2():
    logits, labels = _make((2, 5), 64, torch.float32)
    temps = _row_temps((2, 5))

    def step(x, y, t):
        lp, h, p2 = ops.logprobs_and_entropy(x, y, temperature=t, return_sum_p2=True)
        return (lp * 2).sum() + h.mean(), p2

    compiled = torch.compile(step, fullgraph=True)
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    (out_c, p2_c), (out_e, p2_e) = compiled(x1, labels, temps), step(x2, labels, temps)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(p2_c, p2_e)
    torch.testing.assert_close(x1.grad, x2.grad)


def _fused_call(which, logits, labels, temperature, inplace, p2):
    """Forward and d logits of one public call on a fresh non-leaf copy of ``logits`` (so that
    inplace_backward is honoured), with fixed random upstream gradients."""
    leaf = logits.detach().clone().requires_grad_(True)
    z = leaf * 1  # not a leaf: backward may write into it
    kw = {"temperature": temperature, "inplace_backward": inplace, "return_sum_p2": p2}
    if which == "logprobs":
        outs = ops.logprobs(z, labels, **kw)
    elif which == "entropy":
        outs = ops.entropy(z, **kw)
    else:
        outs = ops.logprobs_and_entropy(z, labels, **kw)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(3)
    diff = [o for o in outs if o.requires_grad]
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in diff)
    (dx,) = torch.autograd.grad(loss, leaf)
    return [o.detach() for o in outs], dx, type(outs[0].grad_fn).__name__


@pytest.mark.parametrize("which", ["logprobs", "entropy", "both"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 4), (7,)])
@pytest.mark.parametrize("row_t", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_cpp_autograd_node_matches_the_python_function(monkeypatch, which, dtype, shape, row_t, inplace):
    """Eager calls with a gradient on the C++ backend run one C++ autograd node (logprobs_fwd's
    register_native); it allocates the same outputs and runs the same kernels as the Python
    torch.autograd.Function it replaces, so values and gradients are the same bits, with and
    without inplace_backward, per-row temperatures and sum_p2 (outputs poisoned in both)."""
    from rlkern.ops import logits as lg

    logits, labels = _make(shape, 33, dtype, banned=0.1)
    temperature = (torch.rand(shape) + 0.5) if row_t else 0.7
    p2 = not inplace  # both settings of return_sum_p2 over the grid
    with rlkern.use_backend("cpp"):
        outs, dx, node = _fused_call(which, logits, labels, temperature, inplace, p2)
        assert node == "CppFunction"
        monkeypatch.setattr(lg._logprobs_fwd, "_native", None)
        outs_py, dx_py, node_py = _fused_call(which, logits, labels, temperature, inplace, p2)
        assert node_py != "CppFunction"
    for a, b in zip(outs, outs_py, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(dx, dx_py, rtol=0, atol=0, equal_nan=True)


def test_cpp_autograd_node_keeps_the_checks():
    """On the C++ node path: a label out of range raises as on the Python path, a non-contiguous
    input takes the Python path, logits modified in place after the forward fail autograd's
    saved-tensor version check, and no_grad gives no graph."""
    logits, labels = _make((4, 6), 11, torch.float32, ignore=0.0)
    leaf = logits.requires_grad_(True)
    with rlkern.use_backend("cpp"):
        bad = labels.clone()
        bad[2, 3] = 11
        with pytest.raises((IndexError, RuntimeError, ValueError), match="11"):
            ops.logprobs(leaf, bad)
        strided = torch.randn(4, 12, 11)[:, ::2].requires_grad_(True)
        out = ops.logprobs(strided, labels)
        assert type(out.grad_fn).__name__ != "CppFunction"
        ref = reference.logprobs(strided.detach().double(), labels)
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
        z = leaf * 1
        out = ops.entropy(z)
        z.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()
        with torch.no_grad():
            assert ops.logprobs(leaf, labels).grad_fn is None
