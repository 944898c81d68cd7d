"""The op layer itself (rlkern/ops/_registry.py, rlkern/backend.py): eager calls run the kernel
without the dispatcher and import nothing heavy; traced calls go through the registered op."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from rlkern.ops._registry import kernel_op

calls: list[str] = []


@kernel_op("_test_scaled_square")
def _scaled_square(x: torch.Tensor, scale: float) -> torch.Tensor:
    calls.append("fn")
    return x * x * scale


@_scaled_square.register_fake
def _(x, scale):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.scale = inputs[1]


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return grad * 2 * x * ctx.scale, None


_scaled_square.register_autograd(_backward, setup_context=_setup)


def test_eager_call_runs_the_function_and_its_autograd_without_the_dispatcher(monkeypatch):
    def no_dispatcher(*args, **kwargs):
        raise AssertionError("an eager call went through torch.ops.rlkern")

    monkeypatch.setattr(_scaled_square, "op", no_dispatcher)
    x = torch.randn(5, requires_grad=True)
    calls.clear()
    y = _scaled_square(x, scale=3.0)  # keyword arguments bind to the signature
    y.sum().backward()
    assert calls == ["fn"]
    torch.testing.assert_close(y, 3 * x.detach() ** 2)
    torch.testing.assert_close(x.grad, 6 * x.detach())
    with torch.no_grad():
        assert _scaled_square(x, 3.0).grad_fn is None


def test_traced_calls_use_the_registered_op():
    x = torch.randn(6, requires_grad=True)
    compiled = torch.compile(lambda t: _scaled_square(t, 0.5).sum(), fullgraph=True, backend="aot_eager")
    compiled(x).backward()
    torch.testing.assert_close(x.grad, x.detach())
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # a dispatch mode is active: the raw function must not see fake tensors
        calls.clear()
        out = _scaled_square(torch.empty(3), 2.0)
    assert out.shape == (3,) and calls == []
    torch.library.opcheck(torch.ops.rlkern._test_scaled_square.default,
                          (torch.randn(4, requires_grad=True), 2.0))


@kernel_op("_test_cubed")
def _cubed(x: torch.Tensor, native_ok: bool) -> torch.Tensor:
    calls.append("fn")
    return x**3


@_cubed.register_fake
def _(x, native_ok):
    return torch.empty_like(x)


_cubed.register_autograd(lambda ctx, grad: (grad * 3 * ctx.saved_tensors[0] ** 2, None),
                         setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[0]))


def _cubed_native(x, native_ok):
    if not native_ok:
        return None
    calls.append("native")
    return x * x * x  # autograd through torch ops, standing in for a C++ autograd node


_cubed.register_native(_cubed_native, without_grad=True)


def test_a_native_path_runs_eagerly_and_falls_back_when_it_declines():
    x = torch.randn(5, requires_grad=True)
    calls.clear()
    y = _cubed(x, True)
    assert calls == ["native"] and y.grad_fn is not None
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0], 3 * x.detach() ** 2)
    calls.clear()
    y = _cubed(x, False)  # declined: the Python autograd.Function over fn
    assert calls == ["fn"]
    torch.testing.assert_close(torch.autograd.grad(y.sum(), x)[0], 3 * x.detach() ** 2)
    calls.clear()
    _cubed(x.detach(), True)  # registered with without_grad=True: calls without a gradient too
    assert calls == ["native"]


def test_a_native_path_registered_for_gradients_only_leaves_other_calls_to_fn(monkeypatch):
    monkeypatch.setattr(_cubed, "_native_without_grad", False)
    x = torch.randn(3, requires_grad=True)
    calls.clear()
    _cubed(x.detach(), True)
    assert calls == ["fn"]
    _cubed(x, True)
    assert calls == ["fn", "native"]


def test_a_native_path_is_not_used_under_tracing_or_functorch():
    x = torch.randn(4)
    calls.clear()
    out = torch.func.vmap(lambda t: _cubed(t, True))(x)  # under a functorch transform: fn
    torch.testing.assert_close(out, x**3)
    assert calls == ["fn"]
    calls.clear()
    compiled = torch.compile(lambda t: _cubed(t, True).sum(), fullgraph=True, backend="aot_eager")
    leaf = x.clone().requires_grad_(True)
    compiled(leaf).backward()
    torch.testing.assert_close(leaf.grad, 3 * x**2)
    assert "native" not in calls  # the graph holds the registered op


def _run(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "RLKERN_BACKEND": "auto"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_first_rlkern_call_of_a_process_may_be_inside_torch_compile_fullgraph():
    out = _run("""
        import json, torch, rlkern.ops as ops
        x, m = torch.randn(4, 8), torch.ones(4, 8, dtype=torch.bool)
        f = torch.compile(lambda t: ops.masked_mean(t, m), fullgraph=True, backend="aot_eager")
        print(json.dumps({"diff": float((f(x) - x.mean()).abs())}))
    """)
    assert out["diff"] < 1e-6


def test_cpu_calls_of_every_op_import_neither_triton_nor_sympy_nor_dynamo():
    """Forward and backward of every public op on small CPU tensors (C++ backend), in a fresh
    process: nothing imports triton, sympy or torch._dynamo (issue 12: the first call imported them
    through the dispatcher and took 1.2-1.9 s)."""
    out = _run("""
        import json, sys, torch
        import rlkern.ops as ops
        torch.manual_seed(0)
        B, T, V, H = 3, 8, 11, 6
        g = lambda *s: torch.randn(*s, requires_grad=True)  # noqa: E731
        m = torch.rand(B, T) > 0.3
        m[:, 0] = True
        fm = m.float()
        labels = torch.randint(0, V, (B, T))
        outs = [
            ops.logprobs(g(B, T, V), labels), ops.entropy(g(B, T, V)),
            ops.logprobs_and_entropy(g(B, T, V), labels)[0],
            ops.linear_logprobs(g(B * T, H), g(V, H), labels.view(-1)),
            ops.kl(g(B, T), torch.randn(B, T), estimator="k3"),
            ops.token_rewards(torch.randn(B), torch.randn(B, T), torch.randn(B, T), fm, kl_coef=0.1),
            ops.gae(torch.randn(B, T), g(B, T), fm, gamma=0.99, lam=0.95)[0],
            ops.discounted_returns(torch.randn(B, T), fm, gamma=0.99),
            ops.masked_sum(g(B, T), fm), ops.masked_mean(g(B, T), fm), ops.masked_var(g(B, T), fm),
            ops.masked_whiten(g(B, T), fm),
            ops.policy_loss(g(B, T), torch.randn(B, T), torch.randn(B, T), fm)[0],
            ops.value_loss(g(B, T), torch.randn(B, T), torch.randn(B, T), fm)[0],
            ops.grpo_loss(g(B, T), torch.randn(B, T), torch.randn(B, T), torch.randn(B), fm)[0],
            ops.group_advantages(torch.randn(2 * B), group_size=2),
            ops.dpo_loss(g(B), g(B), torch.randn(B), torch.randn(B))[0],
        ]
        for o in outs:
            if o.requires_grad:
                o.float().sum().backward()
        print(json.dumps({name: name in sys.modules for name in ("triton", "sympy", "torch._dynamo")}))
    """)
    assert out == {"triton": False, "sympy": False, "torch._dynamo": False}


@pytest.mark.parametrize("module", ["rlkern.ops", "rlkern.compat"])
def test_importing_rlkern_imports_neither_triton_nor_sympy(module):
    out = _run(f"""
        import json, sys
        import {module}  # noqa: F401
        print(json.dumps({{name: name in sys.modules for name in ("triton", "sympy", "torch._dynamo")}}))
    """)
    assert out == {"triton": False, "sympy": False, "torch._dynamo": False}
