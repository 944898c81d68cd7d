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
    (0 without them) and d = a - c (a itself without them), all fp32 whatever the storage dtype."""
    inb = offs < length
    mv = tl.load(m_ptr + base + offs, mask=inb, other=0).to(tl.float32)
    a = tl.load(lp_ptr + base + offs, mask=inb, other=0.0).to(tl.float32)
    if HAS_RLP:
        c = tl.load(rlp_ptr + base + offs, mask=inb, other=0.0).to(tl.float32)
        d = a - c
    else:
        c = tl.zeros_like(a)
        d = a
    return mv, mv != 0, a, c, d


@triton.jit
def _row_terms(n, sum_d, trl, gate_lo, gate_hi, PADDING: tl.constexpr, HAS_GATE: tl.constexpr):
    """The row's log-weight (level 2: TRL's sum of nan_to_num(m d), else the masked sum of d) and
    OpenRLHF's row gate (its geometric-mean ratio within [gate_lo, gate_hi]; True without a gate)."""
    if PADDING == 1:
        row_log = trl.to(tl.float32)
    else:
        row_log = sum_d.to(tl.float32)
    gate = True
    if HAS_GATE:
        geo = tl.exp(sum_d.to(tl.float32) / n.to(tl.float32))
        gate = (geo >= gate_lo) & (geo <= gate_hi)
    return row_log, gate


@triton.jit
def _weights(d, mv, row_log, gate, lower, upper, log_clamp, LEVEL: tl.constexpr, MODE: tl.constexpr,
             PADDING: tl.constexpr, HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_CLAMP: tl.constexpr,
             HAS_GATE: tl.constexpr):
    """The raw and final weights of one block (level 1 token, 2 sequence: the row's log-weight
    ``row_log``), as sweep 2 of csrc/rollout_correction.cpp's kernel."""
    if LEVEL == 2:
        lw = tl.zeros_like(d) + row_log
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
    return raw, w


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
    row_log, gate = _row_terms(n, sum_d, trl, gate_lo, gate_hi, PADDING, HAS_GATE)
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
            raw, w = _weights(d, mv, row_log, gate, lower, upper, log_clamp, LEVEL, MODE, PADDING, HAS_LOWER,
                              HAS_UPPER, HAS_CLAMP, HAS_GATE)
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


# ------------------------------------------------------------------------------------------------
# The weights alone (csrc/rollout_correction.cpp's rollout_weights_fwd): without a row statistic one
# program per block of WEIGHTS_BLOCK tokens of a row (an elementwise kernel); with one (level 2, the
# row gate) one program per row, sweeping it twice.
# ------------------------------------------------------------------------------------------------

WEIGHTS_BLOCK = 1024


@triton.jit
def _rw_kernel(lp_ptr, rlp_ptr, m_ptr, w_ptr, length, lower, upper, log_clamp, gate_lo, gate_hi,
               LEVEL: tl.constexpr, MODE: tl.constexpr, PADDING: tl.constexpr, HAS_RLP: tl.constexpr,
               HAS_LOWER: tl.constexpr, HAS_UPPER: tl.constexpr, HAS_CLAMP: tl.constexpr,
               HAS_GATE: tl.constexpr, ROW_PASS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * length
    lanes = tl.arange(0, BLOCK)
    if ROW_PASS:
        n = tl.zeros((), tl.float64)
        sum_d = tl.zeros((), tl.float64)
        trl = tl.zeros((), tl.float64)
        for t0 in range(0, length, BLOCK):
            mv, valid, a, c, d = _block(lp_ptr, rlp_ptr, m_ptr, base, t0 + lanes, length, HAS_RLP)
            n += tl.sum(mv.to(tl.float64), axis=0)  # fp64 sums: the row statistic decides the whole row
            sum_d += tl.sum(tl.where(valid, d * mv, 0.0).to(tl.float64), axis=0)
            trl += tl.sum(_trl(d * mv).to(tl.float64), axis=0)
        row_log, gate = _row_terms(n, sum_d, trl, gate_lo, gate_hi, PADDING, HAS_GATE)
        for t0 in range(0, length, BLOCK):
            offs = t0 + lanes
            mv, valid, a, c, d = _block(lp_ptr, rlp_ptr, m_ptr, base, offs, length, HAS_RLP)
            raw, w = _weights(d, mv, row_log, gate, lower, upper, log_clamp, LEVEL, MODE, PADDING, HAS_LOWER,
                              HAS_UPPER, HAS_CLAMP, HAS_GATE)
            tl.store(w_ptr + base + offs, w, mask=offs < length)
    else:
        offs = tl.program_id(1) * BLOCK + lanes
        mv, valid, a, c, d = _block(lp_ptr, rlp_ptr, m_ptr, base, offs, length, HAS_RLP)
        raw, w = _weights(d, mv, 0.0, True, lower, upper, log_clamp, LEVEL, MODE, PADDING, HAS_LOWER,
                          HAS_UPPER, HAS_CLAMP, HAS_GATE)
        tl.store(w_ptr + base + offs, w, mask=offs < length)


def rollout_weights_fwd(log_prob, rollout_log_prob, mask, level: int, mode: int, padding: int, lower: float,
                        upper: float, log_clamp: float, gate_lo: float, gate_hi: float, weights) -> None:
    """The arguments of csrc/rollout_correction.cpp's rollout_weights_fwd (NaN for an absent bound, None
    for absent rollout log-probs; log-probs of any kernel dtype)."""
    rows, length = log_prob.shape
    if rows == 0 or length == 0:
        return
    isnan = lambda x: x != x  # noqa: E731
    row_pass = level == 2 or not isnan(gate_lo)
    block = BLOCK if row_pass else WEIGHTS_BLOCK
    grid = (rows,) if row_pass else (rows, triton.cdiv(length, block))
    _rw_kernel[grid](
        log_prob, log_prob if rollout_log_prob is None else rollout_log_prob, _mask_arg(mask), weights,
        length, 0.0 if isnan(lower) else lower, 1.0 if isnan(upper) else upper,
        0.0 if isnan(log_clamp) else log_clamp,
        0.0 if isnan(gate_lo) else gate_lo, 0.0 if isnan(gate_hi) else gate_hi,
        LEVEL=level, MODE=mode, PADDING=padding, HAS_RLP=rollout_log_prob is not None,
        HAS_LOWER=not isnan(lower), HAS_UPPER=not isnan(upper), HAS_CLAMP=not isnan(log_clamp),
        HAS_GATE=not isnan(gate_lo), ROW_PASS=row_pass, BLOCK=block, num_warps=8 if row_pass else 4)


# ------------------------------------------------------------------------------------------------
# The trust-region gate (csrc/rollout_correction.cpp's trust_region_fwd: verl's DPPO, OpenRLHF's
# binary_kl / tv gating), one program per row: the weights and the row's three float64 sums.
# ------------------------------------------------------------------------------------------------


@triton.jit
def _orl_stat(x, y, DIVERGENCE: tl.constexpr):
    """OpenRLHF's divergence between the sampling (y) and training (x) token probabilities."""
    p = _clamp(tl.exp(y), 1e-6, 1.0 - 1e-6)
    q = _clamp(tl.exp(x), 1e-6, 1.0 - 1e-6)
    if DIVERGENCE == 0:
        return tl.abs(p - q)
    return p * tl.log(p / q) + (1.0 - p) * tl.log((1.0 - p) / (1.0 - q))


@triton.jit
def _tr_kernel(x_ptr, y_ptr, adv_ptr, m_ptr, w_ptr, s_ptr, length, low, high, clip_c,
               CONVENTION: tl.constexpr, DIVERGENCE: tl.constexpr, LEVEL: tl.constexpr,
               ADV_PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * length
    lanes = tl.arange(0, BLOCK)
    n = tl.zeros((), tl.float64)
    s1 = tl.zeros((), tl.float64)
    s2 = tl.zeros((), tl.float64)
    keep_row = True
    if CONVENTION == 1 and LEVEL == 2:  # the row's mean statistic first
        for t0 in range(0, length, BLOCK):
            mv, valid, x, y, d = _block(x_ptr, y_ptr, m_ptr, base, t0 + lanes, length, True)
            n += tl.sum(mv.to(tl.float64), axis=0)
            part = tl.where(t0 + lanes < length, _orl_stat(x, y, DIVERGENCE) * mv, 0.0)
            s1 += tl.sum(part.to(tl.float64), axis=0)
        stat = s1.to(tl.float32) / n.to(tl.float32)
        keep_row = (stat >= low) & (stat <= high)
        s2 = tl.where(keep_row, 0.0, 1.0).to(tl.float64)
    for t0 in range(0, length, BLOCK):
        offs = t0 + lanes
        inb = offs < length
        mv, valid, x, y, d = _block(x_ptr, y_ptr, m_ptr, base, offs, length, True)
        if CONVENTION == 0:
            ratio = tl.exp(_clamp(d, -SAFETY, SAFETY))
            px = tl.exp(x)
            py = tl.exp(y)
            if DIVERGENCE == 0:
                ok_pos = (px - py) <= high
                ok_neg = (px - py) >= -low
            else:
                bkl = py * (y - x) + (1.0 - py) * tl.log(((1.0 - py) + 1e-8) / ((1.0 - px) + 1e-8))
                ok_pos = (bkl <= high) | (px <= py)
                ok_neg = (bkl <= low) | (px >= py)
            if ADV_PER_ROW:
                a = tl.load(adv_ptr + row)
            else:
                a = tl.load(adv_ptr + base + offs, mask=inb, other=0.0)
            ok = tl.where(a > 0.0, ok_pos, ok_neg)
            v = tl.where(ok, 1.0, 0.0)
            w = tl.where(ratio > clip_c, clip_c, ratio) * v
            n += tl.sum(mv, axis=0).to(tl.float64)
            s1 += _wsum(valid, (1.0 - v) * mv)
            s2 += _wsum(valid & (ratio > clip_c), v * mv)
        else:
            token_is = tl.exp(d)
            if LEVEL == 2:
                w = tl.where(keep_row, token_is, 0.0)
            else:
                s = _orl_stat(x, y, DIVERGENCE)
                keep = (s >= low) & (s <= high)
                w = tl.where(keep, token_is, 0.0)
                n += tl.sum(mv, axis=0).to(tl.float64)
                s1 += _wsum(inb, tl.where(keep, 0.0, 1.0) * mv)
        tl.store(w_ptr + base + offs, w, mask=inb)
    srow = s_ptr + row * 3
    tl.store(srow + 0, n)
    tl.store(srow + 1, s1)
    tl.store(srow + 2, s2)


def trust_region_fwd(logp, ref_logp, advantages, mask, convention: int, divergence: int, level: int,
                     low: float, high: float, clip_c: float, weights, stats) -> None:
    """The arguments of csrc/rollout_correction.cpp's trust_region_fwd."""
    rows, length = logp.shape
    if rows == 0:
        return
    per_row = advantages is not None and advantages.shape[1] == 1 and length != 1
    _tr_kernel[(rows,)](
        logp, ref_logp, logp if advantages is None else advantages, _mask_arg(mask), weights, stats, length,
        low, high, clip_c, CONVENTION=convention, DIVERGENCE=divergence, LEVEL=level, ADV_PER_ROW=per_row,
        BLOCK=BLOCK, num_warps=8)
