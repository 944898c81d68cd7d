"""rlkern.ops.policy_loss / value_loss / grpo_loss (and the *_and_grad entry points) against the
float64 oracle (rlkern.reference), every backend, every dtype, every aggregation mode.

Tolerances. The kernels read bf16/fp16 inputs exactly into fp32 and compute in fp32, so the
comparison baseline is the reference on the same inputs upcast to fp32, and on top of its error:
* loss and stats: atol 1e-6 + rtol 1e-5. The loss is a weighted sum of at most a few hundred O(1)
  per-token terms; the kernels sum them in a different order (16 lanes, then rows in double) and
  evaluate exp with a ~2 ulp polynomial, which moves the result by a few fp32 ulps of the sum of
  |terms|. Clip fractions are exact counts unless a ratio lies within an ulp of a clip boundary.
* d logp: atol 1e-7 + rtol 1e-5 in fp32 (each element is a product of a handful of fp32 factors);
  stored as bf16/fp16 the gradient costs up to one ulp of that dtype more (rtol 2^-7 / 2^-10; the
  Triton interpreter truncates instead of rounding).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import rlkern
from rlkern import reference
from rlkern.codes import LOSS_STATS
from rlkern.ops import losses as L
from rlkern.ops._registry import cpp_kernels
from tests.conftest import ALL_BACKENDS, DTYPES, KERNEL_BACKENDS, assert_close_to_oracle

GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}
SHAPES = [(3, 37), (1, 16), (2, 3, 17)]  # odd T, one row of exactly 16 lanes, extra leading dim


def _grpo_reference(*args, **kwargs):
    """reference.grpo_loss with the stats keys rlkern.ops.grpo_loss adds for the cispo and vespo loss
    types (0 for the others)."""
    loss, stats = reference.grpo_loss(*args, **kwargs)
    zero = torch.zeros_like(stats["kl"])
    return loss, {**stats, "cispo_clip_ratio": zero, "phi_seq_mean": zero.clone()}


def _tokens(shape, dtype, *, spread=0.4, valid=0.75):
    """logp in (-3, 0), old / ref within ~spread of it (so a good share of ratios is clipped)."""
    logp = (torch.rand(shape) * -3).to(dtype)
    old = (logp.float() + torch.randn(shape) * spread).to(dtype)
    ref = (logp.float() + torch.randn(shape) * spread).to(dtype)
    adv = torch.randn(shape).to(dtype)
    mask = torch.rand(shape) < valid
    return logp, old, ref, adv, mask


def _as(t, dtype):
    return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype.is_floating_point else t


def _compare(op, ref_fn, main, others, kwargs, *, what):
    """Runs op (autograd through the backend under test), the reference in float64 (oracle) and in
    main's dtype (baseline), and checks loss, every stat and d main."""
    dtype = main.dtype
    x = main.clone().requires_grad_()
    loss, stats = op(x, *others, **kwargs)
    loss.backward()
    x64 = main.double().requires_grad_()
    loss64, stats64 = ref_fn(x64, *[_as(o, torch.float64) for o in others], **kwargs)
    loss64.backward()
    x32 = main.float()
    loss32, stats32 = ref_fn(x32, *[_as(o, torch.float32) for o in others], **kwargs)
    x_same = main.clone().requires_grad_()
    ref_fn(x_same, *others, **kwargs)[0].backward()

    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close_to_oracle(loss, loss64, loss32, atol=1e-6, rtol=1e-5, what=f"{what} loss")
    assert set(stats) == set(stats64), f"{what}: stats keys {sorted(stats)} != {sorted(stats64)}"
    for name in stats:
        assert stats[name].shape == () and stats[name].dtype == torch.float32, f"{what} stat {name}"
        assert_close_to_oracle(stats[name], stats64[name], stats32[name], atol=1e-6, rtol=1e-5,
                               what=f"{what} stat {name}")
    assert x.grad.dtype == dtype and x.grad.shape == main.shape
    assert_close_to_oracle(x.grad, x64.grad, x_same.grad, atol=1e-7, rtol=GRAD_RTOL[dtype],
                           what=f"{what} d input")
    return loss, stats, x.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("agg", L.POLICY_AGGS)
@pytest.mark.parametrize("shape", SHAPES)
def test_policy_loss_matches_oracle(backend, dtype, agg, shape):
    logp, old, _, adv, mask = _tokens(shape, dtype)
    _compare(rlkern.ops.policy_loss, reference.policy_loss, logp, (old, adv, mask),
             dict(clip_low=0.2, clip_high=0.28, agg=agg), what=f"policy {agg}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_sequence_adv", [False, True])
def test_policy_loss_dual_clip_weights(backend, dtype, per_sequence_adv):
    logp, old, _, adv, mask = _tokens((4, 29), dtype, spread=1.5)  # wide spread: dual clip often active
    if per_sequence_adv:
        adv = adv[:, 0].contiguous()
    adv[::2] = -adv[::2].abs()  # some rows with negative advantages, so the dual clip can act
    weights = torch.rand(4, 29).to(dtype)
    _, stats, _ = _compare(rlkern.ops.policy_loss, reference.policy_loss, logp, (old, adv, mask),
                           dict(clip_low=0.1, clip_high=0.3, dual_clip=2.0, weights=weights,
                                agg="seq-mean-token-mean"), what="policy dual+weights")
    assert stats["clip_frac_lower"] > 0 and stats["clip_frac"] > 0  # the test exercises both clips


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type", reference.GRPO_LOSS_TYPES)  # the others: test_policy_variants.py
def test_grpo_loss_matches_oracle(backend, dtype, loss_type):
    logp, old, ref, adv, mask = _tokens((4, 21), dtype)
    _compare(rlkern.ops.grpo_loss, _grpo_reference, logp, (old, ref, adv[:, 0].contiguous(), mask),
             dict(beta=0.04, clip_low=0.2, clip_high=0.28, loss_type=loss_type), what=f"grpo {loss_type}")


@pytest.mark.parametrize("kwargs", [dict(loss_type="dr_grpo", max_completion_length=64),
                                    dict(loss_type="dapo", num_items_in_batch=120),
                                    dict(loss_type="dapo", num_items_in_batch=torch.tensor(57.0)),
                                    dict(loss_type="bnpo", beta=0.0),
                                    dict(loss_type="dapo", beta=0.1, use_bias_correction_kl=True),
                                    dict(loss_type="grpo", beta=0.3, clip_high=0.28,
                                         use_bias_correction_kl=True)])
def test_grpo_loss_options(backend, kwargs):
    logp, old, ref, adv, mask = _tokens((2, 3, 19), torch.float32)
    _compare(rlkern.ops.grpo_loss, _grpo_reference, logp, (old, ref, adv, mask), kwargs,
             what=f"grpo {kwargs}")


@pytest.mark.parametrize("loss_type", reference.GRPO_LOSS_TYPES)
@pytest.mark.parametrize("bias_correction", [False, True])
def test_grpo_loss_weights(backend, loss_type, bias_correction):
    """Per-token weights (TRL's entropy / off-policy masks times vLLM IS ratios) scale the clipped
    surrogate only; the KL term is added after them."""
    logp, old, ref, adv, mask = _tokens((3, 23), torch.float32)
    weights = (torch.rand(3, 23) < 0.6).float() * torch.rand(3, 23) * 2
    _compare(rlkern.ops.grpo_loss, _grpo_reference, logp, (old, ref, adv[:, 0].contiguous(), mask),
             dict(beta=0.1, loss_type=loss_type, weights=weights, use_bias_correction_kl=bias_correction,
                  max_completion_length=30), what=f"grpo weights {loss_type}")


def test_grpo_zero_weights_keep_the_kl_term():
    """All weights 0: the surrogate is gone and the loss is beta * (mean k3), as in TRL where the
    masks multiply the surrogate before `+ beta * per_token_kl`."""
    logp, old, ref, adv, mask = _tokens((2, 9), torch.float32)
    for backend_name in ALL_BACKENDS:
        with rlkern.use_backend(backend_name):
            loss, stats = rlkern.ops.grpo_loss(logp, old, ref, adv[:, 0], mask, beta=0.5, loss_type="bnpo",
                                               weights=torch.zeros(2, 9))
            assert math.isclose(float(loss), 0.5 * float(stats["kl"]), rel_tol=1e-5), backend_name


def test_grpo_bias_corrected_kl_by_hand():
    """use_bias_correction_kl multiplies the k3 term (and the kl stat) by r = exp(logp - old): with
    logp = 0, old = -ln 2 (r = 2), ref = -1 (k3 = e^-1 + 0), A = 0 and beta = 1, each token's loss is 2 k3,
    and d/d logp = r (logp - ref) = 2."""
    logp = torch.zeros(1, 3)
    old, ref = torch.full((1, 3), -math.log(2.0)), torch.full((1, 3), -1.0)
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    k3 = math.exp(-1.0)
    for backend_name in ALL_BACKENDS:
        with rlkern.use_backend(backend_name):
            x = logp.clone().requires_grad_()
            loss, stats = rlkern.ops.grpo_loss(x, old, ref, torch.zeros(1), mask, beta=1.0, loss_type="bnpo",
                                               use_bias_correction_kl=True)
            loss.backward()
            assert math.isclose(float(loss), 2 * k3, rel_tol=1e-5), (backend_name, float(loss))
            assert math.isclose(float(stats["kl"]), 2 * k3, rel_tol=1e-5), backend_name
            torch.testing.assert_close(x.grad, torch.tensor([[1.0, 1.0, 0.0]]), rtol=1e-5, atol=1e-6)


def test_grpo_dapo_all_masked_is_zero():
    """TRL clamps the dapo token count to >= 1: an all-padding batch with num_items_in_batch = 0 (a
    mask_truncated_completions run where every completion was truncated) gives loss 0 and a zero gradient."""
    logp, old, ref, adv, _ = _tokens((3, 6), torch.float32)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    for backend_name in ALL_BACKENDS:
        with rlkern.use_backend(backend_name):
            x = logp.clone().requires_grad_()
            loss, _ = rlkern.ops.grpo_loss(x, old, ref, adv, mask, loss_type="dapo", num_items_in_batch=0)
            loss.backward()
            assert float(loss) == 0.0 and bool((x.grad == 0).all()), backend_name


def test_grpo_normalisations_by_hand():
    """The four loss_types' denominators on a batch small enough to count by hand."""
    logp = torch.zeros(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([-1.0, -2.0])  # ratio 1 and beta 0: every valid token's loss is -A
    expected = {"grpo": (1.0 + 2.0) / 2, "bnpo": (3 * 1.0 + 2.0) / 4, "dr_grpo": 5.0 / (2 * 4),
                "dapo": 5.0 / 4}
    for backend_name in ALL_BACKENDS:
        with rlkern.use_backend(backend_name):
            for loss_type, value in expected.items():
                loss, _ = rlkern.ops.grpo_loss(logp, logp, logp, adv, mask, beta=0.0, loss_type=loss_type)
                assert math.isclose(float(loss), value, rel_tol=1e-6), (backend_name, loss_type, float(loss))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("agg", L.POLICY_AGGS)
def test_value_loss_matches_oracle(backend, dtype, agg):
    values = torch.randn(3, 23).to(dtype)
    old = (values.float() + torch.randn(3, 23) * 0.3).to(dtype)
    returns = torch.randn(3, 23).to(dtype)
    mask = torch.rand(3, 23) < 0.8
    _, stats, _ = _compare(rlkern.ops.value_loss, reference.value_loss, values, (old, returns, mask),
                           dict(clip=0.2, agg=agg), what=f"value {agg}")
    assert 0 < stats["clip_frac"] < 1


def test_mixed_input_dtypes(backend):
    """logp in fp32 with bf16 old_logp / advantages: computed in fp32, gradient in logp's dtype."""
    logp, old, ref, adv, mask = _tokens((3, 20), torch.float32)
    old_bf, adv_bf = old.bfloat16(), adv.bfloat16()
    _compare(rlkern.ops.policy_loss, reference.policy_loss, logp, (old_bf, adv_bf, mask), {}, what="mixed")
    half_logp = logp.half()
    _compare(rlkern.ops.grpo_loss, _grpo_reference, half_logp, (old, ref, adv[:, 0], mask), {},
             what="mixed grpo")


@pytest.mark.parametrize("shape", [(0, 7), (3, 0), (0, 0)])
def test_empty_batches(backend, shape):
    logp, old, ref, adv, mask = _tokens(shape, torch.float32)
    for fn, args in ((rlkern.ops.policy_loss, (old, adv, mask)),
                     (rlkern.ops.grpo_loss, (old, ref, adv[..., 0] if shape[-1] else adv.sum(-1), mask)),
                     (rlkern.ops.value_loss, (old, adv, mask))):
        x = logp.clone().requires_grad_()
        loss, stats = fn(x, *args)
        loss.backward()
        assert float(loss.detach()) == 0.0 and all(float(v) == 0.0 for v in stats.values())
        assert x.grad.shape == shape


def test_all_padding_gives_zero_not_nan(backend):
    logp, old, ref, adv, mask = _tokens((3, 18), torch.float32)
    mask = torch.zeros_like(mask)
    for agg in L.POLICY_AGGS:
        x = logp.clone().requires_grad_()
        loss, stats = rlkern.ops.policy_loss(x, old, adv, mask, agg=agg)
        loss.backward()
        assert float(loss.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(logp))
        assert all(float(v) == 0.0 for v in stats.values())
    for loss_type in L.GRPO_LOSS_TYPES:
        loss, _ = rlkern.ops.grpo_loss(logp, old, ref, adv[:, 0], mask, loss_type=loss_type)
        assert float(loss) == 0.0


def test_padding_is_never_read(backend):
    """NaN / inf in masked-out positions change nothing: not the loss, the stats, or the gradient."""
    logp, old, ref, adv, mask = _tokens((3, 25), torch.float32)
    dirty = [t.clone().masked_fill(~mask, v) for t, v in ((logp, float("nan")), (old, float("inf")),
                                                           (ref, float("-inf")), (adv, float("nan")))]
    for fn, clean_args, dirty_args in (
        (rlkern.ops.policy_loss, (old, adv, mask), (dirty[1], dirty[3], mask)),
        (rlkern.ops.grpo_loss, (old, ref, adv, mask), (dirty[1], dirty[2], dirty[3], mask)),
        (rlkern.ops.value_loss, (old, adv, mask), (dirty[1], dirty[3], mask)),
    ):
        results = []
        for main, args in ((logp, clean_args), (dirty[0], dirty_args)):
            x = main.clone().requires_grad_()
            loss, stats = fn(x, *args)
            loss.backward()
            results.append((loss, stats, x.grad))
        (l1, s1, g1), (l2, s2, g2) = results
        assert torch.isfinite(l2) and torch.equal(l1, l2) and torch.equal(g1, g2), fn.__name__
        assert all(torch.equal(s1[k], s2[k]) for k in s1)
        assert (g2[~mask] == 0).all()


def test_extreme_log_ratios_stay_finite(backend):
    """Log-ratios far beyond [-20, 20] are clamped before exp (value and gradient stay finite and
    match the oracle, whose gradient is 0 outside the clamp)."""
    logp = torch.tensor([[0.0, -80.0, 0.0, -1.0, -50.0, 0.0]])
    old = torch.tensor([[-60.0, 0.0, -1.0, -1.0, -2.0, -30.0]])
    ref = torch.tensor([[-70.0, 0.0, 30.0, -1.0, -50.0, 5.0]])
    adv = torch.tensor([[1.0, -1.0, 2.0, -3.0, -1.0, 0.5]])
    mask = torch.ones(1, 6, dtype=torch.bool)
    _compare(rlkern.ops.policy_loss, reference.policy_loss, logp, (old, adv, mask), dict(dual_clip=3.0),
             what="extreme policy")
    _compare(rlkern.ops.grpo_loss, _grpo_reference, logp, (old, ref, adv, mask), dict(beta=0.1),
             what="extreme grpo")


def test_first_epoch_ties_give_the_full_gradient(backend):
    """With logp == old_logp (the first PPO epoch) the two clip terms tie; like torch.maximum the
    kernels split the gradient half/half between them, which sums to the unclipped -A / N."""
    logp = torch.randn(2, 19) - 2
    adv = torch.randn(2, 19)
    mask = torch.rand(2, 19) < 0.7
    x = logp.clone().requires_grad_()
    loss, stats = rlkern.ops.policy_loss(x, logp, adv, mask)
    loss.backward()
    expected = torch.where(mask, -adv / mask.sum(), torch.zeros_like(adv))
    torch.testing.assert_close(x.grad, expected, atol=1e-7, rtol=1e-6)
    assert float(stats["clip_frac"]) == 0.0 and float(stats["approx_kl"]) == 0.0


# Every mask dtype the kernels read natively, and two that token_mask converts (int16, float64).
MASK_DTYPES = [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.bfloat16,
               torch.float16, torch.int16, torch.float64]


def _mask_as(valid, mask_dtype):
    """valid as a mask of mask_dtype whose nonzero entries are 1, 2, 0.5 or -1 (nonzero = valid)."""
    if mask_dtype == torch.bool:
        return valid
    values = torch.tensor([1.0, 2.0, 0.5, -1.0])[torch.randint(0, 4, valid.shape)]
    if not mask_dtype.is_floating_point:
        values = values.round().clamp(min=1) * values.sign()
    return torch.where(valid, values, torch.zeros(())).to(mask_dtype)


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_mask_of_any_dtype(backend, mask_dtype):
    """Each loss with the mask in each dtype against the float64 oracle on the bool mask (the
    tolerances of the oracle tests); T = 1100 spans a 1024-token mask chunk of the C++ kernels."""
    logp, old, ref, adv, valid = _tokens((3, 1100), torch.float32)
    mask = _mask_as(valid, mask_dtype)
    for op, ref_fn, main, others, kwargs in (
            (rlkern.ops.policy_loss, reference.policy_loss, logp, (old, adv), dict(dual_clip=3.0)),
            (rlkern.ops.grpo_loss, _grpo_reference, logp, (old, ref, adv[:, 0]), dict(loss_type="bnpo")),
            (rlkern.ops.value_loss, reference.value_loss, logp, (old, adv), {})):
        loss, stats, grad = _compare(lambda x, *o, op=op, **k: op(x, *o[:-1], mask, **k), ref_fn, main,
                                     (*others, valid), kwargs, what=f"{op.__name__} {mask_dtype} mask")
        assert (grad[~valid] == 0).all()


def test_strict_masks_refuse_values_other_than_0_and_1(monkeypatch):
    """RLKERN_STRICT_MASKS=1 (rlkern.ops._common.STRICT_MASKS) checks masks hold only 0 and 1."""
    from rlkern.ops import _common

    x = torch.randn(2, 5)
    rlkern.ops.policy_loss(x, x, x, torch.full((2, 5), 2.0))  # default: nonzero = valid
    monkeypatch.setattr(_common, "STRICT_MASKS", True)
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        rlkern.ops.policy_loss(x, x, x, torch.full((2, 5), 2.0))
    rlkern.ops.policy_loss(x, x, x, torch.ones(2, 5, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_and_grad_entry_points_match_autograd(backend, dtype):
    logp, old, ref, adv, mask = _tokens((3, 22), dtype)
    x = logp.clone().requires_grad_()
    loss, stats = rlkern.ops.grpo_loss(x, old, ref, adv[:, 0], mask, loss_type="dr_grpo")
    loss.backward()
    loss2, grad2, stats2 = L.grpo_loss_and_grad(logp, old, ref, adv[:, 0], mask, loss_type="dr_grpo")
    assert torch.equal(loss.detach(), loss2) and torch.equal(x.grad, grad2) and grad2.dtype == dtype
    assert all(torch.equal(stats[k], stats2[k]) for k in stats)
    x = logp.clone().requires_grad_()
    loss, _ = rlkern.ops.policy_loss(x, old, adv, mask, dual_clip=3.0, agg="seq-mean-token-sum")
    loss.backward()
    loss2, grad2, _ = L.policy_loss_and_grad(logp, old, adv, mask, dual_clip=3.0, agg="seq-mean-token-sum")
    assert torch.equal(loss.detach(), loss2) and torch.equal(x.grad, grad2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_twice(backend, dtype):
    """The first eager backward may turn the forward's saved per-token gradients into d logp in place
    (fp32); a second backward through the same graph (retain_graph) then recomputes them. Both give
    the bits of the no-autograd entry point."""
    logp, old, ref, adv, mask = _tokens((3, 22), dtype)
    for loss_fn, and_grad, args, kwargs in (
            (rlkern.ops.grpo_loss, L.grpo_loss_and_grad, (old, ref, adv[:, 0], mask), {"beta": 0.1}),
            (rlkern.ops.policy_loss, L.policy_loss_and_grad, (old, adv, mask), {"dual_clip": 3.0})):
        x = logp.clone().requires_grad_()
        loss, _ = loss_fn(x, *args, **kwargs)
        (first,) = torch.autograd.grad(loss, x, retain_graph=True)
        (second,) = torch.autograd.grad(loss, x)
        _, expected, _ = and_grad(logp, *args, **kwargs)
        assert torch.equal(first, expected) and torch.equal(second, expected), loss_fn.__name__


def test_large_t(kernel_backend):
    """One long-sequence case (T = 5000: many 16-lane blocks and a tail; one Triton block loop)."""
    rows, length = (2, 5000) if kernel_backend == "cpp" else (1, 2100)
    logp, old, ref, adv, mask = _tokens((rows, length), torch.bfloat16)
    _compare(rlkern.ops.grpo_loss, _grpo_reference, logp, (old, ref, adv[:, 0], mask), {}, what="large T")


# Right-padded rows whose last valid token sits on either side of the C++ kernels' 16-token blocks
# and 1024-token chunks (csrc/losses.cpp live_end: the blocks after it are skipped), plus an
# all-padding row and a full one.
_PADDED_LENGTHS = (0, 1, 15, 16, 17, 1023, 1024, 1025, 1040, 2048, 2085)


@pytest.mark.parametrize("dtype, mask_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bool),
                                               (torch.bfloat16, torch.int64)])
@pytest.mark.parametrize("case", ["ppo", "cispo", "gspo", "vespo", "gmpo", "value", "and_grad"])
def test_right_padding_is_skipped_exactly(dtype, mask_dtype, case):
    """C++ backend, right-padded rows with NaN in every padded input: the loss, the stats and the
    gradient match the float64 oracle (the skipped padding adds nothing), and every padded gradient
    is written as +0.0 (outputs start as NaN here). fp32 takes the in-place backward over the saved
    gradient, bf16 a separate gradient buffer; the masks are verl's float, TRL's int and bool ones
    (staged differently: a staged 0 is +0.0 from a bool mask and -0.0 from the others)."""
    rows, length = len(_PADDED_LENGTHS), max(_PADDED_LENGTHS)
    mask = torch.arange(length) < torch.tensor(_PADDED_LENGTHS)[:, None]
    typed_mask = mask.to(mask_dtype)
    logp, old, ref, adv, _ = _tokens((rows, length), dtype)
    logp, old, ref, adv = (t.masked_fill(~mask, float("nan")) for t in (logp, old, ref, adv))
    adv_row = torch.randn(rows).to(dtype)
    if case == "and_grad":  # float64 runs the reference; the float64 padding's NaN is never read either
        _, expected, _ = L.grpo_loss_and_grad(logp.double(), old.double(), ref.double(), adv.double(), mask,
                                              loss_type="dapo")
    with rlkern.use_backend("cpp"):
        if case == "and_grad":
            _, grad, _ = L.grpo_loss_and_grad(logp, old, ref, adv, typed_mask, loss_type="dapo")
            torch.testing.assert_close(grad.double()[mask], expected[mask], atol=1e-6,
                                       rtol=GRAD_RTOL[dtype])
        elif case == "value":
            grad = _compare(rlkern.ops.value_loss, reference.value_loss, logp, (old, adv, typed_mask), {},
                            what=case)[2]
        elif case in ("ppo", "gmpo"):
            kwargs = {"variant": "gmpo"} if case == "gmpo" else {}
            grad = _compare(rlkern.ops.policy_loss, reference.policy_loss_variant, logp,
                            (old, adv, typed_mask), kwargs, what=case)[2]
        else:
            loss_type = {"gspo": "grpo"}.get(case, case)
            kwargs = {"loss_type": loss_type, "beta": 0.0}
            if case == "gspo":
                kwargs["importance_sampling_level"] = "sequence"
            grad = _compare(rlkern.ops.grpo_loss, _grpo_variant_reference, logp,
                            (old, None, adv_row, typed_mask), kwargs, what=case)[2]
    padded = grad[~mask]
    assert torch.equal(padded, torch.zeros_like(padded)) and not padded.signbit().any()


def _grpo_variant_reference(logp, old, ref, adv, mask, *, loss_type, beta,
                            importance_sampling_level="token"):
    """rlkern.reference's GRPO loss of any loss type, with no reference model (beta = 0)."""
    return reference.grpo_loss_variant(logp, old, logp.detach(), adv, mask, loss_type=loss_type, beta=beta,
                                       importance_sampling_level=importance_sampling_level)


def test_batch_invariance(kernel_backend):
    """A row's gradient is the same bits alone or in a batch (up to its aggregation scale), and the
    loss does not depend on the thread count."""
    rows = 300 if kernel_backend == "cpp" else 8
    logp, old, ref, adv, mask = _tokens((rows, 77), torch.float32)
    _, grad_all, _ = L.policy_loss_and_grad(logp, old, adv, mask, agg="seq-mean-token-sum-norm")
    for r in (0, rows // 2, rows - 1):
        _, grad_one, _ = L.policy_loss_and_grad(logp[r:r + 1], old[r:r + 1], adv[r:r + 1], mask[r:r + 1],
                                                agg="seq-mean-token-sum-norm")
        assert torch.equal(grad_one, grad_all[r:r + 1])
    loss_2, _ = rlkern.ops.grpo_loss(logp, old, ref, adv[:, 0], mask)
    torch.set_num_threads(1)
    try:
        loss_1, _ = rlkern.ops.grpo_loss(logp, old, ref, adv[:, 0], mask)
    finally:
        torch.set_num_threads(2)
    assert torch.equal(loss_1, loss_2)


def _kink_free_inputs(shape, dtype):
    """Log-ratios in {0, +-0.6} + small noise: every token sits clearly inside one branch of each
    clip (bounds at log 0.8 ~ -0.22, log 1.2 ~ 0.18, dual clip at ratio 3), so finite differences
    never straddle a kink."""
    centre = torch.tensor([0.0, 0.6, -0.6])[torch.randint(0, 3, shape)]
    logp = (torch.rand(shape) * -2).to(dtype)
    old = logp - centre - 0.02 * torch.rand(shape)
    ref = logp + torch.randn(shape) * 0.5
    return logp, old, ref, torch.randn(shape).to(dtype), torch.rand(shape) < 0.8


def test_gradcheck_reference():
    logp, old, ref, adv, mask = _kink_free_inputs((3, 7), torch.float64)
    x = logp.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: reference.policy_loss(t, old, adv, mask, dual_clip=3.0, agg="seq-mean-token-mean")[0], (x,))
    assert torch.autograd.gradcheck(lambda t: reference.grpo_loss(t, old, ref, adv[:, 0], mask)[0], (x,))
    assert torch.autograd.gradcheck(
        lambda t: reference.grpo_loss(t, old, ref, adv[:, 0], mask, beta=0.5, use_bias_correction_kl=True)[0],
        (x,))
    assert torch.autograd.gradcheck(lambda t: reference.value_loss(t, old, adv, mask, clip=0.3)[0], (x,))


@pytest.mark.filterwarnings("ignore:Input #0 requires gradient and is not a double precision")
def test_gradcheck_cpp():
    # fp32 kernels: a large step and loose bounds; a wrong formula (sign, missing ratio factor,
    # missing KL term, wrong normaliser) is off by O(1) relative, far above them.
    logp, old, ref, adv, mask = _kink_free_inputs((3, 7), torch.float32)
    x = logp.requires_grad_()
    tol = dict(eps=1e-3, atol=2e-3, rtol=2e-2, fast_mode=False, nondet_tol=0.0)
    with rlkern.use_backend("cpp"):
        assert torch.autograd.gradcheck(
            lambda t: rlkern.ops.policy_loss(t, old, adv, mask, dual_clip=3.0, agg="seq-mean-token-mean")[0],
            (x,),
            **tol)
        assert torch.autograd.gradcheck(lambda t: rlkern.ops.grpo_loss(t, old, ref, adv[:, 0], mask)[0], (x,),
                                        **tol)
        assert torch.autograd.gradcheck(
            lambda t: rlkern.ops.grpo_loss(t, old, ref, adv[:, 0], mask, beta=0.5,
                                           use_bias_correction_kl=True)[0],
            (x,), **tol)
        assert torch.autograd.gradcheck(lambda t: rlkern.ops.value_loss(t, old, adv, mask, clip=0.3)[0], (x,),
                                        **tol)


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("kind", [0, 1, 2, 3])  # policy, grpo, value, grpo with bias-corrected KL
def test_opcheck(backend_name, kind):
    logp, old, ref, adv, mask = _tokens((3, 21), torch.float32)
    grpo = kind in (1, 3)
    a = adv[:, 0].contiguous() if grpo else adv
    r = ref if grpo else None
    w = torch.rand(3, 21) if kind == 0 else None
    mask = mask.float() if kind == 1 else mask.long() if kind == 2 else mask
    dual = 3.0 if kind == 0 else math.inf
    for save_grad in (0, 1):  # (2: the caller drops `saved`, which the backward may then overwrite)
        args = (logp.requires_grad_(), old, a, r, w, mask, kind, 0.2, 0.28, dual, 0.04, 0.2, grpo,
                -1.0 if not grpo else 3.0, save_grad, backend_name, 0, 0, math.inf, 1.0, 1.05, None, 2.0, 3.0,
                3.0, 2.0)
        torch.library.opcheck(torch.ops.rlkern.losses_fwd.default, args)
    _, _, row_scale, row_aux, saved = torch.ops.rlkern.losses_fwd(*args)
    bwd = (torch.tensor(1.5), logp.detach(), old, a, r, w, mask, row_scale, kind, 0.2, 0.28, dual, 0.04, 0.2,
           backend_name, 0, 0, math.inf, 1.0, 1.05, row_aux, None, 2.0, 3.0, 3.0, 2.0)
    torch.library.opcheck(torch.ops.rlkern.losses_bwd.default, bwd)
    saved_bwd = (torch.tensor(1.5), saved.detach(), mask, row_scale.detach(), torch.float32, backend_name,
                 None)
    torch.library.opcheck(torch.ops.rlkern.losses_bwd_saved.default, saved_bwd)
    # The two backwards agree bit for bit (the forward saved the same product the backward computes).
    assert torch.equal(torch.ops.rlkern.losses_bwd(*bwd), torch.ops.rlkern.losses_bwd_saved(*saved_bwd))


def test_torch_compile_fullgraph():
    logp, old, ref, adv, mask = _tokens((3, 20), torch.float32)

    def step(x):
        p, ps = rlkern.ops.policy_loss(x, old, adv, mask, dual_clip=3.0)
        g, gs = rlkern.ops.grpo_loss(x, old, ref, adv[:, 0], mask, loss_type="bnpo")
        v, vs = rlkern.ops.value_loss(x, old, adv, mask)
        return p + g + 0.5 * v, ps["clip_frac"] + gs["kl"] + vs["clip_frac"]

    compiled_matches_eager(step, logp)


def compiled_matches_eager(step, logp):
    """``step(x) -> (loss, stat)`` under torch.compile(fullgraph=True) gives eager's loss, stat and
    d loss / d x."""
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1, x2 = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    (out_c, stat_c), (out_e, stat_e) = compiled(x1), step(x2)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(stat_c, stat_e)
    torch.testing.assert_close(x1.grad, x2.grad)


def _bad(make, error, match):
    return pytest.param(make, error, match, id=match[:40])


_X = lambda *s: torch.randn(*s)  # noqa: E731
_M = lambda *s: torch.ones(*s, dtype=torch.bool)  # noqa: E731


@pytest.mark.parametrize("make, error, match", [
    _bad(lambda: rlkern.ops.policy_loss(_X(2, 5), _X(2, 4), _X(2, 5), _M(2, 5)), ValueError,
         r"old_logp must have shape \(2, 5\)"),
    _bad(lambda: rlkern.ops.policy_loss(_X(2, 5), _X(2, 5), _X(3), _M(2, 5)), ValueError,
         r"advantages must have shape \(2, 5\) \(per token\) or \(2,\) \(per sequence\)"),
    _bad(lambda: rlkern.ops.policy_loss(_X(2, 5), _X(2, 5), _X(2, 5), _M(2, 4)), ValueError,
         r"mask must have shape \(2, 5\)"),
    _bad(lambda: rlkern.ops.policy_loss(_X(2, 5), _X(2, 5), _X(2, 5), _M(2, 5), agg="mean"), ValueError,
         r"agg must be one of \['token-mean', 'seq-mean-token-sum'"),
    _bad(lambda: rlkern.ops.policy_loss(_X(2, 5), _X(2, 5), _X(2, 5), _M(2, 5), clip_low=1.0), ValueError,
         r"clip_low must be in \[0, 1\)"),
    _bad(lambda: rlkern.ops.policy_loss(_X(2, 5), _X(2, 5), _X(2, 5), _M(2, 5), clip_low=-0.1), ValueError,
         r"clip_low must be in \[0, 1\)"),
    _bad(lambda: rlkern.ops.policy_loss(_X(2, 5), _X(2, 5), _X(2, 5), _M(2, 5), clip_high=float("nan")),
         ValueError,
         "clip_high must be a finite number >= 0"),
    _bad(lambda: rlkern.ops.policy_loss(_X(2, 5), _X(2, 5), _X(2, 5), _M(2, 5), dual_clip=1.0), ValueError,
         "dual_clip must be None or a finite number > 1"),
    _bad(lambda: rlkern.ops.policy_loss(_X(2, 5), _X(2, 5), _X(2, 5), _M(2, 5), weights=_X(5)), ValueError,
         r"weights must have shape \(2, 5\)"),
    _bad(lambda: rlkern.ops.policy_loss(_X(2, 5).long(), _X(2, 5), _X(2, 5), _M(2, 5)), TypeError,
         "logp must be float32, bfloat16, float16 or float64"),
    _bad(lambda: rlkern.ops.policy_loss([[0.0]], _X(1, 1), _X(1, 1), _M(1, 1)), TypeError,
         "logp must be a torch.Tensor"),
    _bad(lambda: rlkern.ops.policy_loss(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0),
                                        torch.tensor(True)),
         ValueError, r"logp must have shape \[..., T\]"),
    _bad(lambda: rlkern.ops.grpo_loss(_X(2, 5), _X(2, 5), _X(2, 5), _X(2), _M(2, 5), loss_type="ppo"),
         ValueError,
         r"loss_type must be one of \['grpo', 'bnpo', 'dr_grpo', 'dapo', 'cispo', 'sapo', 'luspo', "
         r"'vespo'\]"),
    _bad(lambda: rlkern.ops.grpo_loss(_X(2, 5), _X(2, 5), _X(2, 4), _X(2), _M(2, 5)), ValueError,
         r"ref_logp must have shape \(2, 5\)"),
    _bad(lambda: rlkern.ops.grpo_loss(_X(2, 5), _X(2, 5), _X(2, 5), _X(2), _M(2, 5), beta=-0.1), ValueError,
         "beta must be a finite number >= 0"),
    _bad(lambda: rlkern.ops.grpo_loss(_X(2, 5), _X(2, 5), _X(2, 5), _X(2), _M(2, 5), loss_type="dapo",
                                      num_items_in_batch=-1), ValueError,
         "num_items_in_batch must be None or a finite number >= 0"),
    _bad(lambda: rlkern.ops.grpo_loss(_X(2, 5), _X(2, 5), _X(2, 5), _X(2), _M(2, 5), loss_type="dr_grpo",
                                      max_completion_length=0), ValueError,
         "max_completion_length must be None or an int >= 1"),
    _bad(lambda: rlkern.ops.value_loss(_X(2, 5), _X(2, 5), _X(2, 5), _M(2, 5), clip=0.0), ValueError,
         "clip must be a finite number > 0"),
    _bad(lambda: rlkern.ops.value_loss(_X(2, 5), _X(2, 5), _X(2), _M(2, 5)), ValueError,
         r"returns must have shape \(2, 5\)"),
    _bad(lambda: rlkern.ops.value_loss(_X(2, 5), _X(2, 5), _X(2, 5), _M(2, 5), agg="sum"), ValueError,
         "agg must be one of"),
])
def test_bad_input(backend, make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_remembered_hyperparameters_still_refuse_what_they_refused():
    """The scalar checks of grpo_loss / policy_loss keep their answers per value *and type*
    (losses._memoised): a value accepted once must not let a different-typed equal value through
    (True == 1 == 1.0 hash alike), a refused value is refused on every call, NaN (never equal to
    itself) always reaches the check, and an unhashable argument gets the check's own error."""
    x, m = _X(2, 5), _M(2, 5)
    for _ in range(2):  # the second round runs against filled caches
        rlkern.ops.grpo_loss(x, x, x, _X(2), m, beta=1, clip_low=0, clip_high=1.0)
        rlkern.ops.policy_loss(x, x, _X(2), m, clip_low=0, clip_high=1)
        with pytest.raises(TypeError, match="beta must be a real number"):
            rlkern.ops.grpo_loss(x, x, x, _X(2), m, beta=True)
        with pytest.raises(TypeError, match="clip_low must be a real number"):
            rlkern.ops.policy_loss(x, x, _X(2), m, clip_low=False)
        with pytest.raises(TypeError, match="clip_high must be a real number"):
            rlkern.ops.policy_loss(x, x, _X(2), m, clip_high=True)
        with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
            rlkern.ops.grpo_loss(x, x, x, _X(2), m, beta=float("nan"))
        with pytest.raises(TypeError, match="clip_high must be a real number"):
            rlkern.ops.grpo_loss(x, x, x, _X(2), m, clip_high=[0.2])
        with pytest.raises(TypeError, match="clip_low must be a real number"):
            rlkern.ops.policy_loss(x, x, _X(2), m, clip_low=torch.tensor(0.2))
        with pytest.raises(ValueError, match="ref_logp is required when beta != 0"):
            rlkern.ops.grpo_loss(x, x, None, _X(2), m, beta=1)
    # The accepted values are the same numbers as before the cache: numpy scalars read exactly.
    loss_np = rlkern.ops.grpo_loss(x, x, x, _X(2).zero_() + 1, m, beta=np.float32(0.1))[0]
    loss_py = rlkern.ops.grpo_loss(x, x, x, _X(2).zero_() + 1, m, beta=float(np.float32(0.1)))[0]
    assert torch.equal(loss_np, loss_py)


def test_cpp_kernel_checks_shapes_itself():
    """Called directly (bypassing the Python checks) the C++ kernel refuses inconsistent tensors."""
    x = torch.randn(2, 5)
    outs = (torch.empty(()), torch.empty(LOSS_STATS), torch.empty(2))
    opts = (0, 0, math.inf, 1.0, 1.05, torch.empty(2, 2), None, 2.0, 3.0, 3.0, 2.0)
    with pytest.raises(RuntimeError, match="old must be a contiguous"):
        cpp_kernels().losses_fwd(x, torch.randn(2, 4), x, None, None, torch.ones(2, 5, dtype=torch.bool), 0,
                                 0.2, 0.2, math.inf, 0.0, 0.0, False, -1.0, *outs, None, *opts)
    with pytest.raises(RuntimeError, match="ref_logp is used by the grpo kinds only"):
        cpp_kernels().losses_fwd(x, x, x, x, None, torch.ones(2, 5, dtype=torch.bool), 0, 0.2, 0.2,
                                 math.inf, 0.0, 0.0, False, -1.0, *outs, None, *opts)
