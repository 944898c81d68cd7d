"""rlkern.ops.group_advantages against the float64 oracle (reference.group_advantages, a plain loop
over groups) and against hand-computed values.

Tolerance: the op computes in fp32 (bf16/fp16 scores are exact in fp32); the baseline is the
reference on the same scores in fp32, plus atol 1e-6 + rtol 1e-5: the group means and variances are
sums of at most a few dozen O(1) numbers in a different order (index_add vs torch.mean / std), and
grpo divides by std + eps, which can amplify their rounding by 1 / std (stds here are >= ~0.1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rlkern
from rlkern import reference
from rlkern.ops.advantages import ADVANTAGE_METHODS
from tests.conftest import DTYPES, assert_close_to_oracle

ops = rlkern.ops


def _ragged_index(batch: int) -> torch.Tensor:
    """Group ids that are not contiguous, not 0-based, with sizes 1 (a singleton) to 6."""
    sizes = [1, 2, 3, 5, 6, 4, 3]
    ids = torch.cat([torch.full((n,), 100 - 7 * g) for g, n in enumerate(sizes)])
    assert ids.numel() == batch
    return ids[torch.randperm(batch)]


def _check(scores, ids_for_oracle, **kwargs):
    adv = ops.group_advantages(scores, **kwargs)
    method_kwargs = {k: v for k, v in kwargs.items() if k in ("method", "eps", "scale_by_std")}
    oracle = reference.group_advantages(scores.double(), ids_for_oracle, **method_kwargs)
    same = reference.group_advantages(scores.float(), ids_for_oracle, **method_kwargs)
    assert adv.dtype == torch.float32 and adv.shape == scores.shape
    assert_close_to_oracle(adv, oracle, same, atol=1e-6, rtol=1e-5, what=str(kwargs))
    return adv


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ADVANTAGE_METHODS)
def test_fixed_groups_match_oracle(dtype, method):
    scores = torch.randn(24).to(dtype)
    scores[8:12] = 0.5  # one zero-variance group of four
    _check(scores, torch.arange(24) // 4, group_size=4, method=method)


@pytest.mark.parametrize("method", ADVANTAGE_METHODS)
def test_index_groups_match_oracle(method):
    ids = _ragged_index(24)
    scores = torch.randn(24)
    _check(scores, ids, index=ids, method=method)
    # verl passes a numpy array of uid strings; a plain list works too.
    as_strings = np.array([f"uid-{i}" for i in ids.tolist()], dtype=object)
    _check(scores, ids, index=as_strings, method=method)
    _check(scores, ids, index=ids.tolist(), method=method)


@pytest.mark.parametrize("eps", [1e-6, 1e-4])
def test_grpo_options(eps):
    scores = torch.rand(32)
    ids = torch.arange(32) // 8
    _check(scores, ids, group_size=8, method="grpo", eps=eps)
    dr_grpo = _check(scores, ids, group_size=8, method="grpo", scale_by_std=False)
    torch.testing.assert_close(dr_grpo,
                               ops.group_advantages(scores, group_size=8, method="reinforce_baseline"))


def test_formulas_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0])
    std = r.std().item()  # unbiased: 1
    torch.testing.assert_close(ops.group_advantages(r, group_size=3),
                               torch.tensor([-1.0, 0.0, 1.0]) / (std + 1e-6))
    # leave-one-out: 1 - (2 + 3) / 2, 2 - (1 + 3) / 2, 3 - (1 + 2) / 2
    torch.testing.assert_close(ops.group_advantages(r, group_size=3, method="rloo"),
                               torch.tensor([-1.5, 0.0, 1.5]))
    torch.testing.assert_close(ops.group_advantages(r, group_size=3, method="reinforce_baseline"),
                               torch.tensor([-1.0, 0.0, 1.0]))
    s = torch.sigmoid
    p_win = torch.stack([(s(r[0] - r[1]) + s(r[0] - r[2])) / 2, (s(r[1] - r[0]) + s(r[1] - r[2])) / 2,
                         (s(r[2] - r[0]) + s(r[2] - r[1])) / 2])
    torch.testing.assert_close(ops.group_advantages(r, group_size=3, method="winrate"), p_win - 0.5)


@pytest.mark.parametrize("method", ADVANTAGE_METHODS)
def test_degenerate_groups_are_zero_and_counted(method):
    """Binary RLVR rewards: all-correct and all-wrong groups, plus two singletons, give exactly 0."""
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.7, 0.3])
    index = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 4])
    adv, counts = ops.group_advantages(scores, index=index, method=method, return_counts=True)
    assert (adv[:6] == 0).all() and (adv[9:] == 0).all() and (adv[6:9] != 0).all()
    assert torch.isfinite(adv).all()
    expected = {"groups": 5, "singleton_groups": 2, "zero_variance_groups": 2}
    assert {k: int(v) for k, v in counts.items()} == expected
    # 0.1 * 3 / 3 is not exactly 0.1 in floating point: the rule is equality of the scores, not
    # a rounded mean, so this group is still exactly 0 rather than ~1e-17 / eps noise.
    tenths = ops.group_advantages(torch.full((3,), 0.1), group_size=3, method=method)
    assert torch.equal(tenths, torch.zeros(3))


def test_group_size_one_is_all_singletons():
    adv, counts = ops.group_advantages(torch.randn(5), group_size=1, return_counts=True)
    assert torch.equal(adv, torch.zeros(5)) and int(counts["singleton_groups"]) == 5


@pytest.mark.parametrize("grouping", [dict(group_size=4), dict(index=torch.zeros(0, dtype=torch.long))])
def test_empty_batch(grouping):
    for method in ADVANTAGE_METHODS:
        adv, counts = ops.group_advantages(torch.zeros(0), method=method, return_counts=True, **grouping)
        assert adv.shape == (0,) and int(counts["groups"]) == 0


def test_float64_stays_float64_and_groups_are_independent():
    scores = torch.randn(12, dtype=torch.float64)
    adv = ops.group_advantages(scores, group_size=4)
    assert adv.dtype == torch.float64
    # Changing one group's scores leaves every other group's advantages bit-identical.
    other = scores.clone()
    other[4:8] = torch.randn(4, dtype=torch.float64)
    adv2 = ops.group_advantages(other, group_size=4)
    assert torch.equal(adv[:4], adv2[:4]) and torch.equal(adv[8:], adv2[8:])


def test_large_group_winrate_matches_oracle():
    """One large case: 64 groups of 64 (the pairwise block is 64 x 64 x 64)."""
    scores = torch.randn(4096)
    _check(scores, torch.arange(4096) // 64, group_size=64, method="winrate")


@pytest.mark.parametrize("make, error, match", [
    (lambda: ops.group_advantages(torch.randn(8)), ValueError, "pass exactly one of group_size"),
    (lambda: ops.group_advantages(torch.randn(8), group_size=4, index=torch.zeros(8, dtype=torch.long)),
     ValueError, "pass exactly one of group_size"),
    (lambda: ops.group_advantages(torch.randn(8), group_size=0), ValueError,
     "group_size must be >= 1, got 0"),
    (lambda: ops.group_advantages(torch.randn(8), group_size=-2), ValueError, "group_size must be >= 1"),
    (lambda: ops.group_advantages(torch.randn(8), group_size=2.0), TypeError, "group_size must be an int"),
    (lambda: ops.group_advantages(torch.randn(8), group_size=3), ValueError,
     "the batch of 8 scores is not divisible by group_size=3"),
    (lambda: ops.group_advantages(torch.randn(8), index=torch.zeros(7, dtype=torch.long)), ValueError,
     r"index must have shape \(8,\)"),
    (lambda: ops.group_advantages(torch.randn(8), index=torch.zeros(8)), TypeError,
     "index must hold integer"),
    (lambda: ops.group_advantages(torch.randn(8), index=["a"] * 7), ValueError,
     r"index must have shape \(8,\)"),
    (lambda: ops.group_advantages(torch.randn(8), group_size=4, method="ppo"), ValueError,
     r"method must be one of \['grpo', 'rloo', 'reinforce_baseline', 'winrate'\]"),
    (lambda: ops.group_advantages(torch.randn(8), group_size=4, eps=-1.0), ValueError,
     "eps must be a finite"),
    (lambda: ops.group_advantages(torch.randn(2, 4), group_size=4), ValueError,
     r"scores must have shape \[B\]"),
    (lambda: ops.group_advantages(torch.tensor([0.0, float("nan")]), group_size=2), ValueError,
     "scores must be finite"),
    (lambda: ops.group_advantages(torch.arange(4), group_size=2), TypeError, "scores must be float"),
])
def test_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_torch_compile_fullgraph():
    scores = torch.randn(16)

    def step(s):
        return torch.stack([ops.group_advantages(s, group_size=4, method=m) for m in ADVANTAGE_METHODS])

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(scores), step(scores))
