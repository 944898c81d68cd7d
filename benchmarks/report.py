"""The report command: ``python -m benchmarks [--family F ...] [--quick] [--shapes S ...]``.

Prints one markdown table per op family, then saves the rows as JSON, a plot as PNG and every
table as one markdown file (``bench-<stamp>.md``, ready to paste into README.md) under
``benchmarks/results/`` (gitignored). Every family module (benchmarks/logprobs.py, rlmath.py,
linear.py) exposes ``SHAPES = {"full": [...], "quick": [...]}`` (optionally "large") and
``cases(shapes, *, compile=True)`` yielding ``harness.Case``s one at a time. The rlmath family runs
each case with fp32, int64 and bool masks (in the shape label: ``mask=int64``) and adds a summary
table per shape (rlkern vs torch.compile and the peers' eager code, per mask dtype). Two sections
are not op families: ``overhead`` (per-call time on tiny CPU inputs, rlkern vs eager torch) and
``firstcall`` (first call of each op family in a fresh process: seconds, RSS, triton/sympy/dynamo
imported?); each exposes ``run_section(...) -> (table, records)``.

    python -m benchmarks                          # everything, report shapes (make bench)
    python -m benchmarks --quick                  # small shapes (rlmath: B=64,T=1024 only)
    python -m benchmarks -f rlmath -f overhead -f firstcall   # the RL-maths / overhead / first-call tables
    python -m benchmarks -f policy_variants --no-plot        # GSPO, CISPO, TIS-GRPO, KL-Cov (issue #13)

On the project's 2-core machine (2026-12-01, load average ~6 from other jobs) the rlmath + overhead
+ firstcall run took 15 min, three quarters of it torch.compile compiling (the associative scans of
gae and discounted_returns: 20-50 s per shape and mask dtype); ``--quick`` rlmath alone 6 min.
    python -m benchmarks -f rlmath --shapes mask=fp32        # one mask dtype (--shapes: label substrings)
    python -m benchmarks -f logprobs --shapes 4096x32768     # one family, one shape
    python -m benchmarks -f linear --large --impls rlkern     # + the fp32 N=2048,V=151936 case, rlkern only
    pytest benchmarks/ --benchmark-group-by=group            # the same cases under pytest-benchmark
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import sys
import time
from pathlib import Path

import torch

from benchmarks import harness

FAMILIES = ("logprobs", "rlmath", "linear", "policy_variants")  # op families measured through harness.Case
SECTIONS = ("overhead", "firstcall")  # measured their own way: run_section(...) -> (table, records)
EVERYTHING = FAMILIES + SECTIONS
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def family_module(name: str):
    if name not in EVERYTHING:
        raise ValueError(f"unknown benchmark family {name!r}; choose from {EVERYTHING}")
    return importlib.import_module(f"benchmarks.{name}")


def select_shapes(module, *, quick: bool, patterns: list[str] | None, large: bool = False):
    """The family's shapes for this mode (plus its ``large`` ones when asked), kept when their label
    contains any of ``patterns``."""
    shapes = list(module.SHAPES["quick" if quick else "full"])
    if large:
        shapes += module.SHAPES.get("large", [])
    if patterns:
        shapes = [s for s in shapes if any(p in s.label for p in patterns)]
    return shapes


def run_report(families: list[str], *, quick: bool = False, large: bool = False,
               patterns: list[str] | None = None,
               cfg: harness.TimingConfig | None = None, out_dir: Path = RESULTS_DIR,
               plot: bool = True, measure_memory: bool = True, compile: bool = True,
               shapes_override: dict | None = None, impl_patterns: list[str] | None = None,
               probe_bytes: int | None = None, log=print) -> dict:
    """Runs the families (and sections) and writes the report; returns {"tables", "json", "png",
    "markdown", "rows", "targets", "sections"}. ``shapes_override`` maps a family to an explicit
    shape list (the smoke test's tiny shapes; for firstcall, a list of op-family names)."""
    started = time.perf_counter()
    cfg = cfg or harness.TimingConfig()
    meta = {"env": harness.environment(), "quick": quick, "large": large, "patterns": patterns,
            "compile": compile, "impl_patterns": impl_patterns,
            "timing": {"warmup": cfg.warmup, "repeats": cfg.repeats, "min_sample_ms": cfg.min_sample_ms}}
    log(f"# rlkern benchmarks ({meta['env']['utc']}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {meta['env']['loadavg']})")
    if measure_memory:
        meta["memory_probe"] = harness.validate_memory_probe()
        log(f"extra peak memory: {meta['memory_probe']['method']}; validated: a known "
            f"{meta['memory_probe']['known_bytes']} B allocation measured as "
            f"{meta['memory_probe']['measured_bytes']} B")
    nbytes = probe_bytes or (32 if quick else 256) * harness.MIB
    probe = harness.check_streaming_probe(nbytes, cfg)
    meta["streaming_probe"] = probe
    meta["floor_probe"] = "sum" if probe["sum_ok"] else "copy"
    harness.set_floor_probe(meta["floor_probe"])
    g = probe["gbps"]
    log(f"streaming bandwidth over {nbytes // harness.MIB} MiB: sum {g['sum']:.1f} GB/s, "
        f"amax {g['amax']:.1f} GB/s, "
        f"copy {g['copy']:.1f} GB/s (read + write)"
        + ("; floors read with torch.sum" if probe["sum_ok"] else
           "; torch.sum reads >15% below a copy's rate, so floors are copies of the same traffic"))

    all_rows, all_targets, tables, sections = [], [], [], {}
    for fam in families:
        module = family_module(fam)
        if fam in SECTIONS:
            log(f"\n## {fam}")
            table, records = module.run_section(quick=quick, cfg=cfg, shapes=(shapes_override or {}).get(fam),
                                                log=log)
            tables.append(table)
            sections[fam] = records
            log("\n" + table)
            continue
        shapes = ((shapes_override or {}).get(fam)
                  or select_shapes(module, quick=quick, patterns=patterns, large=large))
        if not shapes:
            log(f"\n{fam}: no shape matches {patterns}; skipped")
            continue
        log(f"\n## {fam}: {', '.join(s.label for s in shapes)}")
        rows, targets, notes = harness.run_cases(module.cases(shapes, compile=compile), cfg,
                                                 measure_memory=measure_memory, impl_patterns=impl_patterns,
                                                 log=log)
        table = harness.markdown_table(fam, rows, targets, notes)
        summary = module.summary_tables(rows) if hasattr(module, "summary_tables") else ""
        tables += [summary, table] if summary else [table]
        log("\n" + table + ("\n\n" + summary if summary else ""))
        all_rows += rows
        all_targets += targets

    meta["elapsed_s"] = time.perf_counter() - started
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    json_path = out_dir / f"bench-{stamp}.json"
    meta["sections"] = sections
    harness.save_json(json_path, meta=meta, rows=all_rows, targets=all_targets)
    md_path = out_dir / f"bench-{stamp}.md"
    md_path.write_text(_markdown_report(meta, tables))
    png_path = None
    if plot and all_rows:
        png_path = out_dir / f"bench-{stamp}.png"
        harness.save_plot(png_path, all_rows)
    log(f"\nsaved {json_path}, {md_path}" + (f" and {png_path}" if png_path else "")
        + f" ({meta['elapsed_s']:.0f} s)")
    return {"tables": tables, "json": json_path, "png": png_path, "markdown": md_path, "rows": all_rows,
            "targets": all_targets, "sections": sections}


def _markdown_report(meta: dict, tables: list[str]) -> str:
    """Every table of the run, under one line naming the machine state it was measured in."""
    env = meta["env"]
    head = (f"Measured {env['utc']}, torch {env['torch']}, {env['threads']} threads, load average "
            f"{env['loadavg']}, {'quick' if meta['quick'] else 'report'} shapes, {meta['elapsed_s']:.0f} s.")
    return "\n\n".join([head, *tables]) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("-f", "--family", action="append", choices=EVERYTHING,
                        help="op family or section to run (repeatable; default: all of them)")
    parser.add_argument("--quick", action="store_true",
                        help="small shapes only (rlmath: B=64,T=1024 with the three mask dtypes)")
    parser.add_argument("--large", action="store_true",
                        help="also run each family's SHAPES['large'] "
                             "(linear: N=2048,H=1024,V=151936 fp32, ~10 min)")
    parser.add_argument("--shapes", nargs="+", metavar="SUBSTRING",
                        help="keep the shapes whose label contains one of these, e.g. 4096x32768 B=64")
    parser.add_argument("--impls", nargs="+", metavar="SUBSTRING",
                        help="keep the implementations whose name contains one of these, e.g. rlkern "
                             "(the floor always runs)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default 1)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed samples, median reported (>= 5; default 5)")
    parser.add_argument("--no-memory", action="store_true", help="skip the extra-peak-memory measurement")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR,
                        help=f"output directory (default {RESULTS_DIR})")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = harness.TimingConfig(warmup=args.warmup, repeats=args.repeats)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    run_report(args.family or list(EVERYTHING), quick=args.quick, large=args.large, patterns=args.shapes,
               cfg=cfg, out_dir=args.out, plot=not args.no_plot, measure_memory=not args.no_memory,
               compile=not args.no_compile, impl_patterns=args.impls)
    return 0
