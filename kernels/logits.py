"""Token log-probs and entropy from logits: Triton kernels (one program per row of V logits).

Same maths as csrc/logits.cpp: an online (max, sum-exp) recurrence over BLOCK_V-wide blocks of
the row in fp32, relative to the row max in natural units, saving one log-sum-exp and one entropy
per row; the backward recomputes p = exp(z - lse) block by block and writes d logits once,
optionally over the logits themselves. z = x / T is the IEEE-rounded quotient (div_rn; Triton's
`/` is an approximate division on NVIDIA GPUs), the same z torch's `logits / temperature` gives, so
log-probs are exactly torch's (z_y - m) - log S order and never above 0. Offsets are int64, so
N * V > 2^31 is safe (TRL #7266); rows go on grid axis 0, whose limit is 2^31 - 1, not on axis 1
or 2 (65,535; Liger #1294). V up to 256k loops over 64 blocks of 4096.

Non-finite logits, as on every backend: a NaN or +inf logit makes the row's lse, log-prob (unless
ignored), entropy and gradient row NaN; -inf logits are banned (p = 0), and the masked lanes past
the row's end read as -inf and count for exactly nothing; a row of only -inf has lse -inf.

Per-row temperatures (ROW_T: one float32 per row at temps_ptr) are checked here without a host
sync: a row whose temperature is NaN, <= 0, +inf or has an infinite float32 reciprocal is
computed at temperature NaN, so it comes out exactly as a row holding a NaN logit (NaN lse,
log-prob unless ignored, entropy, sum p^2 and gradient row). The ops layer refuses such
temperatures before launching wherever that costs no sync (CPU tensors, nan_check=True,
RLKERN_STRICT_TEMPERATURE=1). WANT_P2 adds Q = sum e^{2(z - m)} to the online recurrence
(rescaled by c^2) and stores sum p^2 = Q / S / S (0 for a fully banned row).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# A tl.constexpr global: compiled kernels may read only constexpr globals (a plain float works
# under the interpreter but fails to compile for a GPU).
NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _row_base(ptr, row, inner, stride_outer, stride_inner):
    return ptr + (row // inner) * stride_outer + (row % inner) * stride_inner


@triton.jit
def _row_temperature(temps_ptr, row, temperature, ROW_T: tl.constexpr):
    """The row's temperature: the call's scalar, or its own (NaN where it is not a valid one)."""
    if ROW_T:
        t = tl.load(temps_ptr + row)
        ok = (t > 0) & (t < float("inf")) & (tl.math.div_rn(1.0, t) < float("inf"))
        return tl.where(ok, t, float("nan"))
    else:
        return temperature


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, labels_ptr, logp_ptr, lse_ptr, ent_ptr, p2_ptr, temps_ptr,
    inner, stride_outer, stride_inner, vocab, temperature, ignore_index,
    HAS_LABELS: tl.constexpr, WANT_ENTROPY: tl.constexpr, WANT_P2: tl.constexpr, ROW_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = _row_base(logits_ptr, row, inner, stride_outer, stride_inner)
    temperature = _row_temperature(temps_ptr, row, temperature, ROW_T)
    # Running max m, S = sum e^{z-m}, T = sum e^{z-m} (z-m), Q = sum e^{2(z-m)}; S == 0 until a
    # finite logit is seen.
    m = tl.full((), NEG_INF, tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    q = tl.zeros((), tl.float32)
    for start in range(0, vocab, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V).to(tl.int64)
        x = tl.load(x_row + offs, mask=offs < vocab, other=NEG_INF).to(tl.float32)
        z = tl.math.div_rn(x, temperature)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # Rescale the sums from the old max to the new one: S' = cS, T' = c(T + (m - m')S). While
        # S == 0 (m = -inf) there is nothing to rescale; the shift is zeroed so no inf - inf arises.
        # c == 0 (the old terms vanish, or m - m' overflowed to -inf) zeroes T: shift * S may be -inf.
        started = s > 0
        shift = tl.where(started, m, 0.0) - tl.where(started, m_new, 0.0)
        c = tl.exp(shift)
        t = tl.where(c > 0, c * (t + shift * s), 0.0)
        s = s * c
        if WANT_P2:
            q = q * (c * c)
        m = m_new
        # Banned (-inf) logits and the masked lanes contribute exactly 0. A NaN logit is not banned:
        # its d and e are NaN and carry into S (whether or not tl.max saw it), and a +inf logit
        # makes m = +inf and its own d = inf - inf = NaN: the row comes out NaN either way.
        banned = z == NEG_INF
        d = tl.where(banned, 0.0, z - tl.where(m > NEG_INF, m, 0.0))
        e = tl.where(banned, 0.0, tl.exp(d))
        s += tl.sum(e, axis=0)
        if WANT_ENTROPY:
            t += tl.sum(e * d, axis=0)
        if WANT_P2:
            q += tl.sum(e * e, axis=0)
    dead = s == 0  # True only for a row whose every logit is -inf (NaN compares False)
    log_s = tl.log(tl.where(dead, 1.0, s))
    tl.store(lse_ptr + row, tl.where(dead, NEG_INF, m + log_s))
    if WANT_ENTROPY:
        tl.store(ent_ptr + row, tl.where(dead, 0.0, log_s - t / tl.where(dead, 1.0, s)))
    if WANT_P2:
        s_safe = tl.where(dead, 1.0, s)
        tl.store(p2_ptr + row, tl.where(dead, 0.0, q / s_safe / s_safe))
    if HAS_LABELS:
        y = tl.load(labels_ptr + row)
        # Masked load: a label outside [0, V) (only reachable inside torch.compile, where the
        # eager range check is skipped) reads nothing and yields NaN rather than stray memory.
        in_range = (y >= 0) & (y < vocab)
        xy = tl.load(x_row + tl.where(in_range, y, 0), mask=in_range, other=float("nan")).to(tl.float32)
        # torch's log_softmax order: (z_y - m) - log S is exactly -log S at the argmax, never > 0.
        logp = tl.where(dead, NEG_INF, (tl.math.div_rn(xy, temperature) - tl.where(dead, 0.0, m)) - log_s)
        tl.store(logp_ptr + row, tl.where(y == ignore_index, 0.0, logp))


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr, grad_ptr, labels_ptr, grad_logp_ptr, grad_ent_ptr, lse_ptr, ent_ptr, temps_ptr,
    inner, stride_outer, stride_inner, grad_inner, grad_stride_outer, grad_stride_inner, vocab, temperature,
    ignore_index, HAS_LABELS: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENT: tl.constexpr,
    ROW_T: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    temperature = _row_temperature(temps_ptr, row, temperature, ROW_T)
    x_row = _row_base(logits_ptr, row, inner, stride_outer, stride_inner)
    dx_row = _row_base(grad_ptr, row, grad_inner, grad_stride_outer, grad_stride_inner)
    lse = tl.load(lse_ptr + row)
    dead = lse == NEG_INF  # a fully banned row: no gradient at all
    not_dead = lse != NEG_INF
    poisoned = lse != lse  # a row with a NaN / +inf logit: NaN everywhere, as torch's backward gives
    inv_t = tl.math.div_rn(1.0, temperature)
    g = tl.zeros((), tl.float32)
    y = tl.full((), -1, tl.int64)
    if HAS_LABELS:
        y = tl.load(labels_ptr + row).to(tl.int64)
        if HAS_GRAD_LOGP:
            g = tl.where((y != ignore_index) & not_dead, tl.load(grad_logp_ptr + row), 0.0)
    gh = tl.zeros((), tl.float32)
    h = tl.zeros((), tl.float32)
    if HAS_GRAD_ENT:
        gh = tl.where(not_dead, tl.load(grad_ent_ptr + row), 0.0)
        h = tl.load(ent_ptr + row)
    # d z_j = g (1[j=y] - p_j) - gh p_j (z_j - lse + H). Each block is read before it is written,
    # so writing over the logits themselves (inplace backward) is safe.
    for start in range(0, vocab, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V).to(tl.int64)
        in_row = offs < vocab
        x = tl.load(x_row + offs, mask=in_row, other=NEG_INF).to(tl.float32)
        z = tl.math.div_rn(x, temperature)
        # -inf logits (and every logit of a fully banned row) get p = 0 and d = 0: no inf * 0.
        live = z > tl.where(dead, float("inf"), NEG_INF)  # nothing is live in a dead row
        d = tl.where(live, z - tl.where(dead, 0.0, lse), 0.0)
        p = tl.where(live, tl.exp(d), 0.0)
        dz = -p * (g + gh * (d + h)) + tl.where(offs == y, g, 0.0)
        dz = tl.where(poisoned, float("nan"), dz)
        tl.store(dx_row + offs, (dz * inv_t).to(grad_ptr.dtype.element_ty), mask=in_row)


def _block_and_warps(vocab: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(vocab), 4096)
    return block, 4 if block <= 1024 else 8 if block <= 2048 else 16


def logprobs_fwd(logits: torch.Tensor, labels: torch.Tensor | None, temperature: float,
                 temperatures: torch.Tensor | None, ignore_index: int, logp: torch.Tensor | None,
                 lse: torch.Tensor, ent: torch.Tensor | None, sum_p2: torch.Tensor | None) -> None:
    """logits: [outer, inner, V] with unit stride over V; labels: flat int64 [outer*inner] or None;
    temperatures: flat fp32 [outer*inner] (then `temperature` is unused) or None. Writes flat fp32
    lse, and logp / ent / sum_p2 where given (logp needs labels). Same call as rlkern._C."""
    outer, inner, vocab = logits.shape
    rows = outer * inner
    if rows == 0:
        return
    block, warps = _block_and_warps(vocab)
    has_labels, want_entropy = logp is not None, ent is not None
    _logprobs_fwd_kernel[(rows,)](
        logits, labels if has_labels else lse, logp if has_labels else lse, lse, ent if want_entropy else lse,
        sum_p2 if sum_p2 is not None else lse, temperatures if temperatures is not None else lse,
        max(inner, 1), logits.stride(0), logits.stride(1), vocab, float(temperature), ignore_index,
        HAS_LABELS=has_labels, WANT_ENTROPY=want_entropy, WANT_P2=sum_p2 is not None,
        ROW_T=temperatures is not None, BLOCK_V=block, num_warps=warps,
    )


def logprobs_bwd(
    grad_logp: torch.Tensor | None, grad_ent: torch.Tensor | None, logits: torch.Tensor,
    labels: torch.Tensor | None, lse: torch.Tensor, ent: torch.Tensor | None, temperature: float,
    temperatures: torch.Tensor | None, ignore_index: int, grad_logits: torch.Tensor,
) -> None:
    """Writes d logits into grad_logits ([outer, inner, V], unit stride over V; may be logits); an
    absent upstream gradient (and ent without grad_ent) is None. Same call as rlkern._C."""
    outer, inner, vocab = logits.shape
    rows = outer * inner
    if rows == 0:
        return
    block, warps = _block_and_warps(vocab)
    _logprobs_bwd_kernel[(rows,)](
        logits, grad_logits, labels if labels is not None else lse,
        grad_logp if grad_logp is not None else lse, grad_ent if grad_ent is not None else lse,
        lse, ent if ent is not None else lse, temperatures if temperatures is not None else lse,
        max(inner, 1), logits.stride(0), logits.stride(1),
        max(grad_logits.shape[1], 1), grad_logits.stride(0), grad_logits.stride(1),
        vocab, float(temperature), ignore_index,
        HAS_LABELS=labels is not None, HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENT=grad_ent is not None,
        ROW_T=temperatures is not None, BLOCK_V=block, num_warps=warps,
    )
