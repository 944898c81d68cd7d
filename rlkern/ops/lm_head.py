"""Token log-probs and entropy straight from hidden states and the LM head: ``linear_logprobs``.

The logits ``hidden @ weight.T + bias`` (``[N, V]``: 9.7 GB in fp32 for N = 16k, V = 152k) never
exist. Tokens x vocabulary are cut into tiles; each logits tile is one matmul into a reused
buffer, folded into per-token running statistics (max, sum-exp, label logit, sum p*z for entropy)
and overwritten by the next. Only lse and entropy (fp32, one each per token) are saved; backward
recomputes each tile, turns it into d logits in place and accumulates d hidden and d weight.

CPU: the forward's logits tiles come from ``rlkern_C::lm_logits`` (fp32 output for every input
dtype, one fixed summation order per logit, so a token's log-prob is the same bits in any batch
and with any thread count; AMX tiles for bf16 where the CPU has them, an AVX-512 / AVX2 loop
otherwise, at about 0.5x MKL's fp32 speed), the epilogues are the C++ kernels ``rlkern_C::lm_fold`` / ``lm_grad``
(csrc/lm_head.cpp), and the gradient GEMMs go through ATen (MKL sgemm for fp32,
oneDNN/AMX for bf16/fp16). Driving the loop from Python costs ~20 us per tile against
milliseconds of GEMM per tile (< 1 % at the default tile sizes). GPU: kernels/lm_head.py,
a Triton GEMM with the epilogue fused. Oracle: rlkern.reference.linear_logprobs.

Precision: logits are fp32 sums of exact products (bf16 / fp16 products are exact in fp32) and are
never rounded to the input dtype (fp16 logits near 3e4 would be 16 apart), on both backends. The
softmax statistics are fp32. Backward rounds d logits to the input dtype for the two gradient
GEMMs (fp32 accumulation inside them); the sums of the per-tile products over tiles are fp32.

Non-finite inputs (every backend): a NaN in hidden, weight or bias makes the log-prob and entropy
of every token whose logits it reaches NaN (and their gradients NaN); a +inf logit (e.g. from an
inf in hidden) makes its token NaN too (its softmax is undefined in floating point); a -inf bias
entry bans that token (p = 0, no gradient), and a token whose logits are all -inf gets log-prob
-inf and entropy 0. ``nan_check=True`` raises instead, naming the argument and the first index.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlkern import reference
from rlkern.ops._registry import cpp_kernels
from rlkern.ops._common import (
    check_int,
    check_label_range,
    check_labels,
    check_no_nan,
    check_number,
    check_temperature,
    check_tensor,
    new_output,
    pick_backend,
    raise_at_first,
)

__all__ = ["linear_logprobs", "linear_policy_loss"]

# Tile buffer budget: 1/16 of the bytes of the fp32 [N, V] logits, so that the buffer stays a few
# percent of what the naive path allocates (logits + their gradient), clamped to [256 KiB, 64 MiB]:
# below that the GEMM tiles get too thin to run at full speed, above it nothing is gained.
_BUDGET_FRACTION = 16
_BUDGET_MIN, _BUDGET_MAX = 1 << 18, 1 << 26
# At most this many tokens per tile: taller tiles do not make the GEMMs faster.
_MAX_TOKEN_TILE = 2048
# Vocabulary tiles are multiples of this (cache lines and AMX tile widths).
_VOCAB_ALIGN = 64
# The vocabulary tile does not depend on N: a token's running softmax is folded over the same
# tiles, in the same order, whatever batch it comes in (batch invariance; verl #6280). Only the
# token tile follows the memory budget.
_VOCAB_TILE = 4096
# How the Triton GEMMs multiply fp32 operands (tl.dot's input_precision); the kernels' own list,
# repeated here so that the option is checked on machines without Triton too.
PRECISIONS = ("ieee", "tf32")


def tile_sizes(n_tokens: int, vocab: int, chunk_size: int | None = None) -> tuple[int, int]:
    """(token_tile, vocab_tile) for N tokens and a vocabulary of V rows. The vocabulary tile is
    ``chunk_size`` or 4096 (never a function of N); the token tile keeps the fp32 tile within the
    memory budget."""
    vocab_tile = max(1, min(chunk_size or _VOCAB_TILE, vocab))
    budget = min(max(n_tokens * vocab * 4 // _BUDGET_FRACTION, _BUDGET_MIN), _BUDGET_MAX)
    token_tile = max(1, min(n_tokens, _MAX_TOKEN_TILE, budget // (4 * vocab_tile)))
    return token_tile, vocab_tile


def _bias32(bias: Tensor | None, device) -> Tensor:
    return bias.float().contiguous() if bias is not None else torch.empty(0, device=device)


def _finalize(m: Tensor, s: Tensor, t: Tensor, vocab: int | None = None) -> tuple[Tensor, Tensor]:
    """lse = m + log S and H = log S - T / S from the running fold; a token whose logits are all
    -inf (S = 0) gets lse = -inf and entropy 0; a NaN state (a NaN or +inf logit) stays NaN.
    H >= log S >= 0 holds by construction (T <= 0, S >= 1); with ``vocab`` the rounding of a
    near-uniform row is kept from pushing H above ln V."""
    dead = s == 0
    safe_s = torch.where(dead, torch.ones_like(s), s)
    log_s = safe_s.log()
    lse = torch.where(dead, torch.full_like(m, -math.inf), m + log_s)
    ent = torch.where(dead, torch.zeros_like(m), log_s - t / safe_s)
    if vocab is not None:
        ent = torch.minimum(ent, ent.new_tensor(math.log(vocab)))  # minimum propagates NaN
    return lse, ent


def _cpp_stats(hidden: Tensor, weight: Tensor, bias32: Tensor, labels: Tensor, inv_temp: float,
               ignore_index: int, vocab_start: int, want_entropy: bool, tiles: tuple[int, int]):
    """The forward fold over all tiles: running (m, S, T, z_y) per token, fp32 [N] each."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    tn, tv = tiles
    m = torch.full((n_tokens,), -math.inf)
    s, t, zy = torch.zeros(n_tokens), torch.zeros(n_tokens), torch.zeros(n_tokens)
    buf = torch.empty(tn * tv)  # fp32 logits for every input dtype
    for v0 in range(0, vocab, tv):
        v = min(tv, vocab - v0)
        w_tile = weight[v0:v0 + v]
        b = bias32[v0:v0 + v] if bias32.numel() else bias32
        for n0 in range(0, n_tokens, tn):
            n = min(tn, n_tokens - n0)
            tile = buf[:n * v].view(n, v)
            cpp_kernels().lm_logits(hidden[n0:n0 + n], w_tile, tile)
            rows = slice(n0, n0 + n)
            cpp_kernels().lm_fold(tile, b, labels[rows], inv_temp, ignore_index, vocab_start + v0, want_entropy,
                                       m[rows], s[rows], t[rows], zy[rows])
    return m, s, t, zy


def _cpp_grads(grad_logp: Tensor, grad_ent: Tensor, hidden: Tensor, weight: Tensor, bias32: Tensor, labels: Tensor,
               lse: Tensor, ent: Tensor, inv_temp: float, ignore_index: int, vocab_start: int,
               tiles: tuple[int, int], grad_hidden: Tensor, grad_weight: Tensor, grad_bias: Tensor) -> None:
    """Backward over all tiles, vocabulary-outer so that d weight is finished one tile at a time.
    Writes grad_hidden (fp32, accumulated over vocabulary tiles), grad_weight (weight dtype) and
    grad_bias (fp32, empty when there is no bias)."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    tn, tv = tiles
    exact = hidden.dtype == torch.float32  # fp32 GEMMs accumulate in place; bf16/fp16 go through fp32 sums
    grad_hidden.zero_()
    if n_tokens == 0:
        grad_weight.zero_()
        grad_bias.zero_()
        return
    buf = torch.empty(tn * tv)  # fp32 logits, then d logits
    low = None if exact else torch.empty(tn * tv, dtype=hidden.dtype)  # d logits in the GEMMs' dtype
    dh_part = None if exact else torch.empty(tn, hidden.shape[1], dtype=hidden.dtype)
    one_token_tile = tn >= n_tokens
    dw_acc = None if exact or one_token_tile else torch.empty(tv, weight.shape[1])
    for v0 in range(0, vocab, tv):
        v = min(tv, vocab - v0)
        w_tile = weight[v0:v0 + v]
        b = bias32[v0:v0 + v] if bias32.numel() else bias32
        gw = grad_weight[v0:v0 + v]
        for i, n0 in enumerate(range(0, n_tokens, tn)):
            n = min(tn, n_tokens - n0)
            rows = slice(n0, n0 + n)
            h_tile = hidden[rows]
            dz32 = buf[:n * v].view(n, v)
            if exact:  # MKL: ~2x the fixed-order loop; the gradient needs no batch invariance
                torch.mm(h_tile, w_tile.t(), out=dz32)
            else:  # fp32 logits of bf16 / fp16 inputs: AMX for bf16 where present (csrc/lm_head.cpp)
                cpp_kernels().lm_logits(h_tile, w_tile, dz32)
            cpp_kernels().lm_grad(dz32, b, labels[rows], grad_logp[rows] if grad_logp.numel() else grad_logp,
                                       grad_ent[rows] if grad_ent.numel() else grad_ent, lse[rows],
                                       ent[rows] if ent.numel() else ent, inv_temp, ignore_index, vocab_start + v0)
            dz = dz32 if exact else low[:n * v].view(n, v).copy_(dz32)
            if exact:
                grad_hidden[rows].addmm_(dz, w_tile)
            else:
                cpp_kernels().lm_accumulate(grad_hidden[rows], torch.mm(dz, w_tile, out=dh_part[:n]))
            if one_token_tile:
                torch.mm(dz.t(), h_tile, out=gw)
            elif exact:
                if i == 0:
                    torch.mm(dz.t(), h_tile, out=gw)
                else:
                    gw.addmm_(dz.t(), h_tile)
            else:
                part = torch.mm(dz.t(), h_tile)
                if i == 0:
                    dw_acc[:v].copy_(part)
                else:
                    cpp_kernels().lm_accumulate(dw_acc[:v], part)
            if grad_bias.numel():
                if i == 0:
                    torch.sum(dz32, 0, out=grad_bias[v0:v0 + v])
                else:
                    grad_bias[v0:v0 + v].add_(dz32.sum(0))
        if dw_acc is not None:
            gw.copy_(dw_acc[:v])


def shard_stats(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
                ignore_index: int, vocab_start: int, want_entropy: bool, chunk_size: int | None,
                backend: str, precision: str = "ieee") -> tuple[Tensor, Tensor, Tensor]:
    """(lse, entropy, z_y) over the vocabulary rows of ``weight`` (global ids from ``vocab_start``),
    fp32 [N] each; z_y is the label's scaled logit, 0 where the label is ignored or not in the
    shard. hidden: [N, H] contiguous; labels: flat int64 [N]. precision: the Triton GEMMs' fp32
    mode (see :func:`linear_logprobs`); the cpp loop is IEEE fp32 whatever it says."""
    inv_temp = 1.0 / temperature
    bias32 = _bias32(bias, hidden.device)
    if backend == "cpp":
        tiles = tile_sizes(hidden.shape[0], weight.shape[0], chunk_size)
        m, s, t, zy = _cpp_stats(hidden, weight, bias32, labels, inv_temp, ignore_index, vocab_start, want_entropy,
                                 tiles)
        lse, ent = _finalize(m, s, t, weight.shape[0])
        return lse, ent, zy
    from rlkern.kernels import lm_head as tk

    n = hidden.shape[0]
    lse, ent, zy = (torch.empty(n, device=hidden.device) for _ in range(3))
    tk.linear_logprobs_fwd(hidden, weight, bias32, labels, inv_temp, ignore_index, vocab_start, want_entropy,
                           lse, ent, zy, precision=precision)
    if want_entropy:  # the same ln V cap as _finalize (rounding of a near-uniform row); NaN stays NaN
        torch.minimum(ent, ent.new_tensor(math.log(weight.shape[0])), out=ent)
    return lse, ent, zy


def shard_grads(grad_logp: Tensor, grad_ent: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                labels: Tensor, lse: Tensor, ent: Tensor, temperature: float, ignore_index: int, vocab_start: int,
                chunk_size: int | None, backend: str, precision: str = "ieee"
                ) -> tuple[Tensor, Tensor, Tensor | None]:
    """(d hidden fp32 [N, H], d weight [V_shard, H] in weight's dtype, d bias fp32 or None) for the
    shard's logits, given the full-vocabulary lse / entropy. grad_logp / grad_ent: fp32 [N] or empty.
    precision: as for :func:`shard_stats`."""
    n_tokens, hidden_size = hidden.shape
    dev = hidden.device
    bias32 = _bias32(bias, dev)
    grad_hidden = new_output((n_tokens, hidden_size), device=dev)
    grad_bias = new_output(bias32.shape, device=dev)
    if backend == "cpp":
        grad_weight = new_output(weight.shape, device=dev, dtype=weight.dtype)
        tiles = tile_sizes(n_tokens, weight.shape[0], chunk_size)
        _cpp_grads(grad_logp, grad_ent, hidden, weight, bias32, labels, lse, ent, 1.0 / temperature, ignore_index,
                   vocab_start, tiles, grad_hidden, grad_weight, grad_bias)
    else:
        from rlkern.kernels import lm_head as tk

        grad_weight = new_output(weight.shape, device=dev)
        tk.linear_logprobs_bwd(grad_logp, grad_ent, hidden, weight, bias32, labels, lse, ent, 1.0 / temperature,
                               ignore_index, vocab_start, grad_hidden, grad_weight, grad_bias,
                               precision=precision)
        grad_weight = grad_weight.to(weight.dtype)
    return grad_hidden, grad_weight, (grad_bias if bias is not None else None)


def label_logprobs(zy: Tensor, lse: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """logp = z_y - lse; 0 for ignored labels, -inf for every label of a token whose logits are all -inf."""
    logp = torch.where(lse == -math.inf, lse, zy - lse)
    return torch.where(labels == ignore_index, torch.zeros_like(logp), logp)


def _empty_like_rows(hidden: Tensor) -> Tensor:
    return hidden.new_empty(0, dtype=torch.float32)


@torch.library.custom_op("rlkern::linear_logprobs_fwd", mutates_args=())
def _linear_logprobs_fwd(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float,
                         ignore_index: int, want_entropy: bool, chunk_size: int, backend: str, precision: str
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """hidden [N, H] contiguous, labels flat int64 [N]; chunk_size 0 = automatic; precision "ieee" or
    "tf32" (already checked). Returns fp32 (logp [N], lse [N], entropy [N] or [0])."""
    lse, ent, zy = shard_stats(hidden, weight, bias, labels, temperature, ignore_index, 0, want_entropy,
                               chunk_size or None, backend, precision)
    n, dev = hidden.shape[0], hidden.device
    logp_out, lse_out = new_output((n,), device=dev), new_output((n,), device=dev)
    logp_out.copy_(label_logprobs(zy, lse, labels, ignore_index))
    lse_out.copy_(lse)
    ent_out = new_output((n,) if want_entropy else (0,), device=dev)
    if want_entropy:
        ent_out.copy_(ent)
    return logp_out, lse_out, ent_out


@_linear_logprobs_fwd.register_fake
def _(hidden, weight, bias, labels, temperature, ignore_index, want_entropy, chunk_size, backend, precision):
    n = hidden.shape[0]
    new = lambda shape: hidden.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return new((n,)), new((n,)), new((n,) if want_entropy else (0,))


@torch.library.custom_op("rlkern::linear_logprobs_bwd", mutates_args=())
def _linear_logprobs_bwd(grad_logp: Tensor, grad_ent: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                         labels: Tensor, lse: Tensor, ent: Tensor, temperature: float, ignore_index: int,
                         chunk_size: int, backend: str, precision: str) -> tuple[Tensor, Tensor, Tensor]:
    """(d hidden in hidden's dtype, d weight in weight's dtype, d bias fp32 [V] or [0])."""
    gh, gw, gb = shard_grads(grad_logp, grad_ent, hidden, weight, bias, labels, lse, ent, temperature, ignore_index,
                             0, chunk_size or None, backend, precision)
    return gh.to(hidden.dtype), gw, gb if gb is not None else _empty_like_rows(hidden)


@_linear_logprobs_bwd.register_fake
def _(grad_logp, grad_ent, hidden, weight, bias, labels, lse, ent, temperature, ignore_index, chunk_size,
      backend, precision):
    gb = hidden.new_empty(bias.shape if bias is not None else (0,), dtype=torch.float32)
    return torch.empty_like(hidden), torch.empty_like(weight), gb


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, ignore_index, _, chunk_size, backend, precision = inputs
    _, lse, ent = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, ent)
    # precision too: backward recomputes the logits, with the GEMMs of the forward.
    ctx.args = (temperature, ignore_index, chunk_size, backend, precision)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_logp, grad_lse, grad_ent):
    hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
    none = hidden.new_empty(0, dtype=torch.float32)
    grad_logp = grad_logp.float().contiguous() if grad_logp is not None and grad_logp.numel() > 0 else none
    grad_ent = grad_ent.float().contiguous() if grad_ent is not None and grad_ent.numel() > 0 else none
    gh, gw, gb = torch.ops.rlkern.linear_logprobs_bwd(grad_logp, grad_ent, hidden, weight, bias, labels, lse, ent,
                                                      *ctx.args)
    gb = gb.to(bias.dtype) if bias is not None else None
    return gh, gw, gb, None, None, None, None, None, None, None


_linear_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


def _validate(hidden, weight, labels, bias, temperature, chunk_size) -> float:
    check_tensor(hidden, "hidden")
    check_tensor(weight, "weight")
    if hidden.dim() == 0 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have shape [..., H] with H >= 1, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape [V, H] = [V, {hidden.shape[-1]}] with V >= 1 (the LM head, "
                         f"one row per token id), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if bias is not None:
        check_tensor(bias, "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    check_labels(labels, "labels", hidden.shape[:-1])
    if chunk_size is not None:
        try:
            ok = check_int(chunk_size, "chunk_size") >= 1  # Python or numpy ints, not bool
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"chunk_size must be None or an int >= 1 (vocabulary rows per tile), got {chunk_size!r}")
    return check_temperature(temperature, "temperature")


def _check_precision(precision) -> str:
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} (how fp32 logits are multiplied on the "
                         f"Triton backend), got {precision!r}")
    return precision


def _check_finite_inputs(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """nan_check=True: a NaN anywhere, or an inf in hidden / weight or a +inf bias (each can give a
    +inf logit, which makes its token NaN), raises naming the argument and the first index."""
    for t, name in ((hidden, "hidden"), (weight, "weight"), (bias, "bias")):
        check_no_nan(t, name)
    if torch.compiler.is_compiling():
        return
    for t, name, bad in ((hidden, "hidden", hidden.detach().isinf()), (weight, "weight", weight.detach().isinf()),
                         (bias, "bias", None if bias is None else bias.detach() == math.inf)):
        if bad is not None:
            raise_at_first(bad, name, "inf (nan_check=True; it can make a logit +inf and its token NaN)")


def linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                    temperature: float = 1.0, ignore_index: int = -100, return_entropy: bool = False,
                    chunk_size: int | None = None, process_group=None,
                    nan_check: bool = False, precision: str = "ieee") -> Tensor | tuple[Tensor, Tensor]:
    """Log-probability of each label under softmax((hidden @ weight.T + bias) / temperature),
    without materialising the ``[..., V]`` logits.

    Args:
        hidden: ``[..., H]`` float32 / bfloat16 / float16 (float64 runs the reference), e.g. the
            last hidden state already shifted to align with ``labels``.
        weight: ``[V, H]`` LM head in hidden's dtype (``[V_shard, H]`` with ``process_group``).
        labels: ``[...]`` int32 / int64 token ids in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]`` (``[V_shard]`` with ``process_group``); ``-inf`` entries ban tokens.
        temperature: > 0 (a Python or numpy number, with a finite float32 reciprocal); the logits
            are divided by it first.
        ignore_index: an int (Python or numpy; 5.5 or True are refused): label value whose
            log-prob (and gradient) is 0.
        return_entropy: also return the entropy (nats) of the full distribution.
        chunk_size: vocabulary rows per tile of the CPU path; by default chosen from N, V and a
            memory budget (:func:`tile_sizes`). The Triton kernels keep 64 x 64 tiles in registers
            and ignore it.
        process_group: a ``torch.distributed`` group over which ``weight`` (and ``bias``) are
            sharded by vocabulary: rank r holds rows ``[r*ceil(V/world), (r+1)*ceil(V/world))``;
            every rank gets the full-vocabulary result and the gradient for its shard and hidden
            (see :mod:`rlkern.ops.vocab_parallel`).
        nan_check: raise a ValueError naming the argument and the first index of a NaN (or of an
            inf in hidden / weight, a +inf in bias) instead of returning NaN (an extra pass over
            the inputs and a device sync; eager only).
        precision: ``"ieee"`` (default) or ``"tf32"``: how the Triton (CUDA) backend multiplies
            fp32 hidden / weight. ``"ieee"`` gives fp32-accurate logits, so that the log-probs of an
            fp32 LM head agree between rollout and training (TRL #4303, NeMo-RL #3936); ``"tf32"``
            runs the GEMMs on the tensor cores with 10-bit mantissas, faster but ~1e-3 relative
            error in the logits. bf16 / fp16 inputs always use the tensor cores with fp32
            accumulation (their products are exact in fp32); the cpp backend computes fp32 in IEEE
            and the torch backend follows torch's matmul settings (IEEE by default) whatever this
            says, so there it changes nothing.

    Returns:
        float32 ``[...]`` log-probs ``z_y - logsumexp(z)`` (always <= 0), and float32 ``[...]``
        entropy in ``[0, ln V]`` when ``return_entropy``. Gradients flow to hidden, weight and bias
        (in their dtypes). Non-finite inputs: see the module docstring (NaN in, NaN out).
    """
    temperature = _validate(hidden, weight, labels, bias, temperature, chunk_size)
    ignore_index = check_int(ignore_index, "ignore_index")
    precision = _check_precision(precision)
    if nan_check:
        _check_finite_inputs(hidden, weight, bias)
    if process_group is not None:
        from rlkern.ops.vocab_parallel import vocab_parallel_linear_logprobs

        return vocab_parallel_linear_logprobs(hidden, weight, labels, process_group, bias=bias,
                                              temperature=temperature, ignore_index=ignore_index,
                                              return_entropy=return_entropy, chunk_size=chunk_size,
                                              precision=precision)
    tensors = (hidden, weight) if bias is None else (hidden, weight, bias)
    backend = pick_backend(*tensors, labels)
    check_label_range(labels, weight.shape[0], ignore_index)
    if backend == "torch":
        return reference.linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature,
                                         ignore_index=ignore_index, return_entropy=return_entropy)
    lead = hidden.shape[:-1]
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    logp, _, ent = torch.ops.rlkern.linear_logprobs_fwd(flat_hidden, weight.contiguous(), bias, flat_labels,
                                                        temperature, ignore_index, bool(return_entropy),
                                                        int(chunk_size or 0), backend, precision)
    return (logp.view(lead), ent.view(lead)) if return_entropy else logp.view(lead)


# Each token tile of the single pass adds its d logits^T @ hidden into the whole [V, H] fp32 d weight
# (a read-modify-write of V*H floats), so tiles of fewer rows than this make that traffic dominate:
# at N=1024, H=512, V=32768 (one thread) 64-row tiles take 1054 ms, 256-row tiles 723 ms against a
# 689 ms GEMM floor. The tile is then O(256 V) memory, independent of N.
_POLICY_MIN_TOKEN_TILE = 256


def _policy_token_tile(n_tokens: int, vocab: int, chunk_size: int | None) -> int:
    """Tokens per full-vocabulary tile of the single-pass policy loss: what the memory budget of
    :func:`tile_sizes` allows, but at least 256 rows (``chunk_size`` here counts tokens)."""
    if chunk_size is not None:
        return max(1, min(chunk_size, n_tokens))
    budget = min(max(n_tokens * vocab * 4 // _BUDGET_FRACTION, _BUDGET_MIN), _BUDGET_MAX)
    return max(1, min(n_tokens, max(_POLICY_MIN_TOKEN_TILE, budget // (4 * vocab) // 16 * 16)))


def _cpp_policy_single_pass(hidden, weight, labels, old_logp, ref_logp, advantages, mask, loss_kwargs,
                            temperature, chunk_size, loss_and_grad):
    """fp32 GRPO loss and its gradients with three GEMMs per token and no recomputation.

    Tokens are cut into tiles of n rows over the whole vocabulary, so a tile's log-probs are final
    as soon as it is folded. d loss / d logp of a token depends only on its own log-prob (and
    old/ref log-prob and advantage) and on normalisers that depend on the mask alone, so
    ``grpo_loss_and_grad`` run on all tokens, with the tokens not yet computed holding a finite
    placeholder (their old log-prob), gives the exact gradient for this tile's tokens. The tile then
    becomes d logits in place: d hidden = d logits @ W (final), d W += d logits^T @ hidden_tile
    (accumulated in the fp32 gradient itself, as Liger's fused linear losses do)."""
    n_tokens, _ = hidden.shape
    vocab = weight.shape[0]
    inv_temp = 1.0 / temperature
    shape = mask.shape
    logp_all = old_logp.detach().reshape(-1).float().clone()
    ref = ref_logp if ref_logp is not None else logp_all.view(shape)  # beta = 0: k3 only feeds the stats
    grad_hidden = new_output(hidden.shape, device=hidden.device)
    grad_weight = torch.zeros_like(weight)
    tn = _policy_token_tile(n_tokens, vocab, chunk_size)
    buf = torch.empty(tn * vocab)
    none = hidden.new_empty(0, dtype=torch.float32)
    for n0 in range(0, n_tokens, tn):
        n = min(tn, n_tokens - n0)
        rows = slice(n0, n0 + n)
        tile = buf[:n * vocab].view(n, vocab)
        cpp_kernels().lm_logits(hidden[rows], weight, tile)
        m, s, t, zy = torch.full((n,), -math.inf), torch.zeros(n), torch.zeros(n), torch.zeros(n)
        cpp_kernels().lm_fold(tile, none, labels[rows], inv_temp, -100, 0, False, m, s, t, zy)
        lse, _ = _finalize(m, s, t)
        logp_all[rows] = label_logprobs(zy, lse, labels[rows], -100)
        _, grad_logp, _ = loss_and_grad(logp_all.view(shape), old_logp, ref, advantages, mask, **loss_kwargs)
        g = grad_logp.reshape(-1)[rows].float().contiguous()
        cpp_kernels().lm_grad(tile, none, labels[rows], g, none, lse, none, inv_temp, -100, 0)
        torch.mm(tile, weight, out=grad_hidden[rows])
        grad_weight.addmm_(tile.t(), hidden[rows])
    loss, _, stats = loss_and_grad(logp_all.view(shape), old_logp, ref, advantages, mask, **loss_kwargs)
    return loss, stats, grad_hidden, grad_weight


class _AttachGradients(torch.autograd.Function):
    """Gives a loss computed without autograd the gradients already computed for its inputs:
    backward returns them scaled by the upstream gradient (the loss is a scalar, so this is exact).

    The gradients are kept as ctx attributes rather than saved tensors and handed over (scaled in
    place) on the one backward, so that autograd can take them as ``.grad`` without a copy: the
    d weight of an LM head is [V, H], a copy would double the op's peak memory."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, grad_hidden, grad_weight):
        ctx.grads = (grad_hidden, grad_weight)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("linear_policy_loss supports a single backward pass (its gradients are computed in the "
                               "forward and handed over once); recompute the loss to differentiate it again")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return None, grad_hidden, grad_weight, None, None


def _check_policy_inputs(labels: Tensor, old_logp, advantages, mask, ref_logp) -> None:
    """Shapes of the per-token inputs against labels' ``[..., T]``, with the argument's name (the
    kernels would fail later with a bare reshape error)."""
    shape = tuple(labels.shape)
    if len(shape) == 0:
        raise ValueError("labels must have shape [..., T] for linear_policy_loss, got a 0-d tensor")
    for t, name in ((old_logp, "old_logp"), (mask, "mask"), (ref_logp, "ref_logp")):
        if t is None and name == "ref_logp":
            continue
        check_tensor(t, name, floating=name != "mask")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have labels' shape {shape} (one entry per token), got {tuple(t.shape)}")
    check_tensor(advantages, "advantages")
    if tuple(advantages.shape) not in (shape, shape[:-1]):
        raise ValueError(f"advantages must have shape {shape[:-1]} (one per sequence) or {shape} (one per token), "
                         f"got {tuple(advantages.shape)}")


def linear_policy_loss(hidden: Tensor, weight: Tensor, labels: Tensor, old_logp: Tensor, advantages: Tensor,
                       mask: Tensor, *, ref_logp: Tensor | None = None, beta: float = 0.0, clip_low: float = 0.2,
                       clip_high: float = 0.2, loss_type: str = "grpo", temperature: float = 1.0,
                       chunk_size: int | None = None, precision: str = "ieee"
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO / PPO clipped policy loss straight from the last hidden state: the log-probs of
    :func:`linear_logprobs` fed to :func:`rlkern.ops.losses.grpo_loss` (same maths, same code:
    ``grpo_loss_and_grad``), without the ``[B, T, V]`` logits.

    Args:
        hidden: ``[B, T, H]`` (any leading dims ``[..., T, H]``), float32 / bfloat16 / float16.
        weight: ``[V, H]`` LM head in hidden's dtype.
        labels: ``[B, T]`` token ids (positions outside ``mask`` may hold ``-100``).
        old_logp, mask: ``[B, T]``; advantages: ``[B]`` or ``[B, T]``; ref_logp: ``[B, T]``, needed
            when ``beta > 0``.
        beta, clip_low, clip_high, loss_type: as for ``grpo_loss`` (``grpo``, ``bnpo``, ``dr_grpo``,
            ``dapo``).
        temperature: as for :func:`linear_logprobs`.
        chunk_size: tile override: tokens per full-vocabulary tile on the fp32 CPU path, vocabulary
            rows per tile otherwise (as for :func:`linear_logprobs`).
        precision: ``"ieee"`` (default) or ``"tf32"``, as for :func:`linear_logprobs`: fp32 on the
            Triton backend only; IEEE keeps the training log-probs (and so the importance ratio
            against ``old_logp``) consistent with an fp32 rollout.

    The per-token inputs are checked against ``labels``' shape (a ValueError naming the argument).
    A NaN or +inf logit makes that token's log-prob NaN, as in :func:`linear_logprobs`; the loss is
    then what ``grpo_loss`` makes of a NaN log-prob.

    Returns:
        ``(loss, stats)`` as from ``grpo_loss``; the gradient reaches ``hidden`` and ``weight``.
        The gradients are computed during the forward (d loss / d logp is known once the log-probs
        are, because the output is a scalar) and only scaled in backward. fp32 on CPU takes one
        pass of three GEMMs (see ``_cpp_policy_single_pass``); bf16 / fp16 take one GEMM more so
        that d weight needs no ``[V, H]`` fp32 accumulator.
    """
    from rlkern.ops.losses import grpo_loss, grpo_loss_and_grad

    temperature = _validate(hidden, weight, labels, None, temperature, chunk_size)
    precision = _check_precision(precision)
    _check_policy_inputs(labels, old_logp, advantages, mask, ref_logp)
    if ref_logp is None:
        if check_number(beta, "beta") != 0.0:
            raise ValueError(f"ref_logp is required when beta > 0 (got beta={beta})")
    backend = pick_backend(hidden, weight, labels)
    check_label_range(labels, weight.shape[0], -100)
    kwargs = dict(beta=beta, clip_low=clip_low, clip_high=clip_high, loss_type=loss_type)
    if backend == "torch":
        logp = reference.linear_logprobs(hidden, weight, labels, temperature=temperature)
        ref = ref_logp if ref_logp is not None else logp.detach()
        return grpo_loss(logp, old_logp, ref, advantages, mask, **kwargs)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    w = weight.contiguous()
    if backend == "cpp" and hidden.dtype == torch.float32:
        with torch.no_grad():
            loss, stats, gh, gw = _cpp_policy_single_pass(flat_hidden, w, flat_labels, old_logp, ref_logp, advantages,
                                                          mask, kwargs, temperature, chunk_size, grpo_loss_and_grad)
        return _AttachGradients.apply(loss, hidden, weight, gh.view(hidden.shape), gw), stats
    # bf16 / fp16 and Triton: log-probs first, then one backward pass (vocabulary-outer, so d weight
    # is written tile by tile in the weight's dtype with no [V, H] fp32 accumulator); one GEMM more.
    with torch.no_grad():
        lse, _, zy = shard_stats(flat_hidden, w, None, flat_labels, temperature, -100, 0, False, chunk_size,
                                 backend, precision)
        logp = label_logprobs(zy, lse, flat_labels, -100).view(labels.shape)
        ref = ref_logp if ref_logp is not None else logp
        loss, grad_logp, stats = grpo_loss_and_grad(logp, old_logp, ref, advantages, mask, **kwargs)
        none = lse.new_empty(0)
        gh, gw, _ = shard_grads(grad_logp.reshape(-1).float().contiguous(), none, flat_hidden, w, None, flat_labels,
                                lse, none, temperature, -100, 0, chunk_size, backend, precision)
    loss = _AttachGradients.apply(loss, hidden, weight, gh.to(hidden.dtype).view(hidden.shape), gw)
    return loss, stats
