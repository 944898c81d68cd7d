"""What makes a training loop a tool: the run directory, metrics (JSONL + CSV), the progress bar,
step-time breakdown, atomic checkpoints with exact resume, data parallelism, and the PNG plot.

Data parallelism: under ``torchrun`` every rank holds a full replica, samples its share of the batch
from its own RNG stream, and gradients are averaged across ranks with one ``all_reduce`` per step
before the optimizer runs (the DDP scheme, done explicitly so it also covers TRPO's double-backward
Fisher products and the flat natural-gradient step); metrics are averaged across ranks and only
rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

__all__ = ["Run", "RunError", "Timer", "plot_metrics"]

CKPT_DIR = "checkpoints"
STATE_FILE = "state.pt"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
CONFIG_FILE = "config.json"
DONE_FILE = "DONE"


class RunError(RuntimeError):
    """A run directory that cannot be used as asked (exists, or has nothing to resume from)."""


class Timer:
    """Wall-clock seconds per phase of a step (``time/generate``, ``time/logprobs``, ...)."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[f"time/{phase}"] = self.totals.get(f"time/{phase}", 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out, self.totals = self.totals, {}
        return out


class Run:
    """One stage's run directory and the services every algorithm uses."""

    # The live metrics shown on the progress bar, in this order, when a stage reports them.
    BAR_KEYS = ("eval/accuracy", "rollout/reward_mean", "rollout/accuracy", "rollout/kl", "policy/loss",
                "policy/clipfrac", "value/loss", "sft/loss", "rm/accuracy", "dpo/loss", "perf/tokens_per_s")

    def __init__(self, cfg, command: str, out: str | None = None):
        self.cfg, self.command = cfg, command
        self.dir = out or cfg.out or os.path.join("runs", command)
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.main = self.rank == 0
        self._bar = None
        self._rows: list[dict] = []
        # torch.Generators whose state is part of this rank's checkpointed RNG (e.g. the data order).
        self.generators: dict[str, torch.Generator] = {}

    # ---- setup -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        dev = self.cfg.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(dev)
        if dev.type == "cuda" and dev.index is None and self.world > 1:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return dev

    def init_distributed(self) -> None:
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def prepare(self) -> int:
        """Creates (or checks) the run directory and returns the step to start from (0, or the step of
        the newest intact checkpoint under --resume). Nothing is written over an existing run unless
        --resume or --overwrite, and a resumed directory must hold a run of this same command."""
        cfg = self.cfg
        check_out_dir(self.dir)
        exists = os.path.isdir(self.dir) and any(os.scandir(self.dir))
        start = 0
        if cfg.resume:
            self._check_same_command()
            ckpt = self.latest_checkpoint(report=True)
            if ckpt is None:
                raise RunError(f"--resume: {self.dir!r} has no complete checkpoint under {CKPT_DIR}/")
            start = checkpoint_step(ckpt)
            if start > cfg.steps:
                raise RunError(f"--resume: the checkpoint in {self.dir!r} is at step {start}, past --steps "
                               f"{cfg.steps}; pass --steps {start} or more to continue it")
        elif exists and not cfg.overwrite:
            raise RunError(f"run directory {self.dir!r} already exists; pass --resume to continue it or "
                           "--overwrite to replace it")
        self._barrier()
        if self.main:
            if exists and cfg.overwrite:
                shutil.rmtree(self.dir)
            os.makedirs(self.dir, exist_ok=True)
            # A DONE marker from an earlier completion must not outlive this run's own final save (the
            # rlhf pipeline skips a stage that has one).
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.dir, DONE_FILE))
            with open(os.path.join(self.dir, CONFIG_FILE), "w") as fh:
                json.dump({"command": self.command, "world_size": self.world, **asdict(cfg)}, fh, indent=2)
            self._load_metrics(start)
        self._barrier()
        return start

    def _check_same_command(self) -> None:
        """A resumed directory's config.json must name this command (a directory without one has no
        checkpoint either, which the caller reports)."""
        path = os.path.join(self.dir, CONFIG_FILE)
        if not os.path.isfile(path):
            return
        try:
            with open(path) as fh:
                saved = json.load(fh).get("command")
        except (OSError, ValueError, AttributeError):
            raise RunError(f"--resume: {path!r} cannot be read: not a run directory of "
                           f"{self.command}") from None
        if saved != self.command:
            raise RunError(f"--resume: {self.dir!r} holds a {saved} run, not {self.command}; pick the "
                           f"{self.command} run's --out")

    def print_config(self) -> None:
        if not self.main:
            return
        print(f"== rlkern.train {self.command} -> {self.dir} (world size {self.world})", flush=True)
        for key, value in asdict(self.cfg).items():
            print(f"  {key:<18} {value!r}")
        sys.stdout.flush()

    def done(self) -> bool:
        return os.path.isfile(os.path.join(self.dir, DONE_FILE))

    def mark_done(self) -> None:
        if self.main:
            with open(os.path.join(self.dir, DONE_FILE), "w") as fh:
                fh.write("complete\n")

    # ---- metrics -----------------------------------------------------------------------------
    def _load_metrics(self, start: int) -> None:
        """Keeps the metrics of steps <= start (a resumed run re-logs everything after its checkpoint)."""
        path = os.path.join(self.dir, METRICS_JSONL)
        self._rows = []
        if start > 0 and os.path.isfile(path):
            with open(path) as fh:
                self._rows = [r for r in map(json.loads, fh) if r["step"] <= start]
        self._write_metrics()

    def _write_metrics(self) -> None:
        tmp = os.path.join(self.dir, METRICS_JSONL + ".tmp")
        with open(tmp, "w") as fh:
            for row in self._rows:
                fh.write(json.dumps(row) + "\n")
        os.replace(tmp, os.path.join(self.dir, METRICS_JSONL))
        keys = ["step"] + sorted({k for r in self._rows for k in r} - {"step"})
        tmp = os.path.join(self.dir, METRICS_CSV + ".tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self._rows)
        os.replace(tmp, os.path.join(self.dir, METRICS_CSV))

    def reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        """The mean of each metric across ranks (identity on one process)."""
        if self.world == 1 or not metrics:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return {k: v / self.world for k, v in zip(keys, t.tolist())}

    def log(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Reduces ``metrics`` across ranks, appends them at ``step`` and updates the bar."""
        metrics = self.reduce({k: float(v) for k, v in metrics.items()})
        for k, v in metrics.items():
            if not math.isfinite(v):
                raise FloatingPointError(f"metric {k} is {v} at step {step}: training diverged")
        if self.main:
            self._rows.append({"step": step, **metrics})
            self._write_metrics()
            if self._bar is not None:
                shown = {k.split("/")[-1] if k != "eval/accuracy" else "eval_acc": f"{metrics[k]:.3g}"
                         for k in self.BAR_KEYS if k in metrics}
                self._bar.set_postfix(shown, refresh=False)
        return metrics

    def progress(self, start: int, total: int, desc: str):
        """A tqdm bar over steps [start, total) on rank 0 (silent elsewhere or with --no-progress)."""
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True,
                         disable=not (self.main and self.cfg.progress), mininterval=0.5)
        return self._bar

    def close_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def print_time_breakdown(self) -> None:
        """Mean seconds per step of each phase (``time/*`` metrics) and its share, on rank 0."""
        if not self.main:
            return
        phases = sorted({k for r in self._rows for k in r if k.startswith("time/")})
        if not phases:
            return
        means = {}
        for k in phases:
            values = [r[k] for r in self._rows if k in r]
            means[k] = sum(values) / len(values)
        total = sum(means.values())
        parts = ", ".join(f"{k[5:]} {1000 * v:.1f} ms ({100 * v / total:.0f}%)" for k, v in means.items())
        print(f"[{self.command}] step time: {1000 * total:.1f} ms = {parts}", flush=True)

    def rows(self) -> list[dict]:
        return list(self._rows)

    # ---- distributed -------------------------------------------------------------------------
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sync_grads(self, params) -> None:
        """Averages the gradients of ``params`` across ranks (one flat all-reduce)."""
        if self.world == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def all_mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of a tensor across ranks (a new tensor; identity on one process)."""
        if self.world == 1:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t / self.world

    def broadcast_module(self, module) -> None:
        """Rank 0's parameters and buffers on every rank (replicas start identical)."""
        if self.world == 1:
            return
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, 0)

    def shard(self, n: int, what: str) -> int:
        """This rank's share of a global batch of ``n``; it must split evenly."""
        if n % self.world:
            raise ValueError(f"{what}={n} must be divisible by the number of processes ({self.world})")
        return n // self.world

    # ---- checkpoints -------------------------------------------------------------------------
    def latest_checkpoint(self, *, report: bool = False) -> str | None:
        """The newest checkpoint that passes :func:`verify_checkpoint`; a newer, damaged one is skipped
        (and, with ``report``, named on stderr with the reason)."""
        root = os.path.join(self.dir, CKPT_DIR)
        if not os.path.isdir(root):
            return None
        done = sorted((d for d in os.listdir(root) if d.startswith("step_")
                       and os.path.isfile(os.path.join(root, d, STATE_FILE))), reverse=True)
        for name in done:
            ckpt = os.path.join(root, name)
            problem = verify_checkpoint(ckpt, self.world)
            if problem is None:
                return ckpt
            if report and self.main:
                print(f"rlkern.train {self.command}: warning: checkpoint {ckpt!r} is damaged ({problem}); "
                      "trying the previous one", file=sys.stderr, flush=True)
        return None

    def save_checkpoint(self, step: int, savers: dict, state: dict) -> str:
        """Writes ``checkpoints/step_<N>/`` atomically: everything goes to a temporary directory that is
        renamed into place only when complete, so a run killed mid-write leaves the previous checkpoint
        as the latest. ``savers`` maps a sub-directory to a function writing a model there; ``state`` is
        torch-saved with each rank's RNG state added."""
        root = os.path.join(self.dir, CKPT_DIR)
        final = os.path.join(root, f"step_{step:06d}")
        tmp = os.path.join(root, f".tmp_step_{step:06d}")
        if self.main:
            os.makedirs(root, exist_ok=True)
            if os.path.isdir(tmp):
                shutil.rmtree(tmp)
            os.makedirs(tmp)
        self._barrier()
        torch.save({**rng_state(), "generators": {k: g.get_state() for k, g in self.generators.items()}},
                   os.path.join(tmp, f"rng_rank{self.rank}.pt"))
        self._barrier()
        if self.main:
            for name, save in savers.items():
                save(os.path.join(tmp, name))
            torch.save({"step": step, **state}, os.path.join(tmp, STATE_FILE))
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.rename(tmp, final)
            for old in sorted(d for d in os.listdir(root) if d.startswith("step_"))[:-2]:
                shutil.rmtree(os.path.join(root, old))  # keep the two newest
        self._barrier()
        return final

    def load_checkpoint(self) -> tuple[str, dict]:
        """``(directory, state)`` of the newest intact checkpoint, with this rank's RNG restored."""
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            raise RunError(f"--resume: {self.dir!r} has no complete checkpoint under {CKPT_DIR}/")
        state = torch.load(os.path.join(ckpt, STATE_FILE), map_location="cpu", weights_only=False)
        rng_file = os.path.join(ckpt, f"rng_rank{self.rank}.pt")
        if not os.path.isfile(rng_file):
            raise RunError(f"--resume: {ckpt!r} was written by fewer processes "
                           f"(no {os.path.basename(rng_file)})")
        rng = torch.load(rng_file, map_location="cpu", weights_only=False)
        set_rng_state(rng)
        for name, gen in self.generators.items():
            gen.set_state(rng["generators"][name])
        return ckpt, state


def checkpoint_step(ckpt: str) -> int:
    return int(os.path.basename(ckpt).split("_")[1])


def verify_checkpoint(ckpt: str, world: int = 1) -> str | None:
    """``None`` when every file of the checkpoint reads back (state, each rank's RNG, every safetensors
    tensor), else what is wrong. A checkpoint is renamed into place only once written, but a disk that
    filled up or a file damaged later must not crash ``--resume`` when an older intact one exists."""
    from safetensors import safe_open

    try:
        torch.load(os.path.join(ckpt, STATE_FILE), map_location="cpu", weights_only=False)
        for rank in range(world):
            torch.load(os.path.join(ckpt, f"rng_rank{rank}.pt"), map_location="cpu", weights_only=False)
        for folder, _dirs, files in os.walk(ckpt):
            for name in files:
                if name.endswith(".safetensors"):
                    with safe_open(os.path.join(folder, name), framework="pt") as fh:
                        for key in fh.keys():  # noqa: SIM118  (safe_open has no __iter__)
                            fh.get_tensor(key)
    except Exception as err:  # noqa: BLE001  (any unreadable file disqualifies the checkpoint)
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'unreadable'}"
    return None


def check_out_dir(path: str) -> None:
    """``--out`` must be a directory this process can create and write into."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise RunError(f"--out {path!r} is a file, not a directory")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(os.path.abspath(probe))
    if not os.access(probe, os.W_OK):
        raise RunError(f"--out {path!r}: {probe!r} is not writable")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Curves worth a panel each, when present.
PLOT_KEYS = ("eval/accuracy", "rollout/reward_mean", "rollout/kl", "policy/loss", "value/loss",
             "policy/clipfrac",
             "kl/beta", "sft/loss", "rm/loss", "rm/accuracy", "dpo/loss", "dpo/reward_accuracy",
             "perf/tokens_per_s")


def plot_metrics(stages: list[tuple[str, list[dict]]], path: str) -> None:
    """One PNG with a panel per metric; every stage is a line (x = its step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in PLOT_KEYS if any(k in r for _, rows in stages for r in rows)]
    if not keys:
        return
    cols = min(3, len(keys))
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name, rows in stages:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None, label=name)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(stages) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
