"""python -m rlkern.train [rlhf|sft|rm|ppo|ppo-penalty|grpo|dpo|trpo] [--options]  (no command = rlhf)

Trains a language model with RL on rlkern.ops, with no downloads: the default ``rlhf`` command runs
SFT -> reward model -> PPO against that reward model on the embedded arithmetic task ("37+48=" ->
"085") with a tiny Llama-style model and prints a before/after table.
``python -m rlkern.train COMMAND --help`` lists every option.
Multi-process: ``torchrun --nproc_per_node=2 -m rlkern.train COMMAND ...``.
"""

from __future__ import annotations

import sys

from rlkern.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
