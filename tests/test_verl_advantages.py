"""rlkern.ops.outcome_advantages and rlkern.ops.optimal_token_baseline against their float64 oracles
(rlkern.reference: plain loops over groups), by hand, and without host synchronisation.

Tolerance: the oracle in float64, with the rule of tests/conftest.py (rlkern may be off by as much as the
same oracle run in float32, plus atol 1e-6 / rtol 1e-5): outcome_advantages computes its group
statistics in float64 and rounds once; optimal_token_baseline runs in float32 like verl, with sums of at
most T = 16 terms per cumulative sum and a few rows per group sum, all O(1)-O(10) in size.
Comparisons with verl's own functions are in tests/test_compat_verl_installed.py.
"""

from __future__ import annotations

import pytest
import torch

import rlkern
from rlkern import reference
from rlkern.ops.verl_advantages import OUTCOME_METHODS
from tests.conftest import assert_close_to_oracle

ops = rlkern.ops

SIZES = (1, 2, 3, 5, 8, 4, 1, 6)  # uneven, two groups of one


def _ids(sizes=SIZES, seed=0):
    ids = torch.cat([torch.full((n,), g) for g, n in enumerate(sizes)])
    return ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(seed))], len(sizes)


@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("method", OUTCOME_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_outcome_methods_match_oracle(method, dtype, scale_by_std):
    ids, groups = _ids(seed=1)
    g = torch.Generator().manual_seed(2)
    scores = (3 * torch.randn(ids.numel(), generator=g)).to(dtype)
    if method == "passk":
        scores[ids == 4] = 2.0  # a group of 8 with a tie for the best: all 0
        scores = torch.where(ids == 5, scores.round(), scores)
    weights = torch.randint(0, 20, (ids.numel(),), generator=g) if method == "opo" else None
    kwargs = {"method": method, "eps": 1e-6, "scale_by_std": scale_by_std, "weights": weights}
    adv = ops.outcome_advantages(scores, ids, groups, **kwargs)
    assert adv.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    oracle = reference.outcome_advantages(scores.double(), ids, **kwargs)
    same = reference.outcome_advantages(scores.float(), ids, **kwargs)
    assert_close_to_oracle(adv, oracle, same, atol=1e-6, rtol=1e-5, what=method)


def test_outcome_by_hand():
    ids = torch.tensor([0, 0, 0, 1])  # a group of three, a group of one
    s = torch.tensor([1.0, 2.0, 6.0, 5.0])
    out = lambda method, **kw: ops.outcome_advantages(s, ids, 2, method=method, **kw).tolist()  # noqa: E731
    sd = torch.tensor([1.0, 2.0, 6.0]).std().item()
    assert out("grpo", eps=0.0) == pytest.approx([-2 / sd, -1 / sd, 3 / sd, 5.0])  # singleton: (s - 0) / 1
    assert out("mean") == pytest.approx([-2.0, -1.0, 3.0, 5.0])
    assert out("rloo") == pytest.approx([-3.0, -1.5, 4.5, 5.0])  # singleton keeps its score
    assert out("rloo_vectorized") == pytest.approx([-3.0, -1.5, 4.5, 0.0])
    assert out("passk", scale_by_std=False) == pytest.approx([0.0, 0.0, 4.0, 0.0])
    w = torch.tensor([1, 1, 2, 7])
    assert out("opo", weights=w) == pytest.approx([1 - 15 / 4, 2 - 15 / 4, 6 - 15 / 4, 5.0])


def test_outcome_leading_dims_are_independent_score_sets():
    ids, groups = _ids(seed=3)
    scores = torch.randn(2, 3, ids.numel())
    for method in OUTCOME_METHODS:
        w = torch.rand(ids.numel()) if method == "opo" else None
        sets = ops.outcome_advantages(scores, ids, groups, method=method, weights=w)
        for j, k in ((0, 0), (1, 2)):
            one = ops.outcome_advantages(scores[j, k], ids, groups, method=method, weights=w)
            torch.testing.assert_close(sets[j, k], one, atol=0, rtol=0)


def _otb_inputs(mask_dtype, seed=4, t=16):
    ids, groups = _ids(seed=seed)
    b = ids.numel()
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[[2, 9]] = 0
    mask = torch.arange(t)[None] < lengths[:, None]
    mask[4, 2:5] = False  # a gap inside a response
    return dict(rewards=torch.randn(b, t, generator=g) * mask, mask=mask.to(mask_dtype),
                old_log_probs=-2 * torch.rand(b, t, generator=g),
                sum_pi_squared=torch.rand(b, t, generator=g),
                rollout_is_weights=torch.rand(b, t, generator=g) + 0.5), ids, groups


@pytest.mark.parametrize("options", [{}, {"handle_zero_tail": False}, {"rollout_is_weights": None}])
@pytest.mark.parametrize("multi_turn", [False, True])
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.int64, torch.bool], ids=str)
def test_optimal_token_baseline_matches_oracle(mask_dtype, multi_turn, options):
    inputs, ids, groups = _otb_inputs(mask_dtype)
    inputs.update(options)
    tensors = [inputs.pop(k) for k in ("rewards", "mask")]
    lp, spp = inputs.pop("old_log_probs"), inputs.pop("sum_pi_squared")
    adv, ret = ops.optimal_token_baseline(*tensors, ids, groups, lp, spp, multi_turn=multi_turn, **inputs)
    up = lambda x: None if x is None else x.double()  # noqa: E731
    rho = {**inputs, "rollout_is_weights": up(inputs["rollout_is_weights"])}
    want = reference.optimal_token_baseline(up(tensors[0]), tensors[1], ids, up(lp), up(spp),
                                            multi_turn=multi_turn, **rho)
    same = reference.optimal_token_baseline(tensors[0], tensors[1], ids, lp, spp, multi_turn=multi_turn,
                                            **inputs)
    for got, oracle, f32, what in zip((adv, ret), want, same, ("advantages", "returns")):
        assert got.dtype == torch.float32
        assert_close_to_oracle(got, oracle, f32, atol=1e-5, rtol=1e-5, what=what)


def test_optimal_token_baseline_zero_tail_by_hand():
    """Two responses of lengths 3 and 1 in one group: the longer one's baseline is 0 from step 1 on."""
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards = torch.tensor([[0.0, 0.0, 2.0], [4.0, 0.0, 0.0]])
    zeros = torch.zeros(2, 3)
    sum_p2 = torch.ones(2, 3)  # w_t = 1 - 2 * exp(0) + 1 = 0 ... use log-probs of -inf: w_t = 2
    adv, ret = ops.optimal_token_baseline(rewards, mask, torch.tensor([0, 0]), 1, zeros.fill_(float("-inf")),
                                          sum_p2, eps=0.0)
    assert ret.tolist() == [[2.0, 2.0, 2.0], [4.0, 0.0, 0.0]]
    # step 0: W = 2 for both, baseline (2 * 2 + 4 * 2) / 4 = 3; later steps: the longer row alone -> 0.
    assert adv.tolist() == [[-1.0, 2.0, 2.0], [1.0, 0.0, 0.0]]


def test_no_host_sync_on_meta_tensors():
    """Any .item(), bool(tensor), nonzero or data-dependent shape raises on the meta device: both ops
    only enqueue work."""
    ids, groups = _ids(seed=5)
    b, t = ids.numel(), 8
    meta = lambda *shape, dtype=torch.float32: torch.empty(*shape, dtype=dtype, device="meta")  # noqa: E731
    ids_meta = ids.to("meta")
    for method in OUTCOME_METHODS:
        w = meta(b) if method == "opo" else None
        out = ops.outcome_advantages(meta(2, b), ids_meta, groups, method=method, weights=w)
        assert out.shape == (2, b) and out.device.type == "meta"
    for multi_turn in (False, True):
        adv, ret = ops.optimal_token_baseline(meta(b, t), meta(b, t, dtype=torch.bool), ids_meta, groups,
                                              meta(b, t), meta(b, t), rollout_is_weights=meta(b, t),
                                              multi_turn=multi_turn)
        assert adv.shape == ret.shape == (b, t)


@pytest.mark.parametrize("call,error,match", [
    (lambda: ops.outcome_advantages(torch.ones(4), torch.zeros(4, dtype=torch.int32), 1), TypeError, "int64"),
    (lambda: ops.outcome_advantages(torch.ones(4), torch.zeros(3, dtype=torch.long), 1), ValueError, "shape"),
    (lambda: ops.outcome_advantages(torch.ones(4), torch.zeros(4, dtype=torch.long), 1, method="x"),
     ValueError, "method"),
    (lambda: ops.outcome_advantages(torch.ones(4), torch.zeros(4, dtype=torch.long), 1, method="opo"),
     ValueError, "weights"),
    (lambda: ops.optimal_token_baseline(torch.ones(2, 3), torch.ones(2, 4), torch.zeros(2, dtype=torch.long),
                                        1, torch.ones(2, 3), torch.ones(2, 3)), ValueError, "mask"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
