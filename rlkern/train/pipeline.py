"""The default command: SFT -> reward model -> PPO, then the before/after table and plot."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil

from rlkern.train.common import Stage, final_dir, ops_backend
from rlkern.train.config import PPOConfig, RMConfig, SFTConfig
from rlkern.train.run import DONE_FILE, METRICS_JSONL, Run, RunError, check_out_dir, plot_metrics

__all__ = ["train_rlhf", "compare"]


def _sub(cls, cfg, **values):
    names = {f.name for f in dataclasses.fields(cls)}
    kept = {k: v for k, v in dataclasses.asdict(cfg).items() if k in names}
    kept.update(values)
    return cls(**kept)


def train_rlhf(cfg) -> dict:
    """Runs the three stages into ``<out>/sft``, ``<out>/rm``, ``<out>/ppo`` (a stage already complete
    in a resumed run is kept), prints and saves the table, and plots the curves."""
    from rlkern.train.ppo import train_ppo
    from rlkern.train.rm import train_rm
    from rlkern.train.sft import train_sft

    top = Run(cfg, "rlhf")
    root = top.dir
    check_out_dir(root)
    exists = os.path.isdir(root) and any(os.scandir(root))
    if exists and not (cfg.resume or cfg.overwrite):
        raise RunError(f"run directory {root!r} already exists; pass --resume to continue it or --overwrite "
                       "to replace it")
    if exists and cfg.resume:
        top._check_same_command()
    top.init_distributed()
    if top.main and cfg.overwrite and os.path.isdir(root):
        shutil.rmtree(root)
    if top.main:
        os.makedirs(root, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(root, DONE_FILE))  # the table is complete only when this run says so
        with open(os.path.join(root, "config.json"), "w") as fh:
            json.dump({"command": "rlhf", **dataclasses.asdict(cfg)}, fh, indent=2)
    top.print_config()

    def stage_cfg(cls, sub, **values):
        # A finished stage is kept; under --resume a stage with a checkpoint continues from it, and a
        # stage killed before its first checkpoint starts again (its partial directory is replaced).
        d = os.path.join(root, sub)
        done = os.path.isfile(os.path.join(d, "DONE"))
        resume = cfg.resume and not done and Run(cfg, sub, d).latest_checkpoint() is not None
        return _sub(cls, cfg, out=d, resume=resume, overwrite=not resume, **values), done

    sft_cfg, sft_done = stage_cfg(SFTConfig, "sft", steps=cfg.sft_steps, lr=cfg.sft_lr)
    if not sft_done:
        train_sft(sft_cfg)
    sft_model = final_dir(sft_cfg.out)
    rm_cfg, rm_done = stage_cfg(RMConfig, "rm", steps=cfg.rm_steps, lr=cfg.rm_lr, model=sft_model)
    if not rm_done:
        train_rm(rm_cfg)
    rm_model = final_dir(rm_cfg.out)
    # --reward auto (the default) and model: PPO optimises the reward model just trained (refreshed on
    # the policy's samples every --rm-refresh-every steps); the exact-match checker only evaluates.
    # --reward rule: the checker is the reward, the reward model's score is reported beside it.
    ppo_cfg, ppo_done = stage_cfg(PPOConfig, "ppo", model=sft_model, reward_model=rm_model,
                                  reward="model" if cfg.reward == "auto" else cfg.reward)
    if not ppo_done:
        train_ppo(ppo_cfg)
    rows = compare(cfg, [("sft", sft_model), ("ppo", final_dir(ppo_cfg.out))], sft_model, rm_model)
    if top.main:
        stages = []
        for name in ("sft", "rm", "ppo"):
            path = os.path.join(root, name, METRICS_JSONL)
            with open(path) as fh:
                stages.append((name, [json.loads(line) for line in fh]))
        plot_metrics(stages, os.path.join(root, "curves.png"))
        print(f"learning curves: {os.path.join(root, 'curves.png')}")
        top.mark_done()
    return {"dir": root, "table": rows}


def compare(cfg, models: list[tuple[str, str]], ref_path: str, rm_path: str | None) -> list[dict]:
    """Held-out greedy accuracy, reward-model score and KL to the reference (the SFT policy) of each
    model; printed as a table and saved as ``summary.json`` in the run directory."""
    stage = Stage(cfg, "rlhf")
    with ops_backend(cfg.ops):
        ref, tok = stage.start_model(ref_path)
        reward_model = None
        if rm_path:
            reward_model, _ = stage.head_model(rm_path, "reward", load_head=True)
            reward_model.eval()
        rows = []
        for name, path in models:
            policy, _ = stage.start_model(path)
            ev = stage.evaluate(policy, tok, reward_model, ref, max_new_tokens=cfg.max_new_tokens)
            rows.append({"stage": name, "accuracy": ev["eval/accuracy"], "reward": ev.get("eval/reward"),
                         "kl_to_sft": ev["eval/kl_to_ref"]})
    if stage.run.main:
        lines = [f"{'stage':<8} {'held-out accuracy':>18} {'reward (RM)':>12} {'KL to SFT':>10}"]
        for r in rows:
            reward = "-" if r["reward"] is None else f"{r['reward']:.3f}"
            acc, kl = 100 * r["accuracy"], r["kl_to_sft"]
            lines.append(f"{r['stage']:<8} {acc:>17.1f}% {reward:>12} {kl:>10.3f}")
        print("\n".join(lines), flush=True)
        with open(os.path.join(stage.run.dir, "summary.json"), "w") as fh:
            json.dump(rows, fh, indent=2)
        with open(os.path.join(stage.run.dir, "summary.txt"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return rows
