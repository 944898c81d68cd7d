"""Token KL estimators and KL-shaped token rewards: Triton kernels.

Same maths as csrc/kl_penalty.cpp (see there for the formulas and the gradient of the clamped k3): one
program per BLOCK elements for kl forward / backward, one program per row for token_rewards.
All arithmetic is fp32; offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rlkern.codes import KL_ESTIMATORS

# The estimator codes (rlkern/codes.py), as constexpr globals the kernels can compare against.
K1 = tl.constexpr(KL_ESTIMATORS["k1"])
ABS = tl.constexpr(KL_ESTIMATORS["abs"])
K2 = tl.constexpr(KL_ESTIMATORS["k2"])
K3 = tl.constexpr(KL_ESTIMATORS["k3"])
BLOCK = 1024


@triton.jit
def _k3_parts(r, lo, hi):
    """(expm1(rc), expm1(rc) - rc) for rc = r clamped to [lo, hi]: below |rc| = 1/2 both from the
    Taylor series expm1(x) = x + x^2 (1/2! + x/3! + ... + x^7/9!), which keeps k3 = x^2 (...)
    free of the cancellation in e^x - 1 - x. A NaN r skips the clamp (tl.maximum / tl.minimum
    return the non-NaN operand), so value and gradient are NaN as on the other backends."""
    x = tl.where(r != r, r, tl.minimum(tl.maximum(r, lo), hi))
    q = 1.0 / 362880.0
    q = q * x + 1.0 / 40320.0
    q = q * x + 1.0 / 5040.0
    q = q * x + 1.0 / 720.0
    q = q * x + 1.0 / 120.0
    q = q * x + 1.0 / 24.0
    q = q * x + 1.0 / 6.0
    q = q * x + 0.5
    series = x * x * q
    direct = tl.exp(x) - 1.0
    small = tl.abs(x) < 0.5
    return tl.where(small, x + series, direct), tl.where(small, series, direct - x)


@triton.jit
def _kl_value(d, lo, hi, value_bound, ESTIMATOR: tl.constexpr):
    if ESTIMATOR == K1:
        v = d
    elif ESTIMATOR == ABS:
        v = tl.abs(d)
    elif ESTIMATOR == K2:
        v = 0.5 * d * d
    else:
        _, k3 = _k3_parts(-d, lo, hi)
        v = tl.where(k3 != k3, k3, tl.minimum(tl.maximum(k3, -value_bound), value_bound))
    return v


@triton.jit
def _kl_fwd_kernel(lp_ptr, rf_ptr, out_ptr, n, lo, hi, value_bound, ESTIMATOR: tl.constexpr,
                   BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    d = tl.load(lp_ptr + offs, mask=inside, other=0.0).to(tl.float32) - tl.load(
        rf_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, _kl_value(d, lo, hi, value_bound, ESTIMATOR), mask=inside)


@triton.jit
def _kl_bwd_kernel(g_ptr, lp_ptr, rf_ptr, dx_ptr, n, lo, hi, value_bound, ESTIMATOR: tl.constexpr,
                   STRAIGHT_THROUGH: tl.constexpr, G_SCALAR: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    d = tl.load(lp_ptr + offs, mask=inside, other=0.0).to(tl.float32) - tl.load(
        rf_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if G_SCALAR:  # one gradient for every element (the backward of a sum)
        g = tl.load(g_ptr)
    else:
        g = tl.load(g_ptr + offs, mask=inside, other=0.0)
    if STRAIGHT_THROUGH or ESTIMATOR == K2:
        slope = d
    elif ESTIMATOR == K1:
        slope = tl.full(d.shape, 1.0, tl.float32)
    elif ESTIMATOR == ABS:
        slope = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    else:
        r = -d
        em1, value = _k3_parts(r, lo, hi)
        # 0 where a clamp is active; a NaN r fails every test but is no clamp: its slope stays NaN.
        active = ((r >= lo) & (r <= hi) & (value >= -value_bound) & (value <= value_bound)) | (r != r)
        slope = tl.where(active, -em1, 0.0)
    tl.store(dx_ptr + offs, (g * slope).to(dx_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _rewards_kernel(s_ptr, lp_ptr, rf_ptr, m_ptr, out_ptr, length, kl_coef, lo, hi, value_bound,
                    ESTIMATOR: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    # Row pointers in 64 bits, offsets within the row in 32 (T < 2^31): the running last-valid index
    # then costs one 32-bit register per lane instead of two (a 64-bit one spilled on sm_90).
    base = row * length
    lp_row, rf_row, m_row, out_row = lp_ptr + base, rf_ptr + base, m_ptr + base, out_ptr + base
    last = tl.full((), -1, tl.int32)
    for start in range(0, length, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < length
        d = tl.load(lp_row + offs, mask=inside, other=0.0).to(tl.float32) - tl.load(
            rf_row + offs, mask=inside, other=0.0).to(tl.float32)
        valid = tl.load(m_row + offs, mask=inside, other=0) != 0
        penalty = -(kl_coef * _kl_value(d, lo, hi, value_bound, ESTIMATOR))
        tl.store(out_row + offs, tl.where(valid, penalty, 0.0), mask=inside)
        last = tl.maximum(last, tl.max(tl.where(valid, offs, -1), axis=0))
    # The same program wrote the row above, so reading its own store back is ordered.
    has_last = last >= 0
    at = tl.where(has_last, last, 0)
    current = tl.load(out_row + at, mask=has_last, other=0.0)
    tl.store(out_row + at, current + tl.load(s_ptr + row), mask=has_last)


def kl_fwd(logp: torch.Tensor, ref: torch.Tensor, estimator: int, straight_through: bool, lo: float,
           hi: float, value_bound: float, out: torch.Tensor) -> None:
    """logp, ref: contiguous, one shape and dtype; out: contiguous float32 of that shape. The
    straight-through flag changes only the gradient (same arguments as the C++ kernel)."""
    n = logp.numel()
    if n == 0:
        return
    _kl_fwd_kernel[(triton.cdiv(n, BLOCK),)](logp, ref, out, n, lo, hi, value_bound, ESTIMATOR=estimator,
                                             BLOCK=BLOCK)


def kl_bwd(grad: torch.Tensor, logp: torch.Tensor, ref: torch.Tensor, estimator: int, straight_through: bool,
           lo: float, hi: float, value_bound: float, grad_logp: torch.Tensor) -> None:
    """Writes d kl / d logp * grad into grad_logp (contiguous, logp's dtype); grad: contiguous float32,
    one per element or a single one for all."""
    n = logp.numel()
    if n == 0:
        return
    _kl_bwd_kernel[(triton.cdiv(n, BLOCK),)](grad, logp, ref, grad_logp, n, lo, hi, value_bound,
                                             ESTIMATOR=estimator, STRAIGHT_THROUGH=straight_through,
                                             G_SCALAR=grad.numel() != n, BLOCK=BLOCK)


def token_rewards_fwd(scores: torch.Tensor, logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float, estimator: int, lo: float, hi: float, value_bound: float,
                      out: torch.Tensor) -> None:
    """logp, ref, mask, out: contiguous [..., T] (the mask in any dtype, nonzero = valid; read in
    that dtype); scores: contiguous float32, one per row."""
    length = logp.shape[-1]
    rows = logp.numel() // length if length else 0
    if rows == 0:
        return
    block = min(triton.next_power_of_2(length), BLOCK)
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    _rewards_kernel[(rows,)](scores, logp, ref, m, out, length, kl_coef, lo, hi, value_bound,
                             ESTIMATOR=estimator, BLOCK=block)
