"""Shared plumbing for the public ops: argument checks with clear messages, backend choice, and
the [outer, inner, V] row view the logit kernels take."""

from __future__ import annotations

import math
import os

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
    out = torch.empty(shape, device=device, dtype=dtype)
    if POISON_OUTPUTS:
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out


def check_tensor(x, name: str, *, floating: bool = True) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    return x


def check_labels(labels, name: str, expected_shape: torch.Size) -> Tensor:
    check_tensor(labels, name, floating=False)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int32 or int64 token ids), got {labels.dtype}")
    if labels.shape != expected_shape:
        raise ValueError(f"{name} must have shape {tuple(expected_shape)} (the logits' leading dims), "
                         f"got {tuple(labels.shape)}")
    return labels


def check_positive(value, name: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_label_range(labels: Tensor, vocab: int, ignore_index: int, name: str = "labels") -> None:
    """Eager-mode range check (a device sync on GPU); skipped while torch.compile traces."""
    if torch.compiler.is_compiling() or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        raise IndexError(f"{name} must lie in [0, {vocab}) or equal ignore_index={ignore_index}; got {first}")


def check_token_mask(mask, name: str, expected_shape: torch.Size) -> Tensor:
    """A [..., T] mask of `expected_shape`, bool or 0/1 of any dtype, returned as a bool tensor.

    Bool masks cost nothing. Integer masks are checked with one min/max pass; floating masks with
    one pass that also rejects fractions (0.5 is not a mask). The value check is eager only: it is
    skipped while torch.compile traces, where a non-0/1 mask is read as "nonzero = valid".
    """
    check_tensor(mask, name, floating=False)
    if mask.shape != expected_shape:
        raise ValueError(f"{name} must have shape {tuple(expected_shape)}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must be bool or a real 0/1 tensor, got {mask.dtype}")
    if not torch.compiler.is_compiling() and mask.numel() > 0:
        if mask.dtype.is_floating_point:
            bad = bool(((mask != 0) & (mask != 1)).any())
        else:
            lo, hi = torch.aminmax(mask)
            bad = bool(lo < 0) or bool(hi > 1)
        if bad:
            raise ValueError(f"{name} must hold only 0 and 1 (or be bool)")
    return mask != 0


def pick_backend(*tensors: Tensor) -> str:
    """The concrete backend for these tensors; float64 always runs the reference."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
    name = _backend.resolve(device)
    if name != "torch" and any(t.dtype == torch.float64 for t in tensors):
        if _backend.requested() != "auto":
            raise _backend.BackendUnavailable(
                f"rlkern backend {name!r} cannot run: float64 inputs run on the torch backend only")
        return "torch"
    return name


def rows_view(x: Tensor) -> Tensor:
    """x [..., V] as a 3-d view [outer, inner, V] whose rows are x's rows in order, without a copy
    whenever the leading dims fold into two strides (e.g. logits[:, :-1, :]); else a contiguous copy.
    The last dim must have unit stride for the kernels; a tensor where it does not is copied."""
    if x.dim() == 0:
        raise ValueError("expected at least one dimension")
    vocab = x.shape[-1]
    if x.stride(-1) != 1 and vocab > 1:
        x = x.contiguous()
    groups: list[list[int]] = []  # [size, stride] from the innermost leading dim outwards
    for size, stride in reversed(list(zip(x.shape[:-1], x.stride()[:-1]))):
        if size == 1:
            continue
        if groups and groups[-1][0] * groups[-1][1] == stride:
            groups[-1][0] *= size
        else:
            groups.append([size, stride])
    if len(groups) > 2:
        return rows_view(x.contiguous())
    inner = groups[0] if groups else [1, vocab]
    outer = groups[1] if len(groups) > 1 else [1, inner[0] * inner[1]]
    return x.as_strided((outer[0], inner[0], vocab), (outer[1], inner[1], 1))
