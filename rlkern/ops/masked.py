"""Masked statistics over token tensors: ``masked_sum``, ``masked_mean``, ``masked_var``,
``masked_whiten``, globally (``dim=None``) or per row (``dim=k``), with autograd.

The kernels return float64 moments (count, sum, M2 about the mean) from one pass over the data
(csrc/masked.cpp, kernels/masked.py: fp32 chunks merged in float64 in a fixed order, so a global
statistic is independent of the thread count); this module turns them into the statistic and,
for backward, into the coefficients of one elementwise kernel:

    out_j = (gy_j or 1) * c + [mask_j] (a + b (x_j - mean))

    sum:    a = g                 mean:  a = g / n               var:  b = 2 g / (n - ddof)
    whiten: y = (x - mean) r (+ mean if not shift_mean), r = (var + eps)^-1/2; with
            S1 = sum gy, S2 = sum gy (x - mean) over every position of the row (y depends on the
            statistics everywhere): c = r, a = S1 (1[not shift_mean] - r) / n, b = -S2 r^3 / (n - ddof)

(var's own dependence on the mean drops out: sum over the mask of (x - mean) is 0). Oracle:
rlkern.reference.masked_*.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlkern import reference
from rlkern.ops._registry import cpp_kernels
from rlkern.ops._common import check_tensor, check_token_mask, new_output, pick_backend
from rlkern.ops._registry import kernel_op

__all__ = ["masked_sum", "masked_mean", "masked_var", "masked_whiten"]

SUM, MEAN, VAR = 0, 1, 2


def _rows_of(t: Tensor, dim: int | None) -> Tensor:
    """The kernels' view of an x-shaped tensor: flat for a global statistic, else [rows, N] with the
    reduced dim moved last (a copy unless it already is last and contiguous)."""
    if dim is None:
        return t.contiguous()
    moved = t.movedim(dim, -1)
    return moved.reshape(-1, moved.shape[-1]).contiguous()


def _layout(x: Tensor, mask: Tensor, dim: int | None) -> tuple[Tensor, Tensor, bool, torch.Size]:
    """(x rows, mask rows, merge_all, statistic shape)."""
    shape = torch.Size(()) if dim is None else x.movedim(dim, -1).shape[:-1]
    return _rows_of(x, dim), _rows_of(mask, dim), dim is None, shape


def _from_rows(rows: Tensor, like: Tensor, dim: int | None) -> Tensor:
    """Inverse of _layout for an x-shaped result."""
    if dim is None:
        return rows.view(like.shape)
    moved = like.movedim(dim, -1).shape
    return rows.view(moved).movedim(-1, dim)


def _kernels(backend: str):
    if backend == "cpp":
        return cpp_kernels()
    from rlkern.kernels import masked as tk

    return tk


def _moments(x: Tensor, mask: Tensor, dim: int | None, want_m2: bool, backend: str):
    xr, mr, merge_all, shape = _layout(x, mask, dim)
    count, total, m2 = (new_output(shape, device=x.device, dtype=torch.float64) for _ in range(3))
    _kernels(backend).masked_moments(xr, mr, merge_all, want_m2, count.view(-1), total.view(-1), m2.view(-1))
    return count, total, m2


def _affine(x: Tensor, mask: Tensor | None, grad: Tensor | None, mu: Tensor, a: Tensor, b: Tensor, c: Tensor,
            dim: int | None, out_dtype: torch.dtype, backend: str) -> Tensor:
    """(grad or 1) * c + [mask] (a + b (x - mu)) with per-statistic coefficients, x-shaped."""
    xr, merge_all = _rows_of(x, dim), dim is None
    mr = _rows_of(mask, dim) if mask is not None else None
    gr = _rows_of(grad.float(), dim) if grad is not None else None
    out = new_output(xr.shape, device=x.device, dtype=out_dtype)
    coef = [t.reshape(-1).float().contiguous() for t in (mu, a, b, c)]
    if backend == "cpp":
        none = x.new_empty(0)
        cpp_kernels().masked_affine(xr, mr if mr is not None else none.bool(),
                                         gr if gr is not None else none.float(), *coef, merge_all, out)
    else:
        _kernels(backend).masked_affine(xr, mr, gr, *coef, merge_all, out)
    return _from_rows(out, x, dim)


def _ddof(unbiased: bool) -> int:
    return 1 if unbiased else 0


# ------------------------------------------------------------------ sum, mean, var


@kernel_op("masked_stat")
def _masked_stat(x: Tensor, mask: Tensor, dim: int | None, kind: int, unbiased: bool,
                 backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(statistic, count, mean): the last two are saved for backward."""
    count, total, m2 = _moments(x, mask, dim, kind == VAR, backend)
    if kind == SUM:
        out = total
    elif kind == MEAN:
        out = total / count
    else:
        out = m2 / (count - _ddof(unbiased))
    # The saved mean only centres x in backward; 0 for an empty selection keeps that finite.
    return out.float(), count, (total / count.clamp(min=1)).float()


@_masked_stat.register_fake
def _(x, mask, dim, kind, unbiased, backend):
    shape = () if dim is None else x.movedim(dim, -1).shape[:-1]
    new = lambda dtype: x.new_empty(shape, dtype=dtype)  # noqa: E731
    return new(torch.float32), new(torch.float64), new(torch.float32)


@kernel_op("masked_stat_bwd")
def _masked_stat_bwd(grad: Tensor, x: Tensor, mask: Tensor, count: Tensor, mean: Tensor, dim: int | None, kind: int,
                     unbiased: bool, backend: str) -> Tensor:
    g = grad.double()
    zero = torch.zeros_like(g)
    if kind == SUM:
        a, b = g, zero
    elif kind == MEAN:
        a, b = g / count, zero
    else:
        a, b = zero, 2 * g / (count - _ddof(unbiased))
        return _affine(x, mask, None, mean, a, b, zero, dim, x.dtype, backend)
    # d sum / d x_j = m_j whatever x holds (torch autograd's answer). The kernel still evaluates
    # b (x_j - mu) with b = 0, and 0 * NaN is NaN: a NaN x_j made its own gradient NaN and, through
    # the NaN mean, every gradient of its selection (issue 9). Zeros stand in for x and the mean.
    return _affine(torch.zeros_like(x), mask, None, torch.zeros_like(mean), a, b, zero, dim, x.dtype, backend)


@_masked_stat_bwd.register_fake
def _(grad, x, mask, count, mean, dim, kind, unbiased, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _stat_setup(ctx, inputs, output):
    x, mask, dim, kind, unbiased, backend = inputs
    _, count, mean = output
    ctx.save_for_backward(x, mask, count, mean)
    ctx.args = (dim, kind, unbiased, backend)
    ctx.mark_non_differentiable(count, mean)


def _stat_backward(ctx, grad, grad_count, grad_mean):
    x, mask, count, mean = ctx.saved_tensors
    return _masked_stat_bwd(grad, x, mask, count, mean, *ctx.args), None, None, None, None, None


_masked_stat.register_autograd(_stat_backward, setup_context=_stat_setup)


# ------------------------------------------------------------------ whiten


@kernel_op("masked_whiten")
def _masked_whiten(x: Tensor, mask: Tensor, dim: int | None, shift_mean: bool, unbiased: bool, eps: float,
                   backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(whitened, count, mean, rstd): the last three are saved for backward."""
    count, total, m2 = _moments(x, mask, dim, True, backend)
    mean = total / count
    rstd = torch.rsqrt(m2 / (count - _ddof(unbiased)) + eps)
    zero = torch.zeros_like(mean)
    y = _affine(x, None, None, mean, zero, rstd, zero if shift_mean else mean, dim, torch.float32, backend)
    return y, count, mean.float(), rstd


@_masked_whiten.register_fake
def _(x, mask, dim, shift_mean, unbiased, eps, backend):
    shape = () if dim is None else x.movedim(dim, -1).shape[:-1]
    new = lambda dtype: x.new_empty(shape, dtype=dtype)  # noqa: E731
    return x.new_empty(x.shape, dtype=torch.float32), new(torch.float64), new(torch.float32), new(torch.float64)


@kernel_op("masked_whiten_bwd")
def _masked_whiten_bwd(grad: Tensor, x: Tensor, mask: Tensor, count: Tensor, mean: Tensor, rstd: Tensor,
                       dim: int | None, shift_mean: bool, unbiased: bool, backend: str) -> Tensor:
    xr, merge_all = _rows_of(x, dim), dim is None
    shape = torch.Size(()) if dim is None else x.movedim(dim, -1).shape[:-1]
    gr = _rows_of(grad.float(), dim)
    s1, s2 = (new_output(shape, device=x.device, dtype=torch.float64) for _ in range(2))
    _kernels(backend).masked_dot(gr, xr, mean.reshape(-1).contiguous(), merge_all, s1.view(-1), s2.view(-1))
    a = s1 * ((0.0 if shift_mean else 1.0) - rstd) / count
    b = -s2 * rstd.pow(3) / (count - _ddof(unbiased))
    return _affine(x, mask, grad, mean, a, b, rstd, dim, x.dtype, backend)


@_masked_whiten_bwd.register_fake
def _(grad, x, mask, count, mean, rstd, dim, shift_mean, unbiased, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _whiten_setup(ctx, inputs, output):
    x, mask, dim, shift_mean, unbiased, eps, backend = inputs
    _, count, mean, rstd = output
    ctx.save_for_backward(x, mask, count, mean, rstd)
    ctx.args = (dim, shift_mean, unbiased, backend)
    ctx.mark_non_differentiable(count, mean, rstd)


def _whiten_backward(ctx, grad, *_):
    x, mask, count, mean, rstd = ctx.saved_tensors
    dx = _masked_whiten_bwd(grad, x, mask, count, mean, rstd, *ctx.args)
    return dx, None, None, None, None, None, None


_masked_whiten.register_autograd(_whiten_backward, setup_context=_whiten_setup)


# ------------------------------------------------------------------ public functions


def _validate(x, mask, dim) -> tuple[Tensor, int | None]:
    check_tensor(x, "x")
    valid = check_token_mask(mask, "mask", x.shape)
    if dim is not None:
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be None or an int, got {dim!r}")
        if x.dim() == 0 or not -x.dim() <= dim < x.dim():
            raise IndexError(f"dim must lie in [{-x.dim()}, {x.dim()}) for x of shape {tuple(x.shape)}, got {dim}")
        dim %= x.dim()
    return valid, dim


def _check_counts(count: Tensor, need: int, what: str) -> None:
    """Eager-only: an empty selection would be 0/0. Skipped under torch.compile (no data-dependent
    control flow there): a traced graph returns NaN / inf for an empty selection instead."""
    if torch.compiler.is_compiling() or count.numel() == 0:
        return
    if bool((count < need).any()):
        where = "the mask" if count.dim() == 0 else "a row of the mask"
        plural = "element" if need == 1 else "elements"
        raise ValueError(f"{what} needs at least {need} selected {plural}, but {where} selects "
                         f"{int(count.min())}")


def _stat(x, mask, dim, kind: int, unbiased: bool, what: str) -> Tensor:
    valid, dim = _validate(x, mask, dim)
    backend = pick_backend(x)
    if backend == "torch":
        count = valid.sum() if dim is None else valid.sum(dim)
        if kind != SUM:
            _check_counts(count, 1 + (kind == VAR and unbiased), what)
        fn = (reference.masked_sum, reference.masked_mean)[kind] if kind != VAR else None
        if fn is not None:
            return fn(x, valid, dim=dim)
        return reference.masked_var(x, valid, dim=dim, unbiased=unbiased)
    out, count, _ = _masked_stat(x, valid, dim, kind, unbiased, backend)
    if kind != SUM:
        _check_counts(count, 1 + (kind == VAR and unbiased), what)
    return out


def masked_sum(x: Tensor, mask: Tensor, *, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over the positions where ``mask`` is set.

    Args:
        x: ``[...]`` float32 / bfloat16 / float16 (float64 runs the reference).
        mask: bool or 0/1 of any dtype, ``x``'s shape. Masked-out values never enter (even inf/NaN).
        dim: ``None`` for one sum over everything (a 0-d result), or the dim to reduce (per row).

    Returns:
        float32, accumulated in fp32 chunks merged in float64; an empty selection sums to 0.

    NaN (same on every backend): a selected NaN makes the result (its row's, with ``dim``) NaN; the
    gradient is ``mask`` times the upstream gradient whatever ``x`` holds, as torch autograd's, so
    it stays finite (a NaN result already makes a loss built on it NaN). The same holds for
    :func:`masked_mean`. :func:`masked_var` and :func:`masked_whiten` read ``x - mean``, so there
    a selected NaN makes the whole selection's result and gradient NaN.
    """
    return _stat(x, mask, dim, SUM, False, "masked_sum")


def masked_mean(x: Tensor, mask: Tensor, *, dim: int | None = None) -> Tensor:
    """masked_sum / number of selected elements (args as :func:`masked_sum`).

    An empty selection (or an empty row with ``dim``) raises ValueError in eager mode; the check
    is skipped under torch.compile, where the result is then NaN.
    """
    return _stat(x, mask, dim, MEAN, False, "masked_mean")


def masked_var(x: Tensor, mask: Tensor, *, dim: int | None = None, unbiased: bool = True) -> Tensor:
    """Variance of the selected elements: sum (x - mean)^2 / (n - 1) (``unbiased``, Bessel's
    correction, verl's and TRL's default) or / n.

    Computed from per-chunk two-pass moments merged with Chan et al.'s update, never as
    E[x^2] - E[x]^2 (which cancels catastrophically for a large mean). Needs n >= 2 (n >= 1 if
    not ``unbiased``): fewer raises ValueError in eager mode (skipped under torch.compile).
    """
    return _stat(x, mask, dim, VAR, bool(unbiased), "masked_var")


def masked_whiten(x: Tensor, mask: Tensor, *, dim: int | None = None, shift_mean: bool = True,
                  unbiased: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) * rsqrt(var + eps) at every position, mean and var over the selected elements
    (verl / TRL masked_whiten); ``shift_mean=False`` adds the mean back. Positions outside the mask
    are transformed too (with the same statistics), as the peers do.

    Args as :func:`masked_var`; ``eps`` >= 0. Returns float32 of ``x``'s shape. The gradient flows
    through the mean and the variance, one reduction and one elementwise pass.
    """
    valid, dim = _validate(x, mask, dim)
    eps = float(eps)
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    need = 1 + bool(unbiased)
    backend = pick_backend(x)
    if backend == "torch":
        _check_counts(valid.sum() if dim is None else valid.sum(dim), need, "masked_whiten")
        return reference.masked_whiten(x, valid, dim=dim, shift_mean=shift_mean, unbiased=unbiased, eps=eps)
    y, count, _, _ = _masked_whiten(x, valid, dim, bool(shift_mean), bool(unbiased), eps, backend)
    _check_counts(count, need, "masked_whiten")
    return y
