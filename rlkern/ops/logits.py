"""Token log-probs and entropy from logits, fused: ``logprobs``, ``entropy``, ``logprobs_and_entropy``.

One pass over the logits computes, per row, log-sum-exp and (optionally) entropy in fp32; the
log-prob of the label is (z_y - max z) - log sum e^{z - max z}, torch's log_softmax order. Nothing
of size V is saved for backward: the backward pass recomputes softmax from the saved lse and
writes d logits once (into the logits themselves with ``inplace_backward=True``, where that is
safe). Kernels: csrc/logits.cpp (CPU), kernels/logits.py (Triton); oracle:
rlkern.reference.logprobs / entropy.

Non-finite logits, the same on every backend (the torch backend is float64 ``log_softmax``
maths): a NaN or +inf logit makes its row's log-prob (unless the label is ``ignore_index``: then
0), entropy and whole gradient row NaN; ``nan_check=True`` raises instead, naming ``logits`` and
the first bad index. -inf logits are banned tokens (probability 0, no gradient); a row of only
-inf has log-prob -inf and entropy 0.

``temperature`` is a number or a per-row tensor (verl's per-sample temperature). A per-row tensor
is checked for NaN / <= 0 / inf values without a host sync where one would be needed: on CPU always
(the C++ kernel scans it, free next to the logits); on CUDA only with ``nan_check=True`` or
RLKERN_STRICT_TEMPERATURE=1 (one sync), otherwise a row with an invalid temperature comes out as a
row holding a NaN logit (NaN outputs and gradient row), which the Triton kernel decides per row.
``return_sum_p2=True`` adds sum_v p_v^2 per row from the same pass (not differentiable: verl's
optimal token baseline and TRL's WPO weighting both use it under no_grad).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from rlkern import reference
from rlkern.ops import _common
from rlkern.ops._common import (
    check_ignore_index,
    check_label_range,
    check_labels,
    check_no_nan,
    check_temperature,
    check_tensor,
    leading_groups,
    new_output,
    pick_backend,
    raise_at_first,
    rows_view,
)
from rlkern.ops._registry import kernel_op, kernels

__all__ = ["logprobs", "entropy", "logprobs_and_entropy"]

# Debug switch: RLKERN_STRICT_TEMPERATURE=1 checks per-row temperature tensors on CUDA too (one host
# sync per call). Off by default: there an invalid temperature makes its row NaN instead.
STRICT_TEMPERATURE = os.environ.get("RLKERN_STRICT_TEMPERATURE", "0") == "1"


def _flat(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A per-row tensor as the kernels take it: contiguous ``dtype``, one entry per row in row order
    (both kernels index it flat, so its shape does not matter and the common case is ``t`` itself,
    no view: ~0.9 us a tensor); None stays None."""
    if t is None or (t.dtype == dtype and t.is_contiguous()):
        return t
    return t.reshape(-1).to(dtype).contiguous()


def _rows(x: Tensor) -> Tensor:
    """rows_view(x), with the common cases cheap: a contiguous [B, T, V] tensor is its own
    [outer, inner, V] view (its rows in order, unit stride over V), any other contiguous one is one
    view (~0.9 us)."""
    if x.is_contiguous():
        if x.dim() == 3 and x.stride(2) == 1:
            return x
        if x.numel() > 0:
            return x.view(1, -1, x.shape[-1])
    return rows_view(x)


# The registered forward returns (logp, lse, entropy, sum_p2); without labels (entropy only) logp is
# empty, without want_entropy the entropy is, without want_p2 sum_p2 is. `temperatures` (flat fp32,
# one per row) replaces `temperature` when given. `inplace_backward` only changes what backward does.
@kernel_op("logprobs_fwd")
def _logprobs_fwd(logits: Tensor, labels: Tensor | None, temperature: float, temperatures: Tensor | None,
                  ignore_index: int, want_entropy: bool, want_p2: bool, inplace_backward: bool,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    lead, dev = logits.shape[:-1], logits.device
    # The kernels write the outputs flat (one fp32 per row): passed as they are, no views.
    logp = new_output(lead, device=dev) if labels is not None else None
    lse = new_output(lead, device=dev)
    ent = new_output(lead, device=dev) if want_entropy else None
    p2 = new_output(lead, device=dev) if want_p2 else None
    kernels(backend, "logits").logprobs_fwd(
        _rows(logits), _flat(labels, torch.int64), temperature, _flat(temperatures, torch.float32),
        ignore_index, logp, lse, ent, p2)
    # An absent output is its own empty tensor (a shared one would alias two outputs).
    return (_absent(logits) if logp is None else logp, lse, _absent(logits) if ent is None else ent,
            _absent(logits) if p2 is None else p2)


def _native(logits, labels, temperature, temperatures, ignore_index, want_entropy, want_p2, inplace_backward,
            backend):
    """Every eager call on the C++ backend with contiguous logits: one C++ call (csrc/logits.cpp
    LogprobsFunction) allocating the same outputs and running the same kernels as _logprobs_fwd,
    and, when the logits require grad, a C++ autograd node running _backward's kernel."""
    if backend != "cpp" or not logits.is_contiguous():
        return None
    return kernels("cpp", "").logprobs_autograd(
        logits, _flat(labels, torch.int64), temperature, _flat(temperatures, torch.float32), ignore_index,
        want_entropy, want_p2, inplace_backward, _common.POISON_OUTPUTS)


_logprobs_fwd.register_native(_native, without_grad=True)  # ~3 us less than fn's Python allocations


def _absent(logits: Tensor) -> Tensor:
    """The [0] float32 tensor that stands for an output not asked for."""
    return logits.new_empty(0, dtype=torch.float32)


@_logprobs_fwd.register_fake
def _(logits, labels, temperature, temperatures, ignore_index, want_entropy, want_p2, *_):
    lead = logits.shape[:-1]
    new = lambda shape: logits.new_empty(shape, dtype=torch.float32)  # noqa: E731
    return (new(lead if labels is not None else (0,)), new(lead), new(lead if want_entropy else (0,)),
            new(lead if want_p2 else (0,)))


def _run_backward(grad_logp: Tensor | None, grad_ent: Tensor | None, logits: Tensor, labels: Tensor | None,
                  lse: Tensor, ent: Tensor | None, temperature: float, temperatures: Tensor | None,
                  ignore_index: int, backend: str, out: Tensor) -> None:
    rows, out_rows = _rows(logits), _rows(out)
    if out_rows.data_ptr() != out.data_ptr():
        # Unreachable through the public ops: they write in place only where _writable_in_place
        # said so at call time. A direct call of the registered op gets a plain error, not a
        # gradient written into a temporary copy.
        raise ValueError("logprobs_bwd_: the gradient buffer's rows do not fold into one "
                         "[outer, inner, V] view")
    f32 = torch.float32
    kernels(backend, "logits").logprobs_bwd(
        _flat(grad_logp, f32), _flat(grad_ent, f32), rows, _flat(labels, torch.int64), _flat(lse, f32),
        _flat(ent if grad_ent is not None else None, f32), temperature, _flat(temperatures, f32),
        ignore_index, out_rows)


@kernel_op("logprobs_bwd")
def _logprobs_bwd(grad_logp: Tensor | None, grad_ent: Tensor | None, logits: Tensor, labels: Tensor | None,
                  lse: Tensor, ent: Tensor | None, temperature: float, temperatures: Tensor | None,
                  ignore_index: int, backend: str) -> Tensor:
    out = new_output(logits.shape, device=logits.device, dtype=logits.dtype)
    _run_backward(grad_logp, grad_ent, logits, labels, lse, ent, temperature, temperatures, ignore_index,
                  backend, out)
    return out


@_logprobs_bwd.register_fake
def _(grad_logp, grad_ent, logits, *_):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@kernel_op("logprobs_bwd_", mutates_args=("logits",))
def _logprobs_bwd_inplace(grad_logp: Tensor | None, grad_ent: Tensor | None, logits: Tensor,
                          labels: Tensor | None, lse: Tensor, ent: Tensor | None, temperature: float,
                          temperatures: Tensor | None, ignore_index: int, backend: str) -> None:
    _run_backward(grad_logp, grad_ent, logits, labels, lse, ent, temperature, temperatures, ignore_index,
                  backend, logits)


@_logprobs_bwd_inplace.register_fake
def _(*_):
    return None


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, temperatures, ignore_index, want_entropy, _, inplace_backward, backend = (
        inputs)
    _, lse, ent, p2 = output
    ctx.save_for_backward(logits, labels, lse, ent if want_entropy else None, temperatures)
    ctx.args = (temperature, ignore_index, backend)
    ctx.inplace_backward = inplace_backward
    ctx.mark_non_differentiable(lse, p2)
    # An output without a gradient reaches backward as None (which _backward handles), not as zeros
    # autograd would allocate for it: lse is one fp32 per row, ~1.5 us a call on small inputs.
    ctx.set_materialize_grads(False)


def _present(grad: Tensor | None) -> Tensor | None:
    """An upstream gradient, or None where autograd has none (or an empty one, for an absent output)."""
    return grad if grad is not None and grad.numel() > 0 else None


def _backward(ctx, grad_logp, grad_lse, grad_ent, grad_p2):
    logits, labels, lse, ent, temperatures = ctx.saved_tensors
    grad_logp = _present(grad_logp) if labels is not None else None
    grad_ent = _present(grad_ent) if ent is not None else None
    temperature, ignore_index, backend = ctx.args
    args = (logits, labels, lse, ent, temperature, temperatures, ignore_index, backend)
    if ctx.inplace_backward:
        _logprobs_bwd_inplace.in_backward(grad_logp, grad_ent, *args)
        grad = logits
    else:
        grad = _logprobs_bwd.in_backward(grad_logp, grad_ent, *args)
    return grad, None, None, None, None, None, None, None, None


_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_finite_logits(logits: Tensor) -> None:
    """nan_check=True: NaN or +inf logits (either makes its row NaN) raise, naming the first index."""
    check_no_nan(logits, "logits")
    if torch.compiler.is_compiling():
        return
    raise_at_first(logits.detach() == float("inf"), "logits", "+inf (nan_check=True)")


# (temperature, ignore_index) pairs of plain Python numbers already checked, keyed with their types
# (True == 1 == 1.0 as keys): a repeat skips the number checks, ~2 us of a ~35 us call on tiny inputs.
_CHECKED_SCALARS: dict[tuple, tuple[float, int]] = {}


def _check_scalars(temperature, ignore_index) -> tuple[float, int]:
    plain = type(temperature) in (float, int) and type(ignore_index) is int
    key = (type(temperature), temperature, ignore_index) if plain else None
    checked = _CHECKED_SCALARS.get(key) if plain else None
    if checked is None:
        checked = check_temperature(temperature), check_ignore_index(ignore_index)
        if plain and len(_CHECKED_SCALARS) < 64 and not torch.compiler.is_compiling():
            _CHECKED_SCALARS[key] = checked
    return checked


def _row_temperatures(temperature: Tensor, lead: torch.Size) -> Tensor:
    """A per-row temperature tensor as the kernels take it: flat, contiguous float32, detached."""
    check_tensor(temperature, "temperature")
    if temperature.shape != lead:
        raise ValueError(f"a temperature tensor must have the logits' leading shape {tuple(lead)} (one "
                         f"temperature per row; pass a float for one temperature), got "
                         f"{tuple(temperature.shape)}")
    if temperature.requires_grad and torch.is_grad_enabled():
        raise ValueError("temperature must not require grad: no gradient flows to it (pass "
                         "temperature.detach())")
    return _flat(temperature.detach(), torch.float32)


def _invalid_temperatures(temps: Tensor) -> Tensor:
    """True where a float32 temperature is NaN, <= 0, +inf or has an infinite reciprocal."""
    return ~((temps > 0) & torch.isfinite(temps) & torch.isfinite(temps.reciprocal()))


def _check_row_temperatures(temps: Tensor, lead: torch.Size, backend: str, nan_check: bool) -> Tensor:
    """Refuses invalid per-row temperatures where that needs no host sync (CPU; the C++ kernel
    checks them itself), or where the caller accepted one (nan_check=True, RLKERN_STRICT_TEMPERATURE=1).
    Unchecked, the kernels give such a row NaN; the torch backend gets NaN temperatures to match."""
    if torch.compiler.is_compiling() or temps.numel() == 0:
        return temps
    if temps.device.type == "cpu" or nan_check or STRICT_TEMPERATURE:
        if backend != "cpp":
            raise_at_first(_invalid_temperatures(temps).view(lead), "temperature",
                           "a value that is NaN, <= 0, inf or has an infinite float32 reciprocal")
        return temps
    if backend == "torch":
        return temps.masked_fill(_invalid_temperatures(temps), float("nan"))
    return temps


def _validate(logits, labels, temperature, ignore_index, nan_check) -> tuple[float | Tensor, int]:
    check_tensor(logits, "logits")
    shape = logits.shape  # read once: each .shape builds a torch.Size
    if not shape or shape[-1] == 0:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(shape)}")
    if labels is not None:
        check_labels(labels, "labels", shape[:-1])
    if isinstance(temperature, Tensor):
        temperature, ignore_index = _row_temperatures(temperature, shape[:-1]), check_ignore_index(
            ignore_index)
    else:
        temperature, ignore_index = _check_scalars(temperature, ignore_index)
    if nan_check:
        _check_finite_logits(logits)
    return temperature, ignore_index


def _writable_in_place(x: Tensor) -> bool:
    """Whether backward may write d logits over ``x``: its rows must occupy disjoint memory (no
    expanded / stride-0 or overlapping rows, which several rows, on several threads, would write at
    once), fold into the kernels' [outer, inner, V] view without a copy (a copy would receive the
    gradient instead of ``x``), and belong to no leaf that requires grad (torch forbids overwriting
    one). Decided at call time from shapes and strides only."""
    base = x if x._base is None else x._base
    if (x.is_leaf or base.is_leaf) and base.requires_grad:
        return False
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        return False
    # Disjoint: with the dims sorted by stride, each stride clears the span of the smaller ones.
    span = 1
    for stride, size in sorted((st, sz) for sz, st in zip(x.shape, x.stride()) if sz > 1):
        if stride < span:
            return False
        span += (size - 1) * stride
    # No copy: the leading dims merge into at most two (size, stride) groups, as rows_view folds them.
    return len(leading_groups(x)) <= 2


def _fused(logits, labels, temperature, ignore_index, want_entropy, inplace_backward, process_group,
           nan_check, want_p2=False):
    """(logp or None, entropy or None, sum_p2 or None)."""
    if process_group is not None:  # logits sharded by vocabulary across the group's ranks
        from rlkern.ops.vocab_parallel import vocab_parallel_logprobs

        out = vocab_parallel_logprobs(logits, labels, process_group, temperature=temperature,
                                      ignore_index=ignore_index, want_entropy=want_entropy,
                                      want_sum_p2=want_p2)
        return out if want_p2 else (*out, None)
    temperature, ignore_index = _validate(logits, labels, temperature, ignore_index, nan_check)
    temps = temperature if isinstance(temperature, Tensor) else None
    if temps is None:
        backend = pick_backend(logits) if labels is None else pick_backend(logits, labels)
    else:
        backend = pick_backend(logits, temps) if labels is None else pick_backend(logits, labels, temps)
    if temps is not None:
        temps = _check_row_temperatures(temps, logits.shape[:-1], backend, nan_check)
    if labels is not None and backend != "cpp":  # the C++ kernel checks the range itself
        check_label_range(labels, logits.shape[-1], ignore_index)
    if backend == "torch":
        t = temperature if temps is None else temps.view(logits.shape[:-1])
        logp = None if labels is None else reference.logprobs(
            logits, labels, temperature=t, ignore_index=ignore_index)
        ent = reference.entropy(logits, temperature=t) if want_entropy else None
        p2 = reference.sum_p2(logits.detach(), temperature=t) if want_p2 else None
        return logp, ent, p2
    inplace = bool(inplace_backward) and logits.requires_grad and _writable_in_place(logits)
    logp, _, ent, p2 = _logprobs_fwd(logits, labels, 1.0 if temps is not None else temperature, temps,
                                     ignore_index, want_entropy, want_p2, inplace, backend)
    return logp, ent, p2 if want_p2 else None


def _with_p2(out: Tensor, p2: Tensor | None, return_sum_p2: bool):
    return (out, p2) if return_sum_p2 else out


def logprobs(logits: Tensor, labels: Tensor, *, temperature: float | Tensor = 1.0, ignore_index: int = -100,
             inplace_backward: bool = False, process_group=None, nan_check: bool = False,
             return_sum_p2: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probability of each label under softmax(logits / temperature).

    Args:
        logits: ``[..., V]`` float32 / bfloat16 / float16 (float64 runs the reference); the last dim
            must be contiguous, leading dims may be strided (``logits[:, :-1]`` is not copied).
            ``-inf`` entries are banned tokens. A NaN or +inf entry makes its row's outputs NaN
            (see ``nan_check``).
        labels: ``[...]`` int8 / int16 / int32 / int64 / uint8 token ids in ``[0, V)`` or
            ``ignore_index`` (uint16/32/64 are refused: torch has almost no ops for them).
        temperature: > 0 with a finite float32 reciprocal; the logits are divided by it first
            (z = logits / temperature, rounded as torch rounds that division in float32). A number,
            or a float tensor of the logits' leading shape ``[...]``: one temperature per row
            (verl's per-sample temperature, expanded to its tokens), used as float32 and given no
            gradient (it must not require grad). An invalid value (NaN, <= 0, inf) is refused on
            CPU; on CUDA only with ``nan_check=True`` or RLKERN_STRICT_TEMPERATURE=1 (a host sync),
            otherwise that row comes out NaN, as a row holding a NaN logit.
        ignore_index: an int (Python or numpy); the label value whose log-prob (and gradient) is 0.
            5.5 or 5.0 are refused rather than truncated.
        inplace_backward: write d logits into the logits' own storage during backward (saves one
            ``[..., V]`` buffer); the logits must not be needed after backward. Honoured only where
            that is safe, decided at call time: the logits' rows occupy disjoint memory (not
            expanded / stride-0 or overlapping), fold into one ``[outer, inner, V]`` view without a
            copy, and are not (a view of) a leaf that requires grad. Otherwise backward allocates a
            fresh gradient exactly as with ``False``: same numbers, no memory saved.
        process_group: a ``torch.distributed`` group over which the vocabulary is sharded
            (Megatron / verl tensor parallelism): ``logits`` is then this rank's ``[..., V_r]``
            shard, rank r holding ids ``[r*ceil(V/world), (r+1)*ceil(V/world))``, ``labels`` are
            global ids, and every rank gets the full-vocabulary result (three all-reduces of one
            fp32 per row; see rlkern.ops.vocab_parallel). ``inplace_backward`` does not apply.
        nan_check: raise a ValueError naming ``logits`` and the first index of a NaN or +inf
            entry instead of returning NaN (one extra pass and a device sync; eager only, skipped
            while torch.compile traces); with a temperature tensor, also refuse invalid values.
        return_sum_p2: also return ``sum_v p_v^2`` per row (float32 ``[...]``, p = softmax(z)), from
            the same pass: verl's ``sum_pi_squared`` for the optimal token baseline
            (rlkern.ops.optimal_token_baseline takes it as is); TRL's ``log_sum_sq_probs`` is its
            log. 0 for a row whose logits are all -inf, NaN for a row holding a NaN or +inf logit.
            It carries no gradient (both peers use it under no_grad); backward through it is as
            through a constant.

    Returns:
        float32 ``[...]``: ``(z_y - max z) - logsumexp(z - max z)`` with ``z = logits / temperature``,
        always <= 0; 0 where the label is ``ignore_index`` (whatever the row holds); -inf for a
        banned label; NaN for a row holding a NaN or +inf logit. With ``return_sum_p2``, the pair
        ``(logprobs, sum_p2)``.
    """
    logp, _, p2 = _fused(logits, labels, temperature, ignore_index, False, inplace_backward, process_group,
                         nan_check, return_sum_p2)
    return _with_p2(logp, p2, return_sum_p2)


def entropy(logits: Tensor, *, temperature: float | Tensor = 1.0, inplace_backward: bool = False,
            process_group=None, nan_check: bool = False,
            return_sum_p2: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Shannon entropy in nats of softmax(logits / temperature), float32 ``[...]``, in ``[0, log V]``.

    ``-inf`` logits have probability 0 and contribute nothing; a row whose logits are all ``-inf``
    has entropy 0; a row holding a NaN or +inf logit has entropy NaN (or raises with
    ``nan_check=True``). Shapes, dtypes and the other arguments as for :func:`logprobs`; with
    ``return_sum_p2``, the pair ``(entropy, sum_p2)``.
    """
    _, ent, p2 = _fused(logits, None, temperature, -100, True, inplace_backward, process_group, nan_check,
                        return_sum_p2)
    return _with_p2(ent, p2, return_sum_p2)


def logprobs_and_entropy(logits: Tensor, labels: Tensor, *, temperature: float | Tensor = 1.0,
                         ignore_index: int = -100, inplace_backward: bool = False, process_group=None,
                         nan_check: bool = False, return_sum_p2: bool = False):
    """``(logprobs(...), entropy(...))`` from a single pass over the logits; gradients flow through both.
    With ``return_sum_p2``, ``(logprobs, entropy, sum_p2)``."""
    logp, ent, p2 = _fused(logits, labels, temperature, ignore_index, True, inplace_backward, process_group,
                           nan_check, return_sum_p2)
    return (logp, ent, p2) if return_sum_p2 else (logp, ent)
