"""Speed and memory of a real TRL GRPOTrainer step, TRL as shipped vs after ``rlkern.compat.patch("trl")``.

    python -m rlkern.compat.bench_trl              # runs both, each in a fresh process, prints a table
    python -m rlkern.compat.bench_trl --one fused  # one run (what the table runs twice)

A Llama built here with random weights (no Hub): ``--vocab`` x ``--hidden``, 2 layers; a word-level
tokenizer over the same vocabulary; GRPO with 4 generations of ``--completion`` tokens per prompt,
``--batch`` completions per step, fp32 (``bf16=False``). Reported per run: the median wall time of
the training steps after the first (generation + log-prob passes + loss + backward), the median
time of the policy forward through the loss (``compute_loss``: backbone, LM head, GRPO loss) and of
its backward (``accelerator.backward``), and the peak resident memory of the process above what it
held when training started (``ru_maxrss``: includes the optimizer state created at the first step).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings


def _one(mode: str, vocab: int, hidden: int, completion: int, batch: int, steps: int) -> dict:
    import datasets
    import tokenizers
    import torch
    import transformers
    import trl

    import rlkern.compat
    import rlkern.compat.trl

    torch.manual_seed(0)
    words = [f"w{i}" for i in range(vocab - 3)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                     eos_token="<eos>", unk_token="<unk>", bos_token="<eos>")
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
                                      bos_token_id=1)
    model = transformers.LlamaForCausalLM(config)
    model.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(words), (64, 8), generator=g)
    prompts = [" ".join(words[int(i)] for i in row) for row in ids]
    out = tempfile.mkdtemp()
    args = trl.GRPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch,
                          num_generations=4, max_completion_length=completion, report_to="none",
                          save_strategy="no", use_cpu=True, bf16=False, seed=0, logging_steps=1,
                          disable_tqdm=True, learning_rate=1e-5)

    def reward(completions, **_):
        return [float(len(c)) for c in completions]

    if mode == "fused":
        rlkern.compat.patch("trl")
    trainer = trl.GRPOTrainer(model=model, reward_funcs=reward, args=args,
                              train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                              processing_class=tokenizer)
    fwd_times, bwd_times, step_times = [], [], []

    def timed(fn, into):
        def wrapper(*a, **k):
            start = time.perf_counter()
            result = fn(*a, **k)
            into.append(time.perf_counter() - start)
            return result
        return wrapper

    # compute_loss: the policy forward (backbone + LM head + loss); accelerator.backward: its backward;
    # training_step: both plus generation and the old / reference log-prob passes when they happen.
    trainer.compute_loss = timed(trainer.compute_loss, fwd_times)
    trainer.accelerator.backward = timed(trainer.accelerator.backward, bwd_times)
    trainer.training_step = timed(trainer.training_step, step_times)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    calls = dict(rlkern.compat.trl.calls)
    return {"mode": mode, "step_s": statistics.median(step_times[1:]),
            "fwd_s": statistics.median(fwd_times[1:]), "bwd_s": statistics.median(bwd_times[1:]),
            "peak_rss_delta_mib": (rss_peak - rss_before) / 1024, "rlkern_calls": calls,
            "torch_threads": __import__("torch").get_num_threads()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", choices=("trl", "fused"))
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--completion", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    shape = dict(vocab=a.vocab, hidden=a.hidden, completion=a.completion, batch=a.batch, steps=a.steps)
    if a.one:
        print(json.dumps(_one(a.one, **shape)))
        return
    # Alternating runs, each a fresh process; per mode the best (smallest) round is reported, the
    # least disturbed by other work on the machine, with the spread over rounds.
    runs: dict[str, list[dict]] = {"trl": [], "fused": []}
    for _ in range(a.rounds):
        for mode in runs:
            cmd = [sys.executable, "-m", "rlkern.compat.bench_trl", "--one", mode] + \
                  [f"--{k}={v}" for k, v in shape.items()]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
            runs[mode].append(json.loads(res.stdout.strip().splitlines()[-1]))
    load = open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg") else "?"
    print(f"TRL GRPOTrainer on CPU, {shape}, {a.rounds} alternating rounds, load average {' '.join(load)}")
    print(f"{'run':6s} {'step s':>14s} {'loss fwd s':>16s} {'loss bwd s':>16s} {'peak RSS +MiB':>14s}  "
          "rlkern calls (last run)")
    for mode, rs in runs.items():
        cells = [f"{min(r[k] for r in rs):.3f} ({max(r[k] for r in rs):.3f})"
                 for k in ("step_s", "fwd_s", "bwd_s")]
        rss = min(r["peak_rss_delta_mib"] for r in rs)
        print(f"{mode:6s} {cells[0]:>14s} {cells[1]:>16s} {cells[2]:>16s} {rss:14.1f}  "
              f"{rs[-1]['rlkern_calls']}")
    print("times: best round (worst round) of the per-round medians")


if __name__ == "__main__":
    main()
