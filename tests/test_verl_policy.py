"""Every entry of verl 0.9.1's POLICY_LOSS_REGISTRY, patched (rlkern.compat.verl_policy) vs verl's own.

Each case calls verl's registered function unpatched, then ``core.get_policy_loss_fn(name)`` under
``rlkern.compat.patch("verl")`` on the same inputs, with verl's real ``ActorConfig`` /
``PolicyLossConfig`` / ``RolloutCorrectionConfig`` objects, for every ``loss_agg_mode``, with and without
``config.global_batch_info`` (data-parallel normalisation) and ``rollout_is_weights``, and compares the
loss, d loss / d log_prob and the metrics (same names, verl's order for the loss's own, Python floats).

Tolerance: fp32, atol = rtol = 1e-5. The maths is verl's operation for operation, but the masked sums
run in rlkern's kernels (another summation order) and clip_cov's surrogate in rlkern's fused PPO
kernel, so results agree to a few float32 ulps of the largest partial sum, not bit for bit.

Randomness: clip_cov's random subset is drawn differently (see rlkern.ops.clip_cov_mask); the generic
cases use a ratio that takes every candidate (no randomness), and one test gives verl's randperm the
permutation that yields rlkern's subset, after which the two must agree like any other entry.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from rlkern import compat, ops

warnings.filterwarnings("ignore", category=FutureWarning)
core = pytest.importorskip("verl.trainer.ppo.core_algos", reason="verl is not installed (`make setup`)")

from verl.trainer.config.algorithm import RolloutCorrectionConfig  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402
from verl.workers.config.actor import PolicyLossConfig  # noqa: E402

import rlkern.compat.verl as verl_shim  # noqa: E402
import rlkern.compat.verl_cov as vc  # noqa: E402
import rlkern.compat.verl_dppo as vd  # noqa: E402
import rlkern.compat.verl_policy as vp  # noqa: E402

ATOL = RTOL = 1e-5
ENTRIES = ("vanilla", "dppo_tv", "dppo_kl", "gspo", "sapo", "gpg", "clip_cov", "kl_cov", "geo_mean", "dro",
           "cispo", "bypass_mode")
MODES = verl_shim.AGG_MODES
INFOS = {"local": {}, "global": {"dp_size": 2, "batch_num_tokens": 50, "global_batch_size": 9,
                                 "loss_scale_factor": 7}}
# Policy-loss fields every case sets (each entry reads its own). clip_cov: ratio 1 and wide bounds, so
# every candidate is taken and the selection is deterministic.
POLICY = {"dro_beta": 0.3, "kl_cov_ratio": 0.05, "ppo_kl_coef": 0.7, "clip_cov_ratio": 1.0,
          "clip_cov_lb": -10.0, "clip_cov_ub": 10.0}


@pytest.fixture(autouse=True)
def _never_left_patched():
    yield
    compat.unpatch("verl")


def config(info=None, correction=None, clip_ratio_c=3.0, **policy):
    fields = dict(POLICY, **policy)
    if correction is not None:
        fields["rollout_correction"] = correction
    c = ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1, clip_ratio=0.2,
                    clip_ratio_high=0.28, clip_ratio_c=clip_ratio_c, policy_loss=PolicyLossConfig(**fields))
    c.global_batch_info.update(info or {})
    return c


def inputs(seed: int, b: int = 6, t: int = 13, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g) * 3
    old = logp + spread * torch.randn(b, t, generator=g)
    adv = torch.randn(b, t, generator=g)
    mask = (torch.rand(b, t, generator=g) < 0.7).float()
    mask[:, :2] = 1.0
    mask[min(4, b - 1)] = 0.0  # a dead row: the seq-mean modes skip it
    weights = torch.rand(b, t, generator=g) + 0.5
    return logp, old, adv, mask, weights


def run(fn, old, logp, adv, mask, mode, cfg, weights):
    x = logp.detach().clone().requires_grad_()
    loss, metrics = fn(old, x, adv, mask, mode, cfg, weights)
    (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    return loss.detach(), torch.zeros_like(x) if grad is None else grad, metrics


def patched_entry(name):
    compat.patch("verl", strict=True)
    fn = core.get_policy_loss_fn(name)
    shims = ("rlkern.compat.verl", "rlkern.compat.verl_policy", "rlkern.compat.verl_cov",
             "rlkern.compat.verl_dppo")
    assert fn.__module__ in shims, (name, fn)
    return fn


def assert_same(got, want, what):
    (gl, gg, gm), (wl, wg, wm) = got, want
    assert gl.shape == wl.shape and gl.dtype == wl.dtype, what
    for part, g, w in (("loss", gl, wl), ("grad", gg, wg)):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=RTOL, equal_nan=True,
                                   msg=lambda m, part=part: f"{what} {part}: {m}")
    # the loss's own metrics in verl's order; bypass_mode's merged rollout_corr/* metrics (in the
    # order rlkern.ops.rollout_correction produces them) by name
    own = [k for k in wm if not k.startswith("rollout_corr/")]
    assert [k for k in gm if not k.startswith("rollout_corr/")] == own, f"{what}: {list(gm)} != verl's {own}"
    assert set(gm) == set(wm), f"{what}: metric names {sorted(gm)} != verl's {sorted(wm)}"
    for key, value in wm.items():
        assert isinstance(gm[key], float), (what, key, type(gm[key]))
        both_nan = math.isnan(value) and math.isnan(gm[key])
        close = math.isclose(gm[key], value, rel_tol=RTOL, abs_tol=ATOL)
        assert both_nan or close, (what, key, gm[key], value)


def compare(name, old, logp, adv, mask, mode, cfg, weights, what=""):
    original = core.POLICY_LOSS_REGISTRY[name]
    assert original.__module__ == "verl.trainer.ppo.core_algos"
    want = run(original, old, logp, adv, mask, mode, cfg, weights)
    fn = patched_entry(name)
    try:
        got = run(fn, old, logp, adv, mask, mode, cfg, weights)
    finally:
        compat.unpatch("verl")
    assert_same(got, want, f"{name} {mode} {what}")
    return got


# ------------------------------------------------------------------------------------------------
# the registry
# ------------------------------------------------------------------------------------------------


def test_patch_swaps_all_twelve_policy_losses():
    before = dict(core.POLICY_LOSS_REGISTRY)
    assert sorted(before) == sorted(ENTRIES), sorted(before)  # verl 0.9.1 registers these 12
    compat.patch("verl", strict=True)
    during = dict(core.POLICY_LOSS_REGISTRY)
    swapped = {k for k in before if during[k] is not before[k]}
    assert swapped == set(ENTRIES) and len(swapped) == 12
    for name, fn in during.items():
        shim = {"vanilla": verl_shim, "clip_cov": vc, "kl_cov": vc, "dppo_tv": vd,
                "dppo_kl": vd}.get(name, vp)
        assert fn is getattr(shim, before[name].__name__), name
        assert core.get_policy_loss_fn(name) is fn
    # the unregistered REINFORCE loss that bypass_mode calls is swapped too
    assert core.compute_policy_loss_reinforce is vp.compute_policy_loss_reinforce
    compat.unpatch("verl")
    assert all(core.POLICY_LOSS_REGISTRY[k] is v for k, v in before.items())


# ------------------------------------------------------------------------------------------------
# parity, forward and gradient, every entry x every aggregation mode
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "is_weights"])
@pytest.mark.parametrize("info", list(INFOS), ids=list(INFOS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", [n for n in ENTRIES if n != "bypass_mode"])
def test_entry_matches_verl(name, mode, info, weighted):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    logp, old, adv, mask, weights = inputs(seed)
    compare(name, old, logp, adv, mask, mode, config(INFOS[info]), weights if weighted else None,
            f"seed {seed}")


@pytest.mark.parametrize("clip_ratio_c", [3.0, 1.2, 100.0])
@pytest.mark.parametrize("name", ["dppo_tv", "dppo_kl"])
def test_dppo_truncation_and_trust_region(name, clip_ratio_c):
    """Wide log-ratios so that both trust-region branches and the truncation at clip_ratio_c act."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    logp, old, adv, mask, _ = inputs(seed, 16, 40, spread=1.0)
    _, _, metrics = compare(name, old, logp, adv, mask, "token-mean", config(clip_ratio_c=clip_ratio_c), None,
                            f"seed {seed}")
    assert metrics["actor/pg_clipfrac"] > 0


CORRECTIONS = [
    dict(loss_type="ppo_clip"),
    dict(loss_type="ppo_clip", rollout_is="token", rollout_rs="token_k1", rollout_rs_threshold="0.6_1.6"),
    dict(loss_type="reinforce", rollout_is="token", rollout_is_threshold=1.5),
    dict(loss_type="reinforce", rollout_is="sequence", rollout_is_threshold="0.5_4.0",
         rollout_rs="seq_mean_k3", rollout_rs_threshold=0.05),
    dict(loss_type="reinforce", rollout_is=None),
    dict(loss_type="reinforce", rollout_is="token", rollout_is_batch_normalize=True),
]


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("correction", range(len(CORRECTIONS)))
def test_bypass_mode_matches_verl(correction, mode):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    logp, old, adv, mask, weights = inputs(seed, 8, 30)
    cfg = config(INFOS["global"], correction=RolloutCorrectionConfig(**CORRECTIONS[correction]))
    compare("bypass_mode", old, logp, adv, mask, mode, cfg, weights, f"seed {seed}")


@pytest.mark.parametrize("ties", [False, True])
def test_kl_cov_larger_batches(ties):
    """KL-Cov at the default ratio on a batch where k > 1 (n * 0.0002 >= 2 needs 10k tokens), and
    per-sequence advantages (GRPO's) with continuous log-probs."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    logp, old, adv, mask, weights = inputs(seed, 64, 300)
    adv = adv[:, :1].expand_as(adv).contiguous()
    cfg = config(kl_cov_ratio=0.0002, ppo_kl_coef=1.0)
    compare("kl_cov", old, logp, adv, mask, "token-mean", cfg, weights, f"seed {seed}")


def test_clip_cov_random_subset_same_loss_given_the_same_draw(monkeypatch):
    """clip_cov with fewer slots than candidates: rlkern's draw is replayed into verl (its randperm
    returns the permutation that puts rlkern's tokens first); then every number must agree."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    logp, old, adv, mask, weights = inputs(seed, 16, 64)
    cfg = config(clip_cov_ratio=0.02, clip_cov_lb=-0.5, clip_cov_ub=0.5)
    compat.patch("verl", strict=True)
    fn = core.get_policy_loss_fn("clip_cov")
    torch.manual_seed(seed)
    got = run(fn, old, logp, adv, mask, "token-mean", cfg, weights)
    compat.unpatch("verl")
    ratio = torch.exp(logp - old)
    clipped = -adv * torch.clamp(ratio, 0.8, 1.28) > -adv * ratio
    torch.manual_seed(seed)
    chosen = ops.clip_cov_mask(adv, logp, mask, 0.02, -0.5, 0.5, exclude=clipped).reshape(-1)
    cov = ops.token_covariance(adv, logp, mask).reshape(-1)
    candidates = ((mask.reshape(-1) > 0) & ~clipped.reshape(-1) & (cov > -0.5) & (cov < 0.5)).nonzero()
    candidates = candidates.reshape(-1)
    k = max(int(0.02 * float(mask.sum())), 1)
    assert int(chosen.sum()) == k < candidates.numel(), "the case must leave a random choice"
    first = chosen[candidates]
    perm = torch.cat([first.nonzero().reshape(-1), (~first).nonzero().reshape(-1)])

    def replay(n, *args, **kwargs):
        assert n == perm.numel(), "verl's candidate list differs from rlkern's"
        return perm.clone()

    monkeypatch.setattr(torch, "randperm", replay)
    want = run(core.POLICY_LOSS_REGISTRY["clip_cov"], old, logp, adv, mask, "token-mean", cfg, weights)
    assert_same(got, want, f"clip_cov random, seed {seed}")


# ------------------------------------------------------------------------------------------------
# hostile inputs and config errors
# ------------------------------------------------------------------------------------------------


def _hostile_config(name):
    if name != "bypass_mode":
        return config()
    return config(correction=RolloutCorrectionConfig(loss_type="reinforce", rollout_is="token"))


@pytest.mark.parametrize("name", ENTRIES)
def test_nan_at_a_valid_token_gives_nan_like_verl(name):
    logp, old, adv, mask, _ = inputs(int(torch.randint(0, 2**31 - 1, ())))
    logp[0, 0] = math.nan  # mask[0, 0] = 1
    cfg = _hostile_config(name)
    want, _ = core.POLICY_LOSS_REGISTRY[name](old, logp, adv, mask, "token-mean", cfg)
    got, _ = patched_entry(name)(old, logp, adv, mask, "token-mean", cfg)
    assert torch.isnan(want) and torch.isnan(got), (name, want, got)


@pytest.mark.parametrize("name", ENTRIES)
def test_nan_at_padding_never_reaches_the_loss(name):
    """rlkern's masked sums select: padding may hold anything (verl's loss * mask turns 0 * NaN into
    NaN). With NaN at masked-out positions, the patched loss equals the loss with clean padding."""
    logp, old, adv, mask, _ = inputs(int(torch.randint(0, 2**31 - 1, ())))
    cfg = _hostile_config(name)
    fn = patched_entry(name)
    clean = run(fn, old, logp, adv, mask, "seq-mean-token-mean", cfg, None)
    dirty_adv = torch.where(mask > 0, adv, math.nan)
    dirty = run(fn, old, logp, dirty_adv, mask, "seq-mean-token-mean", cfg, None)
    assert torch.isfinite(dirty[0]), (name, dirty[0])
    torch.testing.assert_close(dirty[0], clean[0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(dirty[1] * mask, clean[1] * mask, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", [n for n in ENTRIES if n != "bypass_mode"])
def test_empty_mask_matches_verl(name, mode):
    """No valid token: verl's own result (0/0 = NaN in the mean modes, 0 in the sum modes)."""
    logp, old, adv, mask, _ = inputs(int(torch.randint(0, 2**31 - 1, ())))
    compare(name, old, logp, adv, torch.zeros_like(mask), mode, config(), None, "empty mask")


def test_bypass_mode_empty_mask_raises_like_verl():
    logp, old, adv, mask, _ = inputs(1)
    cfg = _hostile_config("bypass_mode")
    with pytest.raises((ValueError, AssertionError)):
        core.POLICY_LOSS_REGISTRY["bypass_mode"](old, logp, adv, torch.zeros_like(mask), "token-mean", cfg)
    with pytest.raises(ValueError, match="valid token"):
        patched_entry("bypass_mode")(old, logp, adv, torch.zeros_like(mask), "token-mean", cfg)


def test_config_errors():
    logp, old, adv, mask, _ = inputs(2)
    for name in ENTRIES[1:]:
        shim = core.POLICY_LOSS_REGISTRY[name].__name__
        fn = next(getattr(m, shim) for m in (vp, vc, vd) if hasattr(m, shim))  # the module of its family
        with pytest.raises(ValueError, match="config"):
            fn(old, logp, adv, mask, "token-mean", None)
    with pytest.raises(ValueError, match="dro_beta"):
        vp.compute_policy_loss_dro(old, logp, adv, mask, "token-mean", config(dro_beta=None))
    with pytest.raises(ValueError, match="loss_type"):
        vp.compute_policy_loss_bypass_mode(old, logp, adv, mask, "token-mean",
                                           config(correction=RolloutCorrectionConfig(loss_type="ppo")))
    with pytest.raises(ValueError, match="loss_agg_mode"):
        vc.compute_policy_loss_clip_cov(old, logp, adv, mask, "token-median", config())
    with pytest.raises(ValueError, match="batch_num_tokens"):
        vc.compute_policy_loss_kl_cov(old, logp, adv, mask, "token-mean", config({"dp_size": 2}))


def test_plain_mapping_configs():
    """The shims read fields by name: an omegaconf-like dict config works as verl's dataclass does."""
    logp, old, adv, mask, _ = inputs(3)
    cfg = {"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": 0.28, "global_batch_info": {},
           "policy_loss": {"kl_cov_ratio": 0.05, "ppo_kl_coef": 0.7}}
    got = run(vc.compute_policy_loss_kl_cov, old, logp, adv, mask, "token-mean", cfg, None)
    want = run(core.compute_policy_loss_kl_cov, old, logp, adv, mask, "token-mean", config(), None)
    assert_same(got, want, "dict config")


@pytest.mark.parametrize("name", ENTRIES)
def test_bf16_log_probs_agree_within_bf16_resolution(name):
    """bf16 log-probs (what a bf16 actor returns): verl computes its ratios and IS weights in bf16,
    rlkern's kernels and selection in fp32, so the two agree to bf16's resolution (2^-8 relative),
    not to fp32 tolerance; dtypes are verl's (fp32 loss, bf16 gradient)."""
    logp, old, adv, mask, _ = inputs(int(torch.randint(0, 2**31 - 1, ())))
    logp, old = logp.bfloat16(), old.bfloat16()
    cfg = _hostile_config(name)
    want = run(core.POLICY_LOSS_REGISTRY[name], old, logp, adv, mask, "token-mean", cfg, None)
    got = run(patched_entry(name), old, logp, adv, mask, "token-mean", cfg, None)
    assert got[0].dtype == want[0].dtype and got[1].dtype == want[1].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], want[0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got[1].float(), want[1].float(), atol=2e-2, rtol=2e-2)
