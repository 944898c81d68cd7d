"""rlkern.compat.openrlhf's PolicyLoss for every OpenRLHF option (issue 13): ``gspo``, ``dual_clip``,
the train/rollout IS corrections TIS / IcePop / seq-mask-tis and 0.11.2's binary_kl / tv gatings,
standalone and patched into fake ``openrlhf.models.loss`` modules, against transcriptions of
OpenRLHF's own PolicyLoss from two generations of its API (OpenRLHF does not install here: it imports
DeepSpeed and PEFT at module level):

* ``Orl0112PolicyLoss``: the openrlhf 0.11.2 wheel (PyPI, 2026-09), ``openrlhf/models/loss.py``
  (``aggregate_loss``, ``PolicyLoss``) and ``openrlhf/models/utils.py::masked_mean``: options
  ``is_correction_level`` / ``_mode`` / ``_gating`` / ``_threshold``, a 5-tuple;
* ``Orl0110PolicyLoss``: OpenRLHF/OpenRLHF main at 3c3be6234e0cb353e76bb8019947db9dfe99fca7 (= tag
  v0.11.0, 2026-08-13), ``openrlhf/models/loss.py``: ``enable_vllm_is_correction``,
  ``vllm_is_correction_type`` tis / icepop / seq-mask-tis, ``vllm_is_truncated_threshold``, a 4-tuple;
* ``Orl090PolicyLoss``: tag v0.9.0, the same file: TIS with an upper bound only, no global normalisers.

Tolerance: fp32 inputs, atol 1e-6 + rtol 1e-5 (tests/test_compat.py's ``close``): rlkern sums the
masked tokens in a different order (and its rollout-correction kernel sums the seq-mask-tis row mean
in float64), a few fp32 roundings on values of O(1). The IS thresholds sit in the bulk of the
log-ratio's distribution, so a fp32 rounding flips a token's (or row's) band membership only when its
statistic lies within ~1e-7 of a threshold: probability ~1e-5 per token whatever the seed.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from rlkern import compat, ops
from rlkern.compat import openrlhf as orl_shim
from tests.test_compat import _install_fake_openrlhf_loss, close

# ------------------------------------------------------------------------------------------------
# Transcriptions (fp32, as OpenRLHF runs them)
# ------------------------------------------------------------------------------------------------


def orl_masked_mean(tensor, mask, dim=None):  # openrlhf/models/utils.py::masked_mean
    if mask is None:
        return tensor.mean(dim=dim)
    return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)


def orl_aggregate_loss(loss, loss_mask, token_level_loss=True, dp_size=1, batch_num_tokens=None,
                       global_batch_size=None):  # openrlhf/models/loss.py::aggregate_loss (0.10.4+)
    if token_level_loss:
        if batch_num_tokens is None:
            return orl_masked_mean(loss, loss_mask, dim=None)
        return (loss * loss_mask).sum() / batch_num_tokens * dp_size
    token_counts = loss_mask.sum(dim=-1)
    seq_loss = (loss * loss_mask).sum(dim=-1) / (token_counts + 1e-8)
    seq_mask = (token_counts > 0).float()
    if global_batch_size is None:
        return orl_masked_mean(seq_loss, seq_mask, dim=None)
    return (seq_loss * seq_mask).sum() / global_batch_size * dp_size


def _ratio(self, log_probs, old_log_probs, action_mask, rollout_log_probs, is_on):
    raw_policy_log_ratio = log_probs - old_log_probs
    if self.policy_loss_type == "ppo":
        ratio = raw_policy_log_ratio.clamp(min=-20.0, max=20.0).exp()
    elif self.policy_loss_type == "gspo":
        log_ratio = log_probs - rollout_log_probs if is_on else raw_policy_log_ratio
        ratio = (log_ratio * action_mask).sum(dim=-1) / action_mask.sum(dim=-1).clamp(min=1)
        ratio = ratio.exp().unsqueeze(-1) * action_mask
    else:
        raise ValueError(f"Invalid policy loss type: {self.policy_loss_type}")
    return raw_policy_log_ratio, ratio


def _surrogate(self, ratio, advantages):
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - self.clip_eps_low, 1 + self.clip_eps_high) * advantages
    if self.dual_clip is None:
        loss = -torch.min(surr1, surr2)
    else:
        clip1 = torch.min(surr1, surr2)
        clip2 = torch.max(clip1, self.dual_clip * advantages)
        loss = -torch.where(advantages < 0, clip2, clip1)
    return surr1, surr2, loss


class Orl0112PolicyLoss(nn.Module):
    """openrlhf 0.11.2 models/loss.py::PolicyLoss (validation of the options included)."""

    def __init__(self, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None, token_level_loss=True,
                 policy_loss_type="ppo", is_correction_level="off", is_correction_mode="mask",
                 is_correction_gating="ratio", is_correction_threshold=(0.5, 5.0)):
        super().__init__()
        self.clip_eps_low, self.clip_eps_high = clip_eps_low, clip_eps_high
        self.token_level_loss, self.dual_clip = token_level_loss, dual_clip
        self.policy_loss_type = policy_loss_type
        self.is_correction_level, self.is_correction_mode = is_correction_level, is_correction_mode
        self.is_correction_gating = is_correction_gating
        self.is_correction_threshold = is_correction_threshold
        if policy_loss_type == "gspo":
            self.token_level_loss = False
        if dual_clip is not None:
            assert dual_clip > 1.0
        if is_correction_mode == "clip" and (is_correction_level == "seq" or is_correction_gating != "ratio"):
            raise ValueError("is_correction_mode=clip requires is_correction_level=token and gating=ratio")
        divergence = is_correction_gating != "ratio" and is_correction_level != "off"
        if divergence and is_correction_threshold[0] > 0:
            raise ValueError("a divergence gating takes an upper bound only")

    def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None,
                dp_size=1, batch_num_tokens=None, global_batch_size=None):
        is_on = self.is_correction_level != "off"
        raw_policy_log_ratio, ratio = _ratio(self, log_probs, old_log_probs, action_mask, rollout_log_probs,
                                             is_on)
        surr1, surr2, loss = _surrogate(self, ratio, advantages)
        vllm_kl = is_filter_ratio = None
        if is_on and self.policy_loss_type == "ppo":
            low, high = self.is_correction_threshold
            seq_level = self.is_correction_level == "seq"
            is_log_ratio = (old_log_probs - rollout_log_probs).detach()
            token_is = is_log_ratio.exp()
            if self.is_correction_gating == "ratio":
                stat = orl_masked_mean(is_log_ratio, action_mask, dim=-1).unsqueeze(-1) if seq_level \
                    else is_log_ratio
                stat = stat.exp()
            else:
                p = rollout_log_probs.exp().clamp(1e-6, 1 - 1e-6)
                q = old_log_probs.exp().clamp(1e-6, 1 - 1e-6)
                if self.is_correction_gating == "binary_kl":
                    stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
                else:
                    stat = (p - q).abs()
                if seq_level:
                    stat = orl_masked_mean(stat, action_mask, dim=-1).unsqueeze(-1)
            if self.is_correction_mode == "clip":
                coef = stat.clamp(min=low, max=high)
                filtered = (stat < low) | (stat > high)
            else:
                keep = (stat >= low) & (stat <= high)
                coef = torch.where(keep, token_is, 0.0)
                filtered = ~keep
            loss = coef * loss
            if seq_level:
                is_filter_ratio = filtered.float().mean()
            else:
                is_filter_ratio = orl_masked_mean(filtered.float(), action_mask, dim=None)
            vllm_kl = orl_masked_mean(rollout_log_probs - old_log_probs, action_mask, dim=None)
        loss = orl_aggregate_loss(loss, action_mask, self.token_level_loss, dp_size, batch_num_tokens,
                                  global_batch_size)
        clip_ratio = orl_masked_mean(torch.lt(surr2, surr1).float(), action_mask, dim=None)
        ppo_kl = orl_masked_mean(-raw_policy_log_ratio.detach(), action_mask, dim=None)
        return loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio


class Orl090PolicyLoss(nn.Module):
    """OpenRLHF v0.9.0 models/loss.py::PolicyLoss: TIS with an upper bound, no global normalisers, an
    unclamped PPO ratio, per-sequence aggregation as the plain mean of the row means."""

    def __init__(self, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None, token_level_loss=True,
                 policy_loss_type="ppo", enable_vllm_is_correction=False, vllm_is_truncated_threshold=None):
        super().__init__()
        self.clip_eps_low, self.clip_eps_high = clip_eps_low, clip_eps_high
        self.token_level_loss, self.dual_clip = token_level_loss, dual_clip
        self.policy_loss_type = policy_loss_type
        self.enable_vllm_is_correction = enable_vllm_is_correction
        self.vllm_is_truncated_threshold = vllm_is_truncated_threshold
        if policy_loss_type == "gspo":
            self.token_level_loss = False

    def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None):
        if self.policy_loss_type == "ppo":
            log_ratio = log_probs - old_log_probs
            ratio = log_ratio.exp()
        else:
            log_ratio = log_probs - rollout_log_probs if self.enable_vllm_is_correction \
                else log_probs - old_log_probs
            ratio = (log_ratio * action_mask).sum(dim=-1) / action_mask.sum(dim=-1)
            ratio = ratio.exp().unsqueeze(-1) * action_mask
        surr1, surr2, loss = _surrogate(self, ratio, advantages)
        vllm_kl = None
        if self.enable_vllm_is_correction and self.policy_loss_type == "ppo":
            vllm_is = torch.exp(old_log_probs - rollout_log_probs).clamp(
                max=self.vllm_is_truncated_threshold).detach()
            loss = vllm_is * loss
            vllm_kl = orl_masked_mean(rollout_log_probs - old_log_probs, action_mask, dim=None)
        loss = orl_masked_mean(loss, action_mask, dim=None) if self.token_level_loss \
            else orl_masked_mean(loss, action_mask, dim=-1).mean()
        clip_ratio = orl_masked_mean(torch.lt(surr2, surr1).float(), action_mask, dim=None)
        ppo_kl = orl_masked_mean(-log_ratio.detach(), action_mask, dim=None)
        return loss, clip_ratio, ppo_kl, vllm_kl


class Orl0110PolicyLoss(Orl090PolicyLoss):
    """OpenRLHF main @3c3be6234e0c (v0.11.0) models/loss.py::PolicyLoss (its __init__ adds
    vllm_is_correction_type to v0.9.0's)."""

    def __init__(self, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None, token_level_loss=True,
                 policy_loss_type="ppo", enable_vllm_is_correction=False, vllm_is_truncated_threshold=None,
                 vllm_is_correction_type="tis"):
        super().__init__(clip_eps_low, clip_eps_high, dual_clip, token_level_loss, policy_loss_type,
                         enable_vllm_is_correction, vllm_is_truncated_threshold)
        self.vllm_is_correction_type = vllm_is_correction_type

    def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None,
                dp_size=1, batch_num_tokens=None, global_batch_size=None):
        raw_policy_log_ratio, ratio = _ratio(self, log_probs, old_log_probs, action_mask, rollout_log_probs,
                                             self.enable_vllm_is_correction)
        surr1, surr2, loss = _surrogate(self, ratio, advantages)
        vllm_kl = None
        if self.enable_vllm_is_correction and self.policy_loss_type == "ppo":
            low_threshold, high_threshold = self.vllm_is_truncated_threshold
            rollout_log_ratio = old_log_probs - rollout_log_probs
            if self.vllm_is_correction_type == "icepop":
                vllm_is = torch.exp(rollout_log_ratio).detach()
                mask = (vllm_is >= low_threshold) & (vllm_is <= high_threshold)
                loss = vllm_is * mask * loss
            elif self.vllm_is_correction_type == "seq-mask-tis":
                seq_is = torch.exp(orl_masked_mean(rollout_log_ratio, action_mask, dim=-1))
                seq_mask = (seq_is >= low_threshold) & (seq_is <= high_threshold)
                vllm_is = torch.exp(rollout_log_ratio).detach()
                loss = seq_mask.unsqueeze(-1) * vllm_is * loss
            else:
                vllm_is = torch.exp(rollout_log_ratio).clamp(min=low_threshold, max=high_threshold).detach()
                loss = vllm_is * loss
            vllm_kl = orl_masked_mean(rollout_log_probs - old_log_probs, action_mask, dim=None)
        loss = orl_aggregate_loss(loss, action_mask, self.token_level_loss, dp_size, batch_num_tokens,
                                  global_batch_size)
        clip_ratio = orl_masked_mean(torch.lt(surr2, surr1).float(), action_mask, dim=None)
        ppo_kl = orl_masked_mean(-raw_policy_log_ratio.detach(), action_mask, dim=None)
        return loss, clip_ratio, ppo_kl, vllm_kl


# ------------------------------------------------------------------------------------------------
# inputs and comparison
# ------------------------------------------------------------------------------------------------

B, T = 6, 15


def _inputs(mask_dtype=torch.bool, seed=0, empty_row=True):
    """OpenRLHF's micro-batch: per-token advantages, right-padded masks (one row empty when asked),
    log-ratios of ~0.1 between the three policies (so ~1/3 of the tokens leave [0.9, 1.1])."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 2 - 0.05
    logp = (old + 0.1 * torch.randn(B, T, generator=g)).requires_grad_()
    rollout = old + 0.1 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if empty_row:
        mask[2] = False
    return logp, old, rollout, adv, mask.to(mask_dtype)


def _compare(got, want):
    assert len(got) == len(want)
    for g, w, name in zip(got[1:], want[1:], ("clip_ratio", "ppo_kl", "vllm_kl", "is_filter_ratio")):
        if w is None:
            assert g is None, name
        else:
            close(g, w, what=name)
    close(got[0], want[0], what="loss")


def _grads(got, want, logp):
    close(torch.autograd.grad(got[0], logp)[0], torch.autograd.grad(want[0], logp)[0], what="d log_probs")


# (policy_loss_type, dual_clip, token_level_loss): GSPO always aggregates per sequence
POLICIES = [("ppo", None, True), ("ppo", 3.0, True), ("ppo", None, False), ("ppo", 2.0, False),
            ("gspo", None, True), ("gspo", 3.0, True)]
# 0.11.2's (is_correction_level, is_correction_mode, is_correction_threshold) with ratio gating
CORRECTIONS_0112 = {"off": ("off", "mask", (0.5, 5.0)), "tis": ("token", "clip", (0.9, 1.1)),
                    "icepop": ("token", "mask", (0.9, 1.1)), "seq-mask-tis": ("seq", "mask", (0.96, 1.04))}
# 0.11.2's divergence gatings (mask mode): thresholds in the bulk of each statistic for _inputs (token
# binary KL median ~1e-3, TV ~0.02; row means ~4e-3 and ~0.03), so tokens and rows are dropped and kept
GATINGS_0112 = {"binary_kl-token": ("token", "binary_kl", (0.0, 0.0015)),
                "tv-token": ("token", "tv", (0.0, 0.02)),
                "binary_kl-seq": ("seq", "binary_kl", (float("-inf"), 0.004)),
                "tv-seq": ("seq", "tv", (0.0, 0.03))}
CALLS = [dict(), dict(batch_num_tokens=57.0, dp_size=4), dict(global_batch_size=9.0, dp_size=2)]


def _call_for(token_level, i):
    """A global-normaliser call that applies to this aggregation (the others leave it unchanged)."""
    return CALLS[0] if i == 0 else CALLS[1] if token_level else CALLS[2]


# ------------------------------------------------------------------------------------------------
# standalone rlkern.compat.openrlhf.PolicyLoss == openrlhf 0.11.2
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32], ids=str)
@pytest.mark.parametrize("correction", list(CORRECTIONS_0112))
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p[0]}-dual{p[1]}-tok{p[2]}")
def test_policy_loss_matches_openrlhf_0112(policy, correction, mask_dtype):
    kind, dual, token_level = policy
    level, mode, threshold = CORRECTIONS_0112[correction]
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=dual, token_level_loss=token_level,
              policy_loss_type=kind, is_correction_level=level, is_correction_mode=mode,
              is_correction_threshold=threshold)
    logp, old, rollout, adv, mask = _inputs(mask_dtype, seed=len(correction) + 7 * (dual is None))
    for i in range(2):
        call = _call_for(token_level and kind == "ppo", i)
        want = Orl0112PolicyLoss(**kw)(logp, old, adv, mask, rollout, **call)
        got = orl_shim.PolicyLoss(**kw)(logp, old, adv, mask, rollout, **call)
        _compare(got, want)
        _grads(got, want, logp)


def test_policy_loss_filters_tokens_and_rows():
    """The thresholds of the tests really drop tokens and rows, and keep others (the comparisons above
    are not vacuous): over ten draws, whatever the seeds."""
    ratios: dict[str, list[float]] = {"tis": [], "icepop": [], "seq-mask-tis": []}
    for seed in range(10):
        logp, old, rollout, adv, mask = _inputs(seed=seed)
        for name in ratios:
            level, mode, threshold = CORRECTIONS_0112[name]
            out = orl_shim.PolicyLoss(is_correction_level=level, is_correction_mode=mode,
                                      is_correction_threshold=threshold)(logp, old, adv, mask, rollout)
            ratios[name].append(float(out[4]))
    assert ratios["tis"] == pytest.approx(ratios["icepop"], abs=1e-6)  # the same tokens leave the band
    assert 0.1 < min(ratios["tis"]) and max(ratios["tis"]) < 0.9
    # the empty row is always dropped (its mean is 0/0); some of the others are, and not all
    assert min(ratios["seq-mask-tis"]) >= 1 / B and max(ratios["seq-mask-tis"]) > 1.5 / B
    assert min(ratios["seq-mask-tis"]) < 1.0


def test_policy_loss_options_are_validated_as_openrlhf():
    with pytest.raises(ValueError, match="dual_clip must be > 1.0"):
        orl_shim.PolicyLoss(dual_clip=1.0)
    with pytest.raises(ValueError, match=r"policy_loss_type must be one of \('ppo', 'gspo'\)"):
        orl_shim.PolicyLoss(policy_loss_type="grpo")
    with pytest.raises(ValueError, match="is_correction_level must be one of"):
        orl_shim.PolicyLoss(is_correction_level="sequence")
    with pytest.raises(ValueError, match="is_correction_mode=clip requires"):
        orl_shim.PolicyLoss(is_correction_level="seq", is_correction_mode="clip")
    with pytest.raises(ValueError, match="takes an upper bound only"):  # OpenRLHF 0.11.2's own check
        orl_shim.PolicyLoss(is_correction_level="token", is_correction_gating="tv",
                            is_correction_threshold=(0.01, 0.1))
    with pytest.raises(ValueError, match="is_correction_mode=clip requires"):
        orl_shim.PolicyLoss(is_correction_level="token", is_correction_mode="clip",
                            is_correction_gating="binary_kl", is_correction_threshold=(0.0, 0.1))
    assert orl_shim.PolicyLoss(policy_loss_type="gspo", token_level_loss=True).token_level_loss is False
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="needs rollout_log_probs"):
        orl_shim.PolicyLoss(is_correction_level="token")(x, x, x, torch.ones(2, 3))


# ------------------------------------------------------------------------------------------------
# patch("openrlhf") on fake module trees holding each generation's PolicyLoss
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls that reach rlkern's policy loss and rollout-correction ops."""
    calls = {"policy_loss": 0, "rollout_correction": 0, "trust_region_gate": 0}
    for name in calls:
        original = getattr(ops, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(ops, name, counted)
    return calls


def _patched(monkeypatch, cls):
    """patch("openrlhf") over a fake tree holding ``cls``: the installed (patched) PolicyLoss."""
    loss_mod = _install_fake_openrlhf_loss(monkeypatch, cls)
    compat.patch("openrlhf")
    assert loss_mod.PolicyLoss is not cls and issubclass(loss_mod.PolicyLoss, cls)
    return loss_mod.PolicyLoss


@pytest.mark.parametrize("correction", list(CORRECTIONS_0112))
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p[0]}-dual{p[1]}-tok{p[2]}")
def test_patched_openrlhf_0112(monkeypatch, spy, policy, correction):
    kind, dual, token_level = policy
    level, mode, threshold = CORRECTIONS_0112[correction]
    kw = dict(clip_eps_high=0.28, dual_clip=dual, token_level_loss=token_level, policy_loss_type=kind,
              is_correction_level=level, is_correction_mode=mode, is_correction_threshold=threshold)
    logp, old, rollout, adv, mask = _inputs(torch.float32, seed=11)
    call = _call_for(token_level and kind == "ppo", 1)
    want = Orl0112PolicyLoss(**kw)(logp, old, adv, mask, rollout, **call)
    try:
        module = _patched(monkeypatch, Orl0112PolicyLoss)(**kw)
        got = module(logp, old, adv, action_mask=mask, rollout_log_probs=rollout, **call)
    finally:
        compat.unpatch("openrlhf")
    assert spy["policy_loss"] == 1
    assert spy["rollout_correction"] == (correction != "off" and kind == "ppo")
    _compare(got, want)
    _grads(got, want, logp)


@pytest.mark.parametrize("correction", ["off", "tis", "icepop", "seq-mask-tis"])
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p[0]}-dual{p[1]}-tok{p[2]}")
def test_patched_openrlhf_main_0110(monkeypatch, spy, policy, correction):
    """OpenRLHF main up to 2026-08 (v0.9.5-v0.11.0): the 4-tuple, ``vllm_is_correction_type``."""
    kind, dual, token_level = policy
    threshold = CORRECTIONS_0112.get(correction, (None, None, (0.9, 1.1)))[2]
    kw = dict(clip_eps_high=0.28, dual_clip=dual, token_level_loss=token_level, policy_loss_type=kind,
              enable_vllm_is_correction=correction != "off", vllm_is_truncated_threshold=threshold,
              vllm_is_correction_type="tis" if correction == "off" else correction)
    logp, old, rollout, adv, mask = _inputs(torch.bool, seed=12)
    want = Orl0110PolicyLoss(**kw)(logp, old, adv, mask, rollout)
    try:
        got = _patched(monkeypatch, Orl0110PolicyLoss)(**kw)(logp, old, adv, mask, rollout)
    finally:
        compat.unpatch("openrlhf")
    assert spy["policy_loss"] == 1 and spy["rollout_correction"] == (correction != "off" and kind == "ppo")
    _compare(got, want)
    _grads(got, want, logp)


@pytest.mark.parametrize("enable", [False, True])
@pytest.mark.parametrize("policy", [("ppo", None, True), ("ppo", 3.0, False), ("gspo", None, True)],
                         ids=lambda p: f"{p[0]}-dual{p[1]}-tok{p[2]}")
def test_patched_openrlhf_090(monkeypatch, spy, policy, enable):
    """v0.9.0: TIS with an upper bound only, forward without the global normalisers (every row has a
    valid token: v0.9.0's per-sequence mean is NaN for an empty one)."""
    kind, dual, token_level = policy
    kw = dict(dual_clip=dual, token_level_loss=token_level, policy_loss_type=kind,
              enable_vllm_is_correction=enable, vllm_is_truncated_threshold=1.05)
    logp, old, rollout, adv, mask = _inputs(torch.bool, seed=13, empty_row=False)
    want = Orl090PolicyLoss(**kw)(logp, old, adv, mask, rollout)
    try:
        got = _patched(monkeypatch, Orl090PolicyLoss)(**kw)(logp, old, adv, mask, rollout)
    finally:
        compat.unpatch("openrlhf")
    assert spy["policy_loss"] == 1
    _compare(got, want)
    _grads(got, want, logp)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32], ids=str)
@pytest.mark.parametrize("gating", list(GATINGS_0112))
@pytest.mark.parametrize("policy", [p for p in POLICIES if p[0] == "ppo"],
                         ids=lambda p: f"{p[0]}-dual{p[1]}-tok{p[2]}")
def test_policy_loss_divergence_gating_matches_openrlhf_0112(policy, gating, mask_dtype):
    """0.11.2's binary_kl / tv gatings (token and sequence level) fused by ops.trust_region_gate: loss,
    gradient and the four statistics against the transcription (a row with no valid token has a NaN
    mean statistic there, so it is dropped on both sides)."""
    _, dual, token_level = policy
    level, kind, threshold = GATINGS_0112[gating]
    kw = dict(clip_eps_high=0.28, dual_clip=dual, token_level_loss=token_level, is_correction_level=level,
              is_correction_gating=kind, is_correction_threshold=threshold)
    logp, old, rollout, adv, mask = _inputs(mask_dtype, seed=21 + len(gating))
    for i in range(2):
        call = _call_for(token_level, i)
        want = Orl0112PolicyLoss(**kw)(logp, old, adv, mask, rollout, **call)
        got = orl_shim.PolicyLoss(**kw)(logp, old, adv, mask, rollout, **call)
        _compare(got, want)
        _grads(got, want, logp)


def test_divergence_gating_drops_and_keeps():
    """The gating thresholds of these tests drop some tokens (rows) and keep others, over ten draws."""
    for name, (level, kind, threshold) in GATINGS_0112.items():
        ratios = []
        for seed in range(10):
            logp, old, rollout, adv, mask = _inputs(seed=seed)
            out = orl_shim.PolicyLoss(is_correction_level=level, is_correction_gating=kind,
                                      is_correction_threshold=threshold)(logp, old, adv, mask, rollout)
            ratios.append(float(out[4]))
        assert 0.1 < sum(ratios) / len(ratios) < 0.9, (name, ratios)


@pytest.mark.parametrize("gating", list(GATINGS_0112))
def test_patched_openrlhf_divergence_gating(monkeypatch, spy, gating):
    """patch("openrlhf") fuses 0.11.2's binary_kl / tv gatings: rlkern's ops run (no fallback, no
    warning) and give OpenRLHF's 5-tuple and gradient."""
    level, kind, threshold = GATINGS_0112[gating]
    kw = dict(is_correction_level=level, is_correction_gating=kind, is_correction_threshold=threshold)
    logp, old, rollout, adv, mask = _inputs(torch.float32, seed=14)
    want = Orl0112PolicyLoss(**kw)(logp, old, adv, mask, rollout, batch_num_tokens=40.0, dp_size=2)
    try:
        module = _patched(monkeypatch, Orl0112PolicyLoss)(**kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # fused: no fallback warning
            got = module(logp, old, adv, mask, rollout, batch_num_tokens=40.0, dp_size=2)
    finally:
        compat.unpatch("openrlhf")
    assert spy == {"policy_loss": 1, "rollout_correction": 0, "trust_region_gate": 1}
    _compare(got, want)
    _grads(got, want, logp)


@pytest.mark.parametrize("kind", ["ppo", "gspo"])
def test_every_backend(backend, kind):
    """The standalone class on each rlkern backend (Triton through the interpreter): every correction and
    gating with dual_clip, against the 0.11.2 transcription."""
    logp, old, rollout, adv, mask = _inputs(torch.float32, seed=15)
    options = [dict(is_correction_level=level, is_correction_mode=mode, is_correction_threshold=threshold)
               for level, mode, threshold in CORRECTIONS_0112.values()]
    options += [dict(is_correction_level=level, is_correction_gating=gating,
                     is_correction_threshold=threshold) for level, gating, threshold in GATINGS_0112.values()]
    for option in options:
        kw = dict(dual_clip=3.0, policy_loss_type=kind, **option)
        got = orl_shim.PolicyLoss(**kw)(logp, old, adv, mask, rollout)
        want = Orl0112PolicyLoss(**kw)(logp, old, adv, mask, rollout)
        _compare(got, want)
        _grads(got, want, logp)
