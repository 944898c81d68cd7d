"""Masked statistics over token tensors: ``masked_sum``, ``masked_mean``, ``masked_var``,
``masked_whiten``, globally (``dim=None``) or per row (``dim=k``), with autograd.

Each op and direction is one kernel call (csrc/masked.cpp, kernels/masked.py, same entry points):
the forward takes the moments (count, sum, M2 about the mean: fp32 chunks merged in float64 in a
fixed order, so a global statistic is independent of the thread count), derives the statistic (and
the whitened values) from them, saves what backward needs as float64 per statistic, and returns the
smallest selected count, so an empty selection is refused without another pass. The backward is one
elementwise pass (whiten's: one reduction and one elementwise pass):

    sum:    dx = [m] g              mean: dx = [m] g / n             var: dx = [m] 2 g (x - mean) / (n - ddof)
    whiten: y = (x - mean) r (+ mean if not shift_mean), r = (var + eps)^-1/2; with S1 = sum gy and
            S2 = sum gy (x - mean) over every position of the row (y depends on the statistics
            everywhere): dx = gy r + [m] (S1 (1[not shift_mean] - r) / n - S2 r^3 (x - mean) / (n - ddof))

(var's own dependence on the mean drops out: sum over the mask of (x - mean) is 0).

Masks: any dtype (bool, uint8, int32, int64, float32, bfloat16, float16 are read by the kernels as
they are; other real dtypes are converted to bool first), "nonzero = valid": 2.0 and NaN select,
0 and -0.0 do not. RLKERN_STRICT_MASKS=1 refuses values other than 0 and 1 (rlkern.ops._common).
Oracle: rlkern.reference.masked_*.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlkern import reference
from rlkern.ops import _common
from rlkern.ops._common import check_number, check_tensor, pick_backend, token_mask
from rlkern.ops._registry import kernel_op, kernels

__all__ = ["masked_sum", "masked_mean", "masked_var", "masked_whiten"]

SUM, MEAN, VAR = 0, 1, 2
_NAMES = ("masked_sum", "masked_mean", "masked_var")


def _rows(t: Tensor, dim: int | None) -> Tensor:
    """The kernels' view of an x-shaped tensor: itself for a global statistic or a last-dim one,
    else with the reduced dim moved last; contiguous (a copy only when it is not)."""
    if dim is not None and dim != t.dim() - 1:
        t = t.movedim(dim, -1)
    return t.contiguous()


def _rows2(x: Tensor, mask: Tensor, dim: int | None) -> tuple[Tensor, Tensor]:
    """_rows of x and of the mask (one call: this runs on every op call)."""
    if dim is None or dim == x.dim() - 1:
        return x.contiguous(), mask.contiguous()
    return x.movedim(dim, -1).contiguous(), mask.movedim(dim, -1).contiguous()


def _from_rows(rows: Tensor, dim: int | None) -> Tensor:
    """Inverse of _rows for an x-shaped result."""
    return rows if dim is None or dim == rows.dim() - 1 else rows.movedim(-1, dim)


def _check_count(low, need: int, what: str, per_row: bool) -> None:
    """An empty selection would be 0/0. ``low`` is the kernel's smallest selected count (a float,
    or a 0-d device tensor from Triton: reading it is a sync). ``need`` is 0 while torch.compile
    traces (no data-dependent control flow there: a traced graph returns NaN / inf instead)."""
    if need and low < need:
        where = "a row of the mask" if per_row else "the mask"
        plural = "element" if need == 1 else "elements"
        raise ValueError(f"{what} needs at least {need} selected {plural}, but {where} selects {int(low)}")


# ------------------------------------------------------------------ sum, mean, var


@kernel_op("masked_stat")
def _masked_stat(x: Tensor, mask: Tensor, dim: int | None, kind: int, unbiased: bool, need: int,
                 backend: str) -> tuple[Tensor, Tensor]:
    """(statistic, saved): saved is float64 [2, ...] (centring mean, gradient scale) for backward."""
    return _run_stat(kernels(backend, "masked").masked_stat_fwd, x, mask, dim, kind, unbiased, need)


def _run_stat(forward, x, mask, dim, kind, unbiased, need) -> tuple[Tensor, Tensor]:
    """(statistic, saved) from ``forward`` (masked_stat_fwd, or masked_stat_autograd: the same with
    C++ autograd), and the empty-selection check."""
    out, saved, low = forward(*_rows2(x, mask, dim), dim is None, kind, int(unbiased), _common.POISON_OUTPUTS)
    if need:
        _check_count(low, need, _NAMES[kind], out.dim() > 0)
    return out, saved


@_masked_stat.register_native
def _(x, mask, dim, kind, unbiased, need, backend):
    """With x (or the mask) requiring grad on the C++ backend: one C++ autograd node (csrc/masked.cpp
    MaskedStatFunction) over the same two kernels as _stat_backward. The reduced dim is moved last
    (a copy only when that is not contiguous) by torch ops before the node, so autograd moves the
    gradient back. (Without a gradient, fn is already one C++ call.)"""
    if backend != "cpp":
        return None
    return _run_stat(kernels("cpp", "").masked_stat_autograd, x, mask, dim, kind, unbiased, need)


@_masked_stat.register_fake
def _(x, mask, dim, kind, unbiased, need, backend):
    shape = () if dim is None else x.movedim(dim, -1).shape[:-1]
    return x.new_empty(shape, dtype=torch.float32), x.new_empty((2, *shape), dtype=torch.float64)


@kernel_op("masked_stat_bwd")
def _masked_stat_bwd(grad: Tensor, x: Tensor, mask: Tensor, saved: Tensor, dim: int | None, kind: int,
                     backend: str) -> Tensor:
    dx = kernels(backend, "masked").masked_stat_bwd(
        _f32(grad), *_rows2(x, mask, dim), saved, dim is None, kind, _common.POISON_OUTPUTS)
    return dx if dim is None else _from_rows(dx, dim)


def _f32(grad: Tensor) -> Tensor:
    """An incoming gradient as the kernels read it (contiguous float32): itself in the common case
    (~0.3 us less than .float().contiguous())."""
    return grad if grad.dtype is torch.float32 and grad.is_contiguous() else grad.float().contiguous()


def _fake_dx(grad, x, *_):
    """Both backward ops return d x: x-shaped, contiguous."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


_masked_stat_bwd.register_fake(_fake_dx)


def _setup(ctx, inputs, output):
    """setup_context of both forward ops, whose inputs are (x, mask, dim, kind or shift_mean, ...,
    backend): backward reads x, the mask, the saved statistics and (dim, inputs[3], backend)."""
    ctx.save_for_backward(inputs[0], inputs[1], output[1])
    ctx.args = (inputs[2], inputs[3], inputs[-1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # saved's gradient is never defined: no zeros for it


def _stat_backward(ctx, grad, _):
    if grad is None:  # no gradient reaches the statistic
        return (None,) * 7
    x, mask, saved = ctx.saved_tensors
    return _masked_stat_bwd.in_backward(grad, x, mask, saved, *ctx.args), None, None, None, None, None, None


_masked_stat.register_autograd(_stat_backward, setup_context=_setup)


# ------------------------------------------------------------------ whiten


@kernel_op("masked_whiten")
def _masked_whiten(x: Tensor, mask: Tensor, dim: int | None, shift_mean: bool, unbiased: bool, eps: float,
                   need: int, backend: str) -> tuple[Tensor, Tensor]:
    """(whitened, saved): saved is float64 [4, ...] (mean, rstd, n, n - ddof) for backward."""
    y, saved, low = kernels(backend, "masked").masked_whiten_fwd(
        *_rows2(x, mask, dim), dim is None, shift_mean, int(unbiased), eps, _common.POISON_OUTPUTS)
    if need:
        _check_count(low, need, "masked_whiten", saved.dim() > 1)
    return _from_rows(y, dim), saved


@_masked_whiten.register_fake
def _(x, mask, dim, shift_mean, unbiased, eps, need, backend):
    shape = () if dim is None else x.movedim(dim, -1).shape[:-1]
    return x.new_empty(x.shape, dtype=torch.float32), x.new_empty((4, *shape), dtype=torch.float64)


@kernel_op("masked_whiten_bwd")
def _masked_whiten_bwd(grad: Tensor, x: Tensor, mask: Tensor, saved: Tensor, dim: int | None,
                       shift_mean: bool, backend: str) -> Tensor:
    dx = kernels(backend, "masked").masked_whiten_bwd(
        _rows(grad.float(), dim), *_rows2(x, mask, dim), saved, dim is None, shift_mean,
        _common.POISON_OUTPUTS)
    return _from_rows(dx, dim)


_masked_whiten_bwd.register_fake(_fake_dx)


def _whiten_backward(ctx, grad, _):
    if grad is None:
        return (None,) * 8
    x, mask, saved = ctx.saved_tensors
    return _masked_whiten_bwd.in_backward(grad, x, mask, saved, *ctx.args), *(None,) * 7


_masked_whiten.register_autograd(_whiten_backward, setup_context=_setup)


# ------------------------------------------------------------------ public functions


def _validate(x, mask, dim) -> tuple[Tensor, int | None]:
    check_tensor(x, "x")
    mask = token_mask(mask, "mask", x.shape)
    if dim is not None:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be None or an int, got {dim!r}")
        if x.dim() == 0 or not -x.dim() <= dim < x.dim():
            raise IndexError(f"dim must lie in [{-x.dim()}, {x.dim()}) for x of shape {tuple(x.shape)}, "
                             f"got {dim}")
        dim %= x.dim()
    return mask, dim


def _need(kind: int, unbiased: bool) -> int:
    """Selected elements a statistic needs (0 under torch.compile: the check is eager only)."""
    if kind == SUM or torch.compiler.is_compiling():
        return 0
    return 2 if kind == VAR and unbiased else 1


def _reference_count(mask: Tensor, dim: int | None, need: int, what: str) -> None:
    """The torch backend's empty-selection check (the reference reads the mask as ``mask != 0``)."""
    if need:
        count = (mask != 0).sum() if dim is None else (mask != 0).sum(dim)
        if count.numel():
            _check_count(float(count.min()), need, what, count.dim() > 0)


def _stat(x, mask, dim, kind: int, unbiased: bool) -> Tensor:
    mask, dim = _validate(x, mask, dim)
    backend = pick_backend(x)
    need = 0 if kind == SUM else _need(kind, unbiased)
    if backend == "torch":
        _reference_count(mask, dim, need, _NAMES[kind])
        if kind == VAR:
            return reference.masked_var(x, mask, dim=dim, unbiased=unbiased)
        return (reference.masked_sum, reference.masked_mean)[kind](x, mask, dim=dim)
    return _masked_stat(x, mask, dim, kind, unbiased, need, backend)[0]


def masked_sum(x: Tensor, mask: Tensor, *, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over the positions where ``mask`` is set.

    Args:
        x: ``[...]`` float32 / bfloat16 / float16 (float64 runs the reference).
        mask: ``x``'s shape, any real dtype (bool, uint8, int32, int64, float32, bfloat16 and
            float16 are read as they are, without a conversion pass): nonzero = valid, so 2.0 and
            NaN select and 0 and -0.0 do not. RLKERN_STRICT_MASKS=1 refuses anything but 0 and 1.
            Masked-out values never enter (even inf/NaN).
        dim: ``None`` for one sum over everything (a 0-d result), or the dim to reduce (per row).

    Returns:
        float32, accumulated in fp32 chunks merged in float64; an empty selection sums to 0.

    NaN (same on every backend): a selected NaN makes the result (its row's, with ``dim``) NaN; the
    gradient is ``mask`` times the upstream gradient whatever ``x`` holds, as torch autograd's, so
    it stays finite (a NaN result already makes a loss built on it NaN). The same holds for
    :func:`masked_mean`. :func:`masked_var` and :func:`masked_whiten` read ``x - mean``, so there
    a selected NaN makes the whole selection's result and gradient NaN.
    """
    return _stat(x, mask, dim, SUM, False)


def masked_mean(x: Tensor, mask: Tensor, *, dim: int | None = None) -> Tensor:
    """masked_sum / number of selected elements (args as :func:`masked_sum`; ``mask`` any real
    dtype, nonzero = valid).

    An empty selection (or an empty row with ``dim``) raises ValueError in eager mode; the check
    is skipped under torch.compile, where the result is then NaN.
    """
    return _stat(x, mask, dim, MEAN, False)


def masked_var(x: Tensor, mask: Tensor, *, dim: int | None = None, unbiased: bool = True) -> Tensor:
    """Variance of the selected elements: sum (x - mean)^2 / (n - 1) (``unbiased``, Bessel's
    correction, verl's and TRL's default) or / n. Args as :func:`masked_sum` (``mask`` any real
    dtype, nonzero = valid).

    Computed from per-chunk two-pass moments merged with Chan et al.'s update, never as
    E[x^2] - E[x]^2 (which cancels catastrophically for a large mean). Needs n >= 2 (n >= 1 if
    not ``unbiased``): fewer raises ValueError in eager mode (skipped under torch.compile).
    """
    return _stat(x, mask, dim, VAR, bool(unbiased))


def masked_whiten(x: Tensor, mask: Tensor, *, dim: int | None = None, shift_mean: bool = True,
                  unbiased: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) * rsqrt(var + eps) at every position, mean and var over the selected elements
    (verl / TRL masked_whiten); ``shift_mean=False`` adds the mean back. Positions outside the mask
    are transformed too (with the same statistics), as the peers do.

    Args as :func:`masked_var` (``mask`` any real dtype, nonzero = valid: 2.0 and NaN select, 0 and
    -0.0 do not); ``eps`` >= 0. Returns float32 of ``x``'s shape. The gradient flows through the
    mean and the variance, one reduction and one elementwise pass.
    """
    mask, dim = _validate(x, mask, dim)
    eps = check_number(eps, "eps")
    if not torch.compiler.is_compiling() and not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    unbiased = bool(unbiased)
    need = _need(VAR, unbiased)
    backend = pick_backend(x)
    if backend == "torch":
        _reference_count(mask, dim, need, "masked_whiten")
        return reference.masked_whiten(x, mask, dim=dim, shift_mean=shift_mean, unbiased=unbiased, eps=eps)
    return _masked_whiten(x, mask, dim, bool(shift_mean), unbiased, eps, need, backend)[0]
