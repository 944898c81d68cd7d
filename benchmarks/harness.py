"""Measurement and reporting machinery shared by every benchmark family.

What is measured, and how:

* **Time**: ``warmup`` untimed calls (torch.compile compiles here), then ``repeats`` (>= 5) timed
  samples with ``time.perf_counter``; a sample runs the call ``inner`` times back to back, with
  ``inner`` chosen so one sample lasts >= ``min_sample_ms`` (calls of a few microseconds are not
  swamped by timer resolution). The implementations of a case (floor included) are sampled in
  turn, round by round, so load on a shared machine hits them alike. We report the median per-call
  time; timings are never asserted.
* **Floor**: the bytes a case must move (one streaming read of its inputs, plus one write of its
  outputs/gradients where it produces them), timed in the same run on buffers of exactly that size:
  ``dst.copy_(src[:write])`` plus ``src[write:].sum()``. ``check_streaming_probe`` checks that
  ``torch.sum`` reads at the rate a copy moves memory; where it does not, the run's floors use one
  copy of the same total traffic instead (``set_floor_probe``). The linear family's floor is
  compute instead: its three GEMMs timed alone.
* **Extra peak memory**: the highest total of live bytes allocated during one call, above what was
  live before it, from ``torch.profiler`` memory events (``profile_memory=True``): every tensor the
  c10 CPU allocator hands out or frees, in any thread, including torch.compile's buffers and the
  outputs the call returns. Memory a kernel takes with ``malloc`` outside torch is not seen (the
  rlkern C++ kernels allocate none: every output comes from ``rlkern.ops._common.new_output``).
  ``validate_memory_probe`` checks the method on a known allocation.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

MIB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimingConfig:
    warmup: int = 1
    repeats: int = 5
    min_sample_ms: float = 2.0

    def __post_init__(self):
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.repeats < 5:
            raise ValueError(f"repeats must be >= 5 (the median of fewer runs is noise), got {self.repeats}")
        if not self.min_sample_ms >= 0:
            raise ValueError(f"min_sample_ms must be >= 0, got {self.min_sample_ms}")


@dataclass
class Timing:
    median_ms: float
    samples_ms: list[float]
    inner: int
    first_call_s: float  # the first warmup call (includes torch.compile's compilation when it applies)
    peak_bytes: int | None = None  # extra peak memory of one call, when measured


def _prepare(fn: Callable[[], object], cfg: TimingConfig, measure_memory: bool) -> Timing:
    """First call, warmup, and the call that sizes the inner loop (under the memory profiler when
    ``measure_memory``): a Timing with no samples yet."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(max(cfg.warmup - 1, 0)):
        fn()
    # One more call sizes the inner loop; after warmup it is representative.
    peak = None
    if measure_memory:
        peak, one_s = _profiled_call(fn)
    else:
        start = time.perf_counter()
        fn()
        one_s = time.perf_counter() - start
    one_ms = one_s * 1e3
    inner = 1 if one_ms >= cfg.min_sample_ms else \
        min(10_000, math.ceil(cfg.min_sample_ms / max(one_ms, 1e-3)))
    return Timing(math.nan, [], inner, first, peak)


def _sample(fn: Callable[[], object], timing: Timing) -> None:
    start = time.perf_counter()
    for _ in range(timing.inner):
        fn()
    timing.samples_ms.append((time.perf_counter() - start) * 1e3 / timing.inner)
    timing.median_ms = statistics.median(timing.samples_ms)


def time_call(fn: Callable[[], object], cfg: TimingConfig, *, measure_memory: bool = False) -> Timing:
    """Median per-call wall time of ``fn()`` in ms (see the module docstring). With
    ``measure_memory`` the call that sizes the inner loop runs under the memory profiler and its
    extra peak bytes land in ``Timing.peak_bytes`` (one call fewer than measuring apart; the
    profiler's per-op overhead only makes the inner loop shorter)."""
    timing = _prepare(fn, cfg, measure_memory)
    for _ in range(cfg.repeats):
        _sample(fn, timing)
    return timing


def time_calls_interleaved(fns: list[Callable[[], object]], cfg: TimingConfig, *,
                           measure_memory: list[bool] | None = None) -> list[Timing | Exception]:
    """``time_call`` for several implementations of one case, their samples interleaved: after each
    one's first, warmup and sizing calls, round r takes one sample of every implementation before
    round r + 1, so a load change on a shared machine hits all of them alike and their ratios hold.
    An implementation that raises gets its exception in place of a Timing; the others go on."""
    measure_memory = measure_memory or [False] * len(fns)
    out: list[Timing | Exception] = []
    for fn, mem in zip(fns, measure_memory):
        try:
            out.append(_prepare(fn, cfg, mem))
        except Exception as err:  # one implementation failing is reported, not fatal
            out.append(err)
    for _ in range(cfg.repeats):
        for i, fn in enumerate(fns):
            if isinstance(out[i], Timing):
                try:
                    _sample(fn, out[i])
                except Exception as err:
                    out[i] = err
    return out


# ---------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Highest live-byte total that ``fn()`` allocates on top of what was live before it (its
    returned outputs count while they are alive inside the call). From torch.profiler memory events."""
    return _profiled_call(fn)[0]


def _profiled_call(fn: Callable[[], object]) -> tuple[int, float]:
    """(extra peak bytes, wall seconds of the call itself) of one ``fn()`` under the memory profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        start = time.perf_counter()
        out = fn()
        del out
        elapsed = time.perf_counter() - start
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, elapsed


def validate_memory_probe(nbytes: int = 64 * MIB) -> dict:
    """Measures a call that allocates a known ``nbytes`` buffer (written in full, then freed) next
    to a 4-byte result it returns; the probe must report nbytes + 4 exactly, and 0 for a call that
    allocates nothing. Returns what was measured; raises if the method is off."""
    def known():
        buf = torch.empty(nbytes // 4, dtype=torch.float32)
        buf.fill_(1.0)
        return buf[:1].sum()  # 4 bytes outlive the buffer

    scratch = torch.ones(16)
    measured = peak_extra_bytes(known)
    nothing = peak_extra_bytes(lambda: scratch.mul_(scratch))  # tensor-tensor in place: no allocation
    expected = (nbytes // 4) * 4 + 4
    if measured != expected or nothing != 0:
        raise RuntimeError(f"memory probe is off: a known {expected}-byte allocation measured as {measured} "
                           f"bytes, an allocation-free call as {nothing} bytes")
    return {"method": "torch.profiler(profile_memory=True): peak of live c10 CPU allocations during the call",
            "known_bytes": expected, "measured_bytes": measured, "allocation_free_bytes": nothing}


# ---------------------------------------------------------------------------------------------
# Streaming floor
# ---------------------------------------------------------------------------------------------


def _float_buffer(nbytes: int) -> torch.Tensor:
    buf = torch.empty(max(1, math.ceil(nbytes / 4)), dtype=torch.float32)
    buf.uniform_()  # touch every page: the floor must not be timing page faults
    return buf


def dtype_label(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}.get(
        dtype, str(dtype).removeprefix("torch."))


# How floors move their bytes: "sum" (copy what is written, torch.sum over the rest of what is read)
# or "copy" (one copy carrying the same total traffic, (read + write) / 2 bytes each way), for a
# machine where torch.sum does not reach the memory traffic a copy sustains. report.py picks one
# per run from check_streaming_probe.
FLOOR_PROBES = ("sum", "copy")
_floor_probe = "sum"


def set_floor_probe(name: str) -> None:
    global _floor_probe
    if name not in FLOOR_PROBES:
        raise ValueError(f"floor probe must be one of {FLOOR_PROBES}, got {name!r}")
    _floor_probe = name


def streaming_probe(read_bytes: int, write_bytes: int = 0) -> Callable[[], object]:
    """A call that reads ``read_bytes`` once and writes ``write_bytes`` once, at streaming speed.
    With the "sum" probe: ``dst.copy_(src[:write])`` (a read and a write of those bytes) and
    ``src[write:].sum()`` (a read of the rest); with "copy": one copy of (read + write) / 2 bytes.
    Requires write_bytes <= read_bytes (every case here reads at least what it writes)."""
    if write_bytes > read_bytes:
        raise ValueError(f"write_bytes ({write_bytes}) must not exceed read_bytes ({read_bytes})")
    if _floor_probe == "copy":
        read_bytes = write_bytes = (read_bytes + write_bytes) // 2
    n_write = math.ceil(write_bytes / 4) if write_bytes else 0
    buffers: list[torch.Tensor] = []  # allocated on the first call, so building a case costs no memory

    def probe():
        if not buffers:
            buffers.append(_float_buffer(read_bytes))
            buffers.append(_float_buffer(write_bytes) if n_write else torch.empty(0))
        src, dst = buffers
        if n_write:
            dst.copy_(src[:n_write])
        rest = src[n_write:]
        return rest.sum() if rest.numel() else None

    return probe


def check_streaming_probe(nbytes: int, cfg: TimingConfig) -> dict:
    """Does ``torch.sum`` read at memory bandwidth? Times sum, amax and a copy over ``nbytes``; a
    copy moves 2 x nbytes, so its rate is the memory traffic a streaming kernel can sustain here.
    Reports GB/s for each; ``sum_ok`` is False when sum reads more than 15 % below the best of them,
    and then the run's floors move their bytes with a copy instead (see ``streaming_probe``). Seen
    on this machine under load: sum 11.1 GB/s over 256 MiB, copy 12.8 GB/s (sum kept)."""
    src = _float_buffer(nbytes)
    dst = torch.empty_like(src)
    dst.zero_()
    ms = {
        "sum": time_call(lambda: src.sum(), cfg).median_ms,
        "amax": time_call(lambda: src.amax(), cfg).median_ms,
        "copy": time_call(lambda: dst.copy_(src), cfg).median_ms,
    }
    gbps = {k: (2 if k == "copy" else 1) * src.nbytes / v / 1e6 for k, v in ms.items()}
    return {"bytes": src.nbytes, "ms": ms, "gbps": gbps, "sum_ok": gbps["sum"] >= 0.85 * max(gbps.values())}


# ---------------------------------------------------------------------------------------------
# Cases, results, targets
# ---------------------------------------------------------------------------------------------


@dataclass
class Impl:
    """One implementation of a case: ``fn()`` runs one call on inputs the case prepared."""
    name: str
    fn: Callable[[], object]
    kind: str = "peer"  # rlkern | peer | compile | floor
    note: str = ""


TARGET_METRICS = ("x_floor", "mem_per_row", "speedup", "mem_fraction")


@dataclass
class Target:
    """A target from the issues, reported as met/missed (never asserted).

    metric: ``x_floor`` (impl ms / floor ms <= bound), ``mem_per_row`` (extra peak bytes per row <=
    bound), ``speedup`` (other ms / impl ms >= bound), ``mem_fraction`` (impl peak / other peak <= bound).
    """
    text: str
    impl: str
    metric: str
    bound: float
    other: str | None = None

    def __post_init__(self):
        if self.metric not in TARGET_METRICS:
            raise ValueError(f"target metric must be one of {TARGET_METRICS}, got {self.metric!r}")
        if (self.metric in ("speedup", "mem_fraction")) != (self.other is not None):
            raise ValueError(f"target metric {self.metric!r} {'needs' if self.other is None else 'takes no'} "
                             "other implementation")


@dataclass
class Case:
    family: str
    op: str
    shape: str
    mode: str  # fwd | fwd+bwd
    impls: list[Impl]
    work: float  # bytes that must be moved (unit GB/s) or flops that must be done (unit GFLOP/s)
    unit: str = "GB/s"
    rows: int = 0
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.op} {self.shape} {self.mode}"


@dataclass
class Row:
    family: str
    case: str
    op: str
    shape: str
    mode: str
    impl: str
    kind: str
    median_ms: float | None
    samples_ms: list[float]
    inner: int
    first_call_s: float | None
    rate: float | None  # work / time in `unit`
    unit: str
    pct_of_floor: float | None  # floor ms / impl ms * 100
    extra_peak_mb: float | None
    bytes_per_row: float | None
    error: str | None = None
    note: str = ""


@dataclass
class TargetResult:
    family: str
    case: str
    text: str
    value: float | None
    met: bool | None
    detail: str


def run_case(case: Case, cfg: TimingConfig, *, measure_memory: bool = True, log=print) -> list[Row]:
    """Times every implementation of ``case`` with their samples interleaved
    (``time_calls_interleaved``), measuring each one's extra peak memory on the call that sizes its
    timing loop; rows come out floor first (so the others' % of floor is known)."""
    rows = []
    impls = sorted(case.impls, key=lambda i: i.kind != "floor")
    results = time_calls_interleaved([i.fn for i in impls], cfg,
                                     measure_memory=[measure_memory and i.kind != "floor" for i in impls])
    floor_ms = next((r.median_ms for i, r in zip(impls, results)
                     if i.kind == "floor" and isinstance(r, Timing)), None)
    for impl, result in zip(impls, results):
        error = None
        timing = result if isinstance(result, Timing) else None
        peak = timing.peak_bytes if timing else None
        if timing is None:  # a peer that cannot run here is reported, not fatal to the run
            error = f"{type(result).__name__}: {str(result).splitlines()[0] if str(result) else ''}"[:200]
        ms = timing.median_ms if timing else None
        rate = case.work / ms / 1e6 if ms else None  # per ms -> per s (1e3), then giga (1e9)
        row = Row(
            family=case.family, case=case.label, op=case.op, shape=case.shape, mode=case.mode, impl=impl.name,
            kind=impl.kind, median_ms=ms, samples_ms=timing.samples_ms if timing else [],
            inner=timing.inner if timing else 0, first_call_s=timing.first_call_s if timing else None,
            rate=rate, unit=case.unit,
            pct_of_floor=(100.0 * floor_ms / ms) if (floor_ms and ms) else None,
            extra_peak_mb=peak / MIB if peak is not None else None,
            bytes_per_row=(peak / case.rows) if (peak is not None and case.rows) else None,
            error=error, note=impl.note)
        rows.append(row)
        log(f"  {case.label:<44} {impl.name:<34} "
            + (f"{ms:10.3f} ms" if ms is not None else f"failed: {error}"))
    return rows


def evaluate_targets(case: Case, rows: list[Row]) -> list[TargetResult]:
    by_name = {r.impl: r for r in rows}
    floor = next((r for r in rows if r.kind == "floor"), None)
    results = []
    for t in case.targets:
        row, other = by_name.get(t.impl), by_name.get(t.other) if t.other else None
        value, detail = None, "its measurement failed"
        if row is None or row.median_ms is None:
            detail = f"{t.impl} did not run"
        elif t.other and (other is None or other.median_ms is None):
            detail = f"{t.other} did not run"
        elif t.metric in ("mem_per_row", "mem_fraction") and row.extra_peak_mb is None:
            detail = "memory not measured"
        elif t.metric == "x_floor" and floor and floor.median_ms:
            value = row.median_ms / floor.median_ms
            detail = f"{value:.2f}x floor ({row.median_ms:.2f} vs {floor.median_ms:.2f} ms)"
        elif t.metric == "mem_per_row" and row.bytes_per_row is not None:
            value = row.bytes_per_row
            detail = f"{value:.1f} B/row"
        elif t.metric == "speedup" and other is not None and other.median_ms:
            value = other.median_ms / row.median_ms
            detail = f"speedup {value:.2f}x over {t.other} ({row.median_ms:.3f} vs {other.median_ms:.3f} ms)"
        elif (t.metric == "mem_fraction" and other is not None and other.extra_peak_mb
              and row.extra_peak_mb is not None):
            value = row.extra_peak_mb / other.extra_peak_mb
            detail = f"{100 * value:.2f}% of {t.other}'s {other.extra_peak_mb:.1f} MB"
        met = None
        if value is not None:
            met = value >= t.bound if t.metric == "speedup" else value <= t.bound
        results.append(TargetResult(case.family, case.label, t.text, value, met, detail))
    return results


# ---------------------------------------------------------------------------------------------
# Report: markdown table, JSON, PNG
# ---------------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def compile_times(rows: list[Row]) -> dict[str, float]:
    """case -> median ms of its (first) torch.compile row that ran."""
    out: dict[str, float] = {}
    for r in rows:
        if r.kind == "compile" and r.median_ms and r.case not in out:
            out[r.case] = r.median_ms
    return out


def markdown_table(family: str, rows: list[Row], targets: list[TargetResult],
                   notes: Iterable[str] = ()) -> str:
    """One markdown table for a family: case, implementation, median ms, rate, % of floor, extra MB."""
    unit = rows[0].unit if rows else "GB/s"
    compile_ms = compile_times(rows)
    lines = [f"### {family}", "",
             f"| case | implementation | median ms | {unit} | % of floor | extra peak MB | x torch.compile |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.case} | {r.impl} | failed: {r.error.replace('|', '/')} | | | | |")
            continue
        if r.kind == "floor":
            mem = ""
        else:  # small outputs (a few bytes per row) would print as 0.0 MB
            mem = _fmt(r.extra_peak_mb, ".1f" if (r.extra_peak_mb or 0) >= 0.1 else ".4f")
        vs_compile = ""
        if r.kind == "rlkern" and r.median_ms and compile_ms.get(r.case):
            vs_compile = f"{compile_ms[r.case] / r.median_ms:.2f}x"
        lines.append(f"| {r.case} | {r.impl} | {_fmt(r.median_ms, '.3f')} | {_fmt(r.rate, '.1f')} | "
                     f"{_fmt(r.pct_of_floor, '.0f')} | {mem} | {vs_compile} |")
    work = "GEMM flops" if unit == "GFLOP/s" else "bytes that must be moved"
    lines += ["", f"{unit} = {work} / median time; % of floor = floor ms / median ms; extra peak MB = "
                  "peak of tensor memory allocated during one call (outputs included); x torch.compile "
                  "= the case's torch.compile ms / the rlkern row's ms (> 1: rlkern faster)."]
    if targets:
        lines += ["", "Targets:"]
        for t in targets:
            verdict = {True: "met", False: "MISSED", None: "not measured"}[t.met]
            lines.append(f"- {t.case}: {t.text}: {verdict} ({t.detail})")
    notes = list(notes)
    if notes:
        lines += [""] + [f"Note: {n}" for n in notes]
    return "\n".join(lines)


def environment() -> dict:
    return {
        "utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def save_json(path: Path, *, meta: dict, rows: list[Row], targets: list[TargetResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "rows": [asdict(r) for r in rows], "targets": [asdict(t) for t in targets]}
    path.write_text(json.dumps(payload, indent=1))


_KIND_COLOURS = {"rlkern": "tab:blue", "compile": "tab:orange", "peer": "tab:gray"}


def save_plot(path: Path, rows: list[Row]) -> None:
    """One panel per family; per case a heading, then one bar per implementation: its time relative
    to the case's floor (log scale; the dashed line at 1 is the floor, lower is better). rlkern is
    blue, torch.compile orange, the peers' eager code grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r.family for r in rows))
    plotted = {fam: [r for r in rows if r.family == fam and r.kind != "floor" and r.pct_of_floor]
               for fam in families}
    families = [f for f in families if plotted[f]]
    if not families:
        return
    heights = [len(plotted[f]) + len({r.case for r in plotted[f]}) for f in families]
    fig, axes = plt.subplots(len(families), 1, figsize=(10, 1.2 + 0.22 * sum(heights) + 0.6 * len(families)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, fam in zip(axes[:, 0], families):
        y, ticks, labels = 0, [], []
        for case in dict.fromkeys(r.case for r in plotted[fam]):
            ticks.append(y)
            labels.append(case)
            y += 1
            for r in (r for r in plotted[fam] if r.case == case):
                ax.barh(y, 100.0 / r.pct_of_floor, color=_KIND_COLOURS.get(r.kind, "tab:gray"), height=0.8)
                ticks.append(y)
                labels.append(f"{r.impl}  ")
                y += 1
        ax.set_yticks(ticks)
        ax.set_yticklabels(labels, fontsize=7)
        for tick, label in zip(ax.get_yticklabels(), labels):
            if not label.endswith("  "):
                tick.set_fontweight("bold")
        ax.set_ylim(y - 0.5, -0.5)
        ax.set_xscale("log")
        ax.axvline(1.0, color="k", linestyle="--", linewidth=1)
        ax.set_xlabel("time / floor (log scale, lower is better; "
                      "blue rlkern, orange torch.compile, grey peers)", fontsize=8)
        ax.set_title(fam)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_cases(cases: Iterator[Case], cfg: TimingConfig, *, measure_memory: bool = True,
              impl_patterns: list[str] | None = None,
              log=print) -> tuple[list[Row], list[TargetResult], list[str]]:
    """Runs cases one at a time (the generator builds each case's inputs only when asked, so at most
    one case's tensors are alive). ``impl_patterns`` keeps only the implementations whose name
    contains one of them (the floor always runs)."""
    rows, targets, notes = [], [], []
    for case in cases:
        if impl_patterns:
            case.impls = [i for i in case.impls
                          if i.kind == "floor" or any(p in i.name for p in impl_patterns)]
        case_rows = run_case(case, cfg, measure_memory=measure_memory, log=log)
        rows += case_rows
        targets += evaluate_targets(case, case_rows)
        notes += [n for n in case.notes if n not in notes]
        del case  # reference counting frees its buffers now; nothing here makes cycles, so no gc.collect
    gc.collect()  # (0.25 s a call with transformers/trl loaded: once per family, not per case)
    return rows, targets, notes
