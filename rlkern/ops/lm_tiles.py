"""The LM-head tile code shared by :mod:`rlkern.ops.lm_head` and :mod:`rlkern.ops.vocab_parallel`:
tile sizes, argument checks, and the per-shard forward statistics and gradients that both the
single-device op (one shard: the whole vocabulary) and the vocabulary-parallel op call.

The kernels (``kernels(backend, "lm_head")``: ``rlkern._C`` or ``rlkern.kernels.lm_head``) are
called identically on both backends, with None for an absent tensor:

    linear_logprobs_fwd(hidden, weight, bias, labels, inv_temp, ignore_index, vocab_start,
                        want_entropy, token_tile, vocab_tile, precision, lse, ent, zy,
                        inv_temp_rows, sum_p2)
    linear_logprobs_bwd(grad_logp, grad_ent, hidden, weight, bias, labels, lse, ent, inv_temp,
                        ignore_index, vocab_start, token_tile, vocab_tile, precision,
                        grad_hidden, grad_weight, grad_bias, inv_temp_rows)

``inv_temp_rows`` (fp32 [N] per-token inverse temperatures, replacing the scalar ``inv_temp``) and
``sum_p2`` (an fp32 [N] output for sum_v p_v^2) are None when unused.

The C++ loop uses the tile sizes (the Triton kernels keep 64 x 64 tiles in registers), the Triton
GEMMs the precision (the C++ GEMMs are IEEE fp32). The torch backend (float64, or a forced reference
run) gets the same two functions in plain PyTorch from :func:`lm_kernels` (``TorchLmHead``: the
shard's logits materialised in fp32 / fp64), so that every caller names the backend once.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlkern.ops._common import check_int, check_labels, check_temperature, check_tensor, new_output
from rlkern.ops._registry import kernels

__all__ = [
    "lm_kernels",
    "TorchLmHead",
    "torch_shard_stats",
    "torch_shard_dz",
    "torch_sum_p2",
    "tile_sizes",
    "grad_tile_sizes",
    "shard_stats",
    "shard_grads",
    "label_logprobs",
    "finalize",
    "validate",
    "check_precision",
    "row_inv_temperatures",
    "PRECISIONS",
]

# Tile buffer budget: 1/16 of the bytes of the fp32 [N, V] logits, so that the buffer stays a few
# percent of what the naive path allocates (logits + their gradient), clamped to [256 KiB, 64 MiB]:
# below that the GEMM tiles get too thin to run at full speed, above it nothing is gained.
_BUDGET_FRACTION = 16
_BUDGET_MIN, _BUDGET_MAX = 1 << 18, 1 << 26
# At most this many tokens per tile: taller tiles do not make the GEMMs faster.
_MAX_TOKEN_TILE = 2048
# The forward's token tile is at most lm_logits' task height (csrc/lm_head.cpp kRowsPerTask): its fp32
# logits tile (192 x 512 x 4 = 384 KiB), the vocabulary tile's packed weight (1 MiB at H = 512) and the
# packed rows then stay in a 2 MiB L2 between the GEMM and the fold. 1024-row tiles went through L3:
# the fp32 forward at N=1024, H=512, V=32768 (one thread, loaded machine) took 1.1x as long. The token
# tile never changes a token's bits (each row's logits and fold are its own).
_FWD_TOKEN_TILE = 192
# Vocabulary tiles are multiples of this (cache lines and AMX tile widths).
_VOCAB_ALIGN = 64
# The forward's vocabulary tile does not depend on N: a token's running softmax is folded over the
# same tiles, in the same order, whatever batch it comes in (batch invariance; verl #6280). Only
# the token tile follows the memory budget. 512 wide: the fp32 logits tile (N_tile x 512) and the
# tile's packed weight (512 x H) stay in L2 between the GEMM and the fold; the C++ forward at
# N=1024, H=512, V=32768 (one thread) took 0.85x the time of 4096-wide tiles.
_VOCAB_TILE = 512
# How the Triton GEMMs multiply fp32 operands (tl.dot's input_precision); the kernels' own list,
# repeated here so that the option is checked on machines without Triton too.
PRECISIONS = ("ieee", "tf32")


def _budget(n_tokens: int, vocab: int) -> int:
    return min(max(n_tokens * vocab * 4 // _BUDGET_FRACTION, _BUDGET_MIN), _BUDGET_MAX)


def _token_tile(n_tokens: int, vocab: int, vocab_tile: int, cap: int) -> int:
    return max(1, min(n_tokens, cap, _MAX_TOKEN_TILE, _budget(n_tokens, vocab) // (4 * vocab_tile)))


def tile_sizes(n_tokens: int, vocab: int, chunk_size: int | None = None) -> tuple[int, int]:
    """(token_tile, vocab_tile) of the forward for N tokens and a vocabulary of V rows. The
    vocabulary tile is ``chunk_size`` or 512 (never a function of N); the token tile keeps the
    fp32 tile within the memory budget and L2 (at most 192 rows)."""
    vocab_tile = max(1, min(chunk_size or _VOCAB_TILE, vocab))
    return _token_tile(n_tokens, vocab, vocab_tile, _FWD_TOKEN_TILE), vocab_tile


def grad_tile_sizes(n_tokens: int, vocab: int, chunk_size: int | None = None) -> tuple[int, int]:
    """(token_tile, vocab_tile) of the backward, within the same memory budget. The gradient needs
    no batch invariance, so the tile is as tall as allowed (up to 2048 tokens) and the vocabulary
    tile fills the budget: with one token tile, each d weight tile is one GEMM written straight into
    the gradient (no fp32 [V_tile, H] accumulator for bf16 / fp16, no read-modify-write for fp32).
    ``chunk_size`` (vocabulary rows) gives the forward's vocabulary tile, with tokens up to the budget."""
    if chunk_size is not None:
        vocab_tile = max(1, min(chunk_size, vocab))
        return _token_tile(n_tokens, vocab, vocab_tile, _MAX_TOKEN_TILE), vocab_tile
    token_tile = max(1, min(n_tokens, _MAX_TOKEN_TILE))
    vocab_tile = _budget(n_tokens, vocab) // (4 * token_tile) // _VOCAB_ALIGN * _VOCAB_ALIGN
    return token_tile, max(1, min(vocab, max(_VOCAB_ALIGN, vocab_tile)))


def finalize(m: Tensor, s: Tensor, t: Tensor, vocab: int | None = None) -> tuple[Tensor, Tensor]:
    """lse = m + log S and H = log S - T / S from the running fold (m, S, T) of ``lm_fold``; a
    token whose logits are all -inf (S = 0) gets lse = -inf and entropy 0; a NaN state (a NaN or
    +inf logit) stays NaN. H >= log S >= 0 holds by construction (T <= 0, S >= 1); with ``vocab``
    the rounding of a near-uniform row is kept from pushing H above ln V."""
    dead = s == 0
    safe_s = torch.where(dead, torch.ones_like(s), s)
    log_s = safe_s.log()
    lse = torch.where(dead, torch.full_like(m, -math.inf), m + log_s)
    ent = torch.where(dead, torch.zeros_like(m), log_s - t / safe_s)
    if vocab is not None:
        ent = torch.minimum(ent, ent.new_tensor(math.log(vocab)))  # minimum propagates NaN
    return lse, ent


def label_logprobs(zy: Tensor, lse: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """logp = z_y - lse; 0 for ignored labels, -inf for every label of a token whose logits are all -inf."""
    logp = torch.where(lse == -math.inf, lse, zy - lse)
    return torch.where(labels == ignore_index, torch.zeros_like(logp), logp)


def _acc_dtype(t: Tensor) -> torch.dtype:
    """The dtype of the statistics and gradients: fp32, or fp64 for fp64 inputs (torch backend)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _widen(t: Tensor | None, like: Tensor) -> Tensor | None:
    return t.to(_acc_dtype(like)).contiguous() if t is not None else None


NEG_INF = float("-inf")


def torch_shard_stats(z: Tensor, labels: Tensor, ignore_index: int, vocab_start: int):
    """(lse_r, H_r, z_y) of scaled logits z [N, v] (fp32 or fp64) for ids [vocab_start, +v)."""
    lse = torch.logsumexp(z, dim=-1)
    alive = lse != NEG_INF  # a NaN lse (NaN / +inf logit) stays "alive": its statistics come out NaN
    log_q = z - torch.where(alive, lse, torch.zeros_like(lse))[:, None]
    q = torch.where(alive[:, None], log_q.exp(), torch.zeros_like(z))
    ent = -(q * torch.where(q > 0, log_q, torch.zeros_like(log_q))).sum(-1)
    local = labels - vocab_start
    here = (labels != ignore_index) & (local >= 0) & (local < z.shape[-1])
    picked = z.gather(-1, torch.where(here, local, 0)[:, None]).squeeze(-1)
    return lse, ent, torch.where(here, picked, torch.zeros_like(picked))


def torch_sum_p2(z: Tensor, lse: Tensor) -> Tensor:
    """sum_j e^{2 (z_j - lse)} per row of scaled logits z [N, v] (the shard's own softmax when lse is
    the shard's): 0 for a row whose logits are all -inf, NaN for a NaN lse."""
    alive = lse != NEG_INF
    p = torch.where(alive[:, None], (z - torch.where(alive, lse, torch.zeros_like(lse))[:, None]).exp(), 0.0)
    return (p * p).sum(-1)


def torch_shard_dz(
    z: Tensor,
    labels: Tensor,
    grad_logp: Tensor | None,
    grad_ent: Tensor | None,
    lse: Tensor,
    ent: Tensor | None,
    ignore_index: int,
    vocab_start: int,
    inv_temp: float,
) -> Tensor:
    """d logits (before the 1/temperature of z) of the global softmax restricted to this shard."""
    alive = lse != NEG_INF  # a NaN lse (NaN / +inf logit) stays "alive": its statistics come out NaN
    d = z - torch.where(alive, lse, torch.zeros_like(lse))[:, None]
    p = torch.where(alive[:, None], d.exp(), torch.zeros_like(z))
    dz = torch.zeros_like(z)
    if grad_logp is not None:
        g = torch.where((labels != ignore_index) & alive, grad_logp.to(z.dtype), 0.0)
        local = labels - vocab_start
        here = (labels != ignore_index) & (local >= 0) & (local < z.shape[-1])
        onehot = torch.zeros_like(z).scatter_(
            -1, torch.where(here, local, 0)[:, None], here[:, None].to(z.dtype)
        )
        dz = dz + g[:, None] * (onehot - p)
    if grad_ent is not None:
        gh = torch.where(alive, grad_ent.to(z.dtype), 0.0)
        dz = dz - gh[:, None] * torch.where(p == 0, torch.zeros_like(p), p * (d + ent.to(z.dtype)[:, None]))
    return dz * inv_temp


class TorchLmHead:
    """``linear_logprobs_fwd`` / ``_bwd`` in plain PyTorch, with the kernels' arguments: the torch
    backend's "kernels" (float64 inputs, or a forced reference run). The shard's logits are
    materialised in fp32 (fp64 for fp64 inputs); tile sizes and precision are ignored."""

    @staticmethod
    def _inv(inv_temp: float, inv_rows: Tensor | None, like: Tensor):
        return inv_temp if inv_rows is None else inv_rows.to(_acc_dtype(like))[:, None]

    @staticmethod
    def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, inv) -> Tensor:
        up = _acc_dtype(hidden)
        z = hidden.to(up) @ weight.to(up).T
        return (z if bias is None else z + bias.to(up)) * inv

    @staticmethod
    def linear_logprobs_fwd(
        hidden, weight, bias, labels, inv_temp, ignore_index, vocab_start, want_entropy, token_tile,
        vocab_tile, precision, lse, ent, zy, inv_temp_rows=None, sum_p2=None,
    ) -> None:
        z = TorchLmHead._logits(hidden, weight, bias, TorchLmHead._inv(inv_temp, inv_temp_rows, hidden))
        lse_r, ent_r, zy_r = torch_shard_stats(z, labels, ignore_index, vocab_start)
        lse.copy_(lse_r)
        zy.copy_(zy_r)
        if want_entropy:
            ent.copy_(torch.minimum(ent_r, ent_r.new_tensor(math.log(weight.shape[0]))))
        if sum_p2 is not None:
            sum_p2.copy_(torch_sum_p2(z, lse_r))

    @staticmethod
    def linear_logprobs_bwd(
        grad_logp, grad_ent, hidden, weight, bias, labels, lse, ent, inv_temp, ignore_index, vocab_start,
        token_tile, vocab_tile, precision, grad_hidden, grad_weight, grad_bias, inv_temp_rows=None,
    ) -> None:
        inv = TorchLmHead._inv(inv_temp, inv_temp_rows, hidden)
        z = TorchLmHead._logits(hidden, weight, bias, inv)
        dx = torch_shard_dz(z, labels, grad_logp, grad_ent, lse, ent, ignore_index, vocab_start, inv)
        torch.mm(dx, weight.to(dx.dtype), out=grad_hidden)
        grad_weight.copy_(dx.T @ hidden.to(dx.dtype))
        if grad_bias is not None:
            torch.sum(dx, 0, out=grad_bias)


def lm_kernels(backend: str):
    """The LM-head kernels of ``backend``: ``rlkern._C`` ("cpp"), ``rlkern.kernels.lm_head``
    ("triton") or :class:`TorchLmHead` ("torch"), called identically."""
    return TorchLmHead if backend == "torch" else kernels(backend, "lm_head")


def shard_stats(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    temperature: float,
    ignore_index: int,
    vocab_start: int,
    want_entropy: bool,
    chunk_size: int | None,
    backend: str,
    precision: str = "ieee",
    inv_rows: Tensor | None = None,
    sum_p2: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """(lse, entropy or None, z_y) over the vocabulary rows of ``weight`` (global ids from
    ``vocab_start``), fp32 [N] each (fp64 for fp64 inputs, on the torch backend); z_y is the label's
    scaled logit, 0 where the label is ignored or not in the shard. hidden: [N, H] contiguous;
    labels: flat int64 [N]. precision: the Triton GEMMs' fp32 mode (see ``linear_logprobs``); the
    C++ loop is IEEE fp32 whatever it says. inv_rows: per-row inverse temperatures (fp32 [N], from
    :func:`row_inv_temperatures`) used instead of ``1 / temperature``; sum_p2: an [N] output of the
    statistics' dtype that receives sum_v p_v^2 of this shard's softmax (the whole vocabulary for a
    single device)."""
    n, dev, acc = hidden.shape[0], hidden.device, _acc_dtype(hidden)
    lse, zy = new_output((n,), device=dev, dtype=acc), new_output((n,), device=dev, dtype=acc)
    ent = new_output((n,), device=dev, dtype=acc) if want_entropy else None
    token_tile, vocab_tile = tile_sizes(n, weight.shape[0], chunk_size)
    lm_kernels(backend).linear_logprobs_fwd(
        hidden, weight, _widen(bias, hidden), labels, 1.0 / temperature, ignore_index, vocab_start,
        want_entropy, token_tile, vocab_tile, precision, lse, ent, zy, inv_rows, sum_p2,
    )
    return lse, ent, zy


def shard_grads(
    grad_logp: Tensor | None,
    grad_ent: Tensor | None,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    lse: Tensor,
    ent: Tensor | None,
    temperature: float,
    ignore_index: int,
    vocab_start: int,
    chunk_size: int | None,
    backend: str,
    precision: str = "ieee",
    inv_rows: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(d hidden fp32 [N, H], d weight [V_shard, H] in weight's dtype, d bias fp32 or None; fp64 for
    fp64 inputs) for the shard's logits, given the full-vocabulary lse / entropy. grad_logp /
    grad_ent: [N] or None, widened here to fp32 (fp64) (ent is needed with grad_ent). precision and
    inv_rows: as for :func:`shard_stats`."""
    n_tokens, hidden_size = hidden.shape
    dev, acc = hidden.device, _acc_dtype(hidden)
    grad_hidden = new_output((n_tokens, hidden_size), device=dev, dtype=acc)
    grad_weight = new_output(weight.shape, device=dev, dtype=weight.dtype)
    grad_bias = new_output((weight.shape[0],), device=dev, dtype=acc) if bias is not None else None
    token_tile, vocab_tile = grad_tile_sizes(n_tokens, weight.shape[0], chunk_size)
    lm_kernels(backend).linear_logprobs_bwd(
        _widen(grad_logp, hidden), _widen(grad_ent, hidden), hidden, weight, _widen(bias, hidden), labels,
        lse, ent, 1.0 / temperature, ignore_index, vocab_start, token_tile, vocab_tile, precision,
        grad_hidden, grad_weight, grad_bias, inv_rows,
    )
    return grad_hidden, grad_weight, grad_bias


def validate(hidden, weight, labels, bias, temperature, chunk_size) -> float:
    """Checks the LM-head arguments (messages name the argument); returns the temperature as a float
    (1.0 for a per-row temperature tensor, checked by :func:`row_inv_temperatures`)."""
    check_tensor(hidden, "hidden")
    check_tensor(weight, "weight")
    if hidden.dim() == 0 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have shape [..., H] with H >= 1, got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"weight must have shape [V, H] = [V, {hidden.shape[-1]}] with V >= 1 (the LM head, "
            f"one row per token id), got {tuple(weight.shape)}"
        )
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
            raise ValueError(
                f"chunk_size must be None or an int >= 1 (vocabulary rows per tile), got {chunk_size!r}"
            )
    if isinstance(temperature, Tensor):
        return 1.0
    return check_temperature(temperature, "temperature")


def row_inv_temperatures(temperature, shape: torch.Size, device, check_values: bool = False,
                         dtype: torch.dtype = torch.float32) -> Tensor | None:
    """None for a scalar temperature; for a tensor (one temperature per token, or any shape that
    broadcasts to the tokens' ``shape``, e.g. ``[B, 1]`` per sequence), the flat contiguous fp32 [N]
    inverse temperatures ``float32(1 / float64(T))``, as the kernels compute a scalar's (``dtype``
    float64: ``1 / float64(T)`` unrounded, for float64 logits on the torch backend). The values
    are not read on the host (no device sync) unless ``check_values`` (``nan_check=True``): then a
    ValueError names the first entry that is not a finite T > 0 with a finite fp32 reciprocal."""
    if not isinstance(temperature, Tensor):
        return None
    if not temperature.dtype.is_floating_point:
        raise TypeError(f"a temperature tensor must be floating point, got {temperature.dtype}")
    if temperature.device != device:
        raise ValueError(f"a temperature tensor must be on the hidden states' device {device}, got "
                         f"{temperature.device}")
    try:
        expanded = temperature.detach().expand(shape)
    except RuntimeError:
        raise ValueError(f"a temperature tensor must broadcast to the tokens' shape {tuple(shape)}, got "
                         f"{tuple(temperature.shape)}") from None
    inv = (1.0 / expanded.double()).to(dtype)
    if check_values and not torch.compiler.is_compiling():
        bad = ~(torch.isfinite(inv) & (inv > 0) & torch.isfinite(expanded))
        if bool(bad.any()):
            where = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"temperature must be finite and > 0 with a finite float32 reciprocal; entry "
                             f"{where} is {expanded[where].item()!r} (nan_check=True)")
    return inv.reshape(-1).contiguous()


def check_precision(precision) -> str:
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(
            f"precision must be one of {PRECISIONS} (how fp32 logits are multiplied on the "
            f"Triton backend), got {precision!r}"
        )
    return precision
