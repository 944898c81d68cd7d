"""How an rlkern kernel becomes an op: one decorator for every family, and one way to find a
backend's kernels.

``@kernel_op("name")`` registers ``fn`` as the custom op ``torch.ops.rlkern.name`` (with
``register_fake`` and ``register_autograd`` as usual), so ``torch.compile(fullgraph=True)`` traces
through it and ``opcheck`` tests it. Calling the decorated object runs it:

- while torch.compile traces: the registered op (the graph needs it);
- eagerly: the op's native path where it registered one (``register_native``: the whole call in
  C++, with a C++ autograd node), else ``fn`` itself, wrapped in a ``torch.autograd.Function``
  when an input requires grad, built from the same ``setup_context`` and ``backward``.

The eager path skips the dispatcher's Python machinery, which costs ~100 µs a call and whose
first call imports dynamo, sympy and triton (1.2 s) even for a CPU tensor on the C++ backend
(quack's ``torch_library_op.py`` does the same).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

_Parameter = torch.nn.Parameter
# Bound once: each module attribute lookup in __call__ costs ~40 ns, and every eager op call (and
# every backward op call inside a backward) runs it. dynamo recognises the functions themselves.
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_grad_enabled = torch.is_grad_enabled
_functorch_active = torch._C._are_functorch_transforms_active


class KernelOp:
    """A custom op that eager calls run directly (see the module docstring)."""

    def __init__(self, name: str, fn: Callable, mutates_args: tuple[str, ...]):
        self.name, self._fn = name, fn
        self._signature = inspect.signature(fn)
        # The parameters annotated as tensors (Tensor, Tensor | None, ...): the only arguments
        # __call__ inspects (~0.1 us per argument it skips).
        self._tensor_positions = tuple(i for i, p in enumerate(self._signature.parameters.values())
                                       if "Tensor" in str(p.annotation))
        self.op = torch.library.custom_op(f"rlkern::{name}", fn, mutates_args=mutates_args)
        self._function: type[torch.autograd.Function] | None = None
        self._native: Callable | None = None
        self._native_without_grad = False

    def register_fake(self, fake: Callable) -> Callable:
        self.op.register_fake(fake)
        return fake

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self.op.register_autograd(backward, setup_context=setup_context)
        fn = self._fn

        def forward(ctx, *args):
            out = fn(*args)
            setup_context(ctx, args, out)
            return out

        self._function = type(f"{self.name}_eager", (torch.autograd.Function,), {
            "forward": staticmethod(forward), "backward": staticmethod(backward)})
        # Function.apply's Python prologue (binding defaults, unwrapping dead functorch wrappers)
        # costs ~2 us a call; outside functorch transforms the C++ apply underneath does the work.
        self._apply_direct = super(torch.autograd.Function, self._function).apply

    def register_native(self, native: Callable, *, without_grad: bool = False) -> Callable:
        """``native(*args)``: the op's outputs computed in C++ -- outputs allocated there and, when an
        input requires grad (and grad mode is on), a C++ autograd node running the same backward
        kernels as ``backward`` -- or None where it does not apply (another backend, a layout it
        does not take). Eager calls with an input that requires grad try it first: the Python
        ``torch.autograd.Function`` costs ~10 us of a ~40 us forward + backward on tiny inputs.
        With ``without_grad``, the other eager calls too (where ``fn`` costs more, e.g. allocating
        its outputs in Python). Never used while tracing, under functorch transforms or for tensor
        subclasses."""
        self._native, self._native_without_grad = native, without_grad
        return native

    def __call__(self, *args, **kwargs):
        # Tracing (dynamo, or make_fx / AOTAutograd under a dispatch mode such as FakeTensorMode)
        # and tensor subclasses (DTensor, FakeTensor) need the registered op.
        if _is_compiling() or _dispatch_modes():
            return self.op(*args, **kwargs)
        if kwargs:
            args = self._signature.bind(*args, **kwargs).args
        needs_grad = False
        n = len(args)
        for i in self._tensor_positions:
            if i < n and isinstance(a := args[i], Tensor):
                if type(a) is not Tensor and type(a) is not _Parameter:
                    return self.op(*args)
                if a.requires_grad:
                    needs_grad = True
        if (self._native is not None and (needs_grad or self._native_without_grad) and not _functorch_active()
                and (out := self._native(*args)) is not None):
            return out
        if needs_grad and self._function is not None and _grad_enabled():
            if _functorch_active():
                return self._function.apply(*args)
            return self._apply_direct(*args)
        return self._fn(*args)

    def in_backward(self, *args):
        """Calls the op from a backward function, whose tensors are the plain ones its eager forward
        saw and the incoming gradients: ``fn`` itself, without __call__'s per-argument checks (~1 us),
        unless a trace (AOTAutograd, compiled autograd: a dispatch mode is active) needs the
        registered op, or the op has its own autograd (double backward goes through __call__)."""
        if self._function is not None or _is_compiling() or _dispatch_modes():
            return self(*args)
        return self._fn(*args)


def kernel_op(name: str, *, mutates_args: tuple[str, ...] = ()) -> Callable[[Callable], KernelOp]:
    """Decorator: ``fn`` (type-annotated, as ``torch.library.custom_op`` needs) as a KernelOp."""
    return lambda fn: KernelOp(name, fn, tuple(mutates_args))


# (backend, family) -> module, filled on first use: a cached lookup costs ~0.1 us, an import
# statement ~2.5 us a call.
_modules: dict[tuple[str, str], ModuleType] = {}


def cpp_kernels() -> ModuleType:
    """``rlkern._C``: every C++ kernel as a plain function (csrc/bindings.cpp)."""
    return kernels("cpp", "")


def kernels(backend: str, family: str) -> ModuleType:
    """The kernels of ``family`` on ``backend`` ("cpp" or "triton"), called the same way on both
    (same names, same positional arguments, None for an absent tensor): ``rlkern._C`` or
    ``rlkern.kernels.<family>``, imported on first use so that a CPU run never imports Triton."""
    key = (backend, family if backend == "triton" else "")
    module = _modules.get(key)
    if module is None:
        if backend == "cpp":
            from rlkern import _C as module
        elif backend == "triton":
            import importlib

            module = importlib.import_module(f"rlkern.kernels.{family}")
        else:
            raise ValueError(f"no kernels for backend {backend!r}")
        _modules[key] = module
    return module
