"""The policy-loss variants of rlkern.ops.policy_loss / grpo_loss (issue 13): the surrogate (ppo, cispo,
cispo_cap, sapo, gpg, gmpo, dro; TRL's cispo / sapo / luspo / vespo loss types and delta) and the
importance-ratio level (token, sequence, sequence_token), against

* the float64 oracle (rlkern.reference.policy_loss_variant / grpo_loss_variant), every backend, dtype
  and mask dtype, gradients included;
* the peers' own code: verl 0.9.1 ``core_algos.compute_policy_loss_{cispo,gspo,sapo,gpg,geo_mean,dro}``
  called as plain functions, and TRL 1.16 ``GRPOTrainer._compute_loss`` itself, called unbound on a stand-in
  trainer object whose ``_get_per_token_logps_and_entropies`` returns our log-probs (no model);
* hostile inputs: NaN at a valid token reaches the loss and the gradient (at the sequence level the
  whole row's), NaN in padding changes nothing, an all-padding row gives 0.

Tolerances (tests/test_losses.py explains the rule): loss and stats 1e-6 + 1e-5 relative over the
reference in the input dtype; d logp 1e-7 + rtol 1e-5 (fp32) / one ulp of bf16 / fp16. The sequence
levels add one fp32 row sum of n log-ratios (|s_b| <= a few units, n <= 1100): its rounding,
~n * 2^-24 * max |log r|, moves r_b by <= 1e-5 relative, which the stated rtol covers. Against the
peers (fp32 in both): 1e-5 relative, 1e-6 absolute: the same terms summed in another order.
"""

from __future__ import annotations

import math
import types

import pytest
import torch

import rlkern
from rlkern import reference
from rlkern.ops import losses as L
from tests.conftest import ALL_BACKENDS, DTYPES
from tests.test_losses import (
    _compare,  # the oracle comparison (loss, every stat, d logp) and its tolerances
    compiled_matches_eager,
)

MASK_DTYPES = (torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.bfloat16,
               torch.float16)
NEW_GRPO_TYPES = ("cispo", "sapo", "luspo", "vespo")
# gmpo (a loss per row) and dro have the token level only; dro needs its beta.
TOKEN_ONLY = ("gmpo", "dro")
VARIANT_LEVELS = [(v, lv) for v in L.POLICY_VARIANTS for lv in L.RATIO_LEVELS
                  if lv == "token" or v not in TOKEN_ONLY]


def _vkw(variant):
    return {"dro_beta": 0.3} if variant == "dro" else {}


def _tokens(shape, dtype, *, spread=0.4, valid=0.75, generator=None):
    g = generator
    logp = (torch.rand(shape, generator=g) * -3).to(dtype)
    old = (logp.float() + torch.randn(shape, generator=g) * spread).to(dtype)
    ref = (logp.float() + torch.randn(shape, generator=g) * spread).to(dtype)
    adv = torch.randn(shape, generator=g).to(dtype)
    mask = torch.rand(shape, generator=g) < valid
    mask[..., 0] = True  # every row has a token (an empty row: test_empty_rows)
    return logp, old, ref, adv, mask


def _policy_ref(logp, old, adv, mask, **kw):
    return reference.policy_loss_variant(logp, old, adv, mask, **kw)


def _grpo_ref(logp, old, ref, adv, mask, **kw):
    return reference.grpo_loss_variant(logp, old, ref, adv, mask, **kw)


# ------------------------------------------------------------------------------------------------
# The float64 oracle
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("variant", "level"), VARIANT_LEVELS)
def test_policy_variants_match_oracle(backend, dtype, variant, level):
    logp, old, _, adv, mask = _tokens((3, 37), dtype)
    clip_high = 1.3 if variant == "cispo_cap" else 0.28  # cispo_cap: an absolute cap, some ratios above
    kw = dict(clip_low=0.2, clip_high=clip_high, variant=variant, ratio_level=level,
              agg="seq-mean-token-mean" if variant == "sapo" else "token-mean", **_vkw(variant))
    _, stats, _ = _compare(rlkern.ops.policy_loss, _policy_ref, logp, (old, adv, mask), kw,
                           what=f"policy {variant} {level}")
    if variant in ("ppo", "cispo", "cispo_cap", "gmpo") and level == "token":
        assert 0 < stats["clip_frac"] < 1  # the inputs exercise the clip


@pytest.mark.parametrize(("variant", "level"), VARIANT_LEVELS)
@pytest.mark.parametrize("per_sequence_adv", [False, True])
def test_policy_variants_weights_and_aggs(backend, variant, level, per_sequence_adv):
    logp, old, _, adv, mask = _tokens((2, 3, 19), torch.float32, spread=0.8)
    if per_sequence_adv:
        adv = adv[..., 0].contiguous()
    weights = torch.rand(2, 3, 19)
    for agg in L.POLICY_AGGS:
        kw = dict(clip_high=2.0 if variant == "cispo_cap" else 0.28, variant=variant, ratio_level=level,
                  agg=agg, weights=weights, **_vkw(variant))
        if variant == "ppo":
            kw.update(delta=1.4)
        if variant == "sapo":
            kw.update(sapo_tau_pos=0.7, sapo_tau_neg=1.3)
        _compare(rlkern.ops.policy_loss, _policy_ref, logp, (old, adv, mask), kw,
                 what=f"policy {variant} {level} {agg}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type", L.GRPO_LOSS_TYPES)
@pytest.mark.parametrize("level", L.GRPO_IS_LEVELS)
def test_grpo_loss_types_match_oracle(backend, dtype, loss_type, level):
    logp, old, ref, adv, mask = _tokens((4, 21), dtype)
    kw = dict(beta=0.04, clip_low=0.2, clip_high=1.2 if loss_type == "cispo" else 0.28,
              loss_type=loss_type, importance_sampling_level=level)
    _compare(rlkern.ops.grpo_loss, _grpo_ref, logp, (old, ref, adv[:, 0].contiguous(), mask), kw,
             what=f"grpo {loss_type} {level}")


@pytest.mark.parametrize("kwargs", [
    dict(loss_type="dapo", delta=1.5, num_items_in_batch=70),
    dict(loss_type="grpo", delta=1.1, use_bias_correction_kl=True, beta=0.3),
    dict(loss_type="luspo", importance_sampling_level="sequence", use_bias_correction_kl=True, beta=0.2),
    dict(loss_type="cispo", clip_high=5.0, num_items_in_batch=torch.tensor(33.0),
         use_bias_correction_kl=True),
    dict(loss_type="cispo", importance_sampling_level="sequence", clip_high=1.05),
    dict(loss_type="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=2.0, beta=0.1),
    dict(loss_type="sapo", importance_sampling_level="sequence", use_bias_correction_kl=True),
    dict(loss_type="bnpo", importance_sampling_level="sequence", delta=1.2),
    dict(loss_type="dr_grpo", importance_sampling_level="sequence", max_completion_length=40),
    dict(loss_type="vespo", num_items_in_batch=50, beta=0.2, use_bias_correction_kl=True),
    dict(loss_type="vespo", importance_sampling_level="sequence", use_bias_correction_kl=True, beta=0.1,
         vespo_k_pos=1.0, vespo_lambda_pos=0.5, vespo_k_neg=4.0, vespo_lambda_neg=0.0),
    dict(loss_type="vespo", importance_sampling_ratio=True)])
@pytest.mark.parametrize("per_token", [False, True])
def test_grpo_options_weights(backend, kwargs, per_token):
    logp, old, ref, adv, mask = _tokens((2, 3, 19), torch.float32, spread=0.6)
    a = adv if per_token else adv[..., 0].contiguous()
    weights = torch.rand(2, 3, 19)
    kwargs = dict(kwargs)
    if kwargs.get("importance_sampling_ratio"):  # vespo: TRL's vLLM IS ratios, folded into phi
        kwargs["importance_sampling_ratio"] = torch.rand(2, 3, 19) * 2 + 0.1
    _compare(rlkern.ops.grpo_loss, _grpo_ref, logp, (old, ref, a, mask), dict(kwargs, weights=weights),
             what=f"grpo {kwargs} per_token={per_token}")


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_mask_of_any_dtype(backend, mask_dtype):
    """T = 1100 spans the C++ kernels' 1024-token mask chunks, in both sweeps of a sequence level."""
    logp, old, ref, adv, valid = _tokens((3, 1100), torch.float32)
    mask = valid.to(mask_dtype)
    for op, ref_fn, others, kw in (
            (rlkern.ops.policy_loss, _policy_ref, (old, adv), dict(variant="cispo",
                                                                  ratio_level="sequence_token")),
            (rlkern.ops.policy_loss, _policy_ref, (old, adv), dict(variant="sapo", ratio_level="sequence")),
            (rlkern.ops.grpo_loss, _grpo_ref, (old, ref, adv[:, 0]), dict(loss_type="cispo", clip_high=1.1)),
            (rlkern.ops.grpo_loss, _grpo_ref, (old, ref, adv[:, 0]),
             dict(loss_type="grpo", importance_sampling_level="sequence")),
            (rlkern.ops.grpo_loss, _grpo_ref, (old, ref, adv[:, 0]), dict(loss_type="vespo")),
            (rlkern.ops.policy_loss, _policy_ref, (old, adv), dict(variant="gmpo"))):
        _, _, grad = _compare(lambda x, *o, op=op, **k: op(x, *o[:-1], mask, **k), ref_fn, logp,
                              (*others, valid), kw, what=f"{op.__name__} {kw} {mask_dtype} mask")
        assert (grad[~valid] == 0).all()


@pytest.mark.parametrize("level", L.RATIO_LEVELS)
def test_and_grad_entry_points(backend, level):
    """policy_loss_and_grad / grpo_loss_and_grad: the autograd gradient, without autograd."""
    logp, old, ref, adv, mask = _tokens((3, 23), torch.float32)
    for variant in (v for v, lv in VARIANT_LEVELS if lv == level):
        kw = dict(variant=variant, ratio_level=level, clip_high=1.5 if variant == "cispo_cap" else 0.2,
                  **_vkw(variant))
        x = logp.clone().requires_grad_()
        loss, stats = rlkern.ops.policy_loss(x, old, adv, mask, **kw)
        loss.backward()
        loss2, grad2, stats2 = L.policy_loss_and_grad(logp, old, adv, mask, **kw)
        assert torch.allclose(loss, loss2) and torch.allclose(x.grad, grad2, rtol=1e-6, atol=1e-9), variant
    if level == "sequence_token":
        return
    for loss_type in NEW_GRPO_TYPES:
        kw = dict(loss_type=loss_type, importance_sampling_level=level, use_bias_correction_kl=True)
        x = logp.clone().requires_grad_()
        loss, _ = rlkern.ops.grpo_loss(x, old, ref, adv[:, 0], mask, **kw)
        loss.backward()
        loss2, grad2, _ = L.grpo_loss_and_grad(logp, old, ref, adv[:, 0], mask, **kw)
        assert torch.allclose(loss, loss2) and torch.allclose(x.grad, grad2, rtol=1e-6, atol=1e-9), loss_type


@pytest.mark.parametrize("level", ["token", "sequence", "sequence_token"])
def test_second_backward_recomputes_the_same_gradient(backend, level):
    """retain_graph: the first backward may consume the saved gradient; the second recomputes it from
    the inputs and the saved row ratios (row_aux), or (gmpo, vespo) sweeps the row again, and must agree."""
    logp, old, ref, adv, mask = _tokens((3, 29), torch.float32)
    variants = ("ppo", "sapo", "cispo") if level != "token" else ("gmpo", "dro")
    for variant in variants:
        x = logp.clone().requires_grad_()
        loss, _ = rlkern.ops.policy_loss(x, old, adv, mask, variant=variant, ratio_level=level,
                                         weights=torch.rand(3, 29), **_vkw(variant))
        (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
        g1 = g1.clone()
        (g2,) = torch.autograd.grad(loss, x)
        assert torch.allclose(g1, g2, rtol=1e-6, atol=1e-9), variant
    if level == "sequence_token":
        return
    x = logp.clone().requires_grad_()
    loss, _ = rlkern.ops.grpo_loss(x, old, ref, adv[:, 0], mask, loss_type="vespo", beta=0.1,
                                   use_bias_correction_kl=True, importance_sampling_level=level,
                                   importance_sampling_ratio=torch.rand(3, 29) + 0.5)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    g1 = g1.clone()
    (g2,) = torch.autograd.grad(loss, x)
    assert torch.allclose(g1, g2, rtol=1e-6, atol=1e-9), "vespo"


def test_gradcheck_reference():
    """torch.autograd.gradcheck on small float64 inputs for the reference (the kernels compute in fp32:
    they are checked against the reference's analytic gradient at fp32 tolerance above)."""
    g = torch.Generator().manual_seed(1)
    logp, old, ref, adv, mask = (t.double() if t.dtype.is_floating_point else t
                                 for t in _tokens((2, 7), torch.float32, generator=g))
    x = logp.clone().requires_grad_()
    # Not sequence_token: GSPO-token's gradient is by design not the derivative of its value (the value
    # reads the row mean, the gradient sg()s it away); test_matches_verl checks it against verl's.
    for level in ("token", "sequence"):
        for variant in ("ppo", "sapo") + (("gmpo", "dro") if level == "token" else ()):
            assert torch.autograd.gradcheck(
                lambda t, v=variant, lv=level: _policy_ref(t, old, adv, mask, variant=v, ratio_level=lv,
                                                           **_vkw(v))[0], (x,))
    # Not vespo: its phi reads logp but is detached by design (TRL's get_gamma_weights is no_grad).
    for loss_type in ("cispo", "sapo", "luspo"):
        assert torch.autograd.gradcheck(
            lambda t, lt=loss_type: _grpo_ref(t, old, ref, adv[:, 0], mask, loss_type=lt,
                                              importance_sampling_level="sequence",
                                              use_bias_correction_kl=True, beta=0.3)[0], (x,))


# ------------------------------------------------------------------------------------------------
# Hostile inputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", L.RATIO_LEVELS)
def test_nan_at_a_valid_token_reaches_loss_and_gradient(level):
    logp, old, ref, adv, mask = _tokens((3, 17), torch.float32)
    mask[1, 4] = True
    old[1, 4] = math.nan
    for variant in (v for v, lv in VARIANT_LEVELS if lv == level):
        got = {}
        for backend in ALL_BACKENDS:
            with rlkern.use_backend(backend):
                x = logp.clone().requires_grad_()
                loss, stats = rlkern.ops.policy_loss(x, old, adv, mask, variant=variant, ratio_level=level,
                                                     **_vkw(variant))
                loss.backward()
                got[backend] = (loss, x.grad)
        for backend, (loss, grad) in got.items():
            what = (variant, level, backend)
            if variant == "gpg":  # -A logp reads old_logp only for approx_kl
                assert loss.isfinite() and grad.isfinite().all() and stats["approx_kl"].isnan(), what
                continue
            assert loss.isnan(), what
            if level == "token" and variant != "gmpo":
                assert grad[1, 4].isnan() and grad[0].isfinite().all(), what
            else:  # the row's ratio (gmpo: its loss) is NaN: every valid token of row 1
                assert grad[1][mask[1]].isnan().all() and grad[0].isfinite().all(), what


def test_vespo_nan_row_gets_phi_zero_as_in_trl():
    """TRL's get_gamma_weights turns a NaN row weight into phi = 0 (nan_to_num), and rlkern follows it:
    a NaN old_logp at a valid token leaves the loss finite (that row's tokens weigh 0 * A * logp) and
    the row's gradient 0, while approx_kl, which reads it, is NaN; a NaN logp still NaNs the loss
    (0 * NaN) and its own gradient (rlkern's rule). The other rows are untouched."""
    logp, old, ref, adv, mask = _tokens((3, 17), torch.float32)
    mask[1, 4] = True
    for backend in ALL_BACKENDS:
        for nan_in in ("old", "logp"):
            lp, o = logp.clone(), old.clone()
            (o if nan_in == "old" else lp)[1, 4] = math.nan
            with rlkern.use_backend(backend):
                x = lp.clone().requires_grad_()
                loss, stats = rlkern.ops.grpo_loss(x, o, ref, adv[:, 0], mask, loss_type="vespo", beta=0.0)
                loss.backward()
            what = (backend, nan_in)
            assert stats["phi_seq_mean"].isfinite() and stats["approx_kl"].isnan(), what
            assert x.grad[0].isfinite().all() and x.grad[2].isfinite().all(), what
            assert (x.grad[1][mask[1]].nan_to_num() == 0).all(), what
            if nan_in == "old":
                assert loss.isfinite() and x.grad[1, 4] == 0, what
            else:
                assert loss.isnan() and x.grad[1, 4].isnan(), what


@pytest.mark.parametrize("level", L.RATIO_LEVELS)
def test_padding_is_never_read_and_empty_rows_give_zero(backend, level):
    logp, old, ref, adv, mask = _tokens((4, 25), torch.float32)
    mask[2] = False  # an all-padding row
    dirty = [t.clone().masked_fill(~mask, v) for t, v in ((logp, math.nan), (old, math.inf),
                                                           (ref, -math.inf), (adv, math.nan))]
    for variant in (v for v, lv in VARIANT_LEVELS if lv == level):
        outs = []
        for lp, o, a in ((logp, old, adv), (dirty[0], dirty[1], dirty[3])):
            x = lp.clone().requires_grad_()
            loss, stats = rlkern.ops.policy_loss(x, o, a, mask, variant=variant, ratio_level=level,
                                                 agg="seq-mean-token-mean", **_vkw(variant))
            loss.backward()
            outs.append((loss, stats, x.grad))
        (l1, s1, g1), (l2, s2, g2) = outs
        assert torch.equal(l1, l2) and torch.equal(g1, g2) and l1.isfinite(), (variant, level)
        assert all(torch.equal(s1[k], s2[k]) for k in s1), (variant, level)
        assert (g1[2] == 0).all()
    if level == "sequence_token":
        return
    for loss_type in NEW_GRPO_TYPES:
        x = dirty[0].clone().requires_grad_()
        loss, stats = rlkern.ops.grpo_loss(x, dirty[1], dirty[2], dirty[3][:, 0].nan_to_num(), mask,
                                           loss_type=loss_type, importance_sampling_level=level)
        loss.backward()
        assert loss.isfinite() and x.grad.isfinite().all() and all(v.isfinite() for v in stats.values())
    empty = torch.zeros_like(mask)
    for loss_type in NEW_GRPO_TYPES:
        loss, stats = rlkern.ops.grpo_loss(logp, old, ref, adv[:, 0], empty, loss_type=loss_type,
                                           importance_sampling_level=level)
        # vespo: TRL's phi of an all-padding row is phi(w = 1) = 1 (k, lambda by A's sign), and its
        # phi_seq_mean averages all rows.
        phi = stats.pop("phi_seq_mean")
        assert float(phi) == pytest.approx(1.0 if loss_type == "vespo" else 0.0), loss_type
        assert float(loss) == 0.0 and all(float(v) == 0.0 for v in stats.values()), loss_type


def test_bad_options():
    logp, old, ref, adv, mask = _tokens((2, 5), torch.float32)
    with pytest.raises(ValueError, match="variant must be one of"):
        rlkern.ops.policy_loss(logp, old, adv, mask, variant="gspo")
    with pytest.raises(ValueError, match="ratio_level must be one of"):
        rlkern.ops.policy_loss(logp, old, adv, mask, ratio_level="seq")
    with pytest.raises(ValueError, match="apply to variant='ppo' only"):
        rlkern.ops.policy_loss(logp, old, adv, mask, variant="cispo", dual_clip=3.0)
    with pytest.raises(ValueError, match="importance_sampling_level must be one of"):
        rlkern.ops.grpo_loss(logp, old, ref, adv[:, 0], mask, importance_sampling_level="sequence_token")
    with pytest.raises(ValueError, match="delta must be"):
        rlkern.ops.grpo_loss(logp, old, ref, adv[:, 0], mask, delta=-1.0)
    with pytest.raises(ValueError, match="sapo_temperature_neg must be"):
        rlkern.ops.grpo_loss(logp, old, ref, adv[:, 0], mask, loss_type="sapo", sapo_temperature_neg=0.0)
    with pytest.raises(ValueError, match="has ratio_level='token' only"):
        rlkern.ops.policy_loss(logp, old, adv, mask, variant="gmpo", ratio_level="sequence")
    with pytest.raises(ValueError, match="dro_beta must be a finite number > 0"):
        rlkern.ops.policy_loss(logp, old, adv, mask, variant="dro")
    with pytest.raises(ValueError, match="dro_beta must be a finite number > 0"):
        rlkern.ops.policy_loss(logp, old, adv, mask, variant="dro", dro_beta=-1.0)
    with pytest.raises(ValueError, match="dro_beta applies to variant='dro' only"):
        rlkern.ops.policy_loss(logp, old, adv, mask, variant="gpg", dro_beta=1.0)
    with pytest.raises(ValueError, match="importance_sampling_ratio is vespo's"):
        rlkern.ops.grpo_loss(logp, old, ref, adv[:, 0], mask, importance_sampling_ratio=torch.ones(2, 5))
    with pytest.raises(ValueError, match="importance_sampling_ratio must have shape"):
        rlkern.ops.grpo_loss(logp, old, ref, adv[:, 0], mask, loss_type="vespo",
                             importance_sampling_ratio=torch.ones(2, 4))
    with pytest.raises(ValueError, match="vespo_lambda_neg"):
        rlkern.ops.grpo_loss(logp, old, ref, adv[:, 0], mask, loss_type="vespo", vespo_lambda_neg=math.nan)


# ------------------------------------------------------------------------------------------------
# The peers' own code
# ------------------------------------------------------------------------------------------------


def _verl_config(**policy_loss):
    from verl.workers.config import ActorConfig
    from verl.workers.config.actor import PolicyLossConfig

    return ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1, clip_ratio=0.2,
                       clip_ratio_high=0.28, policy_loss=PolicyLossConfig(**policy_loss))


def _peer_inputs(seed, b=6, t=23, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    logp, old, ref, adv, mask = _tokens((b, t), torch.float32, spread=spread, generator=g)
    return logp, old, ref, adv, mask


def _close(a, b, what):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (what, a, b)


# verl name -> (rlkern variant, ratio level, the agg verl uses whatever it is given)
VERL_LOSSES = {"cispo": ("cispo", "token", None), "gspo": ("ppo", "sequence_token", None),
               "sapo": ("sapo", "token", "seq-mean-token-mean"), "gpg": ("gpg", "token", None),
               "geo_mean": ("gmpo", "token", None), "dro": ("dro", "token", None)}


# verl 0.9.1's seq-mean-token-sum-norm is seq-mean-token-sum / T (rlkern's: sum / T); rlkern.compat.verl
# rescales it (tests/test_verl_policy.py), so the plain-function comparison leaves it out.
@pytest.mark.parametrize("name", list(VERL_LOSSES))
@pytest.mark.parametrize("agg", [a for a in L.POLICY_AGGS if a != "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_verl(backend, name, agg, seed):
    core = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed")
    variant, level, forced_agg = VERL_LOSSES[name]
    logp, old, _, adv, mask = _peer_inputs(seed)
    if name == "gspo":  # row offsets, so that some sequence ratios leave [0.8, 1.28]
        old = old + torch.tensor([0.5, -0.5, 0.0, 0.3, -0.3, 0.1]).unsqueeze(-1)
    mask_f = mask.float()  # verl's float response mask
    weights = torch.rand(logp.shape, generator=torch.Generator().manual_seed(seed + 7))
    if name == "geo_mean":  # some zero advantages (sgn 0) and a row with a wide drift (clipped tokens)
        adv = adv * (torch.arange(adv.shape[1]) % 5 != 0)
        old = old + torch.tensor([0.0, 0.4, 0.0, -0.4, 0.0, 0.0]).unsqueeze(-1)
    fn = core.get_policy_loss_fn(name)
    cfg = _verl_config(dro_beta=0.3) if name == "dro" else _verl_config()
    x = logp.clone().requires_grad_()
    want, metrics = fn(old_log_prob=old, log_prob=x, advantages=adv, response_mask=mask_f,
                       loss_agg_mode=agg, config=cfg, rollout_is_weights=weights)
    want.backward()
    y = logp.clone().requires_grad_()
    got, stats = rlkern.ops.policy_loss(y, old, adv, mask_f, clip_low=0.2, clip_high=0.28, variant=variant,
                                        ratio_level=level, agg=forced_agg or agg, weights=weights,
                                        dro_beta=0.3 if name == "dro" else None)
    got.backward()
    _close(got, want, f"{name} loss")
    assert torch.allclose(y.grad, x.grad, rtol=1e-5, atol=1e-7), (name, (y.grad - x.grad).abs().max())
    keys = {"actor/pg_clipfrac": "clip_frac", "actor/ppo_kl": "approx_kl",
            "actor/pg_clipfrac_lower": "clip_frac_lower"}
    for verl_key, ours in keys.items():
        if verl_key in metrics:
            _close(stats[ours], metrics[verl_key], f"{name} {verl_key}")
    if name in ("cispo", "gspo", "geo_mean"):
        assert metrics["actor/pg_clipfrac"] > 0  # the inputs exercise the clip


class _Accelerator:
    num_processes = 1

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


def trl_compute_loss(logp, old, ref, adv, mask, *, loss_type, level="token", beta=0.0, eps_low=0.2,
                     eps_high=0.28, delta=None, bias_correction=False, tau_pos=1.0, tau_neg=1.05,
                     num_items=None, weights=None, vespo=(2.0, 3.0, 3.0, 2.0)):
    """TRL 1.16 GRPOTrainer._compute_loss, the real method, on a stand-in trainer: the log-probs come
    from ``logp`` (through a function of the completion ids: the method only sees what
    _get_per_token_logps_and_entropies returns). ``weights`` enter as TRL's vLLM importance-sampling
    ratios. Returns (loss, d loss / d logp, metrics)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    x = logp.clone().requires_grad_()
    b, t = logp.shape
    args = types.SimpleNamespace(use_bias_correction_kl=bias_correction, delta=delta,
                                 sapo_temperature_pos=tau_pos, sapo_temperature_neg=tau_neg,
                                 steps_per_generation=1, vespo_k_pos=vespo[0], vespo_lambda_pos=vespo[1],
                                 vespo_k_neg=vespo[2], vespo_lambda_neg=vespo[3])
    from collections import defaultdict

    fake = types.SimpleNamespace(
        top_entropy_quantile=1.0, aux_loss_enabled=False, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, args=args, loss_type=loss_type, epsilon_low=eps_low,
        epsilon_high=eps_high, use_vllm=weights is not None, vllm_importance_sampling_correction=True,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=t, accelerator=_Accelerator(), _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list)}, get_gamma_weights=GRPOTrainer.get_gamma_weights,
        _get_per_token_logps_and_entropies=lambda *a, **k: (x, torch.zeros(b, t), None))
    inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long),
              "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": torch.tensor(float(mask.sum() if num_items is None else num_items))}
    if weights is not None:
        inputs["importance_sampling_ratio"] = weights
    loss = GRPOTrainer._compute_loss(fake, None, inputs)
    loss.backward()
    return loss.detach(), x.grad, {k: v[-1] for k, v in fake._metrics["train"].items()}


TRL_CASES = [dict(loss_type=lt, level=lv)
             for lt in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo")
             for lv in ("token", "sequence")] + [
    dict(loss_type="grpo", delta=1.25), dict(loss_type="dapo", level="sequence", delta=1.1, num_items=90),
    dict(loss_type="cispo", eps_high=5.0, beta=0.05, bias_correction=True),
    dict(loss_type="cispo", eps_high=1.1, level="sequence", beta=0.05),
    dict(loss_type="sapo", tau_pos=0.6, tau_neg=1.7, beta=0.02, bias_correction=True),
    dict(loss_type="luspo", level="sequence", beta=0.04, bias_correction=True),
    dict(loss_type="grpo", level="sequence", beta=0.04, bias_correction=True, weights=True),
    dict(loss_type="vespo"), dict(loss_type="vespo", weights=True, num_items=80),
    dict(loss_type="vespo", beta=0.05, bias_correction=True, vespo=(1.0, 0.5, 4.0, 0.0)),
    dict(loss_type="vespo", level="sequence", beta=0.05, bias_correction=True, weights=True)]


@pytest.mark.parametrize("case", TRL_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_matches_trl_compute_loss(backend, case):
    pytest.importorskip("trl")
    case = dict(case)
    logp, old, ref, adv, mask = _peer_inputs(3, spread=0.3)
    mask[4] = False  # an all-padding completion
    a = adv[:, 0].contiguous()
    # TRL flags an empty row at the sequence level by its ratio exp(0) = 1 and its advantage; rlkern
    # counts it as unclipped. They agree for A <= 0 (neither cispo's nor the high clip can flag it).
    a[4] = -a[4].abs()
    w = torch.rand(logp.shape) + 0.5 if case.pop("weights", False) else None
    want, want_grad, metrics = trl_compute_loss(logp, old, ref, a, mask, weights=w, **case)
    x = logp.clone().requires_grad_()
    eps_high = case.get("eps_high", 0.28)
    got, stats = rlkern.ops.grpo_loss(
        x, old, ref, a, mask.long(), beta=case.get("beta", 0.0), clip_low=case.get("eps_low", 0.2),
        clip_high=eps_high, loss_type=case["loss_type"], max_completion_length=logp.shape[1],
        num_items_in_batch=case.get("num_items"), use_bias_correction_kl=case.get("bias_correction", False),
        importance_sampling_level=case.get("level", "token"), delta=case.get("delta"),
        sapo_temperature_pos=case.get("tau_pos", 1.0), sapo_temperature_neg=case.get("tau_neg", 1.05),
        # TRL multiplies its vLLM IS ratios into the loss, except for vespo, which folds them into phi.
        **({"importance_sampling_ratio": w} if case["loss_type"] == "vespo" else {"weights": w}),
        **dict(zip(("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"),
                   case.get("vespo", (2.0, 3.0, 3.0, 2.0)), strict=True)))
    got.backward()
    _close(got, want, f"{case} loss")
    assert torch.allclose(x.grad, want_grad, rtol=1e-5, atol=1e-7), (case, (x.grad - want_grad).abs().max())
    names = {"clip_ratio/low_mean": "clip_ratio_low", "clip_ratio/high_mean": "clip_ratio_high",
             "clip_ratio/region_mean": "clip_ratio", "cispo_clip_ratio": "cispo_clip_ratio", "kl": "kl",
             "vespo/phi_seq_mean": "phi_seq_mean"}
    for trl_key, ours in names.items():
        if trl_key in metrics:
            _close(stats[ours], metrics[trl_key], f"{case} {trl_key}")


# ------------------------------------------------------------------------------------------------
# Row-constant rows: the sequence level with per-row advantages, no weights and no KL term (TRL's GSPO
# with beta = 0, ref_logp None). One sweep per row; the backward is the row's G_b alone.
# ------------------------------------------------------------------------------------------------


def _grpo_ref_no_ref(logp, old, adv, mask, **kw):
    """The oracle for ref_logp=None: logp itself as the reference (k3 = 0, its gradient 0)."""
    return reference.grpo_loss_variant(logp, old, logp.detach(), adv, mask, **kw)


def _grpo_no_ref(x, old, adv, mask, **kw):
    return rlkern.ops.grpo_loss(x, old, None, adv, mask, **kw)


_ROW_CONSTANT_CASES = [
    (rlkern.ops.policy_loss, _policy_ref, dict(variant="ppo", ratio_level="sequence", dual_clip=3.0)),
    (rlkern.ops.policy_loss, _policy_ref, dict(variant="sapo", ratio_level="sequence",
                                               agg="seq-mean-token-mean")),
    (_grpo_no_ref, _grpo_ref_no_ref, dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.0,
                                          clip_low=3e-4, clip_high=4e-4)),
    (_grpo_no_ref, _grpo_ref_no_ref, dict(loss_type="dr_grpo", importance_sampling_level="sequence",
                                          beta=0.0, use_bias_correction_kl=True, delta=1.1)),
    (_grpo_no_ref, _grpo_ref_no_ref, dict(loss_type="sapo", importance_sampling_level="sequence", beta=0.0))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64])
@pytest.mark.parametrize("case", range(len(_ROW_CONSTANT_CASES)))
def test_row_constant_rows_match_oracle(backend, dtype, mask_dtype, case):
    """T = 1100 spans the C++ kernels' mask chunks; row 0 is on-policy (r = 1: never clipped, a
    nonzero gradient); row 1 is all padding; row 2's mean log-ratio is 30 > 20, where the clamp stops
    the gradient (torch.clamp's backward: 0 for the whole row); row 3 is random."""
    op, ref_fn, kw = _ROW_CONSTANT_CASES[case]
    logp, old, _, adv, valid = _tokens((4, 1100), dtype, spread=0.02)
    old[0] = logp[0]
    valid[1] = False
    old[2] = (logp[2].float() - 30).to(dtype)
    adv = adv[:, 0].contiguous()
    mask = valid.to(mask_dtype)
    _, stats, grad = _compare(lambda x, o, a, m, **k: op(x, o, a, mask, **k), ref_fn, logp, (old, adv, valid),
                              kw, what=f"{op.__name__} {kw} {dtype} {mask_dtype} mask")
    assert (grad[~valid] == 0).all() and (grad[1] == 0).all() and (grad[2] == 0).all()
    assert grad[0][valid[0]].ne(0).all()


def test_row_constant_rows_hostile():
    """NaN at a valid token: the loss and its whole row's gradient NaN (on every backend, as the
    per-token path); NaN / inf in padding and in the other rows' padding: bit for bit the clean result."""
    logp, old, _, adv, mask = _tokens((3, 41), torch.float32)
    adv = adv[:, 0].contiguous()
    kw = dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.0)
    for backend in ALL_BACKENDS:
        with rlkern.use_backend(backend):
            for name in ("logp", "old", "adv"):
                lp, o, a = logp.clone(), old.clone(), adv.clone()
                if name == "adv":
                    a[1] = math.nan
                else:
                    (lp if name == "logp" else o)[1, 0] = math.nan
                x = lp.requires_grad_()
                loss, stats = rlkern.ops.grpo_loss(x, o, None, a, mask, **kw)
                loss.backward()
                what = (backend, name)
                assert loss.isnan() and stats["clip_ratio"].isnan(), what
                assert x.grad[1][mask[1]].isnan().all() and (x.grad[1][~mask[1]] == 0).all(), what
                assert x.grad[0].isfinite().all() and x.grad[2].isfinite().all(), what
            outs = []
            for lp, o in ((logp, old), (logp.masked_fill(~mask, math.nan), old.masked_fill(~mask, math.inf))):
                x = lp.clone().requires_grad_()
                loss, stats = rlkern.ops.grpo_loss(x, o, None, adv, mask, **kw)
                loss.backward()
                outs.append((loss, stats, x.grad))
            (l1, s1, g1), (l2, s2, g2) = outs
            assert torch.equal(l1, l2) and torch.equal(g1, g2) and l1.isfinite(), backend
            assert all(torch.equal(s1[k], s2[k]) for k in s1), backend


def test_row_constant_rows_backward_twice_and_grad_entry_point(backend):
    logp, old, _, adv, mask = _tokens((3, 29), torch.float32)
    adv = adv[:, 0].contiguous()
    kw = dict(loss_type="bnpo", importance_sampling_level="sequence", beta=0.0)
    x = logp.clone().requires_grad_()
    loss, _ = rlkern.ops.grpo_loss(x, old, None, adv, mask, **kw)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    g1 = g1.clone()
    (g2,) = torch.autograd.grad(loss, x)
    loss3, g3, _ = L.grpo_loss_and_grad(logp, old, None, adv, mask, **kw)
    assert torch.equal(g1, g2) and torch.equal(loss, loss3) and torch.allclose(g1, g3, rtol=1e-6, atol=1e-9)


def test_no_ref_is_no_kl_term(backend):
    """ref_logp=None (beta = 0 only): the loss, gradient and stats of ref_logp = logp (k3 = 0), kl 0,
    at the token level too; with beta != 0 a ValueError."""
    logp, old, _, adv, mask = _tokens((3, 23), torch.float32)
    for kw in (dict(loss_type="cispo", clip_high=1.2), dict(loss_type="grpo", use_bias_correction_kl=True),
               dict(loss_type="vespo"), dict(loss_type="luspo", importance_sampling_level="sequence")):
        outs = []
        for ref in (None, logp):
            x = logp.clone().requires_grad_()
            loss, stats = rlkern.ops.grpo_loss(x, old, ref, adv[:, 0], mask, beta=0.0, **kw)
            loss.backward()
            outs.append((loss, stats, x.grad))
        (l1, s1, g1), (l2, s2, g2) = outs
        assert torch.allclose(l1, l2, rtol=1e-6, atol=1e-7) and float(s1["kl"]) == 0.0, kw
        assert torch.allclose(g1, g2, rtol=1e-6, atol=1e-9), kw
        assert all(torch.allclose(s1[k], s2[k], rtol=1e-6, atol=1e-7) for k in s1), kw
    with pytest.raises(ValueError, match="ref_logp is required when beta != 0"):
        rlkern.ops.grpo_loss(logp, old, None, adv[:, 0], mask, beta=0.04)


def test_row_constant_rows_compile_fullgraph():
    logp, old, _, adv, mask = _tokens((3, 20), torch.float32)
    adv = adv[:, 0].contiguous()

    def step(x):
        loss, stats = rlkern.ops.grpo_loss(x, old, None, adv, mask, beta=0.0,
                                           importance_sampling_level="sequence")
        return loss, stats["clip_ratio"]

    compiled_matches_eager(step, logp)
