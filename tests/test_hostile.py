"""Hostile but realistic inputs (issue 9, part B): linear_logprobs / linear_policy_loss, kl,
group_advantages, dpo_loss and the shared number validation, on every backend available.

Policy under test (each op's docstring states it): NaN in the inputs feeding an output makes it
NaN (or ``nan_check=True`` raises, naming the argument and the first index); a +inf logit makes
its token NaN; -inf is a banned token; the invariants logp <= 0 and 0 <= entropy <= ln V hold on
every backend; hyperparameters are Python or numpy numbers, never bool.
Regression tests carry the peers' bug numbers in their names.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import rlkern
from rlkern import reference
from tests.conftest import ALL_BACKENDS

NAN, INF = float("nan"), float("inf")
ops = rlkern.ops


def _small_case(n=6, hidden_size=24, vocab=70, dtype=torch.float32):
    hidden = torch.randn(n, hidden_size).to(dtype)
    weight = (torch.randn(vocab, hidden_size) / 3).to(dtype)
    labels = torch.randint(0, vocab, (n,))
    return hidden, weight, labels


# ------------------------------------------------------------------------------------------------
# linear_logprobs: non-finite inputs
# ------------------------------------------------------------------------------------------------


# Where a NaN sits decides which code path meets it: the first lane, a 16-lane vector boundary, a
# vocabulary row inside the last (partial) vector of a tile, the last row, and a whole token.
@pytest.mark.parametrize("where", ["hidden_first", "hidden_last", "weight_row0", "weight_row16",
                                   "weight_tail", "hidden_all_row"])
def test_linear_logprobs_nan_propagates(backend, where):
    hidden, weight, labels = _small_case()
    labels[3] = -100  # an ignored token keeps log-prob 0 even in a NaN row
    poisoned_rows = list(range(hidden.shape[0]))
    if where == "hidden_first":
        hidden[1, 0], poisoned_rows = NAN, [1]
    elif where == "hidden_last":
        hidden[4, -1], poisoned_rows = NAN, [4]
    elif where == "hidden_all_row":  # a diverged model: every logit of token 2 is NaN
        hidden[2], poisoned_rows = NAN, [2]
    else:
        row = {"weight_row0": 0, "weight_row16": 16, "weight_tail": weight.shape[0] - 1}[where]
        weight[row, 5] = NAN  # one vocabulary column NaN for every token
    hidden.requires_grad_(True)
    logp, ent = ops.linear_logprobs(hidden, weight, labels, return_entropy=True, chunk_size=32)
    for r in range(hidden.shape[0]):
        poisoned = r in poisoned_rows
        assert bool(ent[r].isnan()) == poisoned, (r, ent)
        if r == 3:
            assert logp[r].item() == 0.0
        else:
            assert bool(logp[r].isnan()) == poisoned, (r, logp)
    (logp.nan_to_num(0.0).sum() + ent.nan_to_num(0.0).sum()).backward()
    # The gradient of a NaN token is NaN (not a silent 0 that a finite-loss check would miss).
    for r in range(hidden.shape[0]):
        assert bool(hidden.grad[r].isnan().any()) == (r in poisoned_rows), r


def test_linear_logprobs_all_nan_row_poisons_the_policy_loss(backend):
    """An all-NaN token used to give logp -inf and entropy 0, which grpo_loss turned into a finite
    loss with zero gradients: the trainer's non-finite check never fired."""
    hidden, weight, labels = _small_case(n=8)
    hidden = hidden.view(2, 4, -1).clone()
    hidden[1, 2] = NAN
    labels = labels.view(2, 4)
    old, adv, mask = torch.full((2, 4), -3.0), torch.tensor([1.0, -1.0]), torch.ones(2, 4)
    logp = ops.linear_logprobs(hidden, weight, labels)
    assert logp[1, 2].isnan() and not logp[0].isnan().any()
    loss, _ = ops.linear_policy_loss(hidden, weight, labels, old, adv, mask)
    expected, _ = ops.grpo_loss(logp, old, old, adv, mask)
    assert loss.isnan() and expected.isnan()


def test_linear_logprobs_inf_logit_gives_nan_and_neg_inf_bias_bans(backend):
    hidden, weight, labels = _small_case(n=3)
    hidden[0, 0] = INF  # logits of token 0 are +-inf: its softmax is undefined in floating point
    bias = torch.zeros(weight.shape[0])
    bias[labels[1]] = -INF  # token 1's label is banned
    logp, ent = ops.linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True)
    assert logp[0].isnan() and ent[0].isnan()
    assert logp[1].item() == -INF and math.isfinite(ent[1].item())
    assert torch.isfinite(logp[2]) and torch.isfinite(ent[2])
    dead = torch.full((weight.shape[0],), -INF)  # every token banned: log-prob -inf, entropy 0
    logp, ent = ops.linear_logprobs(hidden[1:], weight, labels[1:], bias=dead, return_entropy=True)
    assert (logp == -INF).all() and (ent == 0).all()


@pytest.mark.parametrize("arg, index", [("hidden", (2, 5)), ("weight", (9, 1)), ("bias", (4,))])
def test_linear_logprobs_nan_check_names_argument_and_index(backend, arg, index):
    hidden, weight, labels = _small_case()
    tensors = {"hidden": hidden, "weight": weight, "bias": torch.zeros(weight.shape[0])}
    tensors[arg][index] = NAN
    with pytest.raises(ValueError, match=rf"{arg} holds NaN .*first at index \({index[0]},"):
        ops.linear_logprobs(tensors["hidden"], tensors["weight"], labels, bias=tensors["bias"],
                            nan_check=True)
    tensors[arg][index] = 0.0
    ops.linear_logprobs(tensors["hidden"], tensors["weight"], labels, bias=tensors["bias"], nan_check=True)


# ------------------------------------------------------------------------------------------------
# linear_logprobs: accuracy, invariants, one answer across backends
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [1.0, 30.0, 1000.0])
@pytest.mark.parametrize("temperature", [1e-3, 1.0, 10.0])
def test_linear_logprobs_invariants_sweep(backend, sigma, temperature):
    """verl #2656 (log-probs above 0 collapsed runs): logp <= 0 and 0 <= H <= ln V on every backend,
    for logits ~ N(0, sigma) at any temperature; and within the fp32 error of the oracle."""
    rows = 64 if backend == "triton" else 1000
    vocab, hidden_size = 97, 8
    hidden = torch.randn(rows, hidden_size) * sigma / math.sqrt(hidden_size)
    weight = torch.randn(vocab, hidden_size)
    labels = torch.randint(0, vocab, (rows,))
    logp, ent = ops.linear_logprobs(hidden, weight, labels, temperature=temperature, return_entropy=True)
    assert bool((logp <= 0).all()), logp.max()
    assert bool((ent >= 0).all()) and bool((ent <= math.log(vocab)).all()), (ent.min(), ent.max())
    lp64, ent64 = reference.linear_logprobs(hidden.double(), weight.double(), labels, temperature=temperature,
                                            return_entropy=True)
    # fp32 logits of size |z| carry ~|z| 2^-24 error each; log-prob and entropy inherit a few of them.
    zmax = (hidden.double() @ weight.double().T).abs().max().item() / temperature
    tol = 2e-6 + 8 * zmax * 2.0**-24
    assert (logp.double() - lp64).abs().max().item() <= tol
    assert (ent.double() - ent64).abs().max().item() <= tol
    # sum over every label of exp(logp) = 1: 8 tokens x all 97 labels (padded lanes never count).
    every = ops.linear_logprobs(hidden[:8].repeat_interleave(vocab, 0), weight, torch.arange(vocab).repeat(8),
                                temperature=temperature)
    mass = every.double().exp().view(8, vocab).sum(1)
    assert (mass - 1).abs().max().item() <= 1e-5 + 2 * tol  # sum p |d logp| <= max |d logp|


def test_linear_logprobs_fp16_logits_are_not_rounded_to_fp16(backend):
    """fp16 logits near 3e4 are 16 apart: rounding each tile to fp16 put the cpp path 5 nats off."""
    hidden_size, vocab = 4, 40
    hidden = torch.tensor([[256.0, 1.0, 0.5, 0.25]]).half()
    weight = torch.randn(vocab, hidden_size).half()
    weight[:, 0] = torch.linspace(117.0, 118.0, vocab).half()  # logits ~ 3e4, spread ~ 256
    labels = torch.tensor([vocab - 3])
    logp, ent = ops.linear_logprobs(hidden, weight, labels, return_entropy=True)
    lp64, ent64 = reference.linear_logprobs(hidden.double(), weight.double(), labels, return_entropy=True)
    # fp32 ulp at 3e4 is 2e-3: a few of them, not the 16-wide fp16 grid.
    assert abs(logp.item() - lp64.item()) < 1e-2 and abs(ent.item() - ent64.item()) < 1e-2


def test_linear_policy_loss_bf16_stats_agree_across_backends():
    """bf16 approx_kl was -0.000717 on cpp against -0.001322 elsewhere (cpp rounded its logits)."""
    hidden = torch.randn(2, 8, 32).bfloat16()
    weight = (torch.randn(200, 32) / 4).bfloat16()
    labels = torch.randint(0, 200, (2, 8))
    old = reference.linear_logprobs(hidden, weight, labels) + 0.01 * torch.randn(2, 8)
    args = (hidden, weight, labels, old, torch.randn(2), torch.ones(2, 8))
    results = {}
    for name in ALL_BACKENDS:
        with rlkern.use_backend(name):
            results[name] = ops.linear_policy_loss(*args)
    loss0, stats0 = results["torch"]
    for name, (loss, stats) in results.items():
        torch.testing.assert_close(loss, loss0, atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(stats["approx_kl"], stats0["approx_kl"], atol=2e-6, rtol=1e-3, msg=name)


def test_linear_logprobs_refuses_non_integer_ignore_index_and_limited_unsigned_labels(backend):
    hidden, weight, labels = _small_case(n=3)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        ops.linear_logprobs(hidden, weight, labels, ignore_index=5.5)  # was truncated to 5 on cpp/triton
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        ops.linear_logprobs(hidden, weight, labels, ignore_index=True)
    labels[1] = 5
    out = ops.linear_logprobs(hidden, weight, labels, ignore_index=np.int64(5))
    assert out[1].item() == 0.0 and out[0].item() < 0
    for dtype in (torch.uint16, torch.uint32, torch.uint64):
        with pytest.raises(TypeError, match=r"labels must be int8/int16/int32/int64 or uint8.*\.long\(\)"):
            ops.linear_logprobs(hidden, weight, labels.to(dtype))
    torch.testing.assert_close(ops.linear_logprobs(hidden, weight, labels.to(torch.uint8)),
                               ops.linear_logprobs(hidden, weight, labels))


@pytest.mark.parametrize("bad", ["old_logp", "mask", "advantages", "ref_logp"])
def test_linear_policy_loss_wrong_shape_names_the_argument(backend, bad):
    hidden, weight, labels = _small_case(n=8)
    hidden, labels = hidden.view(2, 4, -1), labels.view(2, 4)
    kw = {"old_logp": torch.full((2, 4), -2.0), "mask": torch.ones(2, 4), "advantages": torch.randn(2),
          "ref_logp": torch.full((2, 4), -2.0)}
    kw[bad] = torch.ones(3) if bad == "advantages" else kw[bad].reshape(8)
    with pytest.raises(ValueError, match=rf"{bad} must have"):
        ops.linear_policy_loss(hidden, weight, labels, kw["old_logp"], kw["advantages"], kw["mask"],
                               ref_logp=kw["ref_logp"], beta=0.1)


def test_linear_logprobs_refuses_temperature_with_overflowing_reciprocal(backend):
    hidden, weight, labels = _small_case(n=2)
    for t in (1e-45, 2e-39):
        with pytest.raises(ValueError, match="temperature must be >"):
            ops.linear_logprobs(hidden, weight, labels, temperature=t)
    with pytest.raises(TypeError, match="temperature must be a real number"):
        ops.linear_logprobs(hidden, weight, labels, temperature=True)


def test_liger_1298_linear_logprobs_non_uniform_upstream_grads(backend):
    """Liger #1298: a fused kernel that assumed a uniform upstream gradient (a mean loss) gave wrong
    gradients for per-token weights. Random per-token weights on logp and entropy, with ignored
    tokens, against autograd through the float64 oracle."""
    hidden, weight, labels = _small_case(n=9, vocab=150)
    labels[[2, 7]] = -100
    bias = torch.randn(weight.shape[0])
    g_lp, g_ent = torch.randn(9) * 3, torch.randn(9)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    logp, ent = ops.linear_logprobs(*leaves[:2], labels, bias=leaves[2], temperature=0.7, return_entropy=True,
                                    chunk_size=64)
    ((logp * g_lp).sum() + (ent * g_ent).sum()).backward()
    leaves64 = [t.double().requires_grad_(True) for t in (hidden, weight, bias)]
    lp64, ent64 = reference.linear_logprobs(*leaves64[:2], labels, bias=leaves64[2], temperature=0.7,
                                            return_entropy=True)
    ((lp64 * g_lp.double()).sum() + (ent64 * g_ent.double()).sum()).backward()
    for got, want in zip(leaves, leaves64):
        atol = 2e-5 * (1 + want.grad.abs().max().item())
        torch.testing.assert_close(got.grad.double(), want.grad, atol=atol, rtol=1e-4)


def test_trl_7266_linear_logprobs_more_than_2_31_logits_cpp():
    """TRL #7266: N * V > 2^31 overflowed 32-bit offsets. N = 64 tokens, V = 2^25 + 1 (H = 1, zero
    rows but three): 2^31 + 64 logits folded, 0.3 GB of inputs, the [N, V] logits never stored."""
    assert "cpp" in ALL_BACKENDS, "the C++ extension is built by `make build`; rlkern._C failed to import"
    n, vocab = 64, (1 << 25) + 1
    assert n * vocab > 2**31
    weight = torch.zeros(vocab, 1)
    weight[0, 0], weight[vocab // 2, 0], weight[-1, 0] = -1.0, 0.5, 2.0
    hidden = torch.linspace(0.5, 3.0, n).unsqueeze(1)
    labels = torch.tensor([0, vocab // 2, vocab - 1, 7] * (n // 4))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared CI box: no spinning thread pool for 2^31 logits
    try:
        with rlkern.use_backend("cpp"):
            logp, ent = ops.linear_logprobs(hidden, weight, labels, return_entropy=True)
    finally:
        torch.set_num_threads(threads)
    h = hidden.double().squeeze(1)
    distinct = torch.stack([-h, 0.5 * h, 2 * h], 1)  # the three non-zero rows; V - 3 zero logits
    lse = torch.logsumexp(torch.cat([distinct, torch.full_like(h, math.log(vocab - 3)).unsqueeze(1)], 1), 1)
    picked = torch.stack([distinct[:, 0], distinct[:, 1], distinct[:, 2], torch.zeros_like(h)], 1)
    expected = picked.gather(1, (torch.arange(n) % 4).unsqueeze(1)).squeeze(1) - lse
    # S is an fp32 running sum of 2^25 terms over 8193 tiles: ~1e-4 relative; an offset bug is O(1).
    torch.testing.assert_close(logp.double(), expected, atol=1e-3, rtol=0)
    assert bool((ent > 0).all()) and bool((ent <= math.log(vocab)).all())


# ------------------------------------------------------------------------------------------------
# kl
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clamp", [None, True])
@pytest.mark.parametrize("estimator", ["k3", "k2", "k3+"])
def test_kl_nan_gives_nan_value_and_gradient(backend, estimator, clamp):
    """k3 on a NaN input gave NaN / NaN / +inf with gradients -0 / 1 / 0 on torch / cpp / triton."""
    logp = torch.tensor([NAN, 0.5, -0.25, -1.0] * 5, requires_grad=True)
    ref = torch.tensor([0.0, NAN, -0.5, -1.5] * 5, requires_grad=True)
    value = ops.kl(logp, ref, estimator, clamp=clamp if estimator != "k2" else None)
    value.sum().backward()
    nan = torch.tensor([True, True, False, False] * 5)
    assert torch.equal(value.isnan(), nan)
    assert torch.equal(logp.grad.isnan(), nan) and torch.equal(ref.grad.isnan(), nan)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clamp", [None, True, (50.0, 1e6)])
def test_openrlhf_1335_trl_3015_k3_far_from_reference_is_finite(backend, dtype, clamp):
    """OpenRLHF #1335 / TRL #3015: k3 with |logp - ref| >> 20 overflowed exp into inf / NaN
    values or gradients (under a clamp as well). Value and gradient stay finite on every backend."""
    logp = torch.tensor([-1000.0, -200.0, -25.0, -1.0, 0.0, -0.5]).to(dtype).requires_grad_(True)
    ref = torch.tensor([0.0, -1.0, 0.0, -900.0, -90.0, -0.5]).to(dtype).requires_grad_(True)
    value = ops.kl(logp, ref, "k3", clamp=clamp)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(logp.grad).all() and torch.isfinite(ref.grad).all()
    assert bool((value >= 0).all())


# ------------------------------------------------------------------------------------------------
# group_advantages, dpo_loss
# ------------------------------------------------------------------------------------------------


def test_rloo_is_zero_sum_for_nearly_equal_scores():
    adv = ops.group_advantages(torch.tensor([1.0, 1.0000001, 2.0, 2.0000002]), group_size=2, method="rloo")
    assert adv[0].item() == -adv[1].item() != 0.0 and adv[2].item() == -adv[3].item() != 0.0
    scores = torch.randn(64) * 1e-3 + 1.0
    adv = ops.group_advantages(scores, group_size=8, method="rloo").double().view(8, 8)
    # float64 inside: each group's sum is only the final float32 rounding of its members.
    assert adv.sum(1).abs().max().item() <= 8 * 2.0**-24 * adv.abs().max().item()


def test_extreme_scores_are_exact_or_refused():
    """Scores of +-3e38 gave +-inf (rloo) or 0 (grpo) silently."""
    scores = torch.tensor([3e38, -3e38, 1.0, 2.0])
    grpo = ops.group_advantages(scores, group_size=2)
    torch.testing.assert_close(grpo[:2], torch.tensor([1.0, -1.0]) / math.sqrt(2), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="exceeds float32's range.*float64"):
        ops.group_advantages(scores, group_size=2, method="rloo")
    rloo64 = ops.group_advantages(scores.double(), group_size=2, method="rloo")
    assert rloo64[0].item() == pytest.approx(6e38, rel=1e-6)
    with pytest.raises(ValueError, match=r"scores\[1\] is nan"):
        ops.group_advantages(torch.tensor([0.0, NAN]), group_size=2)


@pytest.mark.parametrize("loss_type, ls, limit", [("sigmoid", 0.0, 0.0), ("sigmoid", 0.1, INF),
                                                  ("ipo", 0.0, INF), ("hinge", 0.0, 0.0),
                                                  ("robust", 0.0, 0.0), ("robust", 0.1, -INF)])
def test_dpo_neg_inf_rejected_logp_gives_the_limit(loss_type, ls, limit):
    chosen = torch.tensor([-3.0, -2.0], requires_grad=True)
    rejected = torch.tensor([-INF, -4.0], requires_grad=True)
    ref_c, ref_r = torch.tensor([-3.0, -2.5]), torch.tensor([-5.0, -4.0])
    loss, stats = ops.dpo_loss(chosen, rejected, ref_c, ref_r, loss_type=loss_type, label_smoothing=ls)
    finite, _ = ops.dpo_loss(chosen[1:], rejected[1:], ref_c[1:], ref_r[1:], loss_type=loss_type,
                             label_smoothing=ls)
    expected = (limit + finite.item()) / 2
    assert loss.item() == expected or math.isclose(loss.item(), expected, rel_tol=1e-6)
    assert stats["reward_margin"].item() == INF and stats["reward_accuracy"].item() == 1.0
    oracle, _ = reference.dpo_loss(chosen.double(), rejected.double(), ref_c.double(), ref_r.double(),
                                   loss_type=loss_type, label_smoothing=ls)
    assert oracle.item() == loss.item() or math.isclose(oracle.item(), loss.item(), rel_tol=1e-6)
    if math.isfinite(limit):
        loss.backward()
        assert not chosen.grad.isnan().any() and not rejected.grad.isnan().any()
    nan_loss, _ = ops.dpo_loss(torch.tensor([NAN]), torch.tensor([-1.0]), torch.tensor([-1.0]),
                               torch.tensor([-1.0]), loss_type=loss_type, label_smoothing=ls)
    assert nan_loss.isnan()


# ------------------------------------------------------------------------------------------------
# One rule for numbers: numpy scalars read as their value, bool refused
# ------------------------------------------------------------------------------------------------


def test_numpy_scalars_mean_their_value_and_bool_is_not_a_number(backend):
    lp, ref = torch.randn(3, 5) - 1, torch.randn(3, 5) - 1
    mask = torch.ones(3, 5, dtype=torch.bool)
    scores = torch.randn(3)
    hidden, weight, labels = _small_case(n=4)
    c = torch.randn(4)
    calls = [
        lambda x: ops.kl(lp, ref, "k3", clamp=(x, 10.0)),
        lambda x: ops.token_rewards(scores, lp, ref, mask, kl_coef=x),
        lambda x: ops.linear_logprobs(hidden, weight, labels, temperature=x),
        lambda x: ops.group_advantages(torch.randn(4).sort().values, group_size=2, eps=x),
        lambda x: ops.dpo_loss(c, c - 1, c, c - 0.5, beta=x)[0],
    ]
    for i, call in enumerate(calls):
        torch.manual_seed(i)
        want = call(float(np.float32(0.7)))
        torch.manual_seed(i)
        torch.testing.assert_close(call(np.float32(0.7)), want, atol=0, rtol=0)
        with pytest.raises(TypeError, match="must be a real number|a pair of numbers"):
            call(True)


# ------------------------------------------------------------------------------------------------
# Liger #1366: float hyperparameters under torch.compile
# ------------------------------------------------------------------------------------------------


def test_liger_1366_float_hyperparameters_under_compile(backend):
    """Liger #1366: a float hyperparameter baked into a compiled graph as a constant and reused
    after it changed. Each compiled call (fullgraph) must equal eager for its own values."""
    torch._dynamo.reset()
    lp, ref = torch.randn(2, 7) - 1, torch.randn(2, 7) - 1
    mask = torch.ones(2, 7, dtype=torch.bool)
    scores = torch.randn(2)
    hidden, weight, labels = _small_case(n=4)

    def step(coef, temperature, ratio_bound):
        rewards = ops.token_rewards(scores, lp, ref, mask, kl_coef=coef)
        k3 = ops.kl(lp, ref, "k3", clamp=(ratio_bound, 10.0))
        logp = ops.linear_logprobs(hidden, weight, labels, temperature=temperature)
        return rewards, k3, logp

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for coef, temperature, ratio_bound in [(0.1, 1.0, 20.0), (0.05, 0.7, 0.3), (0.1, 1.0, 20.0)]:
        for got, want in zip(compiled(coef, temperature, ratio_bound), step(coef, temperature, ratio_bound)):
            torch.testing.assert_close(got, want, atol=0, rtol=0)
