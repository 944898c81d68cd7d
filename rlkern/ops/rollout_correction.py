"""Rollout/training mismatch correction: importance weights between the policy that trains and the
engine that sampled (vLLM/SGLang), their truncation or masking, and rejection of tokens/sequences whose
divergence estimate is too large, with verl 0.9.1's diagnostics from the same pass.

One op, :func:`rollout_correction`, whose options express the three peers' conventions:

=====================  =========================================  ======================================
peer / name            weights                                     options
=====================  =========================================  ======================================
verl TIS (token)       ``min(exp(clamp(d, ±20)), U)``, padding 0   ``level="token"`` (defaults)
verl TIS (sequence)    ``min(exp(clamp(Σd, ±20)), U)`` per row     ``level="sequence"``
verl IcePop / MIS      0 outside ``[L, U]``                        ``mode="mask", lower=L``
verl RS / Geo-RS       (mask) ``token_k*``, ``seq_{sum,mean}_k*``,  ``rs="seq_mean_k1", rs_threshold=...``
                       ``seq_max_k{2,3}``
TRL token/seq          ``clamp(exp(nan_to_num(d·m)), lo, hi)``     ``padding="trl", log_clamp=None``,
_truncate/_mask        (sequence: Σ over the row, no ±20 clamp)    ``lower=vllm_..._clip_min``
OpenRLHF tis / icepop  ``clamp(exp(d), lo, hi)`` / 0 outside        ``padding="raw", log_clamp=None``
OpenRLHF seq-mask-tis  ``exp(d)`` (not truncated), 0 for a row      ``mode="none", seq_gate=(lo, hi)``
                       whose ``exp(mean d)`` is outside ``[lo, hi]``
=====================  =========================================  ======================================

with ``d = log_prob - rollout_log_prob`` (verl: ``old_log_prob - rollout_log_prob``). The peers differ in:

* the log-ratio clamp: verl clamps ``d`` (or ``Σd``) to ``[-20, 20]`` before ``exp``; TRL and OpenRLHF
  do not (``log_clamp=None``), so their sequence weight overflows to ``inf`` past ``Σd > 88``;
* padding: verl multiplies the weights by the mask (padding weight 0); TRL multiplies ``d`` by the mask
  and maps NaN to 0 (padding, and tokens vLLM could not score, get ratio 1); OpenRLHF leaves the
  padding weight ``exp(d)``; a NaN log-prob on a valid token gives a NaN weight in verl and OpenRLHF;
* truncation: verl's TIS has only an upper bound (a ``"L_U"`` threshold switches to IcePop masking);
  TRL and OpenRLHF clamp to ``[lo, hi]``;
* the sequence statistic: a sum of log-ratios for verl/TRL sequence IS, a mean (geometric mean ratio) for
  verl's ``seq_mean_*`` and OpenRLHF's ``seq-mask-tis`` gate.

TRL's off-policy sequence mask (DeepSeek-V3.2, ``off_policy_mask_threshold``) is
:func:`off_policy_sequence_mask`; verl's DPPO trust region (``dppo_tv`` / ``dppo_kl``) and OpenRLHF's
``binary_kl`` / ``tv`` gatings are :func:`trust_region_gate` (one kernel pass, weights and the
peers' filter shares; C++ and Triton, no host sync).

verl computes in the input dtype; rlkern computes in fp32 (fp64 for fp64 inputs) and returns fp32
weights; the tests compare with verl run on the upcast inputs. No host synchronisation (the tests run
the op on ``meta`` tensors): every statistic is a 0-d tensor; rlkern.compat.verl reads them back in one
transfer.

Backends: on CPU one C++ kernel (csrc/rollout_correction.cpp), on CUDA one Triton kernel
(kernels/rollout_correction.py, one program per row; calls with rejection options ``rs`` take the
torch path there, see that module), each sweeping a row twice (row sums, then weights and mask) and
returning per-row float64 sums from which verl's metrics are ~100 tiny ``[B]`` ops. Calls that want the
weights alone (``metrics=False``, no ``rs``, no ``batch_normalize``: TRL's vLLM IS ratios, OpenRLHF's
corrections) run a lean kernel instead (``rlkern::rollout_weights_fwd``): one pass reading the
log-probs in their own dtype and the mask in its own, writing only the fp32 weights (two passes with a
row statistic: ``level="sequence"``, ``seq_gate``; the row sums in float64). For meta, float64 and
``use_backend("torch")`` the vectorised torch path below (~150 passes over ``[B, T]``,
mostly verl's masked reductions). The Triton kernel is tested through the interpreter and compiled
for sm_80/sm_90 (tests/gpu_compile.py), not yet timed on a GPU.
Either kernel is the registered op ``rlkern::rollout_correction_fwd`` (``register_fake``; no autograd:
the weights are constants in every peer), so ``torch.compile(fullgraph=True)`` traces the public
function, metrics included, without a graph break; :func:`off_policy_sequence_mask` is six torch ops
and traces as it is (tests: opcheck and a fullgraph test per backend).
Measured at B = 256 x T = 4096, fp32 log-probs, float mask, one thread on the loaded 2-core
development CPU, interleaved medians of 9 (verl 0.9.1 ``compute_rollout_correction_and_rejection_mask``
eager; torch.compile of this module's torch path, the same maths as verl's):

=====================================  ========  ===============  ==============  =====================
case                                   verl      rlkern.compat    rlkern.ops      torch.compile
=====================================  ========  ===============  ==============  =====================
token TIS 2.0 + Geo-RS seq_mean_k1     306 ms    57 ms (5.4x)     45 ms (6.8x)    521 ms (ops: 11.5x)
sequence TIS 2.0                       205 ms    72 ms (2.8x)     56 ms (3.6x)    173 ms (ops: 3.1x)
IcePop 0.5_2 + token_k3 + seq_max_k2   569 ms    137 ms (4.1x)    128 ms (4.5x)   503 ms (ops: 3.9x)
=====================================  ========  ===============  ==============  =====================

(every call computes the weights, the new mask and all of verl's metrics; rlkern.compat adds the one
read-back of the metrics and verl's DataProto.)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from rlkern.ops._common import KERNEL_DTYPES, NATIVE_MASK_DTYPES, check_tensor, new_output, pick_backend
from rlkern.ops._registry import kernel_op, kernels

__all__ = ["rollout_correction", "off_policy_sequence_mask", "trust_region_gate", "parse_rs",
           "parse_is_threshold", "RolloutCorrection", "TrustRegion", "RS_OPTIONS", "SAFETY_BOUND"]

SAFETY_BOUND = 20.0
RS_OPTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
              "seq_mean_k1", "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")
_LEVELS = (None, "token", "sequence")
_MODES = ("truncate", "mask", "none")
_PADDINGS = ("zero", "trl", "raw")
_EPS = 1e-8  # verl's masked_mean denominator epsilon


class RolloutCorrection(NamedTuple):
    weights: Tensor | None  # [..., T] fp32 (fp64 for fp64 inputs); None when level is None
    mask: Tensor  # [..., T] the mask with rejected tokens zeroed, in the mask's dtype
    metrics: dict[str, Tensor]  # verl's metric names (unprefixed), 0-d tensors


def parse_is_threshold(spec) -> tuple[float, float | None]:
    """verl's ``_parse_rollout_is_threshold``: a number or ``"U"`` gives ``(U, None)`` (TIS), ``"L_U"``
    gives ``(U, L)`` (IcePop)."""
    if isinstance(spec, bool):
        raise TypeError("rollout_is_threshold must be specified as a float or a string threshold "
                        "specification, not a boolean.")
    if isinstance(spec, int | float):
        upper, lower = float(spec), None
    elif isinstance(spec, str):
        text = spec.strip()
        if not text:
            raise ValueError("rollout_is_threshold must not be an empty string.")
        try:
            if "_" in text:
                low, high = text.split("_", 1)
                lower, upper = float(low), float(high)
            else:
                upper, lower = float(text), None
        except ValueError as exc:
            raise ValueError(f"Invalid rollout_is_threshold '{spec}'.") from exc
    else:
        raise TypeError("rollout_is_threshold must be a float or a string threshold specification.")
    if upper <= 0:
        raise ValueError(f"rollout_is_threshold upper bound must be positive, got {upper}.")
    if lower is not None:
        if lower <= 0:
            raise ValueError(f"rollout_is_threshold lower bound must be positive, got {lower}.")
        if lower > upper:
            raise ValueError("rollout_is_threshold lower bound must be <= upper bound.")
    return upper, lower


def _parse_k1(option: str, spec: str) -> tuple[float, float]:
    low, high = spec.split("_", 1) if "_" in spec else (str(1.0 / float(spec)), spec)
    try:
        lower, upper = float(low), float(high)
    except ValueError as exc:
        raise ValueError(f"Invalid numeric threshold '{spec}' for option '{option}'.") from exc
    if lower <= 0 or upper <= 0:
        raise ValueError(f"Thresholds for option '{option}' must be positive, got {spec}.")
    if lower > upper:
        raise ValueError(f"Thresholds for option '{option}' must be lower <= upper, got {spec}.")
    return lower, upper


def parse_rs(rs: str, threshold) -> list[tuple[str, float | None, float]]:
    """verl's rejection options: ``"token_k1,seq_mean_k3"`` with ``"0.5_2,0.01"`` (one threshold per
    option, or one shared) -> ``[(option, lower, upper)]``; k1 options compare the log-ratio with
    ``log(lower), log(upper)`` (a bare ``U`` means ``1/U _ U``), the others with ``upper`` only."""
    if rs is None or not isinstance(rs, str):
        raise ValueError("rollout_rs must be a non-empty string (comma separated for multiple options).")
    if threshold is None:
        raise ValueError("rollout_rs_threshold must be provided for rejection sampling.")
    options: list[str] = []
    for opt in (o.strip() for o in rs.split(",")):
        if not opt:
            continue
        if opt not in RS_OPTIONS:
            raise ValueError(f"Invalid rollout_rs option: {opt}. Must be one of {sorted(RS_OPTIONS)}.")
        if opt not in options:
            options.append(opt)
    if not options:
        raise ValueError("rollout_rs must contain at least one valid option.")
    if isinstance(threshold, int | float):
        specs = [str(threshold)]
    elif isinstance(threshold, str):
        specs = [part.strip() for part in threshold.split(",") if part.strip()]
    else:
        raise TypeError("rollout_rs_threshold must be a string or numeric value specifying per-option "
                        "thresholds.")
    if not specs:
        raise ValueError("rollout_rs_threshold must contain at least one threshold value.")
    if len(specs) not in (1, len(options)):
        raise ValueError(f"rollout_rs_threshold expects either one threshold shared by all options or "
                         f"exactly {len(options)} thresholds to match the provided rollout_rs options.")
    specs = specs * len(options) if len(specs) == 1 else specs
    parsed: list[tuple[str, float | None, float]] = []
    for opt, spec in zip(options, specs, strict=True):
        if opt.endswith("k1"):
            parsed.append((opt, *_parse_k1(opt, spec)))
            continue
        if "_" in spec:
            raise ValueError(f"rollout_rs_threshold for option '{opt}' must provide a single upper bound "
                             f"without '_'. Received '{spec}'.")
        try:
            upper = float(spec)
        except ValueError as exc:
            raise ValueError(f"Invalid numeric threshold '{spec}' for option '{opt}'.") from exc
        if upper <= 0:
            raise ValueError(f"Threshold for option '{opt}' must be positive, got {spec}.")
        parsed.append((opt, None, upper))
    return parsed


# ------------------------------------------------------------------------------------------------
# masked reductions with verl's conventions (NaN outside the mask ignored, mean over count + 1e-8)
# ------------------------------------------------------------------------------------------------


class _Mask:
    """The mask's forms, each computed on first use (the weights alone need none of them, or one)."""

    def __init__(self, mask: Tensor, dtype: torch.dtype):
        self.mask, self.dtype = mask, dtype
        self._b = self._f = self._rows = None

    @property
    def b(self) -> Tensor:
        if self._b is None:
            self._b = self.mask != 0
        return self._b

    @property
    def f(self) -> Tensor:
        if self._f is None:
            self._f = self.mask.to(self.dtype)
        return self._f

    @property
    def rows(self) -> Tensor:  # [...]
        if self._rows is None:
            self._rows = self.f.sum(-1)
        return self._rows

    @property
    def total(self) -> Tensor:
        return self.rows.sum()

    @property
    def valid_rows(self) -> Tensor:
        return self.rows > 0

    def sum(self, x: Tensor, dim=None) -> Tensor:
        v = torch.where(self.b, x, 0.0) * self.f
        return v.sum() if dim is None else v.sum(dim)

    def mean(self, x: Tensor, dim=None) -> Tensor:
        return self.sum(x, dim) / ((self.total if dim is None else self.rows) + _EPS)

    def max(self, x: Tensor) -> Tensor:
        return x.masked_fill(~self.b, float("-inf")).amax()

    def min(self, x: Tensor) -> Tensor:
        return x.masked_fill(~self.b, float("inf")).amin()

    def row_mean_total(self, seq: Tensor) -> Tensor:
        """masked_mean over tokens of a per-row value broadcast to the row."""
        return (torch.where(self.valid_rows, seq, 0.0) * self.rows).sum() / (self.total + _EPS)


def _seq_summary(v: Tensor, valid: Tensor) -> dict[str, Tensor]:
    """mean / unbiased std / max / min over the rows where ``valid`` (verl indexes ``v[valid]``)."""
    n = valid.sum().to(v.dtype)
    mean = torch.where(valid, v, 0.0).sum() / n
    var = torch.where(valid, (v - mean) ** 2, 0.0).sum() / (n - 1)
    std = torch.where(n > 1, var.sqrt(), torch.zeros_like(var))
    return {"mean": mean, "std": std, "max": torch.where(valid, v, float("-inf")).amax(),
            "min": torch.where(valid, v, float("inf")).amin(), "n": n}


def _valid_fraction(flag: Tensor, valid: Tensor, n: Tensor) -> Tensor:
    return (flag & valid).sum().to(n.dtype) / n


def _std_clamped(m: _Mask, stat: Tensor, low: float, high: float) -> Tensor:
    c = stat.clamp(min=low, max=high)
    mean = m.mean(c)
    var = m.mean(c.square()) - mean.square()
    std = var.clamp(min=0.0).sqrt()
    return torch.where(m.total > 1, std, torch.zeros_like(std))


# ------------------------------------------------------------------------------------------------
# importance weights
# ------------------------------------------------------------------------------------------------


def _is_weights(d: Tensor, m: _Mask, level: str, mode: str, lower, upper, log_clamp, padding: str,
                seq_gate) -> tuple[Tensor, Tensor, Tensor]:
    """(weights, raw weights, log-ratio behind the metrics: d for tokens, Σd [..., 1] for rows)."""
    if padding == "trl":
        d = torch.nan_to_num(d * m.f, nan=0.0)
    if level == "token":
        log_w = d
    elif padding == "trl":
        log_w = d.sum(-1, keepdim=True)
    else:
        log_w = m.sum(d, -1).unsqueeze(-1)
    log_metrics = log_w
    if log_clamp is not None:
        log_w = log_w.clamp(min=-log_clamp, max=log_clamp)
    raw = torch.exp(log_w).expand_as(d)
    if padding == "zero":
        raw = raw * m.f
    if mode == "truncate":
        w = raw.clamp(min=lower, max=upper) if (lower is not None or upper is not None) else raw
    elif mode == "mask":
        low, high = -math.inf if lower is None else lower, math.inf if upper is None else upper
        keep = (raw >= low) & (raw <= high)
        # OpenRLHF multiplies by the flag (NaN/inf outside the band stays NaN); verl and TRL select 0
        w = raw * keep if padding == "raw" else torch.where(keep, raw, torch.zeros_like(raw))
    else:
        w = raw
    if seq_gate is not None:
        geo = torch.exp(m.sum(d, -1) / m.rows).unsqueeze(-1)  # OpenRLHF's masked_mean: no epsilon
        w = w * ((geo >= seq_gate[0]) & (geo <= seq_gate[1]))
    return w, raw, log_metrics


def _is_metrics(w: Tensor, raw: Tensor, log_w: Tensor, m: _Mask, level: str, upper: float, lower) -> dict:
    """verl's compute_is_metrics (plus rollout_is_oob_ratio for IcePop)."""
    out: dict[str, Tensor] = {}
    low = 1.0 / upper if lower is None else lower
    log_upper, log_lower = _f32_log(upper), _f32_log(low)
    if level == "sequence":
        out["rollout_is_max"] = torch.exp(log_w.amax().clamp(max=SAFETY_BOUND))
        out["rollout_is_min"] = torch.exp(log_w.amin())
        out["rollout_is_mean"] = m.mean(w)
        out["rollout_is_ratio_fraction_high"] = (log_w > log_upper).to(w.dtype).mean()
        out["rollout_is_ratio_fraction_low"] = (log_w < log_lower).to(w.dtype).mean()
    else:
        out["rollout_is_mean"] = m.mean(w)
        out["rollout_is_ratio_fraction_high"] = m.mean((raw > upper).to(w.dtype))
        out["rollout_is_ratio_fraction_low"] = m.mean((raw < low).to(w.dtype))
        out["rollout_is_max"] = m.max(w)
        out["rollout_is_min"] = m.min(w)
    out["rollout_is_std"] = _std_clamped(m, w, 0.0, upper)
    wc = w.clamp(min=0.0, max=upper)
    normalized = wc / (m.mean(wc) + _EPS)
    out["rollout_is_eff_sample_size"] = 1.0 / m.mean(normalized.square())
    if w.dim() > 1:
        seq = m.mean(w, -1)
        out["rollout_is_seq_mean"] = seq.mean()
        out["rollout_is_seq_std"] = seq.std() if seq.numel() > 1 else torch.zeros_like(seq.sum())
        out["rollout_is_seq_max"] = seq.amax()
        out["rollout_is_seq_min"] = seq.amin()
        out["rollout_is_seq_max_deviation"] = (seq - 1.0).abs().amax()
        raw_seq = m.mean(raw, -1)
        out["rollout_is_seq_fraction_high"] = (raw_seq > upper).to(w.dtype).mean()
        out["rollout_is_seq_fraction_low"] = (raw_seq < low).to(w.dtype).mean()
    if lower is not None:
        out["rollout_is_oob_ratio"] = m.mean(((raw < lower) | (raw > upper)).to(w.dtype))
    return out


# ------------------------------------------------------------------------------------------------
# rejection (verl's compute_rollout_rejection_mask)
# ------------------------------------------------------------------------------------------------


def _rejection(d: Tensor, m: _Mask, options, metrics: dict) -> Tensor:
    """The combined keep flags [..., T] (bool) of every option, with verl's per-option metrics."""
    ds = d.clamp(min=-SAFETY_BOUND, max=SAFETY_BOUND)
    token_stat = {"k1": lambda: -ds, "k2": lambda: 0.5 * ds**2, "k3": lambda: torch.exp(ds) - 1.0 - ds}
    cache: dict[str, Tensor] = {}
    combined = None
    for option, lower, upper in options:
        kind = option[-2:]
        if kind not in cache:
            cache[kind] = token_stat[kind]()
        tok = cache[kind]
        k1 = kind == "k1"
        hi = math.log(upper) if k1 else upper
        lo = math.log(lower) if k1 else 0.0
        if option.startswith("token"):
            keep = (tok >= lo) & (tok <= hi) if k1 else tok <= hi
            seq = m.mean(tok, -1)
        else:
            if option.startswith("seq_sum"):
                seq = m.sum(tok, -1)
            elif option.startswith("seq_mean"):
                seq = m.mean(tok, -1)
            else:
                seq = tok.masked_fill(~m.b, float("-inf")).amax(-1)
                seq = torch.where(seq == float("-inf"), torch.zeros_like(seq), seq)
            keep = ((seq >= lo) & (seq <= hi) if k1 else seq <= hi).unsqueeze(-1).expand_as(tok)
        combined = keep if combined is None else combined & keep
        metrics.update(_rs_metrics(option, tok, seq, keep, m, hi, lo, k1))
    return combined


def _rs_metrics(option: str, tok: Tensor, seq: Tensor, keep: Tensor, m: _Mask, hi: float, lo: float,
                k1: bool) -> dict[str, Tensor]:
    """verl's compute_rs_metrics plus the two masked fractions, for one option."""
    p = f"rollout_rs_{option}"
    valid = m.valid_rows
    s = _seq_summary(seq, valid)
    n = s["n"]
    dt = tok.dtype
    out: dict[str, Tensor] = {}
    any_valid = n > 0
    if option.startswith("token"):
        out[f"{p}_mean"] = m.mean(tok)
        out[f"{p}_max"] = m.max(tok)
        out[f"{p}_min"] = m.min(tok)
        out[f"{p}_fraction_high"] = m.mean((tok > hi).to(dt))
        out[f"{p}_fraction_low"] = m.mean((tok < lo).to(dt)) if k1 else torch.zeros_like(n)
        stat = tok
    else:
        out[f"{p}_mean"] = m.row_mean_total(seq)
        out[f"{p}_max"] = s["max"]
        out[f"{p}_min"] = s["min"]
        out[f"{p}_fraction_high"] = _valid_fraction(seq > hi, valid, n)
        out[f"{p}_fraction_low"] = _valid_fraction(seq < lo, valid, n) if k1 else torch.zeros_like(n)
        stat = seq.unsqueeze(-1).expand_as(tok)
    out[f"{p}_std"] = _std_clamped(m, stat, lo, hi)
    zero = torch.zeros_like(n)
    out[f"{p}_seq_mean"] = torch.where(any_valid, s["mean"], zero)
    out[f"{p}_seq_std"] = torch.where(any_valid, s["std"], zero)
    out[f"{p}_seq_max"] = torch.where(any_valid, s["max"], zero)
    out[f"{p}_seq_min"] = torch.where(any_valid, s["min"], zero)
    out[f"{p}_seq_max_deviation"] = torch.where(
        any_valid, torch.where(valid, seq.abs(), float("-inf")).amax(), zero)
    out[f"{p}_seq_fraction_high"] = torch.where(any_valid, _valid_fraction(seq > hi, valid, n), zero)
    if k1:
        out[f"{p}_seq_fraction_low"] = torch.where(any_valid, _valid_fraction(seq < lo, valid, n), zero)
    out[f"{p}_masked_fraction"] = m.mean((~keep).to(dt))
    rejected_row = (~keep & m.b).any(-1)
    out[f"{p}_seq_masked_fraction"] = _valid_fraction(rejected_row, valid, n)
    return out


# ------------------------------------------------------------------------------------------------
# off-policy diagnostics (verl's compute_offpolicy_metrics)
# ------------------------------------------------------------------------------------------------


def _ppl_metrics(mean_train: Tensor, mean_roll: Tensor) -> dict[str, Tensor]:
    """verl's rollout perplexity and log-PPL-difference metrics from the per-row mean log-probs."""
    diff = mean_roll - mean_train
    return {"rollout_ppl": torch.exp(-mean_roll).mean(), "rollout_log_ppl": (-mean_roll).mean(),
            "log_ppl_diff": diff.mean(), "log_ppl_abs_diff": diff.abs().mean(),
            "log_ppl_diff_max": diff.amax(), "log_ppl_diff_min": diff.amin(),
            "ppl_ratio": torch.exp(diff).mean()}


def _offpolicy_metrics(lp: Tensor, rlp: Tensor | None, m: _Mask) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    mean_train = m.mean(lp, -1)
    out["training_ppl"] = torch.exp(-mean_train).mean()
    out["training_log_ppl"] = (-mean_train).mean()
    if rlp is None:
        return out
    d = lp - rlp
    out["kl"] = m.mean(rlp - lp)
    out["k3_kl"] = m.mean(torch.exp(d) - d - 1)
    out.update(_ppl_metrics(mean_train, m.mean(rlp, -1)))
    ds = d.clamp(min=-SAFETY_BOUND, max=SAFETY_BOUND)
    out["chi2_token"] = m.mean(torch.exp(ds).square()) - 1.0
    seq = m.sum(d, -1).clamp(min=-SAFETY_BOUND, max=SAFETY_BOUND)
    out["chi2_seq"] = torch.exp(2.0 * seq).mean() - 1.0
    return out


# ------------------------------------------------------------------------------------------------
# public ops
# ------------------------------------------------------------------------------------------------


def _f32_log(x: float) -> Tensor:
    """verl compares the sequence log-ratio with ``torch.log`` of a float32 tensor: that 0-d CPU tensor
    (a tensor, not its ``.item()``, so torch.compile traces it without a graph break; a 0-d CPU tensor
    compares with a tensor on any device, and as the very same float32 value)."""
    return torch.scalar_tensor(x, dtype=torch.float32).log()


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_bound(value, name: str):
    if value is None:
        return None
    if torch.compiler.is_compiling():  # a float argument may be symbolic there: eager-only checks (_common)
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number or None, got {type(value).__name__}")
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return float(value)


# ------------------------------------------------------------------------------------------------
# the fused C++ path: one kernel call per batch writes the weights and the new mask and returns per-row
# float64 sums (layout of csrc/rollout_correction.cpp); verl's metrics come from those [rows] vectors
# ------------------------------------------------------------------------------------------------

_S = dict(n=0, sum_d=1, sum_lp=2, sum_rlp=3, sum_kl=4, sum_k3u=5, sum_chi=6, trl_sum=7, sum_w=8, high=9,
          low=10, max_w=11, min_w=12, sum_wc=13, sum_wc2=14, oob=15, sum_raw=16, rejected=17, any_rejected=18)
_BASE, _PER_OPTION = 19, 8
_AGG = {"token": 0, "seq_sum": 1, "seq_mean": 2, "seq_max": 3}
_NONE = float("nan")  # "no bound" for the kernel


def _option_codes(options) -> tuple[list[int], list[float], list[float]]:
    codes, lows, highs = [], [], []
    for option, lower, upper in options:
        k1 = option.endswith("k1")
        codes.append(int(option[-1]) + 10 * _AGG[option.rsplit("_", 1)[0]])
        lows.append(math.log(lower) if k1 else 0.0)
        highs.append(math.log(upper) if k1 else upper)
    return codes, lows, highs


def _seq_stats(v: Tensor, valid: Tensor, nv: Tensor, prefix: str, hi: float, lo: float, k1: bool) -> dict:
    s = _seq_summary(v, valid)
    zero = torch.zeros_like(nv)
    any_valid = nv > 0
    out = {f"{prefix}_seq_mean": s["mean"], f"{prefix}_seq_std": s["std"], f"{prefix}_seq_max": s["max"],
           f"{prefix}_seq_min": s["min"],
           f"{prefix}_seq_max_deviation": torch.where(valid, v.abs(), float("-inf")).amax(),
           f"{prefix}_seq_fraction_high": _valid_fraction(v > hi, valid, nv)}
    if k1:
        out[f"{prefix}_seq_fraction_low"] = _valid_fraction(v < lo, valid, nv)
    return {k: torch.where(any_valid, x, zero) for k, x in out.items()}


def _cpp_metrics(S: Tensor, level, padding: str, upper, lower, options, has_rlp: bool) -> dict[str, Tensor]:
    col = lambda name: S[:, _S[name]]  # noqa: E731
    n = col("n")
    total = n.sum()
    tmean = lambda x: x.sum() / (total + _EPS)  # noqa: E731  (verl's masked_mean over every token)
    valid = n > 0
    nv = valid.sum().to(S.dtype)
    out: dict[str, Tensor] = {}
    if level is not None and upper is not None:
        low = 1.0 / upper if lower is None else lower
        out["rollout_is_mean"] = tmean(col("sum_w"))
        if level == "sequence":
            log_w = col("trl_sum") if padding == "trl" else col("sum_d")
            log_w = log_w.float()
            out["rollout_is_max"] = torch.exp(log_w.amax().clamp(max=SAFETY_BOUND))
            out["rollout_is_min"] = torch.exp(log_w.amin())
            up_f, low_f = _f32_log(upper), _f32_log(low)
            out["rollout_is_ratio_fraction_high"] = (log_w > up_f).to(S.dtype).mean()
            out["rollout_is_ratio_fraction_low"] = (log_w < low_f).to(S.dtype).mean()
        else:
            out["rollout_is_ratio_fraction_high"] = tmean(col("high"))
            out["rollout_is_ratio_fraction_low"] = tmean(col("low"))
            out["rollout_is_max"] = col("max_w").amax()
            out["rollout_is_min"] = col("min_w").amin()
        mean_c = tmean(col("sum_wc"))
        var = tmean(col("sum_wc2")) - mean_c.square()
        out["rollout_is_std"] = torch.where(total > 1, var.clamp(min=0.0).sqrt(), torch.zeros_like(var))
        out["rollout_is_eff_sample_size"] = 1.0 / (tmean(col("sum_wc2")) / (mean_c + _EPS).square())
        seq = col("sum_w") / (n + _EPS)
        out["rollout_is_seq_mean"] = seq.mean()
        out["rollout_is_seq_std"] = seq.std() if seq.numel() > 1 else torch.zeros_like(total)
        out["rollout_is_seq_max"] = seq.amax()
        out["rollout_is_seq_min"] = seq.amin()
        out["rollout_is_seq_max_deviation"] = (seq - 1.0).abs().amax()
        raw_seq = col("sum_raw") / (n + _EPS)
        out["rollout_is_seq_fraction_high"] = (raw_seq > upper).to(S.dtype).mean()
        out["rollout_is_seq_fraction_low"] = (raw_seq < low).to(S.dtype).mean()
        if lower is not None:
            out["rollout_is_oob_ratio"] = tmean(col("oob"))
    for j, (option, _, _) in enumerate(options or ()):
        o = S[:, _BASE + j * _PER_OPTION:_BASE + (j + 1) * _PER_OPTION]
        _, (lo,), (hi,) = _option_codes([options[j]])
        k1 = option.endswith("k1")
        p = f"rollout_rs_{option}"
        if option.startswith("token"):
            seq = o[:, 0] / (n + _EPS)
            out[f"{p}_mean"] = tmean(o[:, 0])
            out[f"{p}_max"] = o[:, 1].amax()
            out[f"{p}_min"] = o[:, 2].amin()
            out[f"{p}_fraction_high"] = tmean(o[:, 3])
            out[f"{p}_fraction_low"] = tmean(o[:, 4]) if k1 else torch.zeros_like(total)
            mean_c, mean_c2 = tmean(o[:, 5]), tmean(o[:, 6])
        else:
            if option.startswith("seq_sum"):
                seq = o[:, 0]
            elif option.startswith("seq_mean"):
                seq = o[:, 0] / (n + _EPS)
            else:
                seq = torch.where(o[:, 1] == float("-inf"), torch.zeros_like(n), o[:, 1])
            s = _seq_summary(seq, valid)
            out[f"{p}_mean"] = tmean(torch.where(valid, seq, 0.0) * n)
            out[f"{p}_max"] = s["max"]
            out[f"{p}_min"] = s["min"]
            out[f"{p}_fraction_high"] = _valid_fraction(seq > hi, valid, nv)
            out[f"{p}_fraction_low"] = _valid_fraction(seq < lo, valid, nv) if k1 else torch.zeros_like(total)
            c = seq.clamp(min=lo, max=hi)
            mean_c, mean_c2 = tmean(torch.where(valid, c, 0.0) * n), tmean(torch.where(valid, c * c, 0.0) * n)
        var = mean_c2 - mean_c.square()
        out[f"{p}_std"] = torch.where(total > 1, var.clamp(min=0.0).sqrt(), torch.zeros_like(var))
        out.update(_seq_stats(seq, valid, nv, p, hi, lo, k1))
        out[f"{p}_masked_fraction"] = tmean(o[:, 7])
        out[f"{p}_seq_masked_fraction"] = _valid_fraction(o[:, 7] > 0, valid, nv)
    if options:
        out["rollout_rs_masked_fraction"] = tmean(col("rejected"))
        out["rollout_rs_seq_masked_fraction"] = col("any_rejected").mean()
    if has_rlp:
        mean_train, mean_roll = col("sum_lp") / (n + _EPS), col("sum_rlp") / (n + _EPS)
        out["training_ppl"] = torch.exp(-mean_train).mean()
        out["training_log_ppl"] = (-mean_train).mean()
        out["kl"] = tmean(col("sum_kl"))
        out["k3_kl"] = tmean(col("sum_k3u"))
        out.update(_ppl_metrics(mean_train, mean_roll))
        out["chi2_token"] = tmean(col("sum_chi")) - 1.0
        seq_log = col("sum_d").clamp(min=-SAFETY_BOUND, max=SAFETY_BOUND)
        out["chi2_seq"] = torch.exp(2.0 * seq_log).mean() - 1.0
    return {k: v.float() for k, v in out.items()}


@kernel_op("rollout_correction_fwd")
def _rc_fwd(lp: Tensor, rlp: Tensor | None, m: Tensor, level: int, mode: int, padding: int, lower: float,
            upper: float, log_clamp: float, gate_lo: float, gate_hi: float, codes: list[int],
            lows: list[float], highs: list[float], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel as an op: ``lp``, ``rlp`` float32 ``[N, T]``, ``m`` ``[N, T]`` in its own dtype (all
    contiguous); NaN for an absent bound (the kernel's convention). Returns ``(weights, new_mask,
    stats)``: weights float32 ``[N, T]`` (0 elements when ``level`` is 0, no weights), the new mask in
    m's dtype (0 elements without rejection options), the per-row float64 sums ``[N, 19 + 8 options]``.
    No autograd: the weights are constants in every peer (the caller passes detached tensors)."""
    weights = new_output(lp.shape, device=lp.device) if level else None
    new_mask = torch.empty_like(m) if codes else None
    stats = torch.empty(lp.shape[0], _BASE + _PER_OPTION * len(codes), dtype=torch.float64, device=lp.device)
    kernels(backend, "rollout_correction").rollout_correction_fwd(
        lp, rlp, m, level, mode, padding, lower, upper, log_clamp, gate_lo, gate_hi, codes, lows, highs,
        weights, new_mask, stats)
    return (lp.new_empty(0) if weights is None else weights, m.new_empty(0) if new_mask is None else new_mask,
            stats)


@_rc_fwd.register_fake
def _(lp, rlp, m, level, mode, padding, lower, upper, log_clamp, gate_lo, gate_hi, codes, lows, highs,
      backend):
    return (lp.new_empty(lp.shape if level else (0,)), m.new_empty(m.shape if codes else (0,)),
            lp.new_empty((lp.shape[0], _BASE + _PER_OPTION * len(codes)), dtype=torch.float64))


def _kernel_path(backend, log_prob, rollout_log_prob, mask, level, mode, upper, lower, log_clamp, padding,
                 seq_gate, options, batch_normalize, metrics, offpolicy_metrics):
    T = log_prob.shape[-1]
    lp = log_prob.detach().reshape(-1, T).float().contiguous()
    rlp = None if rollout_log_prob is None else rollout_log_prob.detach().reshape(-1, T).float().contiguous()
    m = mask.reshape(-1, T).contiguous()
    codes, lows, highs = _option_codes(options or ())
    nan = _NONE
    weights, new_mask, stats = _rc_fwd(
        lp, rlp, m, _LEVELS.index(level), _MODES.index(mode), _PADDINGS.index(padding),
        nan if lower is None else lower, nan if upper is None else upper,
        nan if log_clamp is None else log_clamp,
        nan if seq_gate is None else float(seq_gate[0]), nan if seq_gate is None else float(seq_gate[1]),
        codes, lows, highs, backend)
    weights = weights if level is not None else None
    new_mask = new_mask if options else None
    out = _cpp_metrics(stats, level, padding, upper, lower, options, rlp is not None and offpolicy_metrics) \
        if metrics else {}
    if level is not None and batch_normalize:
        n = stats[:, _S["n"]]
        if level == "token":
            mean = stats[:, _S["sum_w"]].sum() / (n.sum() + _EPS)
        else:
            valid = (n > 0).double()
            mean = (stats[:, _S["sum_w"]] / (n + _EPS) * valid).sum() / valid.sum().clamp_min(_EPS)
        mean = mean.float()
        big = mean > _EPS
        weights = torch.where(big, weights / mean, weights)
        out["rollout_is_batch_norm_factor"] = torch.where(big, mean, torch.ones_like(mean))
    weights = None if weights is None else weights.view(log_prob.shape)
    return RolloutCorrection(weights, mask if new_mask is None else new_mask.view(mask.shape), out)


@kernel_op("rollout_weights_fwd")
def _rw_fwd(lp: Tensor, rlp: Tensor | None, m: Tensor, level: int, mode: int, padding: int, lower: float,
            upper: float, log_clamp: float, gate_lo: float, gate_hi: float, backend: str) -> Tensor:
    """The weights alone as an op: ``lp``, ``rlp`` ``[N, T]`` of one kernel dtype, ``m`` ``[N, T]`` in
    its own dtype (all contiguous), NaN for an absent bound; returns the float32 weights ``[N, T]``
    (``level`` 1 token, 2 sequence). No autograd: the weights are constants in every peer."""
    weights = new_output(lp.shape, device=lp.device)
    kernels(backend, "rollout_correction").rollout_weights_fwd(
        lp, rlp, m, level, mode, padding, lower, upper, log_clamp, gate_lo, gate_hi, weights)
    return weights


@_rw_fwd.register_fake
def _(lp, rlp, m, level, mode, padding, lower, upper, log_clamp, gate_lo, gate_hi, backend):
    return lp.new_empty(lp.shape, dtype=torch.float32)


def _kernel_inputs(a: Tensor, b: Tensor | None, mask: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
    """``a``, ``b`` (detached) and ``mask`` as ``[rows, T]`` contiguous kernel inputs: the log-probs in
    their own dtype when both have one kernel dtype (else float32), the mask in its own dtype when the
    kernels read it (else float32: its values matter, not only nonzero)."""
    T = a.shape[-1]
    a = a.detach()
    b = None if b is None else b.detach()
    if a.dtype not in KERNEL_DTYPES or (b is not None and b.dtype != a.dtype):
        a, b = a.float(), None if b is None else b.float()
    m = mask if mask.dtype in NATIVE_MASK_DTYPES else mask.float()
    return (a.reshape(-1, T).contiguous(), None if b is None else b.reshape(-1, T).contiguous(),
            m.reshape(-1, T).contiguous())


def _weights_path(backend, log_prob, rollout_log_prob, mask, level, mode, upper, lower, log_clamp, padding,
                  seq_gate) -> RolloutCorrection:
    lp, rlp, m = _kernel_inputs(log_prob, rollout_log_prob, mask)
    nan = _NONE
    weights = _rw_fwd(lp, rlp, m, _LEVELS.index(level), _MODES.index(mode), _PADDINGS.index(padding),
                      nan if lower is None else lower, nan if upper is None else upper,
                      nan if log_clamp is None else log_clamp,
                      nan if seq_gate is None else float(seq_gate[0]),
                      nan if seq_gate is None else float(seq_gate[1]), backend)
    return RolloutCorrection(weights.view(log_prob.shape), mask, {})


def rollout_correction(log_prob: Tensor, rollout_log_prob: Tensor | None, mask: Tensor, *,
                       level: str | None = "token", mode: str = "truncate", upper: float | None = 2.0,
                       lower: float | None = None, log_clamp: float | None = SAFETY_BOUND,
                       padding: str = "zero", seq_gate: tuple[float, float] | None = None,
                       rs: str | list | None = None, rs_threshold=None, batch_normalize: bool = False,
                       metrics: bool = True, offpolicy_metrics: bool = True) -> RolloutCorrection:
    """Importance weights and rejection mask correcting for the rollout engine's log-probs.

    ``d = log_prob - rollout_log_prob`` (``[..., T]``, any float dtype; the last dim is the tokens);
    with ``rollout_log_prob=None``, ``log_prob`` is ``d`` itself (no off-policy diagnostics then).

    Weights (``level``; ``None`` skips them):

    * ``"token"``: ``w_t = exp(d_t)``; ``"sequence"``: ``w = exp(Σ_t m_t d_t)`` for the whole row;
      with ``log_clamp`` the exponent is clamped to ``[-log_clamp, log_clamp]`` first (verl: 20).
    * ``padding``: ``"zero"`` multiplies the raw weights by the mask (verl); ``"trl"`` computes
      ``d = nan_to_num(d * mask, nan=0)`` first (TRL: padding and NaN tokens get ratio 1); ``"raw"``
      leaves padding alone (OpenRLHF).
    * ``mode``: ``"truncate"`` clamps to ``[lower, upper]`` (either may be None: verl's TIS has only
      ``upper``); ``"mask"`` zeroes weights outside ``[lower, upper]`` (IcePop / MIS); ``"none"`` keeps
      them.
    * ``seq_gate=(lo, hi)``: a row whose geometric-mean ratio ``exp(Σ m d / Σ m)`` lies outside
      ``[lo, hi]`` gets weight 0 (OpenRLHF's ``seq-mask-tis``).
    * ``batch_normalize``: verl's ``rollout_is_batch_normalize`` (divide by the masked mean weight, per
      token or per row, when it exceeds 1e-8; single process).

    Rejection (``rs``: verl's option string or a list from :func:`parse_rs`, e.g. ``"token_k1"``
    (IcePop on the k1 statistic), ``"seq_mean_k1"`` (Geo-RS), ``"seq_max_k3"``, comma-separated to
    combine with AND): with ``k1 = -d``, ``k2 = d²/2``, ``k3 = e^d - 1 - d`` on ``d`` clamped to
    ``±20``, a token (``token_*``) or a whole row (``seq_sum_*``, ``seq_mean_*``, ``seq_max_*``) is
    kept when its statistic is ``<= upper`` (k1: within ``[log lower, log upper]``).

    Returns :class:`RolloutCorrection` ``(weights, mask, metrics)``: the weights in fp32 (fp64 for
    fp64 inputs); the mask with rejected tokens zeroed, in the mask's dtype (verl's
    ``(mask * keep).to(mask.dtype)``); ``metrics`` with verl's names (``rollout_is_*`` when
    ``level`` and ``upper`` are set, ``rollout_rs_*`` with ``rs``, the off-policy diagnostics ``kl``,
    ``k3_kl``, ``*_ppl``, ``chi2_*`` with ``offpolicy_metrics``) as 0-d tensors. NaN log-probs give NaN
    weights and NaN metrics (a NaN token fails every rejection test, as in verl).
    """
    check_tensor(log_prob, "log_prob")
    if rollout_log_prob is not None:
        check_tensor(rollout_log_prob, "rollout_log_prob")
        if rollout_log_prob.shape != log_prob.shape:
            raise ValueError(f"rollout_log_prob shape {tuple(rollout_log_prob.shape)} does not match "
                             f"log_prob shape {tuple(log_prob.shape)}")
    if not isinstance(mask, Tensor) or mask.shape != log_prob.shape:
        raise ValueError(f"mask must be a tensor of shape {tuple(log_prob.shape)}, got "
                         f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
    if log_prob.dim() == 0:
        raise ValueError("log_prob must have shape [..., T], got a 0-d tensor")
    if level not in _LEVELS:
        raise ValueError(f"level must be one of {_LEVELS}, got {level!r}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if padding not in _PADDINGS:
        raise ValueError(f"padding must be one of {_PADDINGS}, got {padding!r}")
    upper, lower = _check_bound(upper, "upper"), _check_bound(lower, "lower")
    log_clamp = _check_bound(log_clamp, "log_clamp")
    options = parse_rs(rs, rs_threshold) if isinstance(rs, str) else rs
    others = () if rollout_log_prob is None else (rollout_log_prob,)
    backend = pick_backend(log_prob, mask, *others) if log_prob.numel() and len(options or ()) <= 16 else ""
    if backend == "triton" and options:  # the Triton kernel takes no rejection options (its docstring)
        backend = ""
    if backend in ("cpp", "triton") and not (metrics or options or batch_normalize):
        # the weights alone: one lean kernel pass (two with a row statistic), no row sums for metrics
        if level is None:
            return RolloutCorrection(None, mask, {})
        return _weights_path(backend, log_prob, rollout_log_prob, mask, level, mode, upper, lower, log_clamp,
                             padding, seq_gate)
    if backend in ("cpp", "triton"):
        return _kernel_path(backend, log_prob, rollout_log_prob, mask, level, mode, upper, lower, log_clamp,
                            padding, seq_gate, options, batch_normalize, metrics, offpolicy_metrics)
    if rollout_log_prob is None:  # log_prob already holds the log-ratio d
        dtype = _compute_dtype(log_prob)
        lp = rlp = None
        d = log_prob.to(dtype)
    else:
        dtype = _compute_dtype(log_prob, rollout_log_prob)
        lp, rlp = log_prob.to(dtype), rollout_log_prob.to(dtype)
        d = lp - rlp
    m = _Mask(mask, dtype)
    out: dict[str, Tensor] = {}
    weights = None
    if d.numel() == 0:  # nothing to reduce over (verl raises on an empty mask; B = 0 returns as is)
        metrics, options = False, None
    if level is not None:
        weights, raw, log_w = _is_weights(d, m, level, mode, lower, upper, log_clamp, padding, seq_gate)
        if metrics and upper is not None:
            out.update(_is_metrics(weights, raw, log_w, m, level, upper, lower))
        if batch_normalize:
            if level == "token":
                mean = m.mean(weights)
            else:
                seq_mask = m.valid_rows.to(dtype)
                mean = (m.mean(weights, -1) * seq_mask).sum() / seq_mask.sum().clamp_min(_EPS)
            big = mean > _EPS
            weights = torch.where(big, weights / mean, weights)
            out["rollout_is_batch_norm_factor"] = torch.where(big, mean, torch.ones_like(mean))
    new_mask = mask
    if options:
        keep = _rejection(d, m, options, out)
        final = keep.to(dtype)
        out["rollout_rs_masked_fraction"] = m.mean(1 - final)
        rejected_row = (~keep & m.b).any(-1)
        out["rollout_rs_seq_masked_fraction"] = rejected_row.to(dtype).mean()
        new_mask = (mask * final).to(mask.dtype)
    if metrics and offpolicy_metrics and rlp is not None:
        out.update(_offpolicy_metrics(lp, rlp, m))
    if not metrics:
        out = {k: v for k, v in out.items() if k == "rollout_is_batch_norm_factor"}
    return RolloutCorrection(weights, new_mask, out)


def off_policy_sequence_mask(log_prob: Tensor, sampling_log_prob: Tensor, mask: Tensor,
                             advantages: Tensor, threshold: float) -> Tensor:
    """TRL's off-policy sequence mask (DeepSeek-V3.2; ``GRPOTrainer.get_off_policy_mask``): keep a row
    when its advantage is ``>= 0`` or the mean over valid tokens of ``sampling_log_prob - log_prob``
    (NaN taken as 0, the count clamped to >= 1) is ``<= threshold``. ``advantages`` is ``[B]`` or
    ``[B, 1]``; returns ``[B, 1]`` in the mask's dtype (1 keep, 0 drop)."""
    check_tensor(log_prob, "log_prob")
    check_tensor(sampling_log_prob, "sampling_log_prob")
    if log_prob.dim() != 2 or sampling_log_prob.shape != log_prob.shape or mask.shape != log_prob.shape:
        raise ValueError("log_prob, sampling_log_prob and mask must all have shape [B, T]")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    dtype = _compute_dtype(log_prob, sampling_log_prob)
    kl = torch.nan_to_num(sampling_log_prob.to(dtype) - log_prob.detach().to(dtype), nan=0.0)
    mf = mask.to(dtype)
    avg = (kl * mf).sum(1, keepdim=True) / mf.sum(1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (avg <= threshold)).to(mask.dtype)


# ------------------------------------------------------------------------------------------------
# the trust-region gate: DPPO's (verl) and OpenRLHF's divergence gating of the IS correction
# ------------------------------------------------------------------------------------------------

GATE_CONVENTIONS = ("verl", "openrlhf")
DIVERGENCES = ("tv", "kl")
_GATE_LEVELS = ("token", "sequence")
_DPPO_EPS = 1e-8  # verl's 1e-8 inside the binary KL's log, and its masked_mean denominator epsilon
_PROB_CLAMP = 1e-6  # OpenRLHF clamps both probabilities to [1e-6, 1 - 1e-6]


class TrustRegion(NamedTuple):
    weights: Tensor  # [..., T] fp32 (fp64 for fp64 inputs): constant per-token weights
    metrics: dict[str, Tensor]  # 0-d tensors: pg_clipfrac / pg_clipfrac_lower (verl), is_filter_ratio


def _gate_torch(x: Tensor, y: Tensor, adv: Tensor | None, mask: Tensor, convention: str, divergence: str,
                level: str, low: float, high: float, clip_c: float) -> TrustRegion:
    """The gate in torch ops (meta tensors, float64, the torch backend), the peers' formulas in the
    compute dtype."""
    dtype = _compute_dtype(x, y)
    x, y = x.detach().to(dtype), y.detach().to(dtype)
    mf, mb = mask.to(dtype), mask != 0
    if convention == "verl":
        ratio = torch.exp(torch.clamp(x - y, min=-SAFETY_BOUND, max=SAFETY_BOUND))
        px, py = torch.exp(x), torch.exp(y)
        if divergence == "tv":
            ok_pos, ok_neg = (px - py) <= high, (px - py) >= -low
        else:
            bkl = py * (y - x) + (1 - py) * torch.log((1.0 - py + _DPPO_EPS) / (1.0 - px + _DPPO_EPS))
            ok_pos, ok_neg = (bkl <= high) | (px <= py), (bkl <= low) | (px >= py)
        valid = torch.where(adv > 0, ok_pos, ok_neg).to(dtype)
        weights = torch.clamp(ratio, max=clip_c) * valid
        n = mf.sum() + _DPPO_EPS
        msum = lambda v: (torch.where(mb, v, 0.0) * mf).sum()  # noqa: E731  (verl's masked_sum)
        metrics = {"pg_clipfrac": msum(1.0 - valid) / n,
                   "pg_clipfrac_lower": msum((ratio > clip_c).to(dtype) * valid) / n}
        return TrustRegion(weights, {k: v.float() for k, v in metrics.items()})
    p = torch.exp(y).clamp(_PROB_CLAMP, 1 - _PROB_CLAMP)
    q = torch.exp(x).clamp(_PROB_CLAMP, 1 - _PROB_CLAMP)
    stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log() if divergence == "kl" else (p - q).abs()
    if level == "sequence":
        stat = ((stat * mf).sum(-1) / mf.sum(-1)).unsqueeze(-1)  # OpenRLHF's masked_mean: no epsilon
    keep = (stat >= low) & (stat <= high)
    weights = torch.where(keep, torch.exp(x - y), 0.0)
    filtered = (~keep).to(dtype)
    ratio = filtered.mean() if level == "sequence" else (filtered * mf).sum() / mf.sum()
    return TrustRegion(weights, {"is_filter_ratio": ratio.float()})


@kernel_op("trust_region_fwd")
def _tr_fwd(x: Tensor, y: Tensor, adv: Tensor | None, m: Tensor, convention: int, divergence: int, level: int,
            low: float, high: float, clip_c: float, backend: str) -> tuple[Tensor, Tensor]:
    """The gate kernel as an op: ``x``, ``y`` ``[N, T]`` of one kernel dtype, ``adv`` float32 ``[N, T]``
    or ``[N, 1]`` (verl) or None, ``m`` ``[N, T]`` in its own dtype. Returns the float32 weights and the
    per-row float64 sums ``[N, 3]`` (csrc/rollout_correction.cpp's trust_region_fwd)."""
    weights = new_output(x.shape, device=x.device)
    stats = torch.empty(x.shape[0], 3, dtype=torch.float64, device=x.device)
    kernels(backend, "rollout_correction").trust_region_fwd(x, y, adv, m, convention, divergence, level, low,
                                                            high, clip_c, weights, stats)
    return weights, stats


@_tr_fwd.register_fake
def _(x, y, adv, m, convention, divergence, level, low, high, clip_c, backend):
    return x.new_empty(x.shape, dtype=torch.float32), x.new_empty((x.shape[0], 3), dtype=torch.float64)


def _gate_metrics(stats: Tensor, convention: str, level: str) -> dict[str, Tensor]:
    n = stats[:, 0].sum()
    if convention == "verl":
        return {"pg_clipfrac": (stats[:, 1].sum() / (n + _DPPO_EPS)).float(),
                "pg_clipfrac_lower": (stats[:, 2].sum() / (n + _DPPO_EPS)).float()}
    ratio = stats[:, 2].mean() if level == "sequence" else stats[:, 1].sum() / n
    return {"is_filter_ratio": ratio.float()}


def trust_region_gate(logp: Tensor, ref_logp: Tensor, mask: Tensor, advantages: Tensor | None = None, *,
                      divergence: str = "tv", low: float = 0.2, high: float = 0.2, clip_c: float = 20.0,
                      convention: str = "verl", level: str = "token") -> TrustRegion:
    """Constant per-token weights from a binary trust region between two policies, in one pass (two
    for ``level="sequence"``), with the metrics the peers log; no host synchronisation, no gradient.

    ``logp`` is the policy the weights are for, ``ref_logp`` the one that sampled (``[..., T]``, any float
    dtype); ``mask`` ``[..., T]`` any dtype (nonzero = valid, weighted by its value in the metrics).

    * ``convention="verl"`` (verl 0.9.1 ``core_algos.compute_policy_loss_dppo_tv`` / ``_dppo_kl``,
      DPPO, arXiv 2602.04879; ``logp`` = ``log_prob``, ``ref_logp`` = ``old_log_prob``, ``advantages``
      ``[..., T]`` or ``[..., 1]`` required): ``r = exp(clamp(logp - ref, ±20))``, ``p = e^logp``,
      ``p_old = e^ref``; ``tv``: ``ok+ = p - p_old <= high``, ``ok- = p - p_old >= -low``; ``kl``: with
      ``b = p_old (ref - logp) + (1 - p_old) log((1 - p_old + 1e-8) / (1 - p + 1e-8))``,
      ``ok+ = b <= high or p <= p_old``, ``ok- = b <= low or p >= p_old``. ``valid = ok+`` where
      ``A > 0``, else ``ok-``; weights ``min(r, clip_c) * valid`` (verl's ``sg(min(r, c)) * valid``).
      Metrics ``pg_clipfrac`` (masked mean of ``1 - valid``) and ``pg_clipfrac_lower`` (of
      ``[r > clip_c] * valid``), verl's masked mean (count + 1e-8).
    * ``convention="openrlhf"`` (OpenRLHF 0.11.2 ``models/loss.py::PolicyLoss`` with
      ``is_correction_gating`` ``binary_kl`` / ``tv``, ``is_correction_mode="mask"``; ``logp`` =
      ``old_log_probs``, ``ref_logp`` = ``rollout_log_probs``): ``p = clamp(e^ref, 1e-6, 1 - 1e-6)``,
      ``q = clamp(e^logp, ...)``, statistic ``p log(p/q) + (1-p) log((1-p)/(1-q))`` (``kl``) or ``|p - q|``
      (``tv``), per token or (``level="sequence"``) its masked row mean (no epsilon: an empty row is
      NaN, so dropped); weights ``exp(logp - ref)`` where ``low <= statistic <= high``, else 0. Metric
      ``is_filter_ratio``: the masked share of dropped tokens, or the share of dropped rows.

    Returns :class:`TrustRegion` ``(weights, metrics)``: fp32 weights (fp64 for fp64 inputs) of
    ``logp``'s shape, 0-d metric tensors. NaN log-probs give NaN weights (verl) or a dropped token
    (OpenRLHF, whose comparisons fail on NaN) as in each peer.
    """
    check_tensor(logp, "logp")
    check_tensor(ref_logp, "ref_logp")
    if ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp shape {tuple(ref_logp.shape)} does not match logp shape "
                         f"{tuple(logp.shape)}")
    if logp.dim() == 0:
        raise ValueError("logp must have shape [..., T], got a 0-d tensor")
    if not isinstance(mask, Tensor) or mask.shape != logp.shape:
        raise ValueError(f"mask must be a tensor of shape {tuple(logp.shape)}, got "
                         f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
    if convention not in GATE_CONVENTIONS:
        raise ValueError(f"convention must be one of {GATE_CONVENTIONS}, got {convention!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if level not in _GATE_LEVELS or (convention == "verl" and level != "token"):
        raise ValueError(f"level must be 'token' (verl) or one of {_GATE_LEVELS} (openrlhf), got {level!r}")
    low, high = _check_bound(low, "low"), _check_bound(high, "high")
    clip_c = _check_bound(clip_c, "clip_c")
    if low is None or high is None or clip_c is None:
        raise ValueError("low, high and clip_c must be numbers")
    adv = None
    if convention == "verl":
        if not isinstance(advantages, Tensor):
            raise ValueError("advantages (a [..., T] or [..., 1] tensor) are required with convention='verl'")
        check_tensor(advantages, "advantages")
        adv = advantages.detach()
        if adv.dim() == logp.dim() - 1:
            adv = adv.unsqueeze(-1)
        if adv.shape != logp.shape and adv.shape != (*logp.shape[:-1], 1):
            raise ValueError(f"advantages must have shape {tuple(logp.shape)} or "
                             f"{(*logp.shape[:-1], 1)}, got {tuple(advantages.shape)}")
    backend = pick_backend(logp, ref_logp, mask) if logp.numel() else ""
    if backend not in ("cpp", "triton"):
        return _gate_torch(logp, ref_logp, adv, mask, convention, divergence, level, low, high, clip_c)
    x, y, m = _kernel_inputs(logp, ref_logp, mask)
    if adv is not None:
        adv = adv.float().reshape(x.shape[0], -1).contiguous()
    weights, stats = _tr_fwd(x, y, adv, m, GATE_CONVENTIONS.index(convention), DIVERGENCES.index(divergence),
                             _GATE_LEVELS.index(level) + 1, low, high, clip_c, backend)
    return TrustRegion(weights.view(logp.shape), _gate_metrics(stats, convention, level))
