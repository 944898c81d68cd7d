"""Rollout/training mismatch correction, the Triton kernel: the entry point, arguments and per-row
statistics layout of csrc/rollout_correction.cpp (see there), for calls without rejection options.
One program per row sweeps it twice in blocks of BLOCK tokens: the row's sums (count, Σd, the
off-policy sums), then the weights and their sums. Block sums are fp32 and the row totals fp64. NaN
propagates: a block max / min with a NaN valid element is NaN (the GPU's max would drop it).

Rejection options (``rs``) are not taken here: with them, every specialisation spilled 8-32 B of
stack on sm_90 under Triton 3.4 (the oldest Triton rlkern supports; 3.9 compiled them cleanly once
div.rn.f64's called slow path and the per-option branches were gone), so rlkern.ops runs calls with
options on CUDA through its vectorised torch path. BLOCK = 512 on 8 warps (2 tokens a thread): no
spill in any specialisation tests/gpu_compile builds, Triton 3.4 and 3.9.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 512
K_STATS = 19  # per-row statistics without options (csrc/rollout_correction.cpp's layout)
_K_STATS = tl.constexpr(K_STATS)
FLT_MAX = tl.constexpr(3.4028234663852886e38)
SAFETY = tl.constexpr(20.0)


@triton.jit
def _nan_max(x, valid):
    bad = tl.sum(tl.where(valid & (x != x), 1, 0), axis=0) > 0
    return tl.where(bad, float("nan"), tl.max(tl.where(valid, x, float("-inf")), axis=0))


@triton.jit
def _nan_min(x, valid):
    bad = tl.sum(tl.where(valid & (x != x), 1, 0), axis=0) > 0
    return tl.where(bad, float("nan"), tl.min(tl.where(valid, x, float("inf")), axis=0))


@triton.jit
def _merge_max(acc, v):
    return tl.where(acc != acc, acc, tl.where(v != v, v, tl.maximum(acc, v)))


@triton.jit
def _merge_min(acc, v):
    return tl.where(acc != acc, acc, tl.where(v != v, v, tl.minimum(acc, v)))


@triton.jit
def _wsum(flag, x):
    """fp64 block sum of x where flag."""
    return tl.sum(tl.where(flag, x, 0.0), axis=0).to(tl.float64)


@triton.jit
def _trl(x):
    x = tl.where(x != x, 0.0, x)
    return tl.where(x == float("inf"), FLT_MAX, tl.where(x == float("-inf"), -FLT_MAX, x))


@triton.jit
def _clamp(x, lo, hi):
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _block(lp_ptr, rlp_ptr, m_ptr, base, offs, length, HAS_RLP: tl.constexpr):
    """One block of a row: the mask as fp32, its validity, the log-probs a, the rollout log-probs c
    (0 without them) and d = a - c (a itself without them)."""
    inb = offs < length
    mv = tl.load(m_ptr + base + offs, mask=inb, other=0).to(tl.float32)
    a = tl.load(lp_ptr + base + offs, mask=inb, other=0.0)
    if HAS_RLP:
        c = tl.load(rlp_ptr + base + offs, mask=inb, other=0.0)
        d = a - c
    else:
        c = tl.zeros_like(a)
        d = a
    return mv, mv != 0, a, c, d


@triton.jit
def _rc_kernel(lp_ptr, rlp_ptr, m_ptr, w_ptr, s_ptr, length, lower, upper, log_clamp, gate_lo, gate_hi,
               LEVEL: tl.constexpr, MODE: tl.constexpr, PADDING: tl.constexpr, HAS_RLP: tl.constexpr,
               HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_CLAMP: tl.constexpr,
               HAS_GATE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * length
    lanes = tl.arange(0, BLOCK)
    n = tl.zeros((), tl.float64)
    sum_d = tl.zeros((), tl.float64)
    trl = tl.zeros((), tl.float64)
    s_lp = tl.zeros((), tl.float64)
    s_rlp = tl.zeros((), tl.float64)
    s_kl = tl.zeros((), tl.float64)
    s_k3u = tl.zeros((), tl.float64)
    s_chi = tl.zeros((), tl.float64)
    # sweep 1: the row's sums over its valid tokens
    for t0 in range(0, length, BLOCK):
        mv, valid, a, c, d = _block(lp_ptr, rlp_ptr, m_ptr, base, t0 + lanes, length, HAS_RLP)
        ds = _clamp(d, -SAFETY, SAFETY)
        n += tl.sum(tl.where(valid, mv, 0.0), axis=0).to(tl.float64)
        sum_d += tl.sum(tl.where(valid, d * mv, 0.0), axis=0).to(tl.float64)
        trl += tl.sum(tl.where(valid, _trl(d * mv), 0.0), axis=0).to(tl.float64)
        if HAS_RLP:
            ed = tl.exp(d)
            eds = tl.exp(ds)
            s_lp += tl.sum(tl.where(valid, a * mv, 0.0), axis=0).to(tl.float64)
            s_rlp += tl.sum(tl.where(valid, c * mv, 0.0), axis=0).to(tl.float64)
            s_kl += tl.sum(tl.where(valid, (c - a) * mv, 0.0), axis=0).to(tl.float64)
            s_k3u += tl.sum(tl.where(valid, ((ed - d) - 1.0) * mv, 0.0), axis=0).to(tl.float64)
            s_chi += tl.sum(tl.where(valid, (eds * eds) * mv, 0.0), axis=0).to(tl.float64)
    # sweep 2: the weights and their sums
    if PADDING == 1:
        row_log = trl.to(tl.float32)
    else:
        row_log = sum_d.to(tl.float32)
    gate = True
    if HAS_GATE:
        geo = tl.exp(sum_d.to(tl.float32) / n.to(tl.float32))
        gate = (geo >= gate_lo) & (geo <= gate_hi)
    if HAS_UPPER:
        up = upper
    else:
        up = float("inf")
    if HAS_LOWER:
        low_default = lower
    else:
        low_default = 1.0 / upper
    s_w = tl.zeros((), tl.float64)
    s_high = tl.zeros((), tl.float64)
    s_low = tl.zeros((), tl.float64)
    max_w = tl.full((), float("-inf"), tl.float32)
    min_w = tl.full((), float("inf"), tl.float32)
    s_wc = tl.zeros((), tl.float64)
    s_wc2 = tl.zeros((), tl.float64)
    s_oob = tl.zeros((), tl.float64)
    s_raw = tl.zeros((), tl.float64)
    for t0 in range(0, length, BLOCK):
        offs = t0 + lanes
        inb = offs < length
        mv, valid, a, c, d = _block(lp_ptr, rlp_ptr, m_ptr, base, offs, length, HAS_RLP)
        if LEVEL != 0:
            if LEVEL == 2:
                lw = tl.zeros((BLOCK,), tl.float32) + row_log
            elif PADDING == 1:
                lw = _trl(d * mv)
            else:
                lw = d
            if HAS_CLAMP:
                lw = _clamp(lw, -log_clamp, log_clamp)
            raw = tl.exp(lw)
            if PADDING == 0:
                raw = raw * mv
            w = raw
            if MODE == 0:
                if HAS_LOWER:
                    w = tl.where(w < lower, lower, w)
                if HAS_UPPER:
                    w = tl.where(w > upper, upper, w)
            elif MODE == 1:
                inside = raw == raw
                if HAS_LOWER:
                    inside = inside & (raw >= lower)
                if HAS_UPPER:
                    inside = inside & (raw <= upper)
                if PADDING == 2:
                    w = raw * tl.where(inside, 1.0, 0.0)
                else:
                    w = tl.where(inside, raw, 0.0)
            if HAS_GATE:
                w = tl.where(gate, w, w * 0.0)
            tl.store(w_ptr + base + offs, w, mask=inb)
            s_w += tl.sum(tl.where(valid, w * mv, 0.0), axis=0).to(tl.float64)
            s_high += tl.sum(tl.where(valid & (raw > up), mv, 0.0), axis=0).to(tl.float64)
            s_low += tl.sum(tl.where(valid & (raw < low_default), mv, 0.0), axis=0).to(tl.float64)
            max_w = _merge_max(max_w, _nan_max(w, valid))
            min_w = _merge_min(min_w, _nan_min(w, valid))
            wc = _clamp(w, 0.0, up)
            s_wc += tl.sum(tl.where(valid, wc * mv, 0.0), axis=0).to(tl.float64)
            s_wc2 += tl.sum(tl.where(valid, (wc * wc) * mv, 0.0), axis=0).to(tl.float64)
            if HAS_LOWER:
                s_oob += _wsum(valid & ((raw < lower) | (raw > up)), mv)
            s_raw += tl.sum(tl.where(valid, raw * mv, 0.0), axis=0).to(tl.float64)
    srow = s_ptr + row * _K_STATS  # formed here: a 64-bit pointer kept live through both sweeps spilled
    tl.store(srow + 0, n)
    tl.store(srow + 1, sum_d)
    tl.store(srow + 2, s_lp)
    tl.store(srow + 3, s_rlp)
    tl.store(srow + 4, s_kl)
    tl.store(srow + 5, s_k3u)
    tl.store(srow + 6, s_chi)
    tl.store(srow + 7, trl)
    tl.store(srow + 8, s_w)
    tl.store(srow + 9, s_high)
    tl.store(srow + 10, s_low)
    tl.store(srow + 11, max_w.to(tl.float64))
    tl.store(srow + 12, min_w.to(tl.float64))
    tl.store(srow + 13, s_wc)
    tl.store(srow + 14, s_wc2)
    tl.store(srow + 15, s_oob)
    tl.store(srow + 16, s_raw)
    tl.store(srow + 17, 0.0)  # rejected-token count and any-rejected flag: no options, none rejected
    tl.store(srow + 18, 0.0)


def _mask_arg(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def rollout_correction_fwd(log_prob, rollout_log_prob, mask, level: int, mode: int, padding: int,
                           lower: float, upper: float, log_clamp: float, gate_lo: float, gate_hi: float,
                           rs_codes, rs_lo, rs_hi, weights, new_mask, stats) -> None:
    """The arguments of csrc/rollout_correction.cpp's rollout_correction_fwd (NaN for an absent bound,
    None for an absent tensor), with no rejection options (see the module docstring)."""
    if len(rs_codes) or new_mask is not None:
        raise ValueError("the Triton rollout_correction kernel takes no rejection options; "
                         "rlkern.ops.rollout_correction runs such calls through its torch path")
    rows, length = log_prob.shape
    if rows == 0:
        return
    isnan = lambda x: x != x  # noqa: E731
    _rc_kernel[(rows,)](
        log_prob, log_prob if rollout_log_prob is None else rollout_log_prob, _mask_arg(mask),
        log_prob if weights is None else weights, stats, length,
        0.0 if isnan(lower) else lower, 1.0 if isnan(upper) else upper,
        0.0 if isnan(log_clamp) else log_clamp,
        0.0 if isnan(gate_lo) else gate_lo, 0.0 if isnan(gate_hi) else gate_hi,
        LEVEL=level, MODE=mode, PADDING=padding, HAS_RLP=rollout_log_prob is not None,
        HAS_LOWER=not isnan(lower), HAS_UPPER=not isnan(upper), HAS_CLAMP=not isnan(log_clamp),
        HAS_GATE=not isnan(gate_lo), BLOCK=BLOCK, num_warps=8)
