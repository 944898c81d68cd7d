"""Command line: parse, resolve the config, run the subcommand, turn expected failures into one line."""

from __future__ import annotations

import sys

from rlkern.train.config import COMMANDS, ConfigError, parse_config

__all__ = ["main", "run_command", "USAGE"]

USAGE = """python -m rlkern.train [rlhf|sft|rm|ppo|ppo-penalty|grpo|dpo|trpo] [--options]  (no command = rlhf)

Trains a language model with RL on rlkern.ops, with no downloads: the default ``rlhf`` command runs
SFT -> reward model -> PPO against that reward model on the embedded arithmetic task ("37+48=" ->
"085") with a tiny Llama-style model and prints a before/after table.
``python -m rlkern.train COMMAND --help`` lists every option.
Multi-process: ``torchrun --nproc_per_node=2 -m rlkern.train COMMAND ...``.
"""


def run_command(command: str, cfg) -> dict:
    """Runs one subcommand with a resolved config; returns its summary."""
    from rlkern.train.dpo import train_dpo
    from rlkern.train.grpo import train_grpo
    from rlkern.train.pipeline import train_rlhf
    from rlkern.train.ppo import train_ppo
    from rlkern.train.rm import train_rm
    from rlkern.train.sft import train_sft
    from rlkern.train.trpo import train_trpo

    runners = {"rlhf": train_rlhf, "sft": train_sft, "rm": train_rm, "ppo": train_ppo,
               "ppo-penalty": lambda c: train_ppo(c, penalty=True), "grpo": train_grpo, "dpo": train_dpo,
               "trpo": train_trpo}
    return runners[command](cfg)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["rlhf", *argv]
    command, argv = argv[0], argv[1:]
    if command in ("-h", "--help"):
        print(USAGE + "\ncommands:\n" + "\n".join(f"  {name:<12} {cls.__doc__.splitlines()[0]}"
                                                   for name, cls in COMMANDS.items()))
        return 0
    if command not in COMMANDS:
        print(f"python -m rlkern.train: error: unknown command {command!r} (choose from "
              f"{', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    from rlkern.train.models import ModelError
    from rlkern.train.run import RunError

    try:
        cfg = parse_config(command, argv)
        run_command(command, cfg)
    except (ConfigError, ModelError, RunError, ValueError) as err:
        print(f"rlkern.train {command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
