"""Which implementation runs an op: ``auto`` | ``torch`` | ``cpp`` | ``triton``.

``auto`` picks by device: CPU tensors run the C++ kernels (``rlkern._C``), CUDA tensors the Triton
kernels, anything else the plain-PyTorch reference. ``torch`` forces the reference, ``cpp`` and
``triton`` force a kernel and fail with a one-line reason when it cannot run on the given tensors.

Choose with the context manager ``rlkern.use_backend(name)`` or the environment variable
``RLKERN_BACKEND`` (read at every call, so tests can set it per process); the context manager wins.
"""

from __future__ import annotations

import contextlib
import os

import torch

BACKENDS = ("auto", "torch", "cpp", "triton")

# The innermost use_backend() name. A plain module global (not a ContextVar) so that torch.compile
# can read it while tracing (it guards on the value and retraces when it changes).
_forced: str | None = None


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run on the given tensors; the message says why."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the ``with`` block on backend ``name`` (one of ``BACKENDS``)."""
    global _forced
    previous, _forced = _forced, _check_name(name)
    try:
        yield
    finally:
        _forced = previous


def requested() -> str:
    """The backend asked for: the innermost ``use_backend``, else ``$RLKERN_BACKEND``, else ``auto``."""
    if _forced is not None:
        return _forced
    env = os.environ.get("RLKERN_BACKEND", "auto").strip().lower() or "auto"
    if env not in BACKENDS:
        raise ValueError(f"RLKERN_BACKEND must be one of {BACKENDS}, got {env!r}")
    return env


# Import probes run once; the answers live in a plain dict that dynamo can read. They are written
# as import statements, not __import__() calls: dynamo executes an import statement while tracing
# (so the first rlkern call of a process may sit inside torch.compile(fullgraph=True)), whereas it
# cannot trace a call to the __import__ builtin.
_import_errors: dict[str, str | None] = {}


def cpp_import_error() -> str | None:
    """Why ``rlkern._C`` cannot be imported, or None when it can."""
    if "cpp" not in _import_errors:
        try:
            import rlkern._C  # noqa: F401

            _import_errors["cpp"] = None
        except ImportError as err:
            _import_errors["cpp"] = f"the C++ extension rlkern._C is not built; run `make setup` ({err})"
    return _import_errors["cpp"]


def triton_import_error() -> str | None:
    """Why Triton cannot be imported, or None when it can (only asked for CUDA tensors or a forced
    triton backend, so a CPU run never imports it)."""
    if "triton" not in _import_errors:
        try:
            import triton  # noqa: F401

            _import_errors["triton"] = None
        except ImportError as err:
            _import_errors["triton"] = f"triton is not installed ({err})"
    return _import_errors["triton"]


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _why_not(name: str, device: torch.device) -> str | None:
    if name == "cpp":
        if device.type != "cpu":
            return f"the cpp backend runs on CPU tensors, got a tensor on {device}"
        return cpp_import_error()
    if name == "triton":
        reason = triton_import_error()
        if reason:
            return reason
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return None
        return f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device}"
    return None


def resolve(device: torch.device) -> str:
    """The concrete backend (``torch``, ``cpp`` or ``triton``) for tensors on ``device``."""
    name = requested()
    if name == "auto":
        if device.type == "cpu" and cpp_import_error() is None:
            return "cpp"
        if device.type == "cuda" and triton_import_error() is None:
            return "triton"
        return "torch"
    reason = _why_not(name, device)
    if reason:
        raise BackendUnavailable(f"rlkern backend {name!r} cannot run: {reason}")
    return name


def available(device: torch.device) -> list[str]:
    """The concrete backends that can run on ``device`` here (always includes ``torch``)."""
    return ["torch"] + [n for n in ("cpp", "triton") if _why_not(n, device) is None]
