"""Rollout/training mismatch correction, the Triton kernel: same entry point, arguments and per-row
statistics layout as csrc/rollout_correction.cpp (see there). One program per row sweeps it twice in
blocks of BLOCK tokens: the row's sums (count, Σd, off-policy sums, each rejection option's token
statistic), then the weights, the combined keep flag and the new mask in the mask's dtype. The
per-option sums live in NOPT_P-wide vectors (one lane per option). Block sums are fp32 and the row
totals fp64. NaN propagates: a block max / min with a NaN valid element is NaN (the GPU's max would
drop it). BLOCK = 512: at 1024, 15 of the 240 specs tests/gpu_compile builds spilled 8-24 B; at 512,
2 (sm_90, 8 B); 256 and int32 option codes were worse.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 512
K_BASE, K_PER_OPTION = 19, 8
FLT_MAX = tl.constexpr(3.4028234663852886e38)
SAFETY = tl.constexpr(20.0)
EPS = tl.constexpr(1e-8)


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
def _stat(kind, ds):
    return tl.where(kind == 1, -ds, tl.where(kind == 2, 0.5 * (ds * ds), (tl.exp(ds) - 1.0) - ds))


@triton.jit
def _trl(x):
    x = tl.where(x != x, 0.0, x)
    return tl.where(x == float("inf"), FLT_MAX, tl.where(x == float("-inf"), -FLT_MAX, x))


@triton.jit
def _clamp(x, lo, hi):
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _keep(kind, v, lo, hi):
    return tl.where(kind == 1, (v >= lo) & (v <= hi), v <= hi)


@triton.jit
def _rc_kernel(lp_ptr, rlp_ptr, m_ptr, w_ptr, out_ptr, s_ptr, codes_ptr, lo_ptr, hi_ptr, length,
               lower, upper, log_clamp, gate_lo, gate_hi,
               LEVEL: tl.constexpr, MODE: tl.constexpr, PADDING: tl.constexpr, HAS_RLP: tl.constexpr,
               HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_CLAMP: tl.constexpr,
               HAS_GATE: tl.constexpr, NOPT: tl.constexpr, NOPT_P: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * length
    K: tl.constexpr = 19 + 8 * NOPT
    srow = s_ptr + row * K
    lanes = tl.arange(0, BLOCK)
    jj = tl.arange(0, NOPT_P)
    live_opt = jj < NOPT
    codes = tl.load(codes_ptr + jj, mask=live_opt, other=0)
    olo = tl.load(lo_ptr + jj, mask=live_opt, other=0.0)
    ohi = tl.load(hi_ptr + jj, mask=live_opt, other=0.0)
    n = tl.zeros((), tl.float64)
    sum_d = tl.zeros((), tl.float64)
    trl = tl.zeros((), tl.float64)
    s_lp = tl.zeros((), tl.float64)
    s_rlp = tl.zeros((), tl.float64)
    s_kl = tl.zeros((), tl.float64)
    s_k3u = tl.zeros((), tl.float64)
    s_chi = tl.zeros((), tl.float64)
    o_sum = tl.zeros((NOPT_P,), tl.float64)
    o_max = tl.full((NOPT_P,), float("-inf"), tl.float32)
    o_min = tl.full((NOPT_P,), float("inf"), tl.float32)
    o_high = tl.zeros((NOPT_P,), tl.float64)
    o_low = tl.zeros((NOPT_P,), tl.float64)
    o_c = tl.zeros((NOPT_P,), tl.float64)
    o_c2 = tl.zeros((NOPT_P,), tl.float64)
    o_rej = tl.zeros((NOPT_P,), tl.float64)
    # sweep 1: the row's sums over its valid tokens
    for t0 in range(0, length, BLOCK):
        offs = t0 + lanes
        inb = offs < length
        mv = tl.load(m_ptr + base + offs, mask=inb, other=0).to(tl.float32)
        valid = mv != 0
        a = tl.load(lp_ptr + base + offs, mask=inb, other=0.0)
        if HAS_RLP:
            c = tl.load(rlp_ptr + base + offs, mask=inb, other=0.0)
            d = a - c
        else:
            d = a
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
        for j in tl.static_range(NOPT):
            code = tl.load(codes_ptr + j)
            kind = code % 10
            lo = tl.load(lo_ptr + j).to(tl.float32)
            hi = tl.load(hi_ptr + j).to(tl.float32)
            k = _stat(kind, ds)
            here = jj == j
            o_sum += tl.where(here, tl.sum(tl.where(valid, k * mv, 0.0), axis=0).to(tl.float64), 0.0)
            o_max = tl.where(here, _merge_max(o_max, _nan_max(k, valid)), o_max)
            o_min = tl.where(here, _merge_min(o_min, _nan_min(k, valid)), o_min)
            if code // 10 == 0:
                cl = _clamp(k, lo, hi)
                rej = valid & ~_keep(kind, k, lo, hi)
                o_high += tl.where(here, _wsum(valid & (k > hi), mv), 0.0)
                o_low += tl.where(here, _wsum(valid & (k < lo), mv), 0.0)
                o_c += tl.where(here, _wsum(valid, cl * mv), 0.0)
                o_c2 += tl.where(here, _wsum(valid, (cl * cl) * mv), 0.0)
                o_rej += tl.where(here, _wsum(rej, mv), 0.0)
    # each sequence-level option's keep flag for the row
    agg = codes // 10
    seq_max = tl.where(o_max == float("-inf"), 0.0, o_max.to(tl.float64))
    seq_val = tl.where(agg == 1, o_sum, tl.where(agg == 2, o_sum / (n + EPS), seq_max))
    row_keep = (agg == 0) | _keep(codes % 10, seq_val, olo, ohi) | ~live_opt
    o_rej = tl.where(agg == 0, o_rej, tl.where(row_keep, 0.0, n))
    seq_keep_all = tl.min(tl.where(row_keep | (agg == 0), 1, 0), axis=0) > 0
    # sweep 2: weights, the combined keep flag and the new mask
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
    s_rej = tl.zeros((), tl.float64)
    any_rej = tl.zeros((), tl.int32)
    for t0 in range(0, length, BLOCK):
        offs = t0 + lanes
        inb = offs < length
        mraw = tl.load(m_ptr + base + offs, mask=inb, other=0)
        mv = mraw.to(tl.float32)
        valid = mv != 0
        a = tl.load(lp_ptr + base + offs, mask=inb, other=0.0)
        if HAS_RLP:
            d = a - tl.load(rlp_ptr + base + offs, mask=inb, other=0.0)
        else:
            d = a
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
        if NOPT > 0:
            ds = _clamp(d, -SAFETY, SAFETY)
            keep = valid & seq_keep_all
            for j in tl.static_range(NOPT):
                code = tl.load(codes_ptr + j)
                if code // 10 == 0:
                    kind = code % 10
                    lo = tl.load(lo_ptr + j).to(tl.float32)
                    hi = tl.load(hi_ptr + j).to(tl.float32)
                    keep = keep & _keep(kind, _stat(kind, ds), lo, hi)
            rejected = valid & ~keep
            s_rej += tl.sum(tl.where(rejected, mv, 0.0), axis=0).to(tl.float64)
            any_rej = tl.maximum(any_rej, tl.max(rejected.to(tl.int32), axis=0))
            tl.store(out_ptr + base + offs, tl.where(keep, mraw, 0).to(mraw.dtype), mask=inb)
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
    tl.store(srow + 17, s_rej)
    tl.store(srow + 18, any_rej.to(tl.float64))
    if NOPT > 0:
        o = srow + 19 + jj * 8
        tl.store(o + 0, o_sum, mask=live_opt)
        tl.store(o + 1, o_max.to(tl.float64), mask=live_opt)
        tl.store(o + 2, o_min.to(tl.float64), mask=live_opt)
        tl.store(o + 3, o_high, mask=live_opt)
        tl.store(o + 4, o_low, mask=live_opt)
        tl.store(o + 5, o_c, mask=live_opt)
        tl.store(o + 6, o_c2, mask=live_opt)
        tl.store(o + 7, o_rej, mask=live_opt)


def _mask_arg(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def rollout_correction_fwd(log_prob, rollout_log_prob, mask, level: int, mode: int, padding: int,
                           lower: float, upper: float, log_clamp: float, gate_lo: float, gate_hi: float,
                           rs_codes, rs_lo, rs_hi, weights, new_mask, stats) -> None:
    """The arguments of csrc/rollout_correction.cpp's rollout_correction_fwd (NaN for an absent bound,
    None for an absent tensor); the option lists become small device tensors."""
    rows, length = log_prob.shape
    if rows == 0:
        return
    nopt = len(rs_codes)
    dev = log_prob.device
    codes = torch.tensor(list(rs_codes) or [0], dtype=torch.int64, device=dev)
    lows = torch.tensor(list(rs_lo) or [0.0], dtype=torch.float64, device=dev)
    highs = torch.tensor(list(rs_hi) or [0.0], dtype=torch.float64, device=dev)
    isnan = lambda x: x != x  # noqa: E731
    m = _mask_arg(mask)
    _rc_kernel[(rows,)](
        log_prob, log_prob if rollout_log_prob is None else rollout_log_prob, m,
        log_prob if weights is None else weights, m if new_mask is None else _mask_arg(new_mask), stats,
        codes, lows, highs, length,
        0.0 if isnan(lower) else lower, 1.0 if isnan(upper) else upper,
        0.0 if isnan(log_clamp) else log_clamp,
        0.0 if isnan(gate_lo) else gate_lo, 0.0 if isnan(gate_hi) else gate_hi,
        LEVEL=level, MODE=mode, PADDING=padding, HAS_RLP=rollout_log_prob is not None,
        HAS_LOWER=not isnan(lower), HAS_UPPER=not isnan(upper), HAS_CLAMP=not isnan(log_clamp),
        HAS_GATE=not isnan(gate_lo), NOPT=nopt, NOPT_P=max(1, triton.next_power_of_2(max(nopt, 1))),
        BLOCK=BLOCK, num_warps=4)
