"""Token selection without host syncs: KL-Cov / Clip-Cov (verl) and the top-entropy-quantile mask (TRL).

Three public ops, each returning a bool mask of the selected tokens, shaped like its inputs:

* :func:`kl_cov_mask`: the ``k = max(1, int(n * ratio))`` valid tokens with the largest centred
  covariance ``(A - mean A) * (logp - mean logp)`` (verl 0.9.1
  ``core_algos.compute_policy_loss_kl_cov``, which then adds ``ppo_kl_coef * |log r|`` to their loss).
* :func:`clip_cov_mask`: a uniformly random subset of ``min(max(int(ratio * n), 1), m)`` of the ``m``
  valid, not-excluded tokens whose covariance lies strictly inside ``(lb, ub)`` (verl
  ``compute_policy_loss_clip_cov``, which then zeroes their loss).
* :func:`high_entropy_mask`: tokens whose entropy is at least the ``threshold`` quantile of the valid
  tokens' entropies (TRL 1.16 ``GRPOTrainer.get_high_entropy_mask``, ``torch.quantile``'s linear
  interpolation, single process).

verl and TRL compact the valid tokens first (``x[mask]``, ``nonzero``), move them to the host
(``.cpu()``), read counts with ``.item()`` and size ``topk`` / ``randperm`` with them: every call
waits for the device. Here every count stays a 0-d device tensor: ``k`` only ever enters as a tensor
compared against ranks, and the one host integer these ops use, the ``topk`` width, comes from the
tensor's *shape* (the largest ``k`` any mask of that shape could give), so nothing is read back.

KL-Cov (:func:`kl_cov_mask`, :func:`kl_cov_rows`) has kernels: on CPU (csrc/token_selection.cpp) a
pass for the means and one that keeps each thread's best ``k`` tokens in a heap (faster than
``torch.topk`` over the batch at verl's ratio: benchmarks/policy_variants.py); on GPU
(kernels/token_selection.py) ``torch.topk`` and Triton for the token losses. The entropy mask's
quantile on CPU is csrc/token_selection.cpp's selection (``std::nth_element``, O(n)) where torch
sorts the batch; on GPU it is that sort, which runs at memory speed there. Clip-Cov is plain
PyTorch: a random top-k over the batch. Every op traces with ``torch.compile(fullgraph=True)`` (no
data-dependent shapes).

Shapes: ``[..., T]`` with any leading dims; the selection is over all tokens of the batch together, in
row-major order (verl's and TRL's order). Masks: any dtype, nonzero = valid.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlkern.ops._common import check_number, check_tensor, new_output, pick_backend, token_mask
from rlkern.ops._registry import kernel_op, kernels
from rlkern.ops.masked import masked_sum

__all__ = ["token_covariance", "kl_cov_mask", "kl_cov_rows", "clip_cov_mask", "high_entropy_mask"]

# TRL's padding sentinel in get_high_entropy_mask: gathered entropies equal to it are dropped.
_TRL_PAD = -1e9


def _valid(mask: Tensor, like: Tensor, name: str = "mask") -> Tensor:
    check_tensor(mask, name, floating=False)
    if mask.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, got {tuple(mask.shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def _same_shape(x: Tensor, name: str, like: Tensor, like_name: str) -> Tensor:
    check_tensor(x, name)
    if x.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, "
                         f"got {tuple(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"{name} must be on {like_name}'s device {like.device}, got {x.device}")
    return x


def _ratio(ratio, name: str) -> float:
    ratio = check_number(ratio, name)
    if not (0.0 < ratio <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {ratio}")
    return ratio


def _checked(advantages: Tensor, logp: Tensor, mask: Tensor) -> Tensor:
    """The argument checks shared by the covariance ops; returns the bool valid mask."""
    check_tensor(logp, "logp")
    _same_shape(advantages, "advantages", logp, "logp")
    return _valid(mask, logp)


def _nothing(like: Tensor) -> Tensor:
    return torch.zeros(like.shape, dtype=torch.bool, device=like.device)


def _masked_mean(x: Tensor, valid: Tensor, count: Tensor) -> Tensor:
    # rlkern.ops.masked_sum: one pass, fp32 chunks merged in float64, so within an ulp of verl's
    # float32 means (masked_mean's sum / (count + 1e-8), kl_cov's x[mask].mean()) whatever their
    # summation order. An empty mask gives 0, as verl's masked_mean does.
    return masked_sum(x, valid) / count.clamp(min=1)


def token_covariance(advantages: Tensor, logp: Tensor, mask: Tensor) -> Tensor:
    """``(A - mean A) * (logp - mean logp)`` per token, float32, with the means over the valid tokens
    of the whole batch (verl's Clip-Cov / KL-Cov covariance term; the gradient is not tracked: the
    term only ranks tokens). Masked-out positions hold their value too; the selection ops ignore them.

    Args:
        advantages, logp: ``[..., T]`` float tensors (computed in float32).
        mask: ``[..., T]``, any dtype, nonzero = valid.
    """
    valid = _checked(advantages, logp, mask)
    return _covariance(advantages, logp, valid, torch.count_nonzero(valid))


def _covariance(advantages: Tensor, logp: Tensor, valid: Tensor, count: Tensor) -> Tensor:
    a = advantages.detach().float()
    x = logp.detach().float()
    return (a - _masked_mean(a, valid, count)) * (x - _masked_mean(x, valid, count))


def _k_of(count: Tensor, ratio: float) -> Tensor:
    """``int(count * ratio)`` as Python computes it (float64 product, truncated), as an int64 tensor."""
    return torch.floor(count.double() * ratio).long()


def _topk_width(numel: int, ratio: float) -> int:
    """The largest ``max(1, int(n * ratio))`` over n <= numel, from the shape only (no sync)."""
    return min(max(1, int(numel * ratio)), numel)


_BLOCK = 64  # elements per block in _topk's first stage


def _topk(key: Tensor, width: int, largest: bool = True) -> tuple[Tensor, Tensor]:
    """``torch.topk(key, width, largest, sorted=True)`` of a 1-d ``key``, in two stages when ``width``
    is small against ``key``: the ``width`` blocks of 64 with the best block extremum hold the
    ``width`` best values (each of those blocks has an element at least as good as anything outside
    them), so one ``topk`` runs over the block extrema and one over those blocks' elements (~4x
    faster than one ``topk`` over 1M elements for verl's 0.0002 ratio). The values are exactly
    ``torch.topk``'s; an index may differ only among equal values (and may point past the end only
    when fewer than ``width`` elements beat the padding value, -inf / +inf). Shapes decide the path."""
    n = key.numel()
    blocks = -(-n // _BLOCK)
    if width * _BLOCK * 4 >= n:  # the first stage would not shrink the search
        top = torch.topk(key, width, largest=largest, sorted=True)
        return top.values, top.indices
    if n % _BLOCK:
        padded = key.new_full((blocks * _BLOCK,), -math.inf if largest else math.inf)
        padded[:n] = key
    else:
        padded = key
    grid = padded.view(blocks, _BLOCK)
    extrema = grid.amax(1) if largest else grid.amin(1)
    chosen = torch.topk(extrema, width, largest=largest, sorted=False).indices
    index = (chosen[:, None] * _BLOCK + torch.arange(_BLOCK, device=key.device)).reshape(-1)
    top = torch.topk(padded[index], width, largest=largest, sorted=True)
    return top.values, index[top.indices]


def kl_cov_mask(advantages: Tensor, logp: Tensor, mask: Tensor, ratio: float = 0.0002) -> Tensor:
    """KL-Cov's token selection (verl 0.9.1 ``core_algos.compute_policy_loss_kl_cov``), without a sync.

    With ``n`` valid tokens and ``cov = token_covariance(advantages, logp, mask)``: the
    ``k = max(1, int(n * ratio))`` valid tokens of largest ``cov`` (none when ``n = 0``). Tokens tied
    at the k-th value are taken in row-major order. verl's host ``torch.topk`` takes them in the order
    its heap (``std::partial_sort``) or ``std::nth_element`` leaves them, which is not specified: the
    selected covariance values are the same multiset, the tied tokens chosen may differ (and their
    losses with them). A NaN input at a valid token makes the covariances NaN: the selection is then
    unspecified (verl's loss and this one are NaN anyway).

    How: C++ (csrc/token_selection.cpp): one pass for the means, one in which each thread keeps a heap
    of its best ``k`` tokens (a token that does not beat the heap's worst costs one compare), merged at
    the end; the GPU (kernels/token_selection.py): ``torch.topk`` with the width the shape allows
    (``max(1, int(numel * ratio))``), the k-th value read by a tensor index, then ``> kth`` plus the
    first ``k - #(> kth)`` of the ``== kth`` tokens by a cumulative count; the torch backend: the same
    with a two-stage ``topk``. Same selection on every backend.

    Args:
        advantages, logp: ``[..., T]`` float tensors.
        mask: ``[..., T]``, any dtype, nonzero = valid.
        ratio: share of valid tokens to select, in (0, 1] (verl ``policy_loss.kl_cov_ratio``; verl's
            ``topk`` raises where ``int(n * ratio) > n``).

    Returns:
        bool ``[..., T]``, True at the selected tokens.
    """
    check_tensor(logp, "logp")
    _same_shape(advantages, "advantages", logp, "logp")
    mask = token_mask(mask, "mask", logp.shape)
    ratio = _ratio(ratio, "ratio")
    if logp.numel() == 0:
        return _nothing(logp)
    backend = pick_backend(advantages, logp)
    if backend == "torch":
        return _kl_cov_mask_torch(advantages, logp, mask if mask.dtype == torch.bool else mask != 0, ratio)
    adv, lp = _one_dtype(advantages.detach(), logp.detach())
    return _kl_cov_select(adv, lp, mask, ratio, backend).view(logp.shape)


def _kl_cov_mask_torch(advantages: Tensor, logp: Tensor, valid: Tensor, ratio: float) -> Tensor:
    """kl_cov_mask on the torch backend: a two-stage ``topk`` over the flattened valid covariances."""
    count = torch.count_nonzero(valid)
    cov = _covariance(advantages, logp, valid, count).reshape(-1)
    flat = valid.reshape(-1)
    key = torch.where(flat, cov, -math.inf)
    k = torch.where(count > 0, _k_of(count, ratio).clamp(min=1), 0)
    top, _ = _topk(key, _topk_width(key.numel(), ratio))
    kth = top.gather(0, (k - 1).clamp(min=0).reshape(1)).reshape(())
    at_least = (key >= kth) & flat
    tied = (key == kth) & flat
    need = k - (torch.count_nonzero(at_least) - torch.count_nonzero(tied))  # tied ones to take, in order
    surplus = tied & (torch.cumsum(tied, 0, dtype=torch.int32) > need)
    return (at_least & ~surplus).reshape(logp.shape)  # k = 0 only without valid tokens: nothing


def _one_dtype(*xs: Tensor) -> list[Tensor]:
    """The kernels read the token tensors in one storage type: contiguous, float32 unless all agree."""
    if any(x.dtype != xs[0].dtype for x in xs):
        xs = tuple(x.float() for x in xs)
    return [x.contiguous() for x in xs]


# The registered ops take contiguous token tensors of one shape and dtype, a contiguous mask of that
# shape in any kernel mask dtype, and optional float32 weights. `chosen`: bool, one per token.
@kernel_op("kl_cov_select")
def _kl_cov_select(advantages: Tensor, logp: Tensor, mask: Tensor, ratio: float, backend: str) -> Tensor:
    chosen = new_output(logp.shape, device=logp.device, dtype=torch.bool)
    kernels(backend, "token_selection").kl_cov_select(advantages, logp, mask, ratio, chosen)
    return chosen


@_kl_cov_select.register_fake
def _(advantages, logp, *_):
    return torch.empty(logp.shape, dtype=torch.bool, device=logp.device)


@kernel_op("kl_cov_fwd")
def _kl_cov_fwd(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, weights: Tensor | None,
                ratio: float, coef: float, backend: str) -> tuple[Tensor, Tensor]:
    rows = new_output((3, logp.numel() // logp.shape[-1]), device=logp.device)
    chosen = new_output(logp.shape, device=logp.device, dtype=torch.bool)
    kernels(backend, "token_selection").kl_cov_fwd(logp, old_logp, advantages, mask, weights, ratio, coef,
                                                   chosen, rows)
    return rows, chosen


@_kl_cov_fwd.register_fake
def _(logp, *_):
    rows = logp.new_empty((3, logp.numel() // logp.shape[-1]), dtype=torch.float32)
    return rows, torch.empty(logp.shape, dtype=torch.bool, device=logp.device)


@kernel_op("kl_cov_bwd")
def _kl_cov_bwd(grad_rows: Tensor, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                weights: Tensor | None, chosen: Tensor, coef: float, backend: str) -> Tensor:
    grad = new_output(logp.shape, device=logp.device, dtype=logp.dtype)
    kernels(backend, "token_selection").kl_cov_bwd(grad_rows, logp, old_logp, advantages, mask, weights,
                                                   chosen, coef, grad)
    return grad


@_kl_cov_bwd.register_fake
def _(grad_rows, logp, *_):
    return torch.empty_like(logp, memory_format=torch.contiguous_format)


def _kl_cov_setup(ctx, inputs, output):
    logp, old_logp, advantages, mask, weights, _ratio, coef, backend = inputs
    ctx.save_for_backward(logp, old_logp, advantages, mask, weights, output[1])
    ctx.coef, ctx.backend = coef, backend
    ctx.set_materialize_grads(False)  # no zero-filled [..., T] gradient for the bool `chosen`


def _kl_cov_backward(ctx, grad_rows, _grad_chosen):
    if grad_rows is None:
        return None, None, None, None, None, None, None, None
    logp, old_logp, advantages, mask, weights, chosen = ctx.saved_tensors
    grad = _kl_cov_bwd.in_backward(grad_rows[0].float().contiguous(), logp, old_logp, advantages, mask,
                                   weights, chosen, ctx.coef, ctx.backend)
    return grad, None, None, None, None, None, None, None


_kl_cov_fwd.register_autograd(_kl_cov_backward, setup_context=_kl_cov_setup)


def kl_cov_rows(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, ratio: float = 0.0002,
                coef: float = 1.0, weights: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """KL-Cov's token losses (verl 0.9.1 ``core_algos.compute_policy_loss_kl_cov``) summed per row, with
    the selection of :func:`kl_cov_mask`, in one fused forward pass (plus the selection's) and one
    backward pass: per valid token, ``d = logp - old_logp``, ``r = e^d`` (no clamp, as in verl),

        l = w (-A r)                 elsewhere
        l = w (-A r + coef |d|)      at the tokens kl_cov_mask(advantages, logp, mask, ratio) selects

    Every aggregation (verl's ``agg_loss`` modes) is a function of the row sums and counts.

    Args:
        logp: ``[..., T]`` float32/bf16/fp16 (float64 runs the reference); the only input with a gradient.
        old_logp, advantages: ``[..., T]`` (per-token advantages, as verl passes them).
        mask: ``[..., T]``, any dtype, nonzero = valid.
        ratio: verl ``kl_cov_ratio``, in (0, 1].
        coef: verl ``ppo_kl_coef``.
        weights: optional ``[..., T]`` constant per-token weights (verl's ``rollout_is_weights``).

    Returns:
        ``(loss_sums, abs_kl_sums, counts, chosen)``: float32 ``[...]`` per-row sums of ``l``
        (differentiable w.r.t. ``logp``) and of ``|d|`` over the valid tokens, the valid-token counts
        (float32), and the bool ``[..., T]`` selection. Masked-out tokens never enter (a NaN there
        reaches nothing); a NaN at a valid token makes its row's sums NaN.
    """
    check_tensor(logp, "logp")
    if logp.dim() == 0:
        raise ValueError("logp must have shape [..., T], got a 0-d tensor")
    _same_shape(old_logp, "old_logp", logp, "logp")
    _same_shape(advantages, "advantages", logp, "logp")
    check_tensor(mask, "mask", floating=False)
    ratio = _ratio(ratio, "ratio")
    coef = check_number(coef, "coef")
    if weights is not None:
        _same_shape(weights, "weights", logp, "logp")
        weights = weights.detach()
    backend = pick_backend(logp, old_logp, advantages, *(() if weights is None else (weights,)))
    mask = token_mask(mask, "mask", logp.shape)  # its own dtype, no pass (checks the shape)
    if backend == "torch" or logp.numel() == 0:
        valid = mask if mask.dtype == torch.bool else mask != 0
        return _kl_cov_rows_torch(logp, old_logp, advantages, valid, ratio, coef, weights)
    lp, old, adv = _one_dtype(logp, old_logp.detach(), advantages.detach())
    w = None if weights is None else weights.float().contiguous()
    rows, chosen = _kl_cov_fwd(lp, old, adv, mask, w, ratio, coef, backend)
    rows = rows.view(3, *logp.shape[:-1])
    stats = rows.detach()  # no gradient: one select to differentiate, not three
    return rows[0], stats[1], stats[2], chosen.view(logp.shape)


def _kl_cov_rows_torch(logp, old_logp, advantages, valid, ratio, coef, weights):
    """kl_cov_rows in plain torch (the reference; float64 stays float64)."""
    chosen = _kl_cov_mask_torch(advantages, logp, valid, ratio) if logp.numel() else _nothing(logp)
    dtype = torch.promote_types(logp.dtype, torch.float32)
    d = torch.where(valid, logp.to(dtype) - old_logp.detach().to(dtype), 0)
    surrogate = -torch.where(valid, advantages.detach().to(dtype), 0) * torch.exp(d)
    token = torch.where(chosen, surrogate + coef * d.abs(), surrogate)
    if weights is not None:
        token = token * torch.where(valid, weights.to(dtype), 0)
    return (token.sum(-1), d.abs().detach().sum(-1), valid.sum(-1).to(dtype), chosen)


def clip_cov_mask(advantages: Tensor, logp: Tensor, mask: Tensor, ratio: float = 0.0002, lb: float = 1.0,
                  ub: float = 5.0, exclude: Tensor | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """Clip-Cov's token selection (verl 0.9.1 ``core_algos.compute_policy_loss_clip_cov``), no sync.

    Candidates: valid tokens not in ``exclude`` (verl: those PPO already clipped) with
    ``lb < cov < ub``, ``cov = token_covariance(advantages, logp, mask)``. Selected: a uniformly random
    subset of ``min(max(int(ratio * n), 1), m)`` of the ``m`` candidates (``n`` valid tokens).

    Randomness: verl takes the first ``k`` of ``torch.randperm(m)`` on the host generator, which needs
    ``m`` on the host. Here each token draws a float64 key from ``torch.rand`` (on ``generator``, or
    the default generator of the tokens' device) and the ``k`` candidates with the smallest keys win
    (one ``topk`` of the shape's width). Both give every ``k``-subset of the candidates the same
    probability, so the selection has verl's distribution; it is not verl's draw bit for bit, and the
    same ``generator`` state gives the same selection here on the same device.

    Args:
        advantages, logp: ``[..., T]`` float tensors.
        mask: ``[..., T]``, any dtype, nonzero = valid.
        ratio: verl ``policy_loss.clip_cov_ratio``, in (0, 1].
        lb, ub: verl ``clip_cov_lb`` / ``clip_cov_ub`` (strict bounds).
        exclude: optional ``[..., T]`` bool (any dtype, nonzero = excluded).
        generator: optional ``torch.Generator`` on the tokens' device.

    Returns:
        bool ``[..., T]``, True at the selected tokens.
    """
    valid = _checked(advantages, logp, mask)
    ratio = _ratio(ratio, "ratio")
    lb, ub = check_number(lb, "lb"), check_number(ub, "ub")
    if logp.numel() == 0:
        return _nothing(logp)
    count = torch.count_nonzero(valid)
    cov = _covariance(advantages, logp, valid, count)
    cand = valid & (cov > lb) & (cov < ub)
    if exclude is not None:
        cand = cand & ~_valid(exclude, logp, "exclude")
    keys = torch.rand(logp.shape, generator=generator, dtype=torch.float64, device=logp.device)
    keys = torch.where(cand, keys, 2.0).reshape(-1)
    values, index = _topk(keys, _topk_width(keys.numel(), ratio), largest=False)
    k = _k_of(count, ratio).clamp(min=1)
    chosen = (torch.arange(values.numel(), device=logp.device) < k) & (values < 2.0)
    out = torch.zeros(keys.numel(), dtype=torch.bool, device=logp.device)
    return out.scatter(0, index, chosen).reshape(logp.shape)


def high_entropy_mask(entropies: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """TRL 1.16 ``GRPOTrainer.get_high_entropy_mask`` on one process, without a sync.

    ``thr = torch.quantile(e, threshold)`` (linear interpolation) over the valid tokens' entropies as
    float32 (TRL drops values equal to its padding sentinel -1e9 too); the result is
    ``(entropies * mask.float() >= thr) & mask.bool()``, and all False when no entropy is left. A NaN
    among them makes ``thr`` NaN and the mask all False, as ``torch.quantile`` does. TRL's quantile
    rank ``q * (n - 1)`` is computed in float32 and interpolated with ``torch.lerp`` exactly as
    ``torch.quantile`` does, so the threshold is bitwise TRL's. With several processes TRL gathers
    every rank's entropies first; this op is the single-process rule (gather yourself for more).
    Unlike ``torch.quantile`` it has no 2^24-element limit.

    Args:
        entropies: ``[..., T]`` float (any float dtype; ranked in float32).
        mask: ``[..., T]``, any dtype, nonzero = valid.
        threshold: the quantile in [0, 1] (TRL passes ``1 - top_entropy_quantile``).

    Returns:
        bool ``[..., T]``.
    """
    check_tensor(entropies, "entropies")
    valid = _valid(mask, entropies)
    q = check_number(threshold, "threshold")
    if not (0.0 <= q <= 1.0):
        raise ValueError(f"threshold must be in [0, 1] (torch.quantile's q), got {threshold}")
    if entropies.numel() == 0:
        return _nothing(entropies)
    e = entropies.float()
    if pick_backend(entropies, valid) == "cpp":
        bounds, n = _entropy_quantile_bounds(e.contiguous(), token_mask(mask, "mask", e.shape), q, "cpp")
        lo, hi, weight = bounds.unbind()
    else:
        lo, hi, weight, n = _quantile_bounds_by_sort(e, valid, q)
    # torch.quantile (aten Sorting.cpp quantile_compute): values_below.lerp_(values_above, ranks - below).
    thr = torch.lerp(lo, hi, weight)
    return (entropies * mask.float() >= thr) & valid & (n > 0)


def _quantile_bounds_by_sort(e: Tensor, valid: Tensor, q: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """high_entropy_mask's quantile bounds (csrc/token_selection.cpp entropy_quantile_bounds) as
    torch.quantile finds them: the live values sorted, +inf after them, ranks = q * last_index in
    float32, below = floor (by the cast), above = ceil; NaN bounds when a live value is NaN. Past
    2^24 values float32(n - 1) can round up to n: an index past the last element reads +inf."""
    live = valid & (e != _TRL_PAD)
    n = torch.count_nonzero(live)
    ordered = torch.sort(torch.where(live, e, math.inf).reshape(-1)).values
    ranks = torch.tensor(q, dtype=torch.float32, device=e.device) * (n - 1).clamp(min=0).float()
    below = ranks.long()
    last = ordered.numel() - 1
    nan = (live & torch.isnan(e)).any()

    def value_at(index: Tensor) -> Tensor:
        value = ordered.gather(0, index.clamp(max=last).reshape(1)).reshape(())
        return torch.where(nan, math.nan, torch.where(index > last, math.inf, value))

    return value_at(below), value_at(ranks.ceil().long()), ranks - below.float(), n


# entropies: contiguous float32; mask: its shape, any kernel mask dtype. bounds: float32 (the values at
# the floor and the ceil of the quantile rank, and the interpolation weight); count: int64 live values.
@kernel_op("entropy_quantile_bounds")
def _entropy_quantile_bounds(entropies: Tensor, mask: Tensor, q: float,
                             backend: str) -> tuple[Tensor, Tensor]:
    bounds = new_output((3,), device=entropies.device)
    count = new_output((), device=entropies.device, dtype=torch.int64)
    kernels(backend, "").entropy_quantile_bounds(entropies, mask, q, bounds, count)
    return bounds, count


@_entropy_quantile_bounds.register_fake
def _(entropies, *_):
    return entropies.new_empty((3,)), entropies.new_empty((), dtype=torch.int64)
