"""PPO / GRPO policy losses and the clipped value loss: Triton kernels (one program per row of T tokens).

Same maths and data flow as csrc/losses.cpp: the forward kernel writes per-row partial sums (loss,
valid count, clip counters, KL sums) in fp32, a one-program combine kernel reduces them in a fixed
order into the loss, the stats and one aggregation scale per row; the backward kernel writes
d x = grad * scale_row * w * d l / d x. Ties in max / min / clamp share the gradient exactly as
torch.maximum / torch.minimum / torch.clamp do. The dual clip is compiled in only when it is on
(HAS_DUAL), so -A * inf never produces a NaN to be discarded.

NaN (issue 9), as rlkern.reference and the C++ kernels: every clamp and max propagates NaN
(tl.maximum / tl.minimum default to returning the non-NaN operand), so a NaN in any input of a valid
token makes its loss and gradient NaN; a clip / dual flag of a token whose clipped surrogate is NaN
counts as NaN (a comparison with NaN is False, which would count the token as unclipped). Masked-out
tokens never contribute: every sum selects with tl.where, never multiplies by the mask.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from rlkern.codes import LOSS_KINDS, LOSS_STATS, LOSS_VARIANTS, RATIO_LEVELS

# Per-row partial sums: loss, count, then the first six of the LOSS_STATS stats: clipped, clip_high,
# clip_low, dual, -log r, k3 (the combine kernel adds the last two: clip_high + clip_low, and 0).
N_PARTIALS = 8
assert LOSS_STATS == 6 + 2  # the combine kernel writes six sums and the two derived stats
# The kinds (rlkern/codes.py) as constexpr globals. GRPO_BC: grpo with the KL term weighted by the
# importance ratio (TRL's use_bias_correction_kl).
POLICY = tl.constexpr(LOSS_KINDS["policy"])
GRPO = tl.constexpr(LOSS_KINDS["grpo"])
VALUE = tl.constexpr(LOSS_KINDS["value"])
GRPO_BC = tl.constexpr(LOSS_KINDS["grpo_bc"])
# The per-token surrogates and importance-ratio levels (rlkern/codes.py; csrc/losses.cpp's header).
PPO = tl.constexpr(LOSS_VARIANTS["ppo"])
CISPO = tl.constexpr(LOSS_VARIANTS["cispo"])
CISPO_CAP = tl.constexpr(LOSS_VARIANTS["cispo_cap"])
SAPO = tl.constexpr(LOSS_VARIANTS["sapo"])
GPG = tl.constexpr(LOSS_VARIANTS["gpg"])
VESPO = tl.constexpr(LOSS_VARIANTS["vespo"])
GMPO = tl.constexpr(LOSS_VARIANTS["gmpo"])
DRO = tl.constexpr(LOSS_VARIANTS["dro"])
# vespo: TRL get_gamma_weights clamps log w to [log(1e-8), 20] (a float32 bound).
LOG_W_MIN = tl.constexpr(math.log(1e-8))
FLT_MAX = tl.constexpr(3.4028234663852886e38)
TOKEN = tl.constexpr(RATIO_LEVELS["token"])
SEQUENCE = tl.constexpr(RATIO_LEVELS["sequence"])
LEVELS = RATIO_LEVELS


@triton.jit
def _max_share(a, b):
    """torch.maximum(a, b)'s backward share for a: 1 if a > b, 1/2 on a tie, else 0."""
    return tl.where(a > b, 1.0, tl.where(a == b, 0.5, 0.0))


@triton.jit
def _max_nan(a, b):
    """torch.maximum: NaN if either operand is NaN."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _clamp_nan(x, lo, hi):
    """torch.clamp: NaN if x or a bound is NaN."""
    low = tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(low, hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _flag(cond, probe):
    """cond as 1.0 / 0.0, or NaN where probe (the clipped surrogate) is NaN."""
    return tl.where(probe != probe, probe, tl.where(cond, 1.0, 0.0))  # noqa: PLR0124 (a NaN test)


@triton.jit
def _sigmoid2(z):
    """(sigmoid(z), 1 - sigmoid(z)), stable for any z (e = e^-|z| <= 1); NaN z gives NaN."""
    e = tl.exp(-tl.abs(z))
    inv = 1.0 / (1.0 + e)
    pos = z >= 0.0
    return tl.where(pos, inv, e * inv), tl.where(pos, e * inv, inv)


@triton.jit
def _gmpo_m(d, a, glo, ghi):
    """verl compute_policy_loss_geo_mean's sign-aware clip of d = logp - old (csrc/losses.cpp gmpo_m):
    (m, d m / d d, d outside [glo, ghi]); m = min(d, ghi) where A > 0, max(d, glo) where A < 0, 0 d
    where A == 0, NaN where A is."""
    above = d > ghi
    below = d < glo
    m = tl.where(a > 0.0, tl.where(above, ghi, d),
                 tl.where(a < 0.0, tl.where(below, glo, d), tl.where(a == a, 0.0 * d, a)))  # noqa: PLR0124
    dm = tl.where(a > 0.0, tl.where(above, 0.0, 1.0), tl.where(a < 0.0, tl.where(below, 0.0, 1.0), 0.0))
    return m, dm, above | below


@triton.jit
def _vespo_phi(log_w, k, lam):
    """exp(lam + k log w - lam w), NaN / +-inf -> 0 (TRL's nan_to_num(0, 0, 0))."""
    phi = tl.exp(lam + k * log_w - lam * tl.exp(log_w))
    return tl.where(tl.abs(phi) <= FLT_MAX, phi, 0.0)


@triton.jit
def _row_extra(x_ptr, y_ptr, a_ptr, m_ptr, rin_ptr, row, base, length, glo, ghi, vk_pos, vl_pos, vk_neg,
               vl_neg,
               A_PER_ROW: tl.constexpr, HAS_RIN: tl.constexpr, VARIANT: tl.constexpr, BLOCK: tl.constexpr):
    """vespo's / gmpo's first sweep of a row (csrc/losses.cpp row_extra): (phi for A >= 0, phi for
    A < 0, gmpo's row loss, gmpo's d loss_b / d m_t)."""
    acc = tl.zeros([BLOCK], tl.float32)
    acc_a = tl.zeros([BLOCK], tl.float32)
    acc_n = tl.zeros([BLOCK], tl.float32)
    for start in range(0, length, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        # The policy kind's loads without weights: x, y, a and the mask (x_ptr stands in for ref / weights).
        x, y, a, _z, _w, valid = _load_row(x_ptr, y_ptr, a_ptr, x_ptr, x_ptr, m_ptr, row, base, offs,
                                           offs < length, POLICY, A_PER_ROW, False)
        if VARIANT == VESPO:
            acc += tl.where(valid, _clamp_nan(x - y, -20.0, 20.0), 0.0)
        else:
            m, _dm, _clipped = _gmpo_m(x - y, a, glo, ghi)
            acc += tl.where(valid, m, 0.0)
            acc_a += tl.where(valid, a, 0.0)
            acc_n += tl.where(valid, 1.0, 0.0)
    rin = 0.0
    if HAS_RIN:
        rin = tl.load(rin_ptr + row)
    s = tl.sum(acc, axis=0)
    phi_pos = s * 0.0
    phi_neg = s * 0.0
    gm_loss = s * 0.0
    gm_coef = s * 0.0
    if VARIANT == VESPO:
        log_w = _clamp_nan(s + rin, LOG_W_MIN, 20.0)
        phi_pos = _vespo_phi(log_w, vk_pos, vl_pos)
        phi_neg = _vespo_phi(log_w, vk_neg, vl_neg)
    else:
        n = tl.sum(acc_n, axis=0) + 1e-8
        gm_loss = -(tl.sum(acc_a, axis=0) / n) * tl.exp(s / n)
        if HAS_RIN:
            gm_loss = gm_loss * tl.exp(rin)
        gm_coef = gm_loss / n
    return phi_pos, phi_neg, gm_loss, gm_coef


@triton.jit
def _row_ratio(s, LEVEL: tl.constexpr):
    """(log r_b, pass, through_mean) from the row's masked mean log-ratio s (csrc/losses.cpp
    row_from_mean): sequence: clamp(s, -20, 20), the gradient through the mean unless the clamp acts
    (NaN flows); sequence_token: min(s, 10) (verl compute_policy_loss_gspo), per-token pass s <= 10."""
    if LEVEL == SEQUENCE:
        lr = _clamp_nan(s, -20.0, 20.0)
        through = ~((s < -20.0) | (s > 20.0))
        lr_pass = 0.0
    else:
        lr = tl.where(s > 10.0, 10.0, s)
        through = s != s  # noqa: PLR0124 (False: the gradient is per token)
        lr_pass = tl.where(s <= 10.0, 1.0, 0.0)
    return lr, lr_pass, through


@triton.jit
def _terms(x, y, a, z, lo, hi, dual, beta, vclip, cap, delta, tau_pos, tau_neg, row_lr, row_pass, glo,
           phi_pos, phi_neg, gm_coef, KIND: tl.constexpr, HAS_DUAL: tl.constexpr, VARIANT: tl.constexpr,
           LEVEL: tl.constexpr):
    """Per-token (loss, d loss / d x, d loss / d log r, clipped, clip_high, clip_low, dual, -log r, k3,
    beta d k3 / d x, beta d k3 / d log r) for 16+ lanes: the loss and its gradients without the KL
    term, which is added after the per-token weight (TRL weights the surrogate, not the KL): the
    token's loss is w * loss + beta * k3. d loss / d x already holds the part through log r that the
    level routes per token (token, sequence_token); d loss / d log r (NaN where the loss is) is what
    the sequence level sums over the row (the gradient through the row mean)."""
    zero = tl.zeros_like(x)
    if KIND == VALUE:  # x = v, y = v_old, a = returns
        vlo = y - vclip
        vhi = y + vclip
        vc = _clamp_nan(x, vlo, vhi)
        vc_pass = tl.where((x >= vlo) & (x <= vhi), 1.0, 0.0)
        e1 = x - a
        e2 = vc - a
        l1 = e1 * e1
        l2 = e2 * e2
        a1 = _max_share(l1, l2)
        loss = 0.5 * _max_nan(l1, l2)
        # The clamp's pass is a select (torch.clamp's backward): an infinite old value or return gives
        # 0 there, not 0 * inf = NaN. A NaN token's gradient is NaN.
        grad = a1 * e1 + tl.where(vc_pass != 0.0, (1.0 - a1) * e2, 0.0)
        grad = tl.where(loss != loss, loss, grad)  # noqa: PLR0124 (a NaN test)
        return loss, grad, zero, _flag(l2 > l1, loss), zero, zero, zero, zero, zero, zero, zero
    else:  # policy / grpo: x = logp, y = old_logp, a = advantage, z = ref_logp
        if LEVEL == TOKEN:
            lr_raw = x - y
            lr = _clamp_nan(lr_raw, -20.0, 20.0)
            lr_pass = tl.where((lr_raw >= -20.0) & (lr_raw <= 20.0), 1.0, 0.0)
            nlr = -lr
        else:  # the row's ratio (verl gspo's ppo_kl: the unclamped token log-ratio)
            lr = zero + row_lr
            lr_pass = zero + row_pass
            nlr = y - x
        ratio = tl.exp(lr)
        negative = a < 0.0
        dual_on = negative & (a != a)  # all False
        high_on = dual_on
        low_on = dual_on
        clipped_on = dual_on
        dgrad = zero
        rgrad = zero
        high_val = zero  # vespo: phi itself, reported in the clip_high slot (never NaN)
        if VARIANT == PPO:
            # verl compute_policy_loss_vanilla; TRL _compute_loss's delta: coef_1 = clamp(coef_1, max=delta)
            r1 = tl.where(ratio > delta, delta, ratio)
            r1_pass = tl.where(ratio > delta, 0.0, 1.0)
            rc = _clamp_nan(ratio, lo, hi)
            rc_pass = tl.where((ratio >= lo) & (ratio <= hi), 1.0, 0.0)
            pg1 = -a * r1
            pg2 = -a * rc
            a1 = _max_share(pg1, pg2)
            clip1 = _max_nan(pg1, pg2)
            d_clip1 = -a * (a1 * r1_pass + (1.0 - a1) * rc_pass)
            loss = clip1
            rgrad = d_clip1 * ratio
            if HAS_DUAL:  # A < 0 only: min(clip1, -A c)
                pg3 = -a * dual
                b1 = _max_share(pg3, clip1)  # torch.minimum's share for clip1
                loss = tl.where(negative & (pg3 < clip1), pg3, clip1)
                rgrad = tl.where(negative, b1, 1.0) * rgrad
                dual_on = negative & (clip1 > pg3)
            high_on = (r1 > hi) & (a > 0.0)
            low_on = (r1 < lo) & negative
            clipped_on = pg2 > pg1
            probe = clip1
        elif VARIANT == SAPO:
            # verl compute_policy_loss_sapo == TRL loss_type="sapo"
            pos = a > 0.0
            tau = tl.where(pos, tau_pos, tau_neg)
            s, s1 = _sigmoid2(tau * (ratio - 1.0))
            loss = -(s * (4.0 / tau)) * a
            rgrad = -a * 4.0 * s * s1 * ratio
            probe = loss
        elif VARIANT == GPG:  # verl compute_policy_loss_gpg
            loss = x * -a
            dgrad = -a
            probe = loss
        elif VARIANT == VESPO:  # TRL loss_type="vespo": -sg(phi) A logp, (k, lambda) by A >= 0
            phi = tl.where(a >= 0.0, phi_pos, phi_neg)
            loss = -phi * a * x
            dgrad = -phi * a
            high_val = phi
            probe = phi
        elif VARIANT == GMPO:  # verl geo_mean: the row's loss comes from _row_extra; 0 per token
            m, dm, clipped = _gmpo_m(x - y, a, glo, cap)
            loss = zero
            dgrad = gm_coef * dm
            clipped_on = clipped & (a > 0.0)
            dual_on = clipped & negative
            probe = m
            nlr = y - x
        elif VARIANT == DRO:  # verl compute_policy_loss_dro, the log-ratio unclamped
            d = x - y
            loss = x * -a + 0.5 * beta * d * d
            dgrad = -a + beta * d
            probe = loss
            nlr = y - x
        else:  # CISPO (verl, clamp(r, lo, hi)) or CISPO_CAP (TRL, clamp(r, max=epsilon_high)), detached
            if VARIANT == CISPO:
                c = _clamp_nan(ratio, lo, hi)
                clipped_on = c != ratio
            else:
                c = tl.where(ratio > cap, cap, ratio)
                clipped_on = (ratio > cap) & (a > 0.0)
                high_on = clipped_on
            loss = -c * a * x
            dgrad = -c * a
            probe = loss
        rgrad = tl.where(loss != loss, loss, rgrad)  # noqa: PLR0124 (a NaN token's gradient is NaN)
        # The per-token route (a select, as torch.clamp's backward), then the NaN rule again.
        grad = dgrad + tl.where(lr_pass != 0.0, rgrad, 0.0)
        grad = tl.where(loss != loss, loss, grad)  # noqa: PLR0124
        k3 = zero
        kl_grad = zero
        kl_r = zero
        if (KIND == GRPO) or (KIND == GRPO_BC):
            d_raw = z - x
            d = _clamp_nan(d_raw, -20.0, 20.0)
            d_pass = tl.where((d_raw >= -20.0) & (d_raw <= 20.0), 1.0, 0.0)
            ed = tl.exp(d)
            k3 = ed - d - 1.0
            d_k3 = (1.0 - ed) * d_pass
            # grpo_bc: k3 r, d/d logp = d_k3 r + k3 r d log r; the stat reports k3 r, as TRL's `kl`
            if KIND == GRPO_BC:
                kl_grad = beta * (d_k3 * ratio + k3 * ratio * lr_pass)
                kl_r = beta * (k3 * ratio)
                k3 = k3 * ratio
            else:
                kl_grad = beta * d_k3
        if VARIANT == VESPO:
            high = high_val
        else:
            high = _flag(high_on, probe)
        return (loss, grad, rgrad, _flag(clipped_on, probe), high, _flag(low_on, probe),
                _flag(dual_on, probe), nlr, k3, kl_grad, kl_r)


@triton.jit
def _load_row(x_ptr, y_ptr, a_ptr, z_ptr, w_ptr, m_ptr, row, base, offs, in_row,
              KIND: tl.constexpr, A_PER_ROW: tl.constexpr, HAS_W: tl.constexpr):
    x = tl.load(x_ptr + base + offs, mask=in_row, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + base + offs, mask=in_row, other=0.0).to(tl.float32)
    if A_PER_ROW:
        a = tl.zeros_like(x) + tl.load(a_ptr + row).to(tl.float32)
    else:
        a = tl.load(a_ptr + base + offs, mask=in_row, other=0.0).to(tl.float32)
    z = tl.zeros_like(x)
    if (KIND == GRPO) or (KIND == GRPO_BC):
        z = tl.load(z_ptr + base + offs, mask=in_row, other=0.0).to(tl.float32)
    w = tl.zeros_like(x) + 1.0
    if HAS_W:
        w = tl.load(w_ptr + base + offs, mask=in_row, other=0.0).to(tl.float32)
    valid = tl.load(m_ptr + base + offs, mask=in_row, other=0).to(tl.float32) != 0
    return x, y, a, z, w, valid


@triton.jit
def _row_mean_log_ratio(x_ptr, y_ptr, m_ptr, base, length, BLOCK: tl.constexpr):
    """The sequence levels' first sweep: (sum of logp - old over valid tokens / max(n, 1), n)."""
    acc = tl.zeros([BLOCK], tl.float32)
    acc_n = tl.zeros([BLOCK], tl.float32)
    for start in range(0, length, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        in_row = offs < length
        x = tl.load(x_ptr + base + offs, mask=in_row, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + base + offs, mask=in_row, other=0.0).to(tl.float32)
        valid = tl.load(m_ptr + base + offs, mask=in_row, other=0).to(tl.float32) != 0
        acc += tl.where(valid, x - y, 0.0)
        acc_n += tl.where(valid, 1.0, 0.0)
    n = tl.sum(acc_n, axis=0)
    return tl.sum(acc, axis=0) / tl.maximum(n, 1.0), n


@triton.jit
def _losses_fwd_kernel(x_ptr, y_ptr, a_ptr, z_ptr, w_ptr, m_ptr, partial_ptr, saved_ptr, aux_ptr, rin_ptr,
                       length, lo, hi, dual, beta, vclip, cap, delta, tau_pos, tau_neg, glo, vk_pos, vl_pos,
                       vk_neg, vl_neg, KIND: tl.constexpr, A_PER_ROW: tl.constexpr, HAS_W: tl.constexpr,
                       HAS_DUAL: tl.constexpr, SAVE_GRAD: tl.constexpr, VARIANT: tl.constexpr,
                       LEVEL: tl.constexpr, HAS_RIN: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * length
    phi_pos = 0.0
    phi_neg = 0.0
    gm_loss = 0.0
    gm_coef = 0.0
    if (VARIANT == VESPO) or (VARIANT == GMPO):
        phi_pos, phi_neg, gm_loss, gm_coef = _row_extra(x_ptr, y_ptr, a_ptr, m_ptr, rin_ptr, row, base,
                                                        length, glo, cap, vk_pos, vl_pos, vk_neg, vl_neg,
                                                        A_PER_ROW, HAS_RIN, VARIANT, BLOCK)
    row_lr = 0.0
    row_pass = 0.0
    if LEVEL != TOKEN:
        s, n_row = _row_mean_log_ratio(x_ptr, y_ptr, m_ptr, base, length, BLOCK)
        row_lr, row_pass, through = _row_ratio(s, LEVEL)
    acc_loss = tl.zeros([BLOCK], tl.float32)
    acc_n = tl.zeros([BLOCK], tl.float32)
    acc_clipped = tl.zeros([BLOCK], tl.float32)
    acc_high = tl.zeros([BLOCK], tl.float32)
    acc_low = tl.zeros([BLOCK], tl.float32)
    acc_dual = tl.zeros([BLOCK], tl.float32)
    acc_nlr = tl.zeros([BLOCK], tl.float32)
    acc_k3 = tl.zeros([BLOCK], tl.float32)
    acc_rg = tl.zeros([BLOCK], tl.float32)
    for start in range(0, length, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        in_row = offs < length
        x, y, a, z, w, valid = _load_row(x_ptr, y_ptr, a_ptr, z_ptr, w_ptr, m_ptr, row, base, offs, in_row,
                                         KIND, A_PER_ROW, HAS_W)
        loss, grad, rgrad, clipped, high, low, dual_on, nlr, k3, kl_grad, kl_r = _terms(
            x, y, a, z, lo, hi, dual, beta, vclip, cap, delta, tau_pos, tau_neg, row_lr, row_pass, glo,
            phi_pos, phi_neg, gm_coef, KIND, HAS_DUAL, VARIANT, LEVEL)
        if SAVE_GRAD:  # the unscaled per-token gradient, for _losses_bwd_kernel's SAVED mode (same product)
            tl.store(saved_ptr + base + offs, grad * w + kl_grad, mask=in_row)
        if LEVEL == SEQUENCE:
            acc_rg += tl.where(valid, rgrad * w + kl_r, 0.0)
        loss = loss * w + beta * k3  # w = 1 without weights; k3 = 0 for the policy and value kinds
        # Selects, not products with the mask: padding may hold NaN (the flags are NaN there too).
        acc_loss += tl.where(valid, loss, 0.0)
        acc_n += tl.where(valid, 1.0, 0.0)
        acc_clipped += tl.where(valid, clipped, 0.0)
        acc_high += tl.where(valid, high, 0.0)
        acc_low += tl.where(valid, low, 0.0)
        acc_dual += tl.where(valid, dual_on, 0.0)
        acc_nlr += tl.where(valid, nlr, 0.0)
        acc_k3 += tl.where(valid, k3, 0.0)
    out = partial_ptr + row * 8
    loss_sum = tl.sum(acc_loss, axis=0)
    if VARIANT == GMPO:  # the row's loss (its tokens' are 0)
        loss_sum = gm_loss + 0.0 * loss_sum
    high_sum = tl.sum(acc_high, axis=0)
    if (VARIANT == VESPO) and A_PER_ROW:  # TRL averages phi over all rows, an all-padding one included
        a_row = tl.load(a_ptr + row).to(tl.float32)
        high_sum = tl.where(tl.sum(acc_n, axis=0) > 0, high_sum, tl.where(a_row >= 0.0, phi_pos, phi_neg))
    tl.store(out + 0, loss_sum)
    tl.store(out + 1, tl.sum(acc_n, axis=0))
    tl.store(out + 2, tl.sum(acc_clipped, axis=0))
    tl.store(out + 3, high_sum)
    tl.store(out + 4, tl.sum(acc_low, axis=0))
    tl.store(out + 5, tl.sum(acc_dual, axis=0))
    tl.store(out + 6, tl.sum(acc_nlr, axis=0))
    tl.store(out + 7, tl.sum(acc_k3, axis=0))
    if LEVEL != TOKEN:  # (s_b, G_b): the row-mean gradient of the sequence level (0 otherwise)
        tl.store(aux_ptr + row * 2, s)
        g_row = tl.where(through & (n_row > 0), tl.sum(acc_rg, axis=0) / tl.maximum(n_row, 1.0), 0.0)
        if (LEVEL == SEQUENCE) and not SAVE_GRAD:
            # No saved per-token part (rlkern/ops/losses.py's row-constant rows, whose backward is
            # G_b alone): a NaN token's gradient is NaN through G_b, as the saved part would make it.
            g_row = tl.where(loss_sum != loss_sum, loss_sum, g_row)  # noqa: PLR0124 (a NaN test)
        tl.store(aux_ptr + row * 2 + 1, g_row)
    else:  # every output is written
        tl.store(aux_ptr + row * 2 + tl.arange(0, 2), tl.zeros([2], tl.float32))


@triton.jit
def _losses_combine_kernel(partial_ptr, loss_ptr, stats_ptr, scale_ptr, rows, denom,
                           PER_ROW_MEAN: tl.constexpr, FLAGS_PER_ROW: tl.constexpr, BLOCK_B: tl.constexpr):
    """One program: fixed-order totals over the rows, then the per-row scales and the loss. With
    FLAGS_PER_ROW (sequence level, per-row advantages) the clip stats (partial columns 2..5) are the
    mean over all rows of each row's share (TRL's global_masked_mean of a (B, 1) tensor)."""
    cols = tl.arange(0, 8)
    sums = tl.zeros([8], tl.float32)
    row_shares = tl.zeros([8], tl.float32)
    live = tl.zeros((), tl.float32)
    for start in range(0, rows, BLOCK_B):
        r = start + tl.arange(0, BLOCK_B).to(tl.int64)
        p = tl.load(partial_ptr + r[:, None] * 8 + cols[None, :], mask=(r < rows)[:, None], other=0.0)
        sums += tl.sum(p, axis=0)
        n = tl.load(partial_ptr + r * 8 + 1, mask=r < rows, other=0.0)
        live += tl.sum(tl.where(n > 0, 1.0, 0.0), axis=0)
        if FLAGS_PER_ROW:
            row_shares += tl.sum(p / tl.maximum(n, 1.0)[:, None], axis=0)
    tokens = tl.sum(tl.where(cols == 1, sums, 0.0), axis=0)
    d = tl.where(denom > 0, denom, tl.where(denom == -1.0, tokens, live))
    d = tl.maximum(d, 1.0)
    total = tl.zeros((), tl.float32)
    for start in range(0, rows, BLOCK_B):
        r = start + tl.arange(0, BLOCK_B).to(tl.int64)
        in_b = r < rows
        row_loss = tl.load(partial_ptr + r * 8, mask=in_b, other=0.0)
        n = tl.load(partial_ptr + r * 8 + 1, mask=in_b, other=0.0)
        if PER_ROW_MEAN:
            s = 1.0 / tl.maximum(n, 1.0) / d
        else:
            s = tl.zeros_like(n) + 1.0 / d
        tl.store(scale_ptr + r, s, mask=in_b)
        total += tl.sum(tl.where(in_b, s * row_loss, 0.0), axis=0)
    tl.store(loss_ptr, total)
    # stats = partial columns 2..7 (clipped, clip_high, clip_low, dual, -log r, k3) / valid tokens.
    stats = sums / tl.maximum(tokens, 1.0)
    if FLAGS_PER_ROW:
        stats = tl.where(cols < 6, row_shares / tl.maximum(rows.to(tl.float32), 1.0), stats)
    tl.store(stats_ptr + cols - 2, stats, mask=cols >= 2)
    # stats[6] = clip_high + clip_low (one float32 add: the zeros add nothing), stats[7] = 0.
    tl.store(stats_ptr + 6, tl.sum(tl.where((cols == 3) | (cols == 4), stats, 0.0), axis=0))
    tl.store(stats_ptr + 7, 0.0)


@triton.jit
def _losses_bwd_kernel(grad_ptr, x_ptr, y_ptr, a_ptr, z_ptr, w_ptr, m_ptr, sv_ptr, scale_ptr, aux_ptr,
                       rin_ptr, out_ptr, length, lo, hi, dual, beta, vclip, cap, delta, tau_pos, tau_neg, glo,
                       vk_pos, vl_pos, vk_neg, vl_neg, KIND: tl.constexpr, A_PER_ROW: tl.constexpr,
                       HAS_W: tl.constexpr, HAS_DUAL: tl.constexpr, SAVED: tl.constexpr,
                       VARIANT: tl.constexpr, LEVEL: tl.constexpr, HAS_RIN: tl.constexpr,
                       ROW_ONLY: tl.constexpr, BLOCK: tl.constexpr):
    """d x = grad * scale_row * (d l / d x + G_row) where the mask is set, else 0; G_row (row_aux[:, 1])
    is the sequence level's gradient through the row mean. SAVED: the forward saved the unscaled
    per-token gradient (sv_ptr; the token pointers are not read); with ROW_ONLY too, that part is 0
    and sv_ptr is not read either (the row-constant rows: G_row is the whole gradient); otherwise
    every token's terms are evaluated again, with the row's ratio from row_aux[:, 0] at the sequence
    levels."""
    row = tl.program_id(0).to(tl.int64)
    base = row * length
    g = tl.load(grad_ptr) * tl.load(scale_ptr + row)
    row_lr = 0.0
    row_pass = 0.0
    row_add = 0.0
    if LEVEL != TOKEN:
        row_lr, row_pass, row_through = _row_ratio(tl.load(aux_ptr + row * 2), LEVEL)  # noqa: F841 (unused)
        row_add = tl.load(aux_ptr + row * 2 + 1)
    phi_pos = 0.0
    phi_neg = 0.0
    gm_coef = 0.0
    if ((VARIANT == VESPO) or (VARIANT == GMPO)) and not SAVED:
        phi_pos, phi_neg, _gm_loss, gm_coef = _row_extra(x_ptr, y_ptr, a_ptr, m_ptr, rin_ptr, row, base,
                                                         length, glo, cap, vk_pos, vl_pos, vk_neg, vl_neg,
                                                         A_PER_ROW, HAS_RIN, VARIANT, BLOCK)
    for start in range(0, length, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        in_row = offs < length
        if SAVED:
            valid = tl.load(m_ptr + base + offs, mask=in_row, other=0).to(tl.float32) != 0
            if ROW_ONLY:
                grad = tl.zeros([BLOCK], tl.float32)
            else:
                grad = tl.load(sv_ptr + base + offs, mask=in_row, other=0.0)
        else:
            x, y, a, z, w, valid = _load_row(x_ptr, y_ptr, a_ptr, z_ptr, w_ptr, m_ptr, row, base, offs,
                                             in_row, KIND, A_PER_ROW, HAS_W)
            _, grad, _, _, _, _, _, _, _, kl_grad, _ = _terms(
                x, y, a, z, lo, hi, dual, beta, vclip, cap, delta, tau_pos, tau_neg, row_lr, row_pass, glo,
                phi_pos, phi_neg, gm_coef, KIND, HAS_DUAL, VARIANT, LEVEL)
            grad = grad * w + kl_grad
        if LEVEL == SEQUENCE:
            grad = grad + row_add
        d = tl.where(valid, g * grad, 0.0)
        tl.store(out_ptr + base + offs, d.to(out_ptr.dtype.element_ty), mask=in_row)


def _block(length: int) -> int:
    return max(16, min(triton.next_power_of_2(max(length, 1)), 1024))


def _launch_args(x, old, adv, ref, weights, mask):
    """[rows, T] views of the [..., T] inputs (the mask in its own dtype, a bool one as uint8), with x
    standing in for an absent ref / weights (the kernel never reads them then)."""
    length = x.shape[-1]
    rows = x.shape[:-1].numel()
    flat = lambda t: t.reshape(rows, length)  # noqa: E731
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    ptrs = (flat(x), flat(old), adv.reshape(rows) if adv.dim() < x.dim() else flat(adv),
            x if ref is None else ref, x if weights is None else weights, m)
    return ptrs, rows, length, adv.dim() < x.dim(), weights is not None


def _consts(clip_low, clip_high, dual_clip, beta, value_clip, delta, tau_pos, tau_neg, vk_pos=2.0, vl_pos=3.0,
            vk_neg=3.0, vl_neg=2.0):
    # cap: cispo_cap's absolute bound on r (clip_high itself, TRL's epsilon_high; gmpo's upper log bound);
    # -clip_low: gmpo's lower log bound; vespo's k / lambda (TRL clamps lambda to >= 1e-4).
    return (1.0 - clip_low, 1.0 + clip_high, dual_clip, beta, value_clip, clip_high, delta, tau_pos, tau_neg,
            -clip_low, vk_pos, max(vl_pos, 1e-4), vk_neg, max(vl_neg, 1e-4))


def losses_fwd(x, old, adv, ref, weights, mask, kind, clip_low, clip_high, dual_clip, beta, value_clip,
               per_row_mean, denom, loss, stats, row_scale, saved, variant=0, level=0, delta=math.inf,
               tau_pos=1.0, tau_neg=1.05, row_aux=None, row_in=None, vk_pos=2.0, vl_pos=3.0, vk_neg=3.0,
               vl_neg=2.0) -> None:
    """Same contract as the C++ rlkern._C.losses_fwd: contiguous [..., T] inputs (advantages per token
    or per row; ref and weights or None; the mask in any dtype, nonzero = valid), writes loss (0-d),
    stats [LOSS_STATS] and row_scale [...] (all fp32), unless saved is None each token's unscaled
    gradient into saved (fp32, x's shape) for losses_bwd_saved, and at the sequence levels (s_b, G_b)
    per row into row_aux ([..., 2] fp32)."""
    ptrs, rows, length, a_per_row, has_w = _launch_args(x, old, adv, ref, weights, mask)
    partial = torch.zeros(rows, N_PARTIALS, device=x.device, dtype=torch.float32)
    if row_aux is None:  # a caller that does not read it (tests/gpu_compile.py's launch matrix)
        row_aux = torch.empty(rows, 2, device=x.device, dtype=torch.float32)
    if rows > 0:
        _losses_fwd_kernel[(rows,)](*ptrs, partial, x if saved is None else saved, row_aux,
                                    partial if row_in is None else row_in, length,
                                    *_consts(clip_low, clip_high, dual_clip, beta, value_clip, delta, tau_pos,
                                             tau_neg, vk_pos, vl_pos, vk_neg, vl_neg), KIND=kind,
                                    A_PER_ROW=a_per_row, HAS_W=has_w, HAS_DUAL=math.isfinite(dual_clip),
                                    SAVE_GRAD=saved is not None, VARIANT=variant, LEVEL=level,
                                    HAS_RIN=row_in is not None,
                                    # eight accumulators (and the saved gradient) per element: 512-wide
                                    # tiles on 8 warps. 1024 on 4 warps spilled 8 B on sm_80 (grpo_bc)
                                    # and, with Triton 3.4, on sm_90 for int64 / bf16 masks.
                                    BLOCK=min(_block(length), 512), num_warps=8)
    _losses_combine_kernel[(1,)](partial, loss, stats, row_scale, rows, float(denom),
                                 PER_ROW_MEAN=per_row_mean,
                                 FLAGS_PER_ROW=a_per_row and (level == LEVELS["sequence"]
                                                              or variant == LOSS_VARIANTS["vespo"]),
                                 BLOCK_B=128)


def losses_bwd(grad_loss, x, old, adv, ref, weights, mask, row_scale, kind, clip_low, clip_high, dual_clip,
               beta, value_clip, grad_x, variant=0, level=0, delta=math.inf, tau_pos=1.0, tau_neg=1.05,
               row_aux=None, row_in=None, vk_pos=2.0, vl_pos=3.0, vk_neg=3.0, vl_neg=2.0) -> None:
    """Same contract as the C++ rlkern._C.losses_bwd: writes d x (x's dtype) into grad_x."""
    ptrs, rows, length, a_per_row, has_w = _launch_args(x, old, adv, ref, weights, mask)
    if rows == 0:
        return
    _losses_bwd_kernel[(rows,)](grad_loss, *ptrs, x, row_scale, row_scale if row_aux is None else row_aux,
                                row_scale if row_in is None else row_in, grad_x, length,
                                *_consts(clip_low, clip_high, dual_clip, beta, value_clip, delta, tau_pos,
                                         tau_neg, vk_pos, vl_pos, vk_neg, vl_neg), KIND=kind,
                                A_PER_ROW=a_per_row, HAS_W=has_w, HAS_DUAL=math.isfinite(dual_clip),
                                SAVED=False, VARIANT=variant, LEVEL=level, HAS_RIN=row_in is not None,
                                ROW_ONLY=False, BLOCK=_block(length),
                                num_warps=8)  # 4 warps: Triton 3.4 spilled (int64 mask)


def losses_bwd_saved(grad_loss, saved, mask, row_scale, grad_x, row_aux=None) -> None:
    """Same contract as the C++ rlkern._C.losses_bwd_saved: d x = grad * row_scale * (saved + G_row)
    where the mask is set (0 elsewhere), in grad_x's dtype; G_row = row_aux[:, 1] (None: 0); saved
    None (the row-constant rows; row_aux then required): 0."""
    if saved is None and row_aux is None:
        raise ValueError("without saved (row-constant rows) the gradient is row_aux's: pass it")
    length = grad_x.shape[-1]
    rows = grad_x.shape[:-1].numel()
    if rows == 0:
        return
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    sv = row_scale if saved is None else saved  # not read with ROW_ONLY
    unread = (sv,) * 5  # the token pointers of the recomputing mode
    _losses_bwd_kernel[(rows,)](grad_loss, *unread, m, sv, row_scale,
                                row_scale if row_aux is None else row_aux, row_scale, grad_x, length,
                                *(0.0,) * 5, 1.0, math.inf, 1.0, 1.0, 0.0, 2.0, 3.0, 3.0, 2.0, KIND=0,
                                A_PER_ROW=False, HAS_W=False, HAS_DUAL=False, SAVED=True, VARIANT=0,
                                LEVEL=LEVELS["token"] if row_aux is None else LEVELS["sequence"],
                                HAS_RIN=False, ROW_ONLY=saved is None,
                                BLOCK=_block(length))
