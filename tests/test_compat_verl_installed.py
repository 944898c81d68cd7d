"""rlkern.compat.patch("verl") against the INSTALLED verl (0.9.1, put in by `make setup`).

tests/test_compat.py checks the shims against transcriptions of verl's functions; this file runs
verl's own code: each test calls a verl function unpatched, then patched (same process, same inputs),
and requires the same numbers (and gradients), while a spy on rlkern.ops proves the patched call ran
on rlkern. Masks are float 0/1, as verl's trainers pass them.
"""

from __future__ import annotations

import importlib
import os
import sys

import numpy as np
import pytest
import torch

import rlkern.compat.verl as shim
from rlkern import compat, ops

try:
    import verl.trainer.ppo.core_algos as core
    import verl.utils.torch_functional as vf
    from omegaconf import OmegaConf
except ImportError as err:  # ModuleNotFoundError included: verl, or one of its dependencies, is missing
    if os.environ.get("CI"):  # `make setup` installs verl: in CI its absence is a broken install
        raise
    pytest.skip(f"verl is not importable here ({err}); `make setup` installs verl 0.9.1",
                allow_module_level=True)

ATOL, RTOL = 1e-5, 1e-5
# The rlkern.ops entry points the verl shims reach.
SPIED = ("logprobs", "entropy", "linear_logprobs", "kl", "policy_loss", "value_loss", "gae",
         "group_advantages", "discounted_returns", "masked_sum", "masked_whiten", "masked_var",
         "outcome_advantages", "optimal_token_baseline")
# Every verl module the shims touch, and one of the actor's loss modules that copies them by name.
VERL_MODULES = ("verl.utils.torch_functional", "verl.trainer.ppo.core_algos",
                "verl.utils.kernel.linear_cross_entropy", "verl.workers.utils.losses")
for _name in VERL_MODULES:
    importlib.import_module(_name)

_max_diff = {"abs": 0.0, "rel": 0.0}  # the largest differences any test accepted
_all_calls: dict[str, int] = {}  # rlkern.ops calls the spies saw, over the module


@pytest.fixture(scope="module", autouse=True)
def _print_max_diff(pytestconfig):
    yield
    if pytestconfig.getoption("verbose") > 0:  # -v: show how close rlkern came, for reports
        print(f"\nverl 0.9.1 installed parity: max abs diff {_max_diff['abs']:.3g}, "
              f"max rel diff {_max_diff['rel']:.3g} (where |verl| >= 1e-3); rlkern.ops calls {_all_calls}")


@pytest.fixture(autouse=True)
def _never_left_patched():
    yield
    compat.unpatch("verl")


@pytest.fixture
def spy(monkeypatch):
    """Counts calls into rlkern.ops by name (the shims look ops.<name> up at call time)."""
    calls: dict[str, int] = {}
    for name in SPIED:
        real = getattr(ops, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops, name, counted)
    yield calls
    for name, n in calls.items():
        _all_calls[name] = _all_calls.get(name, 0) + n


def close(got, want, what=""):
    if isinstance(want, (tuple, list)):
        assert len(got) == len(want), what
        for i, (g, w) in enumerate(zip(got, want)):
            close(g, w, f"{what}[{i}]")
        return
    if isinstance(want, dict):
        assert got.keys() == want.keys(), what
        for key in want:
            close(got[key], want[key], f"{what}[{key}]")
        return
    g, w = torch.as_tensor(got).detach(), torch.as_tensor(want).detach()
    assert g.shape == w.shape, f"{what}: shape {tuple(g.shape)} != {tuple(w.shape)}"
    assert g.dtype == w.dtype, f"{what}: dtype {g.dtype} != {w.dtype}"
    torch.testing.assert_close(g, w, atol=ATOL, rtol=RTOL, equal_nan=True, msg=lambda m: f"{what}: {m}")
    diff = (g.double() - w.double()).abs().nan_to_num(0.0)
    if diff.numel():
        _max_diff["abs"] = max(_max_diff["abs"], float(diff.max()))
        big = w.double().abs() >= 1e-3  # relative error of values near 0 says nothing
        if big.any():
            _max_diff["rel"] = max(_max_diff["rel"], float((diff[big] / w.double().abs()[big]).max()))


def both(get_fn, *args, spy=None, expect=(), **kwargs):
    """(patched result, unpatched result) of ``get_fn()(*args, **kwargs)``: ``get_fn`` reads the verl
    attribute at call time, so the second call goes through what patch() installed. ``args`` that are
    tensors needing grad are cloned per call, so each run gets its own leaves."""
    def call():
        leaves = [a.detach().clone().requires_grad_() if torch.is_tensor(a) and a.requires_grad else a
                  for a in args]
        return get_fn()(*leaves, **kwargs), [a for a in leaves if torch.is_tensor(a) and a.requires_grad]

    assert not compat.is_patched("verl")
    want, want_leaves = call()
    assert spy is None or not spy, f"unpatched verl reached rlkern: {spy}"
    compat.patch("verl", strict=True)
    try:
        assert get_fn().__module__ == "rlkern.compat.verl", get_fn()
        got, got_leaves = call()
    finally:
        compat.unpatch("verl")
    for name in expect:
        assert spy.get(name, 0) >= 1, f"patched call did not reach rlkern.ops.{name}: {spy}"
    return (got, got_leaves), (want, want_leaves)


def grads(out, leaves, weight):
    return torch.autograd.grad((out * weight).sum(), leaves)


def float_mask(b, t, seed=0, dead_row=None):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(b, t, generator=g) < 0.7).float()
    mask[:, :2] = 1.0  # every live row has two valid tokens (verl's whitening needs two overall)
    if dead_row is not None:
        mask[dead_row] = 0.0
    return mask


# --- the actor's log-prob / entropy path (verl.utils.torch_functional) ---

@pytest.mark.parametrize("name", ["logprobs_from_logits", "logprobs_from_logits_v2",
                                  "logprobs_from_logits_naive"])
def test_logprobs_match_installed_verl(spy, name):
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 5, 37)).requires_grad_()
    labels = torch.randint(0, 37, (3, 5))
    weight = torch.randn(3, 5)
    (got, gl), (want, wl) = both(lambda: getattr(vf, name), logits, labels, spy=spy, expect=("logprobs",))
    close(got, want, name)
    close(grads(got, gl, weight), grads(want, wl, weight), f"{name} d logits")


@pytest.mark.parametrize("name,kwargs", [("entropy_from_logits", {}),
                                         ("entropy_from_logits_with_chunking", {"chunk_size": 4})])
def test_entropy_matches_installed_verl(spy, name, kwargs):
    torch.manual_seed(1)
    logits = (2 * torch.randn(11, 29)).requires_grad_()  # 11 rows: chunks of 4, 4, 3
    weight = torch.randn(11)
    (got, gl), (want, wl) = both(lambda: getattr(vf, name), logits, spy=spy, expect=("entropy",), **kwargs)
    close(got, want, name)
    if want.requires_grad:  # verl's chunked entropy writes into a fresh tensor: differentiable too
        close(grads(got, gl, weight), grads(want, wl, weight), f"{name} d logits")


def test_linear_cross_entropy_against_float64(spy):
    """verl's fused head is a Triton/CUDA kernel (it opens an NVTX range first, which a CPU build of torch
    refuses), so on CPU the patched function is compared with a float64 torch computation of what
    verl's kernel computes (verl/utils/kernel/kernels.py: logprobs = z_y/T - logsumexp(z/T), entropy of
    softmax(z/T), both per token)."""
    from verl.utils.kernel import linear_cross_entropy as lce_mod

    torch.manual_seed(2)
    hidden, weight = torch.randn(2, 6, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 40, (2, 6))
    temperature = 0.7
    z = (hidden.double().reshape(-1, 16) @ weight.double().T) / temperature
    want_lp = z.gather(-1, labels.reshape(-1, 1)).squeeze(-1) - z.logsumexp(-1)
    want_ent = z.logsumexp(-1) - (z.softmax(-1) * z).sum(-1)
    compat.patch("verl", strict=True)
    try:
        fn = lce_mod.linear_cross_entropy
        assert fn is shim.linear_cross_entropy
        lp, ent = fn(hidden, weight, labels, temperature, "none")
        lp_sum, _ = fn(hidden, weight, labels, temperature, "sum")
    finally:
        compat.unpatch("verl")
    assert spy.get("linear_logprobs", 0) == 2
    close(lp.double(), want_lp, "logprobs")
    close(ent.double(), want_ent, "entropy")
    close(lp_sum.double(), want_lp.sum(), "logprobs sum")
    w = torch.randn(12, dtype=torch.float64)
    close([g.double() for g in torch.autograd.grad((lp.double() * w).sum(), (hidden, weight))],
          [g.to(torch.float64) for g in torch.autograd.grad((want_lp * w).sum(), (hidden, weight))], "grad")


MASKED_CASES = [("masked_sum", {}), ("masked_sum", {"axis": -1}), ("masked_mean", {}),
                ("masked_mean", {"axis": -1}), ("masked_var", {}), ("masked_var", {"unbiased": False}),
                ("masked_whiten", {}), ("masked_whiten", {"shift_mean": False})]


@pytest.mark.parametrize("name,kwargs", MASKED_CASES)
def test_masked_stats_match_installed_verl(spy, name, kwargs):
    torch.manual_seed(11)
    values = (torch.randn(5, 9) + 2).requires_grad_()
    mask = float_mask(5, 9, seed=11, dead_row=3)  # a dead row: masked_mean(axis=-1) gives 0 there
    weight = torch.randn(5, 9)
    (got, gl), (want, wl) = both(lambda: getattr(vf, name), values, mask, spy=spy, **kwargs)
    assert spy, f"{name} did not reach rlkern.ops"
    close(got, want, name)
    w = weight if want.dim() == 2 else weight[:, 0] if want.dim() == 1 else 1.0
    close(grads(got, gl, w), grads(want, wl, w), f"{name} grad")


# --- verl.trainer.ppo.core_algos ---

def _loss_inputs(seed=3, b=6, t=13):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(b, t, generator=g) * 3).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, t, generator=g)
    return logp, old, adv, float_mask(b, t, seed, dead_row=4)


def actor_config(info, **clip):
    """verl's own ActorConfig (gspo asserts the type), with the global-batch info the actor's ppo_loss
    writes into it (verl/workers/utils/losses.py)."""
    from verl.workers.config import ActorConfig

    config = ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1, **clip)
    config.global_batch_info.update(info)
    return config


GLOBAL_INFOS = [{}, {"dp_size": 2, "batch_num_tokens": 50, "global_batch_size": 9, "loss_scale_factor": 7}]
VERL_AGG_MODES = shim.AGG_MODES  # verl 0.9.1 has five, token-sum included


@pytest.mark.parametrize("info", GLOBAL_INFOS, ids=["local", "global"])
@pytest.mark.parametrize("mode", VERL_AGG_MODES)
def test_agg_loss_matches_installed_verl(spy, mode, info):
    loss_mat, _, _, mask = _loss_inputs()
    (got, gl), (want, wl) = both(lambda: core.agg_loss, loss_mat, mask, mode, spy=spy, expect=("masked_sum",),
                                 **info)
    close(got, want, mode)
    close(grads(got, gl, 1.0), grads(want, wl, 1.0), f"{mode} grad")


@pytest.mark.parametrize("info", GLOBAL_INFOS, ids=["local", "global"])
@pytest.mark.parametrize("mode", VERL_AGG_MODES)
def test_vanilla_policy_loss_registry_entry(spy, mode, info):
    """What verl's actor calls: get_policy_loss_fn("vanilla")(..., config) -> (pg_loss, pg_metrics),
    with the global-batch normalisation from config.global_batch_info (verl/workers/utils/losses.py)."""
    logp, old, adv, mask = _loss_inputs()
    config = actor_config(info, clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28, clip_ratio_c=2.5)
    weights = torch.rand(*logp.shape) + 0.5
    (got, gl), (want, wl) = both(lambda: core.get_policy_loss_fn("vanilla"), old, logp, adv, mask, mode,
                                 config, weights, spy=spy, expect=("policy_loss",))
    close(got, want, mode)
    close(grads(got[0], gl, 1.0), grads(want[0], wl, 1.0), f"{mode} d logp")


def test_deprecated_compute_policy_loss(spy):
    logp, old, adv, mask = _loss_inputs(seed=4)
    (got, gl), (want, wl) = both(lambda: core.compute_policy_loss, old, logp, adv, mask, spy=spy,
                                 expect=("policy_loss",), cliprange=0.2, cliprange_high=0.3,
                                 loss_agg_mode="seq-mean-token-mean")
    close(got, want)
    close(grads(got[0], gl, 1.0), grads(want[0], wl, 1.0), "d logp")


@pytest.mark.parametrize("info", GLOBAL_INFOS, ids=["local", "global"])
@pytest.mark.parametrize("mode", VERL_AGG_MODES)
def test_value_loss_matches_installed_verl(spy, mode, info):
    vpreds, values, returns, mask = _loss_inputs(seed=5)
    (got, gl), (want, wl) = both(lambda: core.compute_value_loss, vpreds, returns, values, mask, 0.2, mode,
                                 spy=spy, expect=("value_loss",), **info)
    close(got, want, mode)
    close(grads(got[0], gl, 1.0), grads(want[0], wl, 1.0), f"{mode} d vpreds")


@pytest.mark.parametrize("name", shim.KL_PENALTIES)
def test_kl_penalty_matches_installed_verl(spy, name):
    logp, ref, _, _ = _loss_inputs(seed=6)
    ref = ref * 8  # reaches the k3 clamps (|log-ratio| > 20 somewhere, k3 > 10 somewhere)
    weight = torch.randn(*logp.shape)
    (got, gl), (want, wl) = both(lambda: core.kl_penalty, logp, ref, name, spy=spy, expect=("kl",))
    close(got, want, name)
    close(grads(got, gl, weight), grads(want, wl, weight), f"{name} grad")


def test_gae_registry_entry(spy):
    g = torch.Generator().manual_seed(7)
    rewards, values = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    mask = float_mask(5, 16, seed=7)
    mask[1, 5:9] = 0.0  # an observation gap inside a response (multi-turn)
    (got, _), (want, _) = both(lambda: core.get_adv_estimator_fn("gae"), rewards, values, mask, 0.95, 0.9,
                               spy=spy, expect=("gae",))
    close(got, want, "gae")


def _uids():
    # A numpy object array mixing ints and strings, as verl's uid column can be; "solo" is a group of one.
    return np.array([0, "a", 0, "a", 7, "b", 7, "b", "solo", "a"], dtype=object)


@pytest.mark.parametrize("name,kwargs", [("grpo", {}), ("grpo", {"norm_adv_by_std_in_grpo": False}),
                                         ("rloo", {})])
def test_group_estimators_registry_entries(spy, name, kwargs):
    g = torch.Generator().manual_seed(8)
    mask = float_mask(10, 9, seed=8)
    rewards = torch.randn(10, 9, generator=g) * mask
    (got, _), (want, _) = both(lambda: core.get_adv_estimator_fn(name), rewards, mask, _uids(), spy=spy,
                               expect=("outcome_advantages",), **kwargs)
    close(got, want, name)


def test_reinforce_plus_plus_registry_entry(spy):
    g = torch.Generator().manual_seed(9)
    mask = float_mask(4, 12, seed=9)
    mask[2, 4:7] = 0.0  # an observation gap: verl carries the running return through it
    rewards = torch.randn(4, 12, generator=g) * mask
    config = OmegaConf.create({"gamma": 0.9})
    (got, _), (want, _) = both(lambda: core.get_adv_estimator_fn("reinforce_plus_plus"), rewards, mask,
                               config=config, spy=spy, expect=("gae",))
    close(got, want, "reinforce_plus_plus")


# --- every other ADV_ESTIMATOR_REGISTRY entry (verl 0.9.1), against verl's own function ---
# Inputs: groups of uneven sizes (1, 2, 3, 5, 8, 4, 1, 6 responses, shuffled; two groups of one),
# responses of every length including 0 (two zero-length responses), an
# observation gap inside one response, masks float32 / int64 / bool. Tolerance: fp32 (ATOL = RTOL = 1e-5):
# both sides compute in fp32 (rlkern's group statistics in float64, rounded once), so they differ by
# the rounding of sums of <= 12 terms reordered, |values| <= ~50.

GROUP_SIZES = (1, 2, 3, 5, 8, 4, 1, 6)
MASK_DTYPES = (torch.float32, torch.int64, torch.bool)


def _estimator_inputs(seed, mask_dtype, t=12, sizes=GROUP_SIZES):
    g = torch.Generator().manual_seed(seed)
    uids = np.array([f"uid-{k}" for k, n in enumerate(sizes) for _ in range(n)], dtype=object)
    uids = uids[torch.randperm(len(uids), generator=g).numpy()]
    b = len(uids)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[[3, 11]] = 0  # zero-length responses
    lengths[7] = t  # at least one full row
    mask = torch.arange(t)[None] < lengths[:, None]
    mask[5, 3:6] = False  # an observation gap inside a response (multi-turn)
    rewards = torch.randn(b, t, generator=g) * mask
    extras = {"old_log_probs": -3 * torch.rand(b, t, generator=g),
              "sum_pi_squared": torch.rand(b, t, generator=g),
              "rollout_is_weights": torch.rand(b, t, generator=g) + 0.5}
    return rewards, mask.to(mask_dtype), uids, extras


def _estimator_kwargs(name, seed, mask_dtype):
    rewards, mask, uids, extras = _estimator_inputs(seed, mask_dtype)
    kwargs = {"token_level_rewards": rewards, "response_mask": mask}
    config = OmegaConf.create({"gamma": 1.0, "norm_adv_by_std_in_grpo": True})
    if name == "remax":
        g = torch.Generator().manual_seed(seed)
        kwargs["reward_baselines"] = torch.randn(rewards.shape[0], generator=g)
    else:
        kwargs["index"] = uids
    if name in ("gdpo", "reinforce_plus_plus_baseline", "opo", "gpg", "rloo_vectorized", "grpo_vectorized"):
        kwargs["config"] = config
    if name.endswith("optimal_token_baseline"):
        kwargs.update(extras)
    return kwargs


OUTCOME_ESTIMATORS = ("grpo", "grpo_vectorized", "gdpo", "reinforce_plus_plus_baseline", "opo", "gpg", "rloo",
                      "rloo_vectorized", "remax", "optimal_token_baseline", "tir_optimal_token_baseline")


def _expected_op(name):
    if name == "remax":
        return "gae"  # the reward-to-go scan
    return "optimal_token_baseline" if name.endswith("optimal_token_baseline") else "outcome_advantages"


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
@pytest.mark.parametrize("name", OUTCOME_ESTIMATORS)
def test_every_estimator_registry_entry(spy, name, mask_dtype):
    kwargs = _estimator_kwargs(name, 20 + OUTCOME_ESTIMATORS.index(name), mask_dtype)
    (got, _), (want, _) = both(lambda: core.get_adv_estimator_fn(name), spy=spy, expect=(_expected_op(name),),
                               **kwargs)
    close(got, want, name)


@pytest.mark.parametrize("kwargs", [{"handle_zero_tail": False}, {"rollout_is_weights": None},
                                    {"epsilon": 1e-3}], ids=["no_zero_tail", "no_is_weights", "eps"])
@pytest.mark.parametrize("name", ["optimal_token_baseline", "tir_optimal_token_baseline"])
def test_optimal_token_baseline_options(spy, name, kwargs):
    base = _estimator_kwargs(name, 40, torch.float32)
    (got, _), (want, _) = both(lambda: core.get_adv_estimator_fn(name), spy=spy,
                               expect=("optimal_token_baseline",), **{**base, **kwargs})
    close(got, want, f"{name} {kwargs}")


@pytest.mark.parametrize("name", ["optimal_token_baseline", "tir_optimal_token_baseline"])
def test_optimal_token_baseline_tied_longest(spy, name):
    """handle_zero_tail acts only when a group's longest response is unique: a group whose two longest
    tie keeps its baseline; one whose longest is unique gets 0 from the second length on."""
    b, t = 6, 10
    mask = torch.zeros(b, t)
    for row, length in enumerate((10, 10, 4, 9, 5, 2)):  # group 0 ties at 10; group 1 unique 9 > 5
        mask[row, :length] = 1.0
    mask[3, 2] = 0.0  # a gap: columns and ranks differ (tir)
    g = torch.Generator().manual_seed(41)
    extras = {"old_log_probs": -torch.rand(b, t, generator=g),
              "sum_pi_squared": torch.rand(b, t, generator=g)}
    uids = np.array([0, 0, 0, 1, 1, 1])
    (got, _), (want, _) = both(lambda: core.get_adv_estimator_fn(name), torch.randn(b, t, generator=g) * mask,
                               mask, uids, spy=spy, expect=("optimal_token_baseline",), **extras)
    close(got, want, name)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
def test_grpo_passk_registry_entry(spy, mask_dtype, norm):
    """Pass@k: 0/1/2 rewards so that groups have ties for the best (all 0) and unique bests; verl reads
    norm_adv_by_std_in_grpo from the config, not from its argument."""
    rewards, mask, uids, _ = _estimator_inputs(50, mask_dtype, sizes=(2, 3, 5, 8, 4, 6, 2))
    scores = torch.randint(0, 3, (rewards.shape[0],), generator=torch.Generator().manual_seed(51)).float()
    rewards = torch.zeros_like(rewards)
    rewards[:, 0] = scores
    config = OmegaConf.create({"norm_adv_by_std_in_grpo": norm})
    (got, _), (want, _) = both(lambda: core.get_adv_estimator_fn("grpo_passk"), rewards, mask, uids,
                               norm_adv_by_std_in_grpo=not norm, config=config, spy=spy,
                               expect=("outcome_advantages",))
    close(got, want, "grpo_passk")


def test_grpo_passk_group_of_one_raises():
    rewards, mask, uids, _ = _estimator_inputs(52, torch.float32)  # GROUP_SIZES has groups of one
    config = OmegaConf.create({})
    with pytest.raises(ValueError, match="at least 2 samples per group"):
        core.compute_grpo_passk_outcome_advantage(rewards, mask, uids, config=config)
    with pytest.raises(ValueError, match="at least 2 samples per group"):
        shim.compute_grpo_passk_outcome_advantage(rewards, mask, uids, config=config)


@pytest.mark.parametrize("weights", [None, [0.3, 1.0, 2.5]])
def test_gdpo_reward_keys(spy, weights):
    """GDPO with its per-component rewards read from non_tensor_batch[config.gdpo_reward_keys] (verl
    writes each at the last response token: batch['prompts'] and batch['attention_mask'])."""
    rewards, mask, uids, _ = _estimator_inputs(53, torch.float32)
    b, t = mask.shape
    g = torch.Generator().manual_seed(54)
    keys = ["format_reward", "accuracy_reward", "length_reward"]
    non_tensor = {"uid": uids, **{k: (torch.randint(0, 3, (b,), generator=g).numpy() * 0.5) for k in keys}}
    prompt = 5
    batch = {"prompts": torch.zeros(b, prompt, dtype=torch.long),
             "attention_mask": torch.cat([torch.ones(b, prompt), mask], dim=1).long()}
    config = OmegaConf.create({"gdpo_reward_keys": keys, "gdpo_reward_weights": weights})
    (got, _), (want, _) = both(lambda: core.get_adv_estimator_fn("gdpo"), rewards, mask, uids, config=config,
                               non_tensor_batch=non_tensor, batch=batch, spy=spy,
                               expect=("outcome_advantages", "masked_whiten"))
    close(got, want, "gdpo")


@pytest.mark.parametrize("index", [
    np.array([3, 3, 7, 7, 7, 0, 12, 12]),  # sparse integer uids
    np.array([1.0, 1.0 + 1e-9, 2.0, 2.0, 5.0, 5.0, 5.0, 9.0]),  # near-integer floats are rounded
    np.array(["10", "10", "010", "2", "2", "33", "33", "33"]),  # numeric strings: "10" == "010"
    np.array([0.2, 0.7, 1.5, 1.9, 2.5, 3.0, 3.0, 0.1]),  # other floats are truncated (!)
    np.array(["a", 1, "a", 1, "b", "b", 2, 2], dtype=object),  # mixed: factorised by str()
    torch.tensor([4, 4, 1, 1, 1, 9, 9, 2]),
], ids=["ints", "near_int_floats", "numeric_strings", "floats", "mixed_objects", "tensor"])
def test_grpo_vectorized_grouping(spy, index):
    """grpo_vectorized groups with verl.utils.as_torch_index, not with the dict of grpo."""
    g = torch.Generator().manual_seed(55)
    mask = float_mask(8, 6, seed=55)
    rewards = torch.randn(8, 6, generator=g) * mask
    (got, _), (want, _) = both(lambda: core.get_adv_estimator_fn("grpo_vectorized"), rewards, mask, index,
                               spy=spy, expect=("outcome_advantages",))
    close(got, want, "grpo_vectorized")


@pytest.mark.parametrize("name", ["grpo", "grpo_vectorized", "rloo", "rloo_vectorized", "gpg",
                                  "reinforce_plus_plus_baseline"])
def test_binary_rewards_flat_groups_exact(spy, name):
    """0/1 rewards, groups all 0 or all 1 among mixed ones: verl's loops and rlkern agree exactly on the
    flat groups' 0 (a group mean of equal small integers has no rounding; for continuous scores verl
    gives a flat group the rounding of its mean / epsilon, rlkern exactly 0)."""
    uids = np.repeat(np.arange(6), 4)
    scores = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 0, 1, 1, 0, 1, 0, 0, 0, 1, 1, 1, 0, 0, 1, 0, 1]).float()
    mask = float_mask(24, 5, seed=56)
    rewards = torch.zeros(24, 5)
    rewards[:, 1] = scores
    kwargs = {"config": OmegaConf.create({})} if name != "grpo" else {}
    (got, _), (want, _) = both(lambda: core.get_adv_estimator_fn(name), rewards, mask, uids, spy=spy,
                               expect=("outcome_advantages",), **kwargs)
    close(got, want, name)
    assert torch.equal(got[0][:8], want[0][:8])  # the flat groups (whitening then shifts them alike)
    if name != "reinforce_plus_plus_baseline":
        assert not got[0][:8].any()


def test_trainer_shaped_calls_reach_rlkern(spy):
    """The call verl 0.9.1's trainer makes (ray_trainer.compute_advantage, which needs torchdata and is
    not importable here) for every estimator but gae and grpo: get_adv_estimator_fn(name)(**adv_kwargs)
    with config, the uid column as index, reward_baselines when the batch has them (remax), and for the
    optimal token baselines sum_pi_squared, old_log_probs and rollout_is_weights. Patched, each call
    reaches rlkern once; the numbers are verl's."""
    rewards, mask, uids, extras = _estimator_inputs(57, torch.float32, sizes=(2, 3, 5, 8, 4, 6, 2))
    config = OmegaConf.create({"gamma": 1.0, "norm_adv_by_std_in_grpo": True})
    names = [n for n in core.ADV_ESTIMATOR_REGISTRY if n not in ("gae", "grpo")]
    results = []
    for patched in (False, True):
        if patched:
            compat.patch("verl", strict=True)
        try:
            for name in names:
                adv_kwargs = {"token_level_rewards": rewards, "response_mask": mask, "config": config,
                              "index": uids}
                if name == "remax":
                    adv_kwargs["reward_baselines"] = rewards.sum(-1) * 0.5
                if name == "gdpo":
                    parts = {"fmt": (rewards.sum(-1) > 0).numpy() * 1.0, "acc": rewards.sum(-1).numpy()}
                    batch = {"prompts": torch.zeros(len(uids), 3, dtype=torch.long),
                             "attention_mask": torch.cat([torch.ones(len(uids), 3), mask], 1).long()}
                    adv_kwargs.update(config=OmegaConf.create({"gdpo_reward_keys": ["fmt", "acc"]}),
                                      non_tensor_batch={"uid": uids, **parts}, batch=batch)
                if name.endswith("optimal_token_baseline"):
                    adv_kwargs.update(extras)
                results.append(core.get_adv_estimator_fn(name)(**adv_kwargs))
        finally:
            compat.unpatch("verl")
        if not patched:
            assert not spy, spy
    assert sum(spy.values()) >= len(names) - 1 and spy.get("optimal_token_baseline", 0) == 2, spy
    close(results[len(names):], results[:len(names)], "trainer-shaped calls")

# --- the cases of verl's own CPU suite (tests/trainer/ppo/test_core_algos_on_cpu.py), run patched ---
# Our own tests of the same cases (verl's file is not vendored): its registry tests, its multi-turn GAE
# test, and its GRPO / RLOO "loop vs vectorized" equivalence tests, each with rlkern.compat.patch("verl")
# in effect, so every function called is rlkern's.

@pytest.fixture
def patched_verl():
    compat.patch("verl", strict=True)
    yield core
    compat.unpatch("verl")


def test_suite_registry_behaviour_patched(patched_verl):
    """register_adv_est / get_adv_estimator_fn keep verl's behaviour on the patched registry: a new name
    registers; re-registering the same function is allowed, a different one for a taken name raises;
    unknown names and other cases raise verl's ValueError."""
    registry = patched_verl.ADV_ESTIMATOR_REGISTRY
    assert all(fn.__module__ == "rlkern.compat.verl" for fn in registry.values())

    def custom(token_level_rewards, response_mask, **kwargs):
        return token_level_rewards, token_level_rewards

    try:
        assert patched_verl.register_adv_est("rlkern_test_estimator")(custom) is custom
        patched_verl.register_adv_est("rlkern_test_estimator")(custom)
        assert patched_verl.get_adv_estimator_fn("rlkern_test_estimator") is custom
        with pytest.raises(ValueError, match="already been registered"):
            patched_verl.register_adv_est("rlkern_test_estimator")(lambda: None)
        grpo = registry["grpo"]
        assert patched_verl.register_adv_est("grpo")(grpo) is grpo  # the patched entry, re-registered
        assert patched_verl.get_adv_estimator_fn(patched_verl.AdvantageEstimator.GRPO) is grpo
        for bad in ("invalid_name", "GAE"):
            with pytest.raises(ValueError, match="Unknown advantage estimator simply"):
                patched_verl.get_adv_estimator_fn(bad)
    finally:
        registry.pop("rlkern_test_estimator", None)


def test_suite_multi_turn_gae_skips_observation_tokens(patched_verl):
    """verl's case: the values at observation tokens (mask 0) must not change the advantages at all, nor
    the returns at valid tokens: bitwise, for random gamma and lambda."""
    rng = np.random.default_rng(60)
    rewards = torch.tensor([[0.0, 0.0, 0.1, 0.1, 0.1, 0.0, 0.0, 0.1, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0]], dtype=torch.float)
    for _ in range(5):
        gamma, lam = rng.uniform(0, 1, 2)
        values = [torch.tensor([[rng.uniform(-100, 100), rng.random(), 4.0, 5.0, 6.0,
                                 rng.uniform(-100, 100), rng.uniform(0, 100), 7.0, 9.0, 0.0, 0.0]])
                  for _ in range(2)]
        (adv1, ret1), (adv2, ret2) = (patched_verl.compute_gae_advantage_return(rewards, v, mask, gamma, lam)
                                      for v in values)
        assert torch.equal(adv1, adv2)
        assert torch.equal(ret1 * mask, ret2 * mask)


def _suite_group_index(rng, batch, groups):
    counts = np.full(groups, 2)  # every group has at least 2 responses, as in verl's helper
    np.add.at(counts, rng.integers(0, groups, batch - 2 * groups), 1)
    return rng.permutation(np.repeat(np.arange(groups), counts)).astype(np.int64)


def _suite_mask(batch, length, seed):
    mask = torch.randint(0, 2, (batch, length), generator=torch.Generator().manual_seed(seed)).float()
    mask[mask.sum(-1) == 0, -1] = 1.0  # every row keeps one valid token
    return mask


@pytest.mark.parametrize("pair", [
    ("compute_rloo_outcome_advantage", "compute_rloo_vectorized_outcome_advantage"),
    ("compute_grpo_outcome_advantage", "compute_grpo_vectorized_outcome_advantage"),
], ids=["rloo", "grpo"])
@pytest.mark.parametrize("batch,length,groups,seed", [(64, 128, 5, 0), (128, 256, 8, 1), (512, 512, 10, 2)])
def test_suite_loop_and_vectorized_equivalence_patched(patched_verl, pair, batch, length, groups, seed):
    """verl's equivalence tests (same sizes, same tolerance: rtol 1e-5, atol 1e-6) on the patched
    functions, and each patched function against verl's original."""
    rng = np.random.default_rng(seed)
    index = _suite_group_index(rng, batch, groups)
    mask = _suite_mask(batch, length, seed)
    rewards = torch.randn(batch, length, generator=torch.Generator().manual_seed(seed + 100)) * mask
    loop, vectorized = (getattr(patched_verl, name) for name in pair)
    assert loop.__module__ == vectorized.__module__ == "rlkern.compat.verl"
    adv1, ret1 = loop(token_level_rewards=rewards, response_mask=mask, index=index)
    adv2, ret2 = vectorized(token_level_rewards=rewards, response_mask=mask, index=index)
    assert adv1.shape == adv2.shape == ret1.shape == ret2.shape == (batch, length)
    assert torch.allclose(adv1, adv2, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ret1, ret2, rtol=1e-5, atol=1e-6)
    compat.unpatch("verl")
    for name, got in zip(pair, (adv1, adv2)):
        want, _ = getattr(core, name)(token_level_rewards=rewards, response_mask=mask, index=index)
        close(got, want, name)


# --- what patch() replaces, what it leaves, and unpatch ---

def _snapshot():
    mods = {name: dict(vars(sys.modules[name])) for name in VERL_MODULES}
    regs = {name: dict(getattr(core, name)) for name in ("ADV_ESTIMATOR_REGISTRY", "POLICY_LOSS_REGISTRY")}
    return mods, regs


def test_patch_scope_and_unpatch_identity():
    mods_before, regs_before = _snapshot()
    originals = {id(getattr(sys.modules[m], a)) for m, a, _ in shim.PATCH_TARGETS}
    names = compat.patch("verl", strict=True)
    mods_during, regs_during = _snapshot()
    # Every target was found in 0.9.1, and the actor's loss module's copies were replaced too.
    for module, attr, shim_name in shim.PATCH_TARGETS:
        assert f"{module}.{attr}" in names
        assert getattr(sys.modules[module], attr) is getattr(shim, shim_name)
    losses = sys.modules["verl.workers.utils.losses"]
    assert losses.agg_loss is shim.agg_loss and losses.kl_penalty is shim.kl_penalty
    assert losses.compute_value_loss is shim.compute_value_loss and losses.masked_mean is shim.masked_mean
    # No verl module still holds an original of a replaced function.
    for name, attrs in mods_during.items():
        assert not [a for a, v in attrs.items() if id(v) in originals], name
    # Every advantage estimator (14) and every policy loss (12) verl 0.9.1 registers is replaced.
    replaced = set(regs_before["POLICY_LOSS_REGISTRY"]), set(regs_before["ADV_ESTIMATOR_REGISTRY"])
    assert len(replaced[1]) == 14 and len(replaced[0]) == 12, sorted(replaced[1]) + sorted(replaced[0])
    for (reg, before), keys in zip(regs_before.items(), (replaced[1], replaced[0])):
        during = regs_during[reg]
        assert during.keys() == before.keys(), reg
        assert {k for k in before if during[k] is not before[k]} == keys, reg
        shims = ("rlkern.compat.verl", "rlkern.compat.verl_policy", "rlkern.compat.verl_cov",
                 "rlkern.compat.verl_dppo")
        assert all(during[k].__module__ in shims for k in keys)
    compat.unpatch("verl")
    mods_after, regs_after = _snapshot()
    for name, attrs in mods_before.items():
        assert mods_after[name].keys() == attrs.keys(), name
        assert [a for a, v in attrs.items() if mods_after[name][a] is not v] == [], name
    for reg, before in regs_before.items():
        assert regs_after[reg].keys() == before.keys()
        assert [k for k, v in before.items() if regs_after[reg][k] is not v] == [], reg


def test_untouched_policy_losses_still_run_patched():
    """verl's original gspo (a reference taken before patching) calls core_algos.agg_loss, which the
    patch replaces: its numbers must not change. (The registry entry itself is replaced.)"""
    logp, old, adv, mask = _loss_inputs(seed=10)
    info = {"dp_size": 2, "batch_num_tokens": 40, "global_batch_size": 8, "loss_scale_factor": None}
    config = actor_config(info, clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28)
    for mode in ("token-mean", "seq-mean-token-mean"):
        (got, _), (want, _) = both(lambda: core.agg_loss, logp, mask, mode)  # agg_loss itself is replaced
        close(got, want, mode)
        fn = core.POLICY_LOSS_REGISTRY["gspo"]
        want = fn(old, logp, adv, mask, mode, config)
        compat.patch("verl")
        try:
            assert core.POLICY_LOSS_REGISTRY["gspo"] is not fn
            got = fn(old, logp, adv, mask, mode, config)
        finally:
            compat.unpatch("verl")
        close(got, want, f"gspo {mode}")


# ------------------------------------------------------------------------------------------------
# rollout correction (verl/trainer/ppo/rollout_corr_helper.py): weights, rejection masks, metrics
# ------------------------------------------------------------------------------------------------

import verl.trainer.ppo.rollout_corr_helper as rch  # noqa: E402

RC_MASKS = (torch.float32, torch.int64, torch.bool)
RC_IS = [("token", 2.0), ("token", "1.5"), ("token", "0.8_1.25"), ("sequence", 2.0), ("sequence", "0.5_3"),
         ("sequence", 1e6)]
RC_RS = [("token_k1", "0.8_1.25"), ("token_k1", 1.3), ("token_k2", 0.03), ("token_k3", 0.03),
         ("seq_sum_k1", "0.5_2"), ("seq_sum_k2", 0.2), ("seq_sum_k3", 0.2), ("seq_mean_k1", 1.05),
         ("seq_mean_k2", 0.04), ("seq_mean_k3", 0.04), ("seq_max_k2", 0.1), ("seq_max_k3", 0.1),
         ("token_k1,seq_mean_k3,seq_max_k2", "0.7_1.4,0.04,0.15"), ("seq_mean_k1,seq_sum_k3", 1.1)]


@pytest.fixture
def rc_spy(monkeypatch):
    calls = []
    real = ops.rollout_correction

    def counted(*args, **kwargs):
        calls.append(kwargs.get("level"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "rollout_correction", counted)
    return calls


def _rc_inputs(mask_dtype=torch.float32, seed=0, b=8, t=12, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g) * 3
    roll = old + scale * torch.randn(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) < 0.75
    mask[0] = True
    mask[2] = False  # a zero-length response
    return old, roll, mask.to(mask_dtype)


def _rc_both(name, *args, spy=None, **kwargs):
    return both(lambda: getattr(rch, name), *args, spy=spy, **kwargs)


@pytest.mark.parametrize("batch_normalize", [False, True])
@pytest.mark.parametrize("level,threshold", RC_IS, ids=[f"{a}-{b}" for a, b in RC_IS])
@pytest.mark.parametrize("mask_dtype", RC_MASKS, ids=str)
def test_rollout_is_weights_match_installed_verl(rc_spy, mask_dtype, level, threshold, batch_normalize):
    old, roll, mask = _rc_inputs(mask_dtype, seed=1)
    (got, _), (want, _) = _rc_both("compute_rollout_correction_weights", old - roll, mask, level, threshold,
                                   batch_normalize)
    close(got, want, f"{level} {threshold}")
    assert rc_spy == [level]


@pytest.mark.parametrize("rs,threshold", RC_RS, ids=[f"{a}-{b}" for a, b in RC_RS])
@pytest.mark.parametrize("mask_dtype", RC_MASKS, ids=str)
def test_rollout_rejection_mask_matches_installed_verl(rc_spy, mask_dtype, rs, threshold):
    old, roll, mask = _rc_inputs(mask_dtype, seed=2)
    (got, _), (want, _) = _rc_both("compute_rollout_rejection_mask", old - roll, mask, rs, threshold)
    close(got, want, rs)
    assert rc_spy == [None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask_dtype", RC_MASKS, ids=str)
@pytest.mark.parametrize("is_,rs", [(("token", 2.0), (None, None)),
                                    (("sequence", "0.5_2"), ("seq_mean_k1", 1.1)),
                                    ((None, 2.0), ("token_k1,seq_max_k3", "0.8_1.25,0.1")),
                                    (("token", "0.8_1.2"), ("seq_sum_k2", 0.2))])
def test_rollout_correction_and_rejection_matches_installed_verl(rc_spy, mask_dtype, dtype, is_, rs):
    """bf16 log-probs: verl computes in bf16, rlkern in fp32 from the same values; compared with verl on
    the fp32 upcast (the weights also with verl's own bf16 dtype rule)."""
    old, roll, mask = _rc_inputs(mask_dtype, seed=3)
    old, roll = old.to(dtype), roll.to(dtype)
    args = (mask, is_[0], is_[1], False, rs[0], rs[1])
    want = rch.compute_rollout_correction_and_rejection_mask(old.float(), roll.float(), *args)
    want_dtype = rch.compute_rollout_correction_and_rejection_mask(old, roll, *args)
    compat.patch("verl", strict=True)
    try:
        got = rch.compute_rollout_correction_and_rejection_mask(old, roll, *args)
    finally:
        compat.unpatch("verl")
    assert rc_spy == [is_[0]]
    assert (got[0] is None) == (want[0] is None)
    if want[0] is not None:
        gw, ww = got[0].batch["rollout_is_weights"], want[0].batch["rollout_is_weights"]
        assert gw.dtype == want_dtype[0].batch["rollout_is_weights"].dtype
        close(gw.float(), ww.float().to(gw.dtype).float(), "weights")
    close(got[1], want[1], "mask")
    close(got[2], want[2], "metrics")


def test_rollout_correction_non_finite_and_errors_match_installed_verl(rc_spy):
    old, roll, mask = _rc_inputs(torch.float32, seed=4)
    old[0, 3] = float("nan")
    old[3, 1] = float("-inf")
    roll[4, 0] = float("inf")
    for args in ((mask, "token", 2.0, False, "seq_mean_k3", 0.05),
                 (mask, "sequence", "0.5_2", True, None, None)):
        (got, _), (want, _) = _rc_both("compute_rollout_correction_and_rejection_mask", old, roll, *args)
        assert want[2]["rollout_corr/kl"] != want[2]["rollout_corr/kl"]  # NaN propagates to the metrics
        close(got[0].batch["rollout_is_weights"], want[0].batch["rollout_is_weights"], "weights")
        close(got[1], want[1], "mask")
        close(got[2], want[2], "metrics")
    bad_calls = [
        (rch.compute_rollout_correction_and_rejection_mask, (old, roll, torch.zeros_like(mask), "token")),
        (rch.compute_rollout_correction_and_rejection_mask, (old, roll[:, :-1], mask, "token")),
        (rch.compute_rollout_correction_and_rejection_mask, (old, roll, mask, "tok")),
        (rch.compute_rollout_correction_and_rejection_mask, (old, roll, mask, None, 2.0, False, "token_k1")),
        (rch.compute_rollout_correction_weights, (old - roll, mask, "token", "2_1")),
        (rch.compute_rollout_correction_weights, (old - roll, mask, "token", True)),
        (rch.compute_rollout_rejection_mask, (old - roll, mask, "token_k9", 1.0)),
        (rch.compute_rollout_rejection_mask, (old - roll, mask, "token_k2", "0.1_0.2")),
        (rch.compute_rollout_rejection_mask, (old - roll, torch.zeros_like(mask), "token_k2", 0.1)),
    ]
    for fn, args in bad_calls:
        with pytest.raises((ValueError, TypeError)) as want_err:
            fn(*args)
        compat.patch("verl", strict=True)
        try:
            with pytest.raises(want_err.type, match=str(want_err.value).split(":")[0][:30].replace("(", ".")):
                getattr(rch, fn.__name__)(*args)
        finally:
            compat.unpatch("verl")
    # an empty batch comes back as is from the rejection mask
    (got, _), (want, _) = _rc_both("compute_rollout_rejection_mask", old[:0] - roll[:0], mask[:0], "token_k2",
                                   1.0)
    assert got[1] == want[1] == {} and got[0].shape == want[0].shape == (0, old.shape[1])


@pytest.mark.parametrize("mask_dtype", RC_MASKS, ids=str)
def test_offpolicy_metrics_match_installed_verl(rc_spy, mask_dtype):
    old, roll, mask = _rc_inputs(mask_dtype, seed=5)
    for name, args in (("compute_offpolicy_metrics", (old, roll, mask)),
                       ("compute_offpolicy_metrics", (old, None, mask)),
                       ("compute_rollout_corr_metrics_from_logprobs", (old, roll, mask))):
        (got, _), (want, _) = _rc_both(name, *args)
        close(got, want, name)
    assert rc_spy == [None, None]


def test_trainer_path_reaches_rlkern(rc_spy):
    """verl's ray trainer calls compute_rollout_correction_and_add_to_batch, which looks the helper up in
    its module at call time: patched, the whole step runs on rlkern and gives verl's batch and metrics."""
    from verl.protocol import DataProto

    old, roll, mask = _rc_inputs(torch.float32, seed=6)
    config = {"rollout_is": "token", "rollout_is_threshold": 2.0, "rollout_rs": "seq_mean_k1",
              "rollout_rs_threshold": "0.95_1.05"}

    def run():
        batch = DataProto.from_dict(tensors={"old_log_probs": old, "rollout_log_probs": roll,
                                             "response_mask": mask})
        return rch.compute_rollout_correction_and_add_to_batch(batch, config)

    want_batch, want_metrics = run()
    assert rc_spy == []
    compat.patch("verl", strict=True)
    try:
        got_batch, got_metrics = run()
    finally:
        compat.unpatch("verl")
    assert rc_spy == ["token"]
    close(got_metrics, want_metrics, "metrics")
    for key in ("response_mask", "rollout_is_weights"):
        close(got_batch.batch[key], want_batch.batch[key], key)
