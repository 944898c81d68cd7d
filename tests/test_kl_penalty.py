"""rlkern.ops.kl / token_rewards against the float64 oracle, every backend.

Tolerances (on top of the error of plain torch run in float32 on the same inputs, which is the
comparison baseline: the kernels compute in fp32 whatever the input dtype, and bf16/fp16 inputs
are exact in fp32):
* value: atol 1e-6 + rtol 2e-6. The kernels' exp is a degree-6 polynomial within ~2 ulp, their
  expm1 switches to a Taylor series below |r| = 1/2; a few ulp of the value either way.
* gradient: the same, times the upstream gradient's scale (randn, |g| < ~4) for the atol part.
"""

from __future__ import annotations

import math

import pytest
import torch

import rlkern
from rlkern import reference
from tests.conftest import ALL_BACKENDS, DTYPES, KERNEL_BACKENDS, assert_close_to_oracle
from tests.test_masked import compiled_matches_eager

ops = rlkern.ops

ESTIMATORS = ["k1", "abs", "k2", "k3", "k3+", "abs+"]
CLAMPS = [None, True, (1.5, 0.3)]


def _make(shape, dtype, scale=1.5):
    logp = (-torch.rand(shape) * 4).to(dtype)
    ref = (logp.float() + torch.randn(shape) * scale).to(dtype)
    return logp, ref


def _check_value_and_grad(logp, ref, estimator, clamp):
    x = logp.clone().requires_grad_()
    out = ops.kl(x, ref, estimator, clamp=clamp)
    g = torch.randn(out.shape)
    out.backward(g)
    x64 = logp.double().requires_grad_()
    oracle = reference.kl(x64, ref.double(), estimator, clamp=clamp)
    oracle.backward(g.double())
    x32 = logp.float().clone().requires_grad_()
    same = reference.kl(x32, ref.float(), estimator, clamp=clamp)
    same.backward(g)
    assert out.dtype == torch.float32 and out.shape == logp.shape
    assert_close_to_oracle(out, oracle, same, atol=1e-6, rtol=2e-6, what=f"kl {estimator}")
    assert x.grad.dtype == logp.dtype
    # A bf16/fp16 gradient is the fp32 one rounded once: up to an ulp of that dtype on top.
    rtol = {torch.float32: 2e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[logp.dtype]
    assert_close_to_oracle(x.grad, x64.grad, x32.grad, atol=4e-6, rtol=rtol,
                           what=f"d kl {estimator} / d logp")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("clamp", CLAMPS)
def test_kl_matches_oracle(backend, dtype, estimator, clamp):
    logp, ref = _make((3, 37), dtype)  # 111 elements: 6 full 16-lane vectors and a tail
    _check_value_and_grad(logp, ref, estimator, clamp)


@pytest.mark.parametrize("shape", [(1,), (0,), (4, 0), (2, 3, 17), (5000,)])
def test_kl_odd_shapes(backend, shape):
    if backend == "triton" and math.prod(shape) > 200:
        shape = (1031,)  # one partial block after a full one, small enough for the interpreter
    logp, ref = _make(shape, torch.float32)
    _check_value_and_grad(logp, ref, "k3", None)


def test_kl_large_log_ratios_stay_finite(backend):
    """Any finite input gives a finite value and gradient, clamped or not (OpenRLHF PR #1335)."""
    logp = torch.tensor([-300.0, -100.0, -90.0, -1.0, 0.0, -1e-3, -50.0, -1e4])
    ref = torch.tensor([-0.1, -5.0, -1.0, -1.0, -80.0, -1e-3 + 1e-6, -0.5, -1.0])
    for estimator in ("k3", "k3+", "k1", "k2", "abs"):
        for clamp in (None, True):
            x = logp.clone().requires_grad_()
            out = ops.kl(x, ref, estimator, clamp=clamp)
            out.sum().backward()
            assert torch.isfinite(out).all() and torch.isfinite(x.grad).all(), (estimator, clamp)
    # Where verl's clamps are active, k3 and its gradient saturate: value 10, gradient 0.
    x = logp.clone().requires_grad_()
    out = ops.kl(x, ref, "k3", clamp=True)
    out.sum().backward()
    assert out[0] == 10 and x.grad[0] == 0
    # Unclamped, the log-ratio entering the exp is capped at 80: value e^80 - 81, gradient 0 beyond.
    x = logp.clone().requires_grad_()
    out = ops.kl(x, ref, "k3")
    out.sum().backward()
    assert out[0].item() == pytest.approx(math.expm1(80.0) - 80.0, rel=1e-5) and x.grad[0] == 0


def test_kl_tiny_log_ratio_is_accurate(kernel_backend):
    """The kernels take k3 = r^2 (1/2 + r/6 + ...) for small r: accurate where fp32 expm1(r) - r (and
    more so verl's e^r - r - 1) is mostly rounding error."""
    logp = torch.zeros(64)
    ref = torch.linspace(-1e-3, 1e-3, 64)
    out = ops.kl(logp, ref, "k3")
    exact = reference.kl(logp.double(), ref.double(), "k3")
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-12)


def test_kl_gradient_to_ref_logp(backend):
    logp, ref = _make((4, 9), torch.float32)
    x, r = logp.clone().requires_grad_(), ref.clone().requires_grad_()
    ops.kl(x, r, "k3", clamp=True).sum().backward()
    assert torch.equal(r.grad, -x.grad)


def test_kl_straight_through_value_and_gradient(backend):
    logp, ref = _make((2, 21), torch.float32)
    x = logp.clone().requires_grad_()
    out = ops.kl(x, ref, "k3+")
    assert torch.equal(out.detach(), ops.kl(logp, ref, "k3"))
    out.sum().backward()
    torch.testing.assert_close(x.grad, logp - ref, rtol=0, atol=0)


def test_kl_aliases():
    logp, ref = _make((3, 5), torch.float32)
    for alias, name in reference.KL_ALIASES.items():
        assert torch.equal(ops.kl(logp, ref, alias), ops.kl(logp, ref, name))


def test_kl_verl_clamp_formula():
    """clamp=True is verl's low_var_kl: clamp(exp(c) - c - 1, -10, 10), c = clamp(ref - logp, -20, 20)."""
    logp = torch.tensor([-30.0, -1.0, -2.0, -0.1])
    ref = torch.tensor([-0.5, -25.0, -1.5, -0.1])
    c = (ref - logp).clamp(-20, 20).double()
    verl = (c.exp() - c - 1).clamp(-10, 10)
    torch.testing.assert_close(ops.kl(logp, ref, "low_var_kl", clamp=True).double(), verl, rtol=1e-6,
                               atol=1e-7)


def test_kl_gradcheck_reference():
    logp = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    # Not "k3+": its gradient is k2's by design, not the derivative of its value.
    for estimator in ("k1", "abs", "k2", "k3"):
        assert torch.autograd.gradcheck(
            lambda a, b, e=estimator: reference.kl(a, b, e, clamp=(1.0, 0.6)), (logp, ref))


@pytest.mark.filterwarnings("ignore:Input #0 requires gradient and is not a double")
@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_kl_gradcheck_kernels(backend_name):
    # fp32 kernels: central differences with a 1e-2 step; a wrong slope is off by O(1).
    logp = (torch.randn(2, 5) * 0.7).requires_grad_()
    ref = torch.randn(2, 5) * 0.7
    with rlkern.use_backend(backend_name):
        for estimator in ("k1", "k2", "k3"):
            assert torch.autograd.gradcheck(lambda a, e=estimator: ops.kl(a, ref, e), (logp,), eps=1e-2,
                                            atol=2e-3, rtol=2e-2, nondet_tol=0.0)


def test_kl_batch_invariance():
    logp, ref = _make((1000, 33), torch.bfloat16)
    with rlkern.use_backend("cpp"):
        full = ops.kl(logp, ref, "k3", clamp=True)
        for r in (0, 501, 999):
            one = ops.kl(logp[r:r + 1].clone(), ref[r:r + 1].clone(), "k3", clamp=True)
            assert torch.equal(one, full[r:r + 1])


def _rewards_inputs(shape, dtype, p_valid=0.8):
    logp, ref = _make(shape, dtype)
    # Right-padded rows of random lengths (some empty) with a few holes inside (multi-turn gaps).
    length = shape[-1]
    lengths = torch.randint(0, length + 1, shape[:-1])
    mask = torch.arange(length) < lengths.unsqueeze(-1)
    mask &= torch.rand(shape) < p_valid
    scores = torch.randn(shape[:-1])
    return scores, logp, ref, mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator", ["k1", "k3", "k2"])
@pytest.mark.parametrize("shape", [(5, 37), (1, 1), (0, 7), (3, 0), (2, 2, 19)])
def test_token_rewards_matches_oracle(backend, dtype, estimator, shape):
    scores, logp, ref, mask = _rewards_inputs(shape, dtype)
    out = ops.token_rewards(scores, logp, ref, mask, kl_coef=0.05, estimator=estimator)
    oracle = reference.token_rewards(scores.double(), logp.double(), ref.double(), mask, kl_coef=0.05,
                                     estimator=estimator)
    same = reference.token_rewards(scores, logp.float(), ref.float(), mask, kl_coef=0.05, estimator=estimator)
    assert out.shape == shape and out.dtype == torch.float32 and not out.requires_grad
    assert_close_to_oracle(out, oracle, same, atol=1e-6, rtol=2e-6, what="token rewards")
    assert (out[~mask] == 0).all()


def test_token_rewards_places_the_score_at_the_last_valid_token(backend):
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.int64)
    logp = torch.zeros(3, 6)
    scores = torch.tensor([2.0, 5.0, -1.0])
    out = ops.token_rewards(scores, logp, logp, mask, kl_coef=0.1)
    expected = torch.zeros(3, 6)
    expected[0, 3], expected[2, 5] = 2.0, -1.0  # row 1 has no valid token: its score goes nowhere
    assert torch.equal(out, expected)


# Every mask dtype the kernels read natively, and two that token_mask converts (int16, float64).
MASK_DTYPES = [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.bfloat16,
               torch.float16, torch.int16, torch.float64]


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_token_rewards_mask_of_any_dtype(backend, mask_dtype):
    """Nonzero = valid, read in the mask's own dtype: values other than 1 (2, 0.5, -1) are valid too.
    Tolerance as in test_token_rewards_matches_oracle (fp32 maths on the same inputs)."""
    scores, logp, ref, valid = _rewards_inputs((4, 45), torch.float32)
    values = torch.tensor([1.0, 2.0, 0.5 if mask_dtype.is_floating_point else 3.0, -1.0])
    mask = torch.where(valid, values[torch.randint(0, 4, valid.shape)], torch.zeros(())).to(mask_dtype)
    if mask_dtype == torch.bool:
        mask = valid
    out = ops.token_rewards(scores, logp, ref, mask, kl_coef=0.05, estimator="k3")
    oracle = reference.token_rewards(scores.double(), logp.double(), ref.double(), valid, kl_coef=0.05,
                                     estimator="k3")
    same = reference.token_rewards(scores, logp, ref, valid, kl_coef=0.05, estimator="k3")
    assert_close_to_oracle(out, oracle, same, atol=1e-6, rtol=2e-6, what=f"token rewards, {mask_dtype} mask")
    assert (out[~valid] == 0).all()


def test_strict_masks_refuse_values_other_than_0_and_1(monkeypatch):
    """RLKERN_STRICT_MASKS=1 (rlkern.ops._common.STRICT_MASKS) checks masks hold only 0 and 1."""
    from rlkern.ops import _common

    args = (torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3))
    ops.token_rewards(*args, torch.full((2, 3), 2), kl_coef=0.1)  # default: nonzero = valid
    monkeypatch.setattr(_common, "STRICT_MASKS", True)
    for bad in (torch.full((2, 3), 0.5), torch.full((2, 3), 2)):
        with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
            ops.token_rewards(*args, bad, kl_coef=0.1)
    ops.token_rewards(*args, torch.ones(2, 3), kl_coef=0.1)


def test_token_rewards_is_detached(backend):
    scores, logp, ref, mask = _rewards_inputs((2, 9), torch.float32)
    out = ops.token_rewards(scores.requires_grad_(), logp.requires_grad_(), ref, mask, kl_coef=0.1)
    assert not out.requires_grad


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: ops.kl(torch.zeros(3), torch.zeros(4)), ValueError,
         r"ref_logp must have logp's shape \(3,\)"),
        (lambda: ops.kl(torch.zeros(3), torch.zeros(3), "k4"), ValueError, "estimator must be one of"),
        (lambda: ops.kl(torch.zeros(3), torch.zeros(3), clamp=(0.0, 1.0)), ValueError,
         "log-ratio bound must be > 0"),
        (lambda: ops.kl(torch.zeros(3), torch.zeros(3), clamp="yes"), TypeError, "clamp must be None, True"),
        (lambda: ops.kl(torch.zeros(3, dtype=torch.long), torch.zeros(3)), TypeError, "logp must be float"),
        (lambda: ops.token_rewards(torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 4),
                                   kl_coef=0.1), ValueError, r"mask must have shape \(2, 3\)"),
        (lambda: ops.token_rewards(torch.zeros(3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3),
                                   kl_coef=0.1), ValueError, r"scores must have shape \(2,\)"),
        (lambda: ops.token_rewards(torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3),
                                   kl_coef=float("nan")), ValueError, "kl_coef must be finite"),
    ],
)
def test_bad_input(backend, call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_opcheck(backend_name):
    logp, ref = _make((3, 20), torch.float32)
    args = (logp.requires_grad_(), ref, 3, False, -20.0, 20.0, 10.0, backend_name)
    torch.library.opcheck(torch.ops.rlkern.kl_fwd.default, args)
    bwd_args = (torch.randn(3, 20), logp.detach(), ref, 3, True, -20.0, 20.0, 10.0, backend_name)
    torch.library.opcheck(torch.ops.rlkern.kl_bwd.default, bwd_args)
    # the backward of a sum: one gradient for every element
    torch.library.opcheck(torch.ops.rlkern.kl_bwd.default, (torch.ones(()).expand(3, 20), *bwd_args[1:]))
    scores, logp, ref, mask = _rewards_inputs((3, 20), torch.float32)
    for m in (mask, mask.float(), mask.long()):
        torch.library.opcheck(torch.ops.rlkern.token_rewards.default,
                              (scores, logp, ref, m, 0.1, 0, -float("inf"), 80.0, float("inf"), backend_name))


def test_torch_compile_fullgraph():
    scores, logp, ref, mask = _rewards_inputs((4, 24), torch.float32)

    def step(x):
        k = ops.kl(x, ref, "k3", clamp=True)
        shaped = ops.token_rewards(scores, x.detach(), ref, mask, kl_coef=0.1, estimator="k3")
        return (k * mask).sum() + shaped.sum()

    compiled_matches_eager(step, logp)


@pytest.mark.parametrize("backend_name", ALL_BACKENDS)
def test_float64_runs_the_reference_only_under_auto(backend_name):
    logp, ref = _make((2, 3), torch.float64)
    if backend_name == "torch":
        with rlkern.use_backend("torch"):
            assert ops.kl(logp, ref).dtype == torch.float64
    else:
        with rlkern.use_backend(backend_name), pytest.raises(rlkern.BackendUnavailable, match="float64"):
            ops.kl(logp, ref)
    assert ops.kl(logp, ref).dtype == torch.float64  # auto
