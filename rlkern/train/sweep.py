"""python -m rlkern.train.sweep [--seeds 0 1 2 3 4] [--jobs 2] [--out runs/sweep] [rlhf options...]

Runs the default pipeline (``python -m rlkern.train rlhf``) once per seed, each in its own process and
run directory (``<out>/seed_<S>``), then prints one table (seed, SFT and final held-out accuracy,
the reward model's held-out pairwise accuracy and its score of the final policy, the KL to SFT, wall
time) and saves it as ``sweep.md`` / ``sweep.json`` with ``sweep.png``: every seed's held-out accuracy
(the checker) beside the reward model's score of the same greedy answers, over the PPO steps, so that
reward over-optimisation (score up, accuracy down) would be visible. Options it does not know are
passed to every run, e.g. ``--reward rule``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

__all__ = ["main", "sweep_table"]


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def _run_one(seed: int, out: str, extra: list[str], reuse: str | None) -> subprocess.Popen:
    # One intra-op thread per run: the built-in model is too small for threads to pay, and parallel
    # runs would otherwise oversubscribe the cores.
    mode = "--overwrite"
    if reuse:
        # The finished SFT and reward-model stages of another sweep are copied in and kept (the
        # pipeline skips a stage whose DONE marker is present under --resume); only PPO runs.
        if os.path.isdir(out):
            shutil.rmtree(out)
        src = os.path.join(reuse, f"seed_{seed}")
        while not os.path.isfile(os.path.join(src, "rm", "DONE")):
            if not os.path.isdir(src):
                raise FileNotFoundError(f"--reuse: {src!r} does not exist")
            time.sleep(10.0)  # that sweep is still running this seed's SFT or reward model
        os.makedirs(out)
        for stage in ("sft", "rm"):
            shutil.copytree(os.path.join(src, stage), os.path.join(out, stage))
        shutil.copy(os.path.join(src, "config.json"), out)
        mode = "--resume"
    cmd = [sys.executable, "-m", "rlkern.train", "rlhf", "--seed", str(seed), "--out", out, mode,
           "--no-progress", "--threads", "1", *extra]
    log = open(os.path.join(os.path.dirname(out), f"seed_{seed}.log"), "w")  # noqa: SIM115
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def sweep_table(root: str, seeds: list[int], walls: dict[int, float]) -> list[dict]:
    """One row per finished seed, read back from its run directory."""
    rows = []
    for seed in seeds:
        run = os.path.join(root, f"seed_{seed}")
        with open(os.path.join(run, "summary.json")) as fh:
            summary = {r["stage"]: r for r in json.load(fh)}
        rm_rows = [r for r in _read_jsonl(os.path.join(run, "rm", "metrics.jsonl"))
                   if "rm/eval_accuracy" in r]
        rows.append({"seed": seed, "sft_accuracy": summary["sft"]["accuracy"],
                     "final_accuracy": summary["ppo"]["accuracy"],
                     "gain": summary["ppo"]["accuracy"] - summary["sft"]["accuracy"],
                     "rm_accuracy": rm_rows[-1]["rm/eval_accuracy"],
                     "rm_score_sft": summary["sft"]["reward"], "rm_score_final": summary["ppo"]["reward"],
                     "kl_to_sft": summary["ppo"]["kl_to_sft"], "wall_s": walls.get(seed, float("nan"))})
    return rows


def format_table(rows: list[dict]) -> str:
    head = ("| seed | SFT acc | final acc | gain | RM pair acc | RM score SFT -> final | KL to SFT | wall s |"
            "\n|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['seed']} | {100 * r['sft_accuracy']:.1f}% | {100 * r['final_accuracy']:.1f}% | "
                     f"{100 * r['gain']:+.1f} | {100 * r['rm_accuracy']:.1f}% | "
                     f"{r['rm_score_sft']:.2f} -> {r['rm_score_final']:.2f} | {r['kl_to_sft']:.3f} | "
                     f"{r['wall_s']:.0f} |")
    return "\n".join(lines)


def plot_sweep(root: str, seeds: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, rm_ax) = plt.subplots(1, 2, figsize=(10, 3.4))
    for seed in seeds:
        rows = [r for r in _read_jsonl(os.path.join(root, f"seed_{seed}", "ppo", "metrics.jsonl"))
                if "eval/accuracy" in r]
        steps = [r["step"] for r in rows]
        line, = acc_ax.plot(steps, [100 * r["eval/accuracy"] for r in rows], label=f"seed {seed}")
        if all("eval/reward" in r for r in rows):
            rm_ax.plot(steps, [r["eval/reward"] for r in rows], color=line.get_color(), label=f"seed {seed}")
    acc_ax.set_title("held-out greedy accuracy (checker), %", fontsize=9)
    # With --reward rule PPO holds no reward model, so its evaluations carry no score.
    rm_ax.set_title("reward-model score of the same answers" if rm_ax.lines else
                    "reward-model score (none: --reward rule)", fontsize=9)
    for ax in (acc_ax, rm_ax):
        ax.set_xlabel("PPO step", fontsize=8)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlkern.train.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="seeds to run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each uses one thread)")
    parser.add_argument("--out", default=os.path.join("runs", "sweep"), help="root of the seed runs")
    parser.add_argument("--reuse", default=None, help="root of an earlier sweep whose SFT and reward-model "
                        "stages are reused (only PPO runs; wall time then counts PPO alone)")
    args, extra = parser.parse_known_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    os.makedirs(args.out, exist_ok=True)
    pending, running, walls, failed = list(args.seeds), {}, {}, []
    while pending or running:
        while pending and len(running) < args.jobs:
            seed = pending.pop(0)
            proc = _run_one(seed, os.path.join(args.out, f"seed_{seed}"), extra, args.reuse)
            running[seed] = (proc, time.perf_counter())
        time.sleep(1.0)
        for seed, (proc, t0) in list(running.items()):
            if proc.poll() is not None:
                walls[seed] = time.perf_counter() - t0
                del running[seed]
                if proc.returncode != 0:
                    failed.append(seed)
                    print(f"seed {seed} failed (exit {proc.returncode}); see "
                          f"{os.path.join(args.out, f'seed_{seed}.log')}", file=sys.stderr)
    done = [s for s in args.seeds if s not in failed]
    if not done:
        return 1
    rows = sweep_table(args.out, done, walls)
    table = format_table(rows)
    load = os.getloadavg()
    reused = f", SFT and RM reused from {args.reuse} (wall = PPO only)" if args.reuse else ""
    note = (f"{len(done)} seeds, {args.jobs} at a time{reused}, options: {' '.join(extra) or '(defaults)'}; "
            f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(table + "\n" + note)
    with open(os.path.join(args.out, "sweep.md"), "w") as fh:
        fh.write(table + "\n\n" + note + "\n")
    with open(os.path.join(args.out, "sweep.json"), "w") as fh:
        json.dump({"rows": rows, "options": extra, "jobs": args.jobs, "loadavg": load}, fh, indent=2)
    plot_sweep(args.out, done, os.path.join(args.out, "sweep.png"))
    print(f"curves: {os.path.join(args.out, 'sweep.png')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
