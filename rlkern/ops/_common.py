"""Shared plumbing for the public ops: argument checks with clear messages, backend choice, and
the [outer, inner, V] row view the logit kernels take."""

from __future__ import annotations

import math
import numbers
import os

import numpy as np
import torch
from torch import Tensor

from rlkern import backend as _backend

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FLOAT_DTYPES = KERNEL_DTYPES + (torch.float64,)


# Tests set this (or RLKERN_POISON_OUTPUTS=1) so that every kernel output starts as NaN: an element
# a kernel forgets to write then fails the comparison instead of passing by luck.
POISON_OUTPUTS = os.environ.get("RLKERN_POISON_OUTPUTS", "0") == "1"


def new_output(shape, *, device, dtype=torch.float32) -> Tensor:
    """Allocates a buffer that a kernel will write in full (uninitialised, or NaN when poisoning)."""
    # The sizes as separate arguments: torch parses a torch.Size argument ~1.3 us slower.
    out = (torch.empty(*shape, device=device, dtype=dtype) if isinstance(shape, tuple) and shape
           else torch.empty(shape, device=device, dtype=dtype))
    if POISON_OUTPUTS:
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out


def check_tensor(x, name: str, *, floating: bool = True) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    return x


_LIMITED_UNSIGNED = (torch.uint16, torch.uint32, torch.uint64)


def check_labels(labels, name: str, expected_shape: torch.Size) -> Tensor:
    check_tensor(labels, name, floating=False)
    dtype = labels.dtype
    if dtype is torch.int64 or dtype is torch.int32:  # what trainers pass: the checks below accept both
        pass
    elif dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int32 or int64 token ids), got {labels.dtype}")
    elif dtype in _LIMITED_UNSIGNED:
        # torch implements almost no ops for these (not even <), and a uint64 id >= 2^63 has no int64
        # value: refused on every backend alike rather than accepted by one kernel only.
        raise TypeError(f"{name} must be int8/int16/int32/int64 or uint8 token ids, got {labels.dtype}: "
                        f"convert with {name}.long()")
    if labels.shape != expected_shape:
        raise ValueError(f"{name} must have shape {tuple(expected_shape)} (the logits' leading dims), "
                         f"got {tuple(labels.shape)}")
    return labels


# One rule for scalar hyperparameters, used by every op: a number is a real Python or numpy scalar
# (int, float, np.float32, np.int64, ...) and is read as the Python float (or int) it equals, so
# np.float32(0.1) means 0.10000000149011612, exactly its value. bool (and np.bool_) is not a
# number: ``beta=True`` is a bug, not 1.0. 0-d tensors are refused too: reading one is a device
# sync, and under torch.compile it would turn a constant into graph input.


def check_number(value, name: str) -> float:
    """``value`` as a float, or a TypeError naming ``name`` (bool, str, tensors... are refused).
    While torch.compile traces, a float argument of the compiled function arrives as a symbolic
    float (math.isfinite cannot trace it; float() would bake one value into the graph, Liger
    #1366): the checks are eager-only, like the other value checks here, and pass it through."""
    if torch.compiler.is_compiling():
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (int, float or a numpy scalar), got "
                        f"{type(value).__name__} {value!r}")
    return float(value)


def check_finite(value, name: str) -> float:
    value = check_number(value, name)
    if torch.compiler.is_compiling():
        return value
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_int(value, name: str) -> int:
    """``value`` as an int: Python or numpy integers only. 5.5, 5.0, True and '5' are refused (a
    truncated ignore_index would silently drop a different token)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int (or a numpy integer), got {type(value).__name__} {value!r}")
    return int(value)


def check_positive(value, name: str) -> float:
    value = check_number(value, name)
    if torch.compiler.is_compiling():
        return value
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


# The kernels scale logits by 1 / temperature in float32; below this the reciprocal overflows to inf.
_MIN_TEMPERATURE = 1.0 / float(torch.finfo(torch.float32).max)


def check_temperature(value, name: str = "temperature") -> float:
    """A finite temperature > 0 whose float32 reciprocal is finite (1e-45 would scale by inf)."""
    value = check_positive(value, name)
    if torch.compiler.is_compiling():
        return value
    if value <= _MIN_TEMPERATURE:
        raise ValueError(f"{name} must be > {_MIN_TEMPERATURE:.3g} (its reciprocal, which scales the logits "
                         f"in float32, overflows below that), got {value}")
    # The kernels divide by float32(temperature): it must not round to inf either (2^128 - 2^103
    # is the midpoint between FLT_MAX and 2^128, where float32 rounding goes to inf).
    if value >= 2.0**128 - 2.0**103:
        raise ValueError(f"{name} must be finite in float32, got {value}")
    return value


def check_no_nan(x: Tensor | None, name: str) -> None:
    """The opt-in ``nan_check``: a ValueError naming ``name`` and the first NaN's index (eager only,
    a device sync; skipped while torch.compile traces)."""
    if x is None or torch.compiler.is_compiling() or not x.dtype.is_floating_point:
        return
    raise_at_first(torch.isnan(x.detach()), name, "NaN (nan_check=True)")


def raise_at_first(bad: Tensor, name: str, what: str) -> None:
    """A ValueError naming ``name`` and the first True index of ``bad``, if any (a device sync)."""
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(f"{name} holds {what}; first at index {first}")


def check_label_range(labels: Tensor, vocab: int, ignore_index: int, name: str = "labels") -> None:
    """Eager-mode range check (a device sync on GPU); skipped while torch.compile traces."""
    if torch.compiler.is_compiling() or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        raise IndexError(f"{name} must lie in [0, {vocab}) or equal ignore_index={ignore_index}; got {first}")


# The mask dtypes the kernels read natively (csrc/dispatch.h, dispatch_mask_type; Triton loads any).
NATIVE_MASK_DTYPES = (torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.bfloat16,
                      torch.float16)

# Debug switch: RLKERN_STRICT_MASKS=1 checks that every mask holds only 0 and 1 (one extra pass and,
# on GPU, a host sync per call). Off by default: a mask is "nonzero = valid" and costs nothing.
STRICT_MASKS = os.environ.get("RLKERN_STRICT_MASKS", "0") == "1"


def token_mask(mask, name: str, expected_shape: torch.Size) -> Tensor:
    """A mask of ``expected_shape`` for the kernels, in its own dtype (no conversion pass): any
    nonzero value is valid. bool, uint8, int32, int64, float32, bfloat16 and float16 are read as
    they are; other integer and float dtypes are converted to bool here (one pass). Contiguous."""
    check_tensor(mask, name, floating=False)
    if mask.shape != expected_shape:
        raise ValueError(f"{name} must have shape {tuple(expected_shape)}, got {tuple(mask.shape)}")
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must be bool or a real 0/1 tensor, got {mask.dtype}")
    if STRICT_MASKS and mask.dtype != torch.bool and not torch.compiler.is_compiling() and mask.numel() > 0:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"{name} must hold only 0 and 1 (RLKERN_STRICT_MASKS=1)")
    if mask.dtype not in NATIVE_MASK_DTYPES:
        mask = mask != 0
    return mask.contiguous()


# Per-call fast path of pick_backend when no backend is requested (no use_backend(), RLKERN_BACKEND
# unset): resolve()'s answer for "auto" depends only on the device and on the import probes, which
# backend.py runs once, so it is kept per device. os.environ's backing dict is read directly (keys
# encoded as os.environ.encodekey does): ~50 ns, where os.environ.get of an unset variable costs
# ~0.9 us (a KeyError raised and caught inside). Anything else, and tracing, goes through resolve().
_ENV_DATA = getattr(os.environ, "_data", None)
_BACKEND_KEY = os.environ.encodekey("RLKERN_BACKEND") if _ENV_DATA is not None else None
_auto_backend: dict[torch.device, str] = {}
_is_compiling = torch.compiler.is_compiling  # bound once: ~40 ns a lookup, on every call
_FLOAT64 = torch.float64


def pick_backend(*tensors: Tensor) -> str:
    """The concrete backend for these tensors; float64 always runs the reference."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
    if (_backend._forced is None and _ENV_DATA is not None and _BACKEND_KEY not in _ENV_DATA
            and not _is_compiling()):  # dynamo traces resolve() itself
        name = _auto_backend.get(device)
        if name is None:
            name = _auto_backend[device] = _backend.resolve(device)
    else:
        name = _backend.resolve(device)
    if name != "torch":
        for t in tensors:  # a loop, not any(<generator>): ~0.4 us less a call
            if t.dtype is _FLOAT64:  # dtypes are singletons
                if _backend.requested() != "auto":
                    raise _backend.BackendUnavailable(
                        f"rlkern backend {name!r} cannot run: float64 inputs run on the torch backend only")
                return "torch"
    return name


def leading_groups(x: Tensor) -> list[list[int]]:
    """x's leading dims (all but the last) merged into [size, stride] groups, innermost first: dims
    that are contiguous with each other fold into one group; size-1 dims are dropped."""
    groups: list[list[int]] = []
    for size, stride in reversed(list(zip(x.shape[:-1], x.stride()[:-1]))):
        if size == 1:
            continue
        if groups and groups[-1][0] * groups[-1][1] == stride:
            groups[-1][0] *= size
        else:
            groups.append([size, stride])
    return groups


def rows_view(x: Tensor) -> Tensor:
    """x [..., V] as a 3-d view [outer, inner, V] whose rows are x's rows in order, without a copy
    whenever the leading dims fold into two strides (e.g. logits[:, :-1, :]); else a contiguous copy.
    The last dim must have unit stride for the kernels; a tensor where it does not is copied."""
    if x.dim() == 0:
        raise ValueError("expected at least one dimension")
    vocab = x.shape[-1]
    if x.stride(-1) != 1 and vocab > 1:
        x = x.contiguous()
    groups = leading_groups(x)
    if len(groups) > 2:
        return rows_view(x.contiguous())
    inner = groups[0] if groups else [1, vocab]
    outer = groups[1] if len(groups) > 1 else [1, inner[0] * inner[1]]
    return x.as_strided((outer[0], inner[0], vocab), (outer[1], inner[1], 1))


def check_ignore_index(value, name: str = "ignore_index") -> int:
    """An ignore_index (or any token-id sentinel) as an int that fits in int64, the labels' dtype in
    the kernels: Python or numpy integers only, as check_int."""
    value = check_int(value, name)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{name} must fit in int64, got {value}")
    return value
