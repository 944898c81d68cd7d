"""rlkern.ops.gae / discounted_returns against the float64 oracle, every backend.

Tolerance: the kernels run the same fp32 recursion as plain torch in float32 (the baseline of the
oracle rule) in the same order, so their error is that baseline's plus at most a few roundings:
atol 1e-5 + rtol 1e-5 on values of size ~T (rewards and values are O(1); gamma = lam = 1 sums T
of them). The C++ kernel scans rows in pairs (an odd row alone) without FMA contraction, so its
results are also checked to be the same bits whatever the batch around a row and the thread count.
"""

from __future__ import annotations

import pytest
import torch

import rlkern
from rlkern import reference
from tests.conftest import ALL_BACKENDS, DTYPES, KERNEL_BACKENDS, assert_close_to_oracle
from tests.test_masked import MASK_DTYPES, as_mask

ops = rlkern.ops


def _mask(shape, holes=0.15):
    """Left-aligned responses of random lengths (some empty, some full), with holes inside them
    (multi-turn tool/observation tokens)."""
    length = shape[-1]
    lengths = torch.randint(0, length + 1, shape[:-1])
    mask = torch.arange(length) < lengths.unsqueeze(-1)
    return mask & (torch.rand(shape) >= holes)


def _inputs(shape, dtype):
    return torch.randn(shape).to(dtype), torch.randn(shape).to(dtype), _mask(shape)


def _check_gae(rewards, values, mask, gamma, lam):
    adv, ret = ops.gae(rewards, values, mask, gamma=gamma, lam=lam)
    o_adv, o_ret = reference.gae(rewards.double(), values.double(), mask, gamma=gamma, lam=lam)
    s_adv, s_ret = reference.gae(rewards.float(), values.float(), mask, gamma=gamma, lam=lam)
    assert adv.dtype == ret.dtype == torch.float32 and adv.shape == rewards.shape
    assert not adv.requires_grad and not ret.requires_grad
    assert_close_to_oracle(adv, o_adv, s_adv, atol=1e-5, rtol=1e-5, what="advantages")
    assert_close_to_oracle(ret, o_ret, s_ret, atol=1e-5, rtol=1e-5, what="returns")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0), (0.0, 1.0)])
def test_gae_matches_oracle(backend, dtype, gamma, lam):
    rewards, values, mask = _inputs((19, 37), dtype)
    _check_gae(rewards, values, mask, gamma, lam)


@pytest.mark.parametrize("shape", [(1, 1), (1, 50), (0, 9), (4, 0), (2, 3, 11), (7,)])
def test_gae_odd_shapes(backend, shape):
    rewards, values, mask = _inputs(shape, torch.float32)
    _check_gae(rewards, values, mask, 0.9, 0.8)


def test_gae_long_rows(kernel_backend):
    rows, length = (24, 2049) if kernel_backend == "cpp" else (3, 130)
    rewards, values, mask = _inputs((rows, length), torch.bfloat16)
    _check_gae(rewards, values, mask, 1.0, 0.95)


def test_gae_hand_computed(backend):
    """One row with a gap: the gap carries next_value and the running advantage through."""
    rewards = torch.tensor([[0.0, 0.0, 5.0, 1.0, 0.0]])
    values = torch.tensor([[1.0, 2.0, 100.0, 3.0, 7.0]])
    mask = torch.tensor([[1, 1, 0, 1, 0]])
    gamma, lam = 0.5, 0.5
    # t=4 (masked): running stays 0.           adv 0
    # t=3: delta = 1 + 0.5*0 - 3 = -2, a = -2.   adv -2, next_value = 3
    # t=2 (masked): carries -2.                 adv -2
    # t=1: delta = 0 + 0.5*3 - 2 = -0.5, a = -0.5 + 0.25*(-2) = -1.   next_value = 2
    # t=0: delta = 0 + 0.5*2 - 1 = 0, a = 0 + 0.25*(-1) = -0.25
    adv, ret = ops.gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert torch.equal(adv, torch.tensor([[-0.25, -1.0, -2.0, -2.0, 0.0]]))
    assert torch.equal(ret, adv + values)


def test_gae_matches_trl_loop_on_unmasked_rows(backend):
    """Without padding, verl's masked GAE is the textbook loop (TRL's PPO trainer)."""
    rewards, values = torch.randn(4, 23), torch.randn(4, 23)
    gamma, lam = 0.97, 0.9
    last, adv_rev = torch.zeros(4), []
    for t in reversed(range(23)):
        next_v = values[:, t + 1] if t < 22 else torch.zeros(4)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * last
        adv_rev.append(last)
    textbook = torch.stack(adv_rev[::-1], dim=1)
    adv, _ = ops.gae(rewards, values, torch.ones(4, 23, dtype=torch.bool), gamma=gamma, lam=lam)
    torch.testing.assert_close(adv, textbook, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
@pytest.mark.parametrize("shape", [(19, 37), (1, 1), (0, 5), (3, 0), (2, 2, 9)])
def test_discounted_returns_matches_oracle(backend, dtype, gamma, shape):
    rewards, _, mask = _inputs(shape, dtype)
    ret = ops.discounted_returns(rewards, mask, gamma=gamma)
    oracle = reference.discounted_returns(rewards.double(), mask, gamma=gamma)
    same = reference.discounted_returns(rewards.float(), mask, gamma=gamma)
    assert ret.dtype == torch.float32 and ret.shape == shape and not ret.requires_grad
    assert_close_to_oracle(ret, oracle, same, atol=1e-5, rtol=1e-5, what="discounted returns")


def test_discounted_returns_resets_after_each_sequence(backend):
    rewards = torch.tensor([[1.0, 2.0, 4.0, 8.0, 16.0]])
    mask = torch.tensor([[True, True, False, True, False]])
    # Walking back: t4 = 16, reset (masked); t3 = 8, kept; t2 = 4 + 0.5*8 = 8, reset; t1 = 2; t0 = 1 + 1 = 2.
    ret = ops.discounted_returns(rewards, mask, gamma=0.5)
    assert torch.equal(ret, torch.tensor([[2.0, 2.0, 8.0, 8.0, 16.0]]))


@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
def test_every_mask_dtype_is_nonzero_valid(backend, mask_dtype):
    """Masks of any dtype are read as they are, nonzero = valid (2, -3, NaN select; 0 and -0.0 do
    not): both scans match the float64 oracle run on the bool mask."""
    rewards, values, valid = _inputs((13, 29), torch.float32)
    mask = as_mask(valid, mask_dtype)
    adv, ret = ops.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    o_adv, o_ret = reference.gae(rewards.double(), values.double(), valid, gamma=0.99, lam=0.95)
    s_adv, s_ret = reference.gae(rewards, values, valid, gamma=0.99, lam=0.95)
    assert_close_to_oracle(adv, o_adv, s_adv, atol=1e-5, rtol=1e-5, what=f"advantages {mask_dtype}")
    assert_close_to_oracle(ret, o_ret, s_ret, atol=1e-5, rtol=1e-5, what=f"returns {mask_dtype}")
    got = ops.discounted_returns(rewards, mask, gamma=0.9)
    oracle, same = (reference.discounted_returns(r, valid, gamma=0.9) for r in (rewards.double(), rewards))
    assert_close_to_oracle(got, oracle, same, atol=1e-5, rtol=1e-5, what=f"discounted returns {mask_dtype}")


def test_strict_masks_refuse_values_other_than_0_and_1(backend, monkeypatch):
    rewards, values = torch.randn(2, 3), torch.randn(2, 3)
    odd = torch.tensor([[2.0, -0.0, 1.0], [0.0, 1.0, -1.0]])
    want, _ = ops.gae(rewards, values, odd != 0)
    assert torch.equal(ops.gae(rewards, values, odd)[0], want)
    from rlkern.ops import _common

    monkeypatch.setattr(_common, "STRICT_MASKS", True)
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1 \(RLKERN_STRICT_MASKS=1\)"):
        ops.gae(rewards, values, odd)
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        ops.discounted_returns(rewards, torch.full((2, 3), 3), gamma=1.0)


def test_gae_batch_invariance():
    rewards, values, mask = _inputs((203, 129), torch.float32)
    with rlkern.use_backend("cpp"):
        adv, ret = ops.gae(rewards, values, mask, gamma=0.99, lam=0.95)
        for r in (0, 7, 8, 200, 202):
            a1, r1 = ops.gae(rewards[r:r + 1].clone(), values[r:r + 1].clone(), mask[r:r + 1].clone(),
                             gamma=0.99, lam=0.95)
            assert torch.equal(a1, adv[r:r + 1]) and torch.equal(r1, ret[r:r + 1])
        torch.set_num_threads(1)
        try:
            serial, _ = ops.gae(rewards, values, mask, gamma=0.99, lam=0.95)
        finally:
            torch.set_num_threads(2)
        assert torch.equal(serial, adv)


def test_gae_inputs_needing_grad_give_detached_outputs(backend):
    rewards, values, mask = _inputs((3, 8), torch.float32)
    adv, ret = ops.gae(rewards, values.requires_grad_(), mask)
    assert not adv.requires_grad and not ret.requires_grad


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: ops.gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3)), ValueError,
         r"values must have shape \(2, 3\)"),
        (lambda: ops.gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, 2)), ValueError,
         r"mask must have shape \(2, 3\)"),
        (lambda: ops.gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.complex64)),
         TypeError, "mask must be bool or a real"),
        (lambda: ops.gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), gamma=True), TypeError,
         "gamma must be a real number"),
        (lambda: ops.gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), gamma=1.5), ValueError,
         r"gamma must lie in \[0, 1\]"),
        (lambda: ops.gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), lam=-0.1), ValueError,
         r"lam must lie in \[0, 1\]"),
        (lambda: ops.gae(torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, 3), torch.ones(2, 3)),
         TypeError, "rewards must be float"),
        (lambda: ops.gae(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(True)), ValueError,
         r"rewards must have shape \[\.\.\., T\]"),
        (lambda: ops.discounted_returns(torch.zeros(2, 3), torch.ones(2, 2), gamma=1.0), ValueError,
         r"mask must have shape \(2, 3\)"),
        (lambda: ops.discounted_returns(torch.zeros(2, 3), torch.ones(2, 3), gamma=float("nan")), ValueError,
         r"gamma must lie in \[0, 1\]"),
    ],
)
def test_bad_input(backend, call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_opcheck(backend_name):
    rewards, values, mask = _inputs((9, 21), torch.float32)
    torch.library.opcheck(torch.ops.rlkern.gae.default, (rewards, values, mask, 0.99, 0.95, backend_name))
    torch.library.opcheck(torch.ops.rlkern.discounted_returns.default, (rewards, mask, 0.9, backend_name))


def test_torch_compile_fullgraph():
    rewards, values, mask = _inputs((5, 16), torch.float32)

    def step(r, v, m):
        adv, ret = ops.gae(r, v, m, gamma=0.99, lam=0.95)
        return adv * 2 + ret, ops.discounted_returns(r, m, gamma=0.9)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(rewards, values, mask), step(rewards, values, mask)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend_name", ALL_BACKENDS)
def test_all_backends_agree_on_an_all_masked_batch(backend_name):
    rewards, values = torch.randn(3, 7), torch.randn(3, 7)
    with rlkern.use_backend(backend_name):
        adv, ret = ops.gae(rewards, values, torch.zeros(3, 7, dtype=torch.bool))
    assert torch.equal(adv, torch.zeros(3, 7)) and torch.equal(ret, values)
