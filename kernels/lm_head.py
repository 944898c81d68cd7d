"""Token log-probs and entropy from hidden states and the LM head: Triton kernels (GPU; checked
on CPU tensors through the interpreter at small sizes).

Forward: one program per block of BLOCK_N tokens walks the vocabulary in BLOCK_V-wide tiles; each
logits tile is a tl.dot GEMM over BLOCK_H slices of the hidden size with fp32 accumulation, folded
straight from registers into the per-token online-softmax state (m, S, T, z_y) of
csrc/lm_head.cpp. The logits never reach memory.

Backward: one program per (token block, vocabulary tile) recomputes its tile, turns it into
d logits in registers, and adds d logits @ W_tile to d hidden and d logits^T @ hidden_tile to
d weight with fp32 atomics (the split-K pattern of Cut Cross-Entropy's backward), so the
[N, V] gradient never reaches memory either. The order of the fp32 atomic adds is not fixed on a
GPU, so d hidden / d weight may differ between runs in the last bits.

Numerics: bf16 / fp16 operands go through the tensor cores with fp32 accumulation. fp32 operands
are multiplied in IEEE fp32 by default (PRECISION="ieee"): tl.dot would otherwise default to TF32
on a GPU, ~1e-3 relative error per product, enough to make rollout and training log-probs of an
fp32 LM head disagree (TRL #4303, NeMo-RL #3936). precision="tf32" opts into the faster path.
Offsets: token rows and vocabulary rows are scaled to int64 once per program; offsets inside a
tile stay int32.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# A tl.constexpr global: compiled kernels may read only constexpr globals (a plain float works
# under the interpreter but fails to compile for a GPU).
NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _logits_tile(
    h_rows, w_rows, b_ptr, row_ok, cols, v0, vocab, hidden_size, inv_temp,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """z = (hidden[rows] @ weight[v0 + cols]^T + bias) * inv_temp, fp32 [BLOCK_N, BLOCK_V]; columns
    past the vocabulary are -inf. inv_temp: a scalar or a [BLOCK_N, 1] per-row block. h_rows /
    w_rows: [BLOCK_N, 1] / [BLOCK_V, 1] row pointers (int64
    row offsets computed once), so the per-slice offsets stay int32."""
    col_ok = (v0 + cols) < vocab
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for k0 in range(0, hidden_size, BLOCK_H):
        offs_k = k0 + tl.arange(0, BLOCK_H)
        k_ok = offs_k[None, :] < hidden_size
        a = tl.load(h_rows + offs_k[None, :], mask=row_ok[:, None] & k_ok, other=0.0)
        b = tl.load(w_rows + offs_k[None, :], mask=col_ok[:, None] & k_ok, other=0.0)
        if DOT_FP32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + v0 + cols, mask=col_ok, other=0.0)[None, :]
    return tl.where(col_ok[None, :], acc * inv_temp, NEG_INF)


@triton.jit
def _row_inv_temp(inv_ptr, offs_n, row_ok, inv_temp, ROW_TEMP: tl.constexpr):
    """The inverse temperature: the scalar, or with ROW_TEMP a [BLOCK_N, 1] block of per-row values."""
    if ROW_TEMP:
        return tl.load(inv_ptr + offs_n, mask=row_ok, other=1.0)[:, None]
    else:
        return inv_temp


@triton.jit
def _linear_logprobs_fwd_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, inv_ptr, lse_ptr, ent_ptr, zy_ptr, p2_ptr,  # outputs: lse, ent, zy, p2
    n_tokens, vocab, hidden_size, inv_temp, ignore_index, vocab_start,
    HAS_BIAS: tl.constexpr, WANT_ENTROPY: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    ROW_TEMP: tl.constexpr, WANT_SUM_P2: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # Row offsets are int64 from the program id on (N * H past 2^31 is fine); the grid is 1-D over
    # token blocks (2^31 - 1 blocks allowed, unlike the 65,535 of grid dims 1 and 2).
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < n_tokens
    inv = _row_inv_temp(inv_ptr, offs_n, row_ok, inv_temp, ROW_TEMP)
    h_rows = h_ptr + offs_n[:, None] * hidden_size
    cols = tl.arange(0, BLOCK_V)
    y = tl.load(labels_ptr + offs_n, mask=row_ok, other=ignore_index)
    # The label's column in this shard (int32: |V| < 2^31), or -1 when ignored; a label in another
    # shard lands outside [0, vocab) and never matches.
    local = tl.where(y == ignore_index, -1, y - vocab_start).to(tl.int32)
    m = tl.full((BLOCK_N,), NEG_INF, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    q = tl.zeros((BLOCK_N,), tl.float32)  # sum e^{2(z - m)}, with WANT_SUM_P2
    zy = tl.zeros((BLOCK_N,), tl.float32)
    # A NaN or +inf logit makes its token NaN (as in csrc/lm_head.cpp) through S itself: a
    # NaN z gives e = NaN, a +inf z makes m = +inf and its d = inf - inf = NaN; once S is NaN the
    # rescale below keeps it NaN (S * 0). No extra per-row state: it would spill on sm_80.
    for v0 in range(0, vocab, BLOCK_V):
        w_rows = w_ptr + (v0 + cols).to(tl.int64)[:, None] * hidden_size
        z = _logits_tile(h_rows, w_rows, b_ptr, row_ok, cols, v0, vocab, hidden_size, inv, HAS_BIAS,
                         DOT_FP32, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # Move the sums from the old max to the new one: S' = c S, T' = c (T + (m - m') S).
        # (m - m' is masked before use: while S = 0 the old max is -inf and m - m' would be NaN.)
        shift = tl.where(s > 0, m - m_new, 0.0)
        c = tl.where(s > 0, tl.exp(shift), 0.0)
        t = tl.where(s > 0, c * (t + shift * s), 0.0)
        s = s * c
        if WANT_SUM_P2:
            q = q * c * c
        m = m_new
        d = z - m[:, None]
        e = tl.where(z != NEG_INF, tl.exp(d), 0.0)  # -inf logits add 0; a NaN z passes the test
        s += tl.sum(e, axis=1)
        if WANT_ENTROPY:
            t += tl.sum(tl.where(e > 0, e * d, 0.0), axis=1)
        if WANT_SUM_P2:
            q += tl.sum(e * e, axis=1)
        # (Padding columns past the shard are -inf and must not match a label of a later shard.)
        hit = ((v0 + cols)[None, :] == local[:, None]) & ((v0 + cols)[None, :] < vocab)
        zy += tl.sum(tl.where(hit, z, 0.0), axis=1)
    alive = s != 0  # False only for a token whose every logit is -inf; a NaN S stays NaN
    log_s = tl.log(tl.where(alive, s, 1.0))
    tl.store(lse_ptr + offs_n, tl.where(alive, m + log_s, NEG_INF), mask=row_ok)
    if WANT_ENTROPY:
        tl.store(ent_ptr + offs_n, tl.where(alive, log_s - t / tl.where(alive, s, 1.0), 0.0), mask=row_ok)
    tl.store(zy_ptr + offs_n, zy, mask=row_ok)
    if WANT_SUM_P2:  # sum p^2 = Q / S^2 (S >= 1); 0 for a token whose every logit is -inf
        safe_s = tl.where(alive, s, 1.0)
        tl.store(p2_ptr + offs_n, tl.where(alive, q / (safe_s * safe_s), 0.0), mask=row_ok)


@triton.jit
def _linear_logprobs_bwd_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, grad_logp_ptr, grad_ent_ptr, lse_ptr, ent_ptr, inv_ptr,
    grad_h_ptr, grad_w_ptr, grad_b_ptr,  # the outputs, accumulated with fp32 atomics
    n_tokens, vocab, hidden_size, inv_temp, ignore_index, vocab_start,
    HAS_BIAS: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENT: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, ROW_TEMP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # Grid: dim 0 over token blocks (up to 2^31 - 1), dim 1 over vocabulary tiles (65,535 x 64 ids:
    # any vocabulary up to 4.19M); row offsets int64 as in the forward.
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    v0 = tl.program_id(1) * BLOCK_V
    cols = tl.arange(0, BLOCK_V)
    row_ok = offs_n < n_tokens
    col_ok = (v0 + cols) < vocab
    inv = _row_inv_temp(inv_ptr, offs_n, row_ok, inv_temp, ROW_TEMP)
    h_rows = h_ptr + offs_n[:, None] * hidden_size
    w_off = (v0 + cols).to(tl.int64)[:, None] * hidden_size
    z = _logits_tile(h_rows, w_ptr + w_off, b_ptr, row_ok, cols, v0, vocab, hidden_size, inv, HAS_BIAS,
                     DOT_FP32, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
    y = tl.load(labels_ptr + offs_n, mask=row_ok, other=ignore_index)
    lse = tl.load(lse_ptr + offs_n, mask=row_ok, other=NEG_INF)
    alive = lse != NEG_INF  # a NaN lse (a NaN / +inf logit in the row) stays alive: its gradient is NaN
    g = tl.zeros((BLOCK_N,), tl.float32)
    if HAS_GRAD_LOGP:
        g = tl.where(
            (y != ignore_index) & alive, tl.load(grad_logp_ptr + offs_n, mask=row_ok, other=0.0), 0.0
        )
    gh = tl.zeros((BLOCK_N,), tl.float32)
    h = tl.zeros((BLOCK_N,), tl.float32)
    if HAS_GRAD_ENT:
        gh = tl.where(alive, tl.load(grad_ent_ptr + offs_n, mask=row_ok, other=0.0), 0.0)
        h = tl.load(ent_ptr + offs_n, mask=row_ok, other=0.0)
    # d z_j = g (1[j=y] - p_j) - gh p_j (z_j - lse + H), d x = d z / temperature.
    d = z - lse[:, None]
    p = tl.where(z != NEG_INF, tl.exp(d), 0.0)  # != keeps a NaN logit's p NaN (> would make it 0)
    # p == 0 (not p > 0) selects the zero terms, so that a NaN p keeps the row's gradient NaN.
    dz = tl.where(p == 0, 0.0, -p * (g[:, None] + gh[:, None] * (d + h[:, None])))
    local = tl.where(y == ignore_index, -1, y - vocab_start).to(tl.int32)
    is_label = (v0 + cols)[None, :] == local[:, None]
    dz = (dz + tl.where(is_label, g[:, None], 0.0)) * inv
    dz = tl.where(row_ok[:, None] & col_ok[None, :], dz, 0.0)
    if HAS_BIAS:
        tl.atomic_add(grad_b_ptr + v0 + cols, tl.sum(dz, axis=0), mask=col_ok)
    # The gradient GEMMs take d logits in the input dtype (tensor cores; fp32 under the
    # interpreter's bf16 workaround) and accumulate in fp32. Converted once, before the loop, so the
    # loop-carried operand keeps one type.
    if DOT_FP32:
        dz_in = dz
    else:
        dz_in = dz.to(h_ptr.dtype.element_ty)
    dz_t = tl.trans(dz_in)
    gh_rows = grad_h_ptr + offs_n[:, None] * hidden_size
    gw_rows = grad_w_ptr + w_off
    for k0 in range(0, hidden_size, BLOCK_H):
        offs_k = k0 + tl.arange(0, BLOCK_H)
        k_ok = offs_k[None, :] < hidden_size
        w_blk = tl.load(w_ptr + w_off + offs_k[None, :], mask=col_ok[:, None] & k_ok, other=0.0)
        h_blk = tl.load(h_rows + offs_k[None, :], mask=row_ok[:, None] & k_ok, other=0.0)
        if DOT_FP32:
            w_blk, h_blk = w_blk.to(tl.float32), h_blk.to(tl.float32)
        tl.atomic_add(
            gh_rows + offs_k[None, :],
            tl.dot(dz_in, w_blk, input_precision=PRECISION),
            mask=row_ok[:, None] & k_ok,
        )
        tl.atomic_add(
            gw_rows + offs_k[None, :],
            tl.dot(dz_t, h_blk, input_precision=PRECISION),
            mask=col_ok[:, None] & k_ok,
        )


def _or(t: Tensor | None, stand_in: Tensor) -> Tensor:
    """An absent (None) tensor argument as a stand-in pointer that its kernel never reads (the
    matching HAS_* constexpr is False)."""
    return t if t is not None else stand_in


def _dot_fp32(dtype: torch.dtype) -> bool:
    # Triton 3.x's interpreter computes tl.dot on bfloat16 operands wrongly (it multiplies the raw
    # 16-bit patterns); under the interpreter bf16 operands are widened to fp32 first. A GPU keeps
    # the bf16 tensor-core dot.
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


PRECISIONS = ("ieee", "tf32")


def _dot_precision(precision: str, dtype: torch.dtype) -> str:
    """The kernels' PRECISION constexpr: the option applies to fp32 operands only (bf16 / fp16 always
    run on the tensor cores), so 16-bit inputs get one specialisation whatever was asked."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision if dtype == torch.float32 else "ieee"


def _slice(hidden_size: int, widest: int) -> int:
    return max(16, min(widest, triton.next_power_of_2(hidden_size)))  # tl.dot needs every dim >= 16


def fwd_config(hidden_size: int, dtype: torch.dtype, precision: str = "ieee", options: bool = False) -> dict:
    """Tile sizes and warps of the forward kernel: 64 tokens x 64 vocabulary rows per logits tile,
    BLOCK_H-wide slices of H, eight warps. fp32 operands take twice the registers of 16-bit ones,
    and under "ieee" they are multiplied with FMAs from registers instead of by the tensor cores,
    so their slices are narrower. With ``options`` (a per-row temperature or sum p^2: one more
    [BLOCK_N] state and a [BLOCK_N, 1] scale live across the sweep) 16-bit slices are 32 wide: at 64,
    sm_80 spilled 16 B with every output asked for. Chosen so that no launch spills registers on
    sm_80 / sm_90 (tests/test_gpu_compile.py compiles every one)."""
    widest = (32 if options else 64) if dtype != torch.float32 else 16 if precision == "ieee" else 32
    return {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": _slice(hidden_size, widest), "num_warps": 8}


def bwd_config(hidden_size: int, dtype: torch.dtype, precision: str = "ieee") -> dict:
    """The backward recomputes one 64 x 64 tile, then per BLOCK_H slice adds two GEMM products
    (d hidden and d weight) into fp32 memory; narrower slices than the forward keep the d logits
    operand and both partial products in registers."""
    widest = 16 if dtype == torch.float32 and precision == "ieee" else 32
    return {"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_H": _slice(hidden_size, widest), "num_warps": 8}


# CUDA's grid limits: dim 0 up to 2^31 - 1 blocks, dims 1 and 2 up to 65,535 (Liger's GRPO kernel put
# the sequence on dim 1 and failed at 65,536 tokens, Liger-Kernel #1294).
GRID_DIM0_MAX, GRID_DIM12_MAX = 2**31 - 1, 65535


def fwd_grid(n_tokens: int, cfg: dict) -> tuple[int]:
    """The forward's grid: token blocks on dim 0 only."""
    grid = (triton.cdiv(n_tokens, cfg["BLOCK_N"]),)
    if grid[0] > GRID_DIM0_MAX:
        raise ValueError(f"{n_tokens} tokens exceed the CUDA grid ({GRID_DIM0_MAX} blocks of "
                         f"{cfg['BLOCK_N']})")
    return grid


def bwd_grid(n_tokens: int, vocab: int, cfg: dict) -> tuple[int, int]:
    """The backward's grid: token blocks on dim 0, vocabulary tiles on dim 1 (any V < 4.19M)."""
    grid = (triton.cdiv(n_tokens, cfg["BLOCK_N"]), triton.cdiv(vocab, cfg["BLOCK_V"]))
    if grid[0] > GRID_DIM0_MAX or grid[1] > GRID_DIM12_MAX:
        raise ValueError(f"N={n_tokens}, V={vocab} exceed the CUDA grid limits of the backward")
    return grid


def linear_logprobs_fwd(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
    inv_temp: float, ignore_index: int, vocab_start: int, want_entropy: bool,
    token_tile: int, vocab_tile: int, precision: str,
    lse: Tensor, ent: Tensor | None, zy: Tensor,
    inv_temp_rows: Tensor | None = None, sum_p2: Tensor | None = None,
) -> None:
    """hidden [N, H], weight [V, H] contiguous, same dtype; bias fp32 [V] or None; labels int64 [N]
    (global ids, the shard starting at vocab_start). Writes fp32 lse, z_y and, with want_entropy, ent
    ([N] each; the entropy capped at ln V, NaN kept) and, given sum_p2 (fp32 [N]), sum_v p_v^2;
    inv_temp_rows: fp32 [N] per-row inverse temperatures replacing inv_temp, or None. Called as
    rlkern._C.linear_logprobs_fwd is:
    token_tile / vocab_tile are the C++ loop's (the Triton kernels keep 64 x 64 tiles in registers).

    precision: how tl.dot multiplies fp32 inputs: "ieee" (fp32-accurate, the default) or "tf32"
    (tensor cores, ~1e-3 relative error per product, several times faster). bf16 / fp16 inputs
    always use the tensor cores with fp32 accumulation."""
    precision = _dot_precision(precision, hidden.dtype)
    n_tokens, hidden_size = hidden.shape
    if n_tokens == 0:
        return
    cfg = fwd_config(hidden_size, hidden.dtype, precision, inv_temp_rows is not None or sum_p2 is not None)
    _linear_logprobs_fwd_kernel[fwd_grid(n_tokens, cfg)](
        hidden, weight, _or(bias, lse), labels, _or(inv_temp_rows, lse), lse, _or(ent, lse), zy,
        _or(sum_p2, lse),
        n_tokens, weight.shape[0], hidden_size, inv_temp, ignore_index, vocab_start,
        HAS_BIAS=bias is not None, WANT_ENTROPY=want_entropy, DOT_FP32=_dot_fp32(hidden.dtype),
        PRECISION=precision, ROW_TEMP=inv_temp_rows is not None, WANT_SUM_P2=sum_p2 is not None, **cfg,
    )
    if want_entropy:  # the rounding of a near-uniform row must not push H above ln V; NaN stays NaN
        torch.minimum(ent, ent.new_tensor(math.log(weight.shape[0])), out=ent)


def linear_logprobs_bwd(
    grad_logp: Tensor | None, grad_ent: Tensor | None,
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, lse: Tensor, ent: Tensor | None,
    inv_temp: float, ignore_index: int, vocab_start: int, token_tile: int, vocab_tile: int, precision: str,
    grad_hidden: Tensor, grad_weight: Tensor, grad_bias: Tensor | None,
    inv_temp_rows: Tensor | None = None,
) -> None:
    """Writes fp32 grad_hidden [N, H], grad_weight [V, H] (in its own dtype: summed in fp32 first)
    and grad_bias fp32 [V] (or None); grad_logp / grad_ent are fp32 [N] or None (no such upstream
    gradient). Arguments as rlkern._C.linear_logprobs_bwd; precision and inv_temp_rows as in
    linear_logprobs_fwd."""
    precision = _dot_precision(precision, hidden.dtype)
    # The kernel adds partial products from many programs into these, so they start at zero.
    dw = (
        grad_weight
        if grad_weight.dtype == torch.float32
        else torch.empty(grad_weight.shape, device=hidden.device)
    )
    grad_hidden.zero_()
    dw.zero_()
    if grad_bias is not None:
        grad_bias.zero_()
    n_tokens, hidden_size = hidden.shape
    if n_tokens > 0:
        cfg = bwd_config(hidden_size, hidden.dtype, precision)
        vocab = weight.shape[0]
        _linear_logprobs_bwd_kernel[bwd_grid(n_tokens, vocab, cfg)](
            hidden, weight, _or(bias, lse), labels, _or(grad_logp, lse), _or(grad_ent, lse),
            lse, _or(ent, lse), _or(inv_temp_rows, lse), grad_hidden, dw, _or(grad_bias, lse),
            n_tokens, vocab, hidden_size, inv_temp, ignore_index, vocab_start,
            HAS_BIAS=bias is not None, HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENT=grad_ent is not None,
            DOT_FP32=_dot_fp32(hidden.dtype), PRECISION=precision, ROW_TEMP=inv_temp_rows is not None, **cfg,
        )
    if dw is not grad_weight:
        grad_weight.copy_(dw)
