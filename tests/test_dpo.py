"""rlkern.ops.dpo_loss against the float64 oracle (reference.dpo_loss, TRL's expressions with
F.logsigmoid) and hand-computed values.

Tolerance: the op computes in fp32 from inputs exact in fp32; the baseline is the reference on the
same inputs in fp32, plus atol 1e-6 + rtol 1e-5 (softplus(-x) and -logsigmoid(x) are the same
function evaluated by different fp32 kernels, each within a few ulps; the mean adds the rest).
"""

from __future__ import annotations

import math

import pytest
import torch

import rlkern
from rlkern import reference
from rlkern.ops.dpo import DPO_LOSS_TYPES
from tests.conftest import DTYPES, assert_close_to_oracle

ops = rlkern.ops
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def _pairs(batch, dtype, scale=20.0):
    """Sequence log-probs of a few tens of nats, the reference close to the policy."""
    chosen, rejected = -torch.rand(batch) * scale, -torch.rand(batch) * scale
    tensors = (chosen, rejected, chosen + torch.randn(batch), rejected + torch.randn(batch))
    return [t.to(dtype) for t in tensors]


def _smoothing(loss_type):
    return {"sigmoid": [0.0, 0.2, 0.5], "robust": [0.0, 0.3], "ipo": [0.0], "hinge": [0.0]}[loss_type]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type, label_smoothing",
                         [(lt, ls) for lt in DPO_LOSS_TYPES for ls in _smoothing(lt)])
@pytest.mark.parametrize("batch", [1, 13])
def test_matches_oracle(dtype, loss_type, label_smoothing, batch):
    inputs = _pairs(batch, dtype)
    kwargs = dict(beta=0.3, loss_type=loss_type, label_smoothing=label_smoothing)
    xs = [t.clone().requires_grad_() for t in inputs]
    loss, stats = ops.dpo_loss(*xs, **kwargs)
    loss.backward()
    x64 = [t.double().requires_grad_() for t in inputs]
    loss64, stats64 = reference.dpo_loss(*x64, **kwargs)
    loss64.backward()
    same = [t.clone().requires_grad_() for t in inputs]
    loss32, stats32 = reference.dpo_loss(*same, **kwargs)
    loss32.backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close_to_oracle(loss, loss64, loss32, atol=1e-6, rtol=1e-5, what="loss")
    assert set(stats) == set(stats64)
    for name in stats:
        assert stats[name].shape == () and not stats[name].requires_grad
        assert_close_to_oracle(stats[name], stats64[name], stats32[name], atol=1e-6, rtol=1e-5, what=name)
    for x, o, s in zip(xs, x64, same):
        assert x.grad.dtype == dtype
        assert_close_to_oracle(x.grad, o.grad, s.grad, atol=1e-7, rtol=GRAD_RTOL[dtype], what="gradient")


def test_values_by_hand():
    c, r, rc, rr = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.5))  # margin z = 2 - 0.5 = 1.5
    beta, z = 0.5, 1.5
    expect = {
        "sigmoid": math.log1p(math.exp(-beta * z)),
        "ipo": (z - 1 / (2 * beta)) ** 2,
        "hinge": max(0.0, 1 - beta * z),
    }
    for loss_type, value in expect.items():
        loss, stats = ops.dpo_loss(c, r, rc, rr, beta=beta, loss_type=loss_type)
        assert math.isclose(float(loss), value, rel_tol=1e-6), loss_type
    ls = 0.25
    loss, _ = ops.dpo_loss(c, r, rc, rr, beta=beta, loss_type="robust", label_smoothing=ls)
    robust = ((1 - ls) * math.log1p(math.exp(-beta * z)) - ls * math.log1p(math.exp(beta * z))) / (1 - 2 * ls)
    # The two terms nearly cancel (0.39 vs 0.38 before scaling), so fp32 keeps ~6 significant digits.
    assert math.isclose(float(loss), robust, rel_tol=0, abs_tol=1e-6)
    assert math.isclose(float(stats["chosen_rewards"]), beta * 1.0, rel_tol=1e-6)
    assert math.isclose(float(stats["rejected_rewards"]), beta * -0.5, rel_tol=1e-6)
    assert float(stats["reward_accuracy"]) == 1.0
    assert math.isclose(float(stats["reward_margin"]), beta * z, rel_tol=1e-6)


def test_zero_smoothing_sigmoid_is_plain_dpo_and_robust_agrees():
    inputs = _pairs(9, torch.float32)
    plain, _ = ops.dpo_loss(*inputs, loss_type="sigmoid")
    robust, _ = ops.dpo_loss(*inputs, loss_type="robust")
    z = (inputs[0] - inputs[1]) - (inputs[2] - inputs[3])
    torch.testing.assert_close(plain, -torch.nn.functional.logsigmoid(0.1 * z).mean())
    torch.testing.assert_close(robust, plain)


def test_huge_margins_stay_finite():
    c = torch.tensor([0.0, -5000.0], requires_grad=True)
    r = torch.tensor([-5000.0, 0.0])
    zero = torch.zeros(2)
    for loss_type, ls in (("sigmoid", 0.1), ("robust", 0.1), ("hinge", 0.0), ("ipo", 0.0)):
        loss, stats = ops.dpo_loss(c, r, zero, zero, beta=1.0, loss_type=loss_type, label_smoothing=ls)
        (grad,) = torch.autograd.grad(loss, c)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), loss_type
        assert float(stats["reward_accuracy"]) == 0.5


def test_leading_dims_and_float64():
    inputs = [t.reshape(2, 3) for t in _pairs(6, torch.float64)]
    loss, stats = ops.dpo_loss(*inputs)
    assert loss.dtype == torch.float64 and loss.shape == ()
    torch.testing.assert_close(loss, reference.dpo_loss(*inputs)[0])


def test_gradcheck():
    inputs = [t.double().requires_grad_() for t in _pairs(5, torch.float64)]
    for loss_type, ls in (("sigmoid", 0.2), ("ipo", 0.0), ("robust", 0.1)):
        assert torch.autograd.gradcheck(
            lambda *xs, t=loss_type, s=ls: ops.dpo_loss(*xs, beta=0.2, loss_type=t, label_smoothing=s)[0],
            inputs)


def _x(n=4):
    return torch.randn(n)


@pytest.mark.parametrize("make, error, match", [
    (lambda: ops.dpo_loss(_x(), _x(3), _x(), _x()), ValueError, r"rejected_logps must have shape \(4,\)"),
    (lambda: ops.dpo_loss(_x(), _x(), _x(), [0.0] * 4), TypeError,
     "ref_rejected_logps must be a torch.Tensor"),
    (lambda: ops.dpo_loss(_x(0), _x(0), _x(0), _x(0)), ValueError, "at least one preference pair"),
    (lambda: ops.dpo_loss(_x(), _x(), _x(), _x(), loss_type="kto"), ValueError,
     r"loss_type must be one of \['sigmoid', 'ipo', 'hinge', 'robust'\]"),
    (lambda: ops.dpo_loss(_x(), _x(), _x(), _x(), beta=0.0), ValueError, "beta must be a finite number > 0"),
    (lambda: ops.dpo_loss(_x(), _x(), _x(), _x(), label_smoothing=0.6), ValueError,
     r"label_smoothing must be in \[0, 0.5\] for loss_type='sigmoid'"),
    (lambda: ops.dpo_loss(_x(), _x(), _x(), _x(), loss_type="robust", label_smoothing=0.5), ValueError,
     r"label_smoothing must be in \[0, 0.5\) for loss_type='robust'"),
    (lambda: ops.dpo_loss(_x(), _x(), _x(), _x(), loss_type="ipo", label_smoothing=0.1), ValueError,
     "label_smoothing is used by 'sigmoid' and 'robust' only"),
    (lambda: ops.dpo_loss(_x().long(), _x(), _x(), _x()), TypeError, "chosen_logps must be float"),
])
def test_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_torch_compile_fullgraph():
    inputs = _pairs(8, torch.float32)

    def step(*xs):
        loss, stats = ops.dpo_loss(*xs, beta=0.2, loss_type="sigmoid", label_smoothing=0.1)
        return loss, stats["reward_margin"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a = [t.clone().requires_grad_() for t in inputs]
    b = [t.clone().requires_grad_() for t in inputs]
    (lc, mc), (le, me) = compiled(*a), step(*b)
    lc.backward()
    le.backward()
    torch.testing.assert_close((lc, mc), (le, me))
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)
