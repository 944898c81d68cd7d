"""The trainer (python -m rlkern.train): task and tokenizer, configuration, every algorithm on a tiny
model, checkpoints that load with from_pretrained, exact resume, --ops reference vs rlkern, the error
cases, and (slow) learning and a 2-process torchrun run.

Everything runs on a problem space shrunk to single digits (a+b with a, b <= 9) and a 1-2 layer
model of hidden size 32, so each run takes seconds; the default-size pipeline is exercised by
``make train``, not here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from rlkern.train.cli import main
from rlkern.train.config import COMMANDS, field_docs
from rlkern.train.task import ArithmeticTask, build_char_tokenizer

TINY = ["--max-operand", "9", "--heldout", "20", "--eval-size", "20", "--hidden-size", "32",
        "--num-layers", "1", "--no-progress", "--eval-every", "0"]
ON_POLICY = ["--rollout-batch", "8", "--max-new-tokens", "3"]
RL_COMMANDS = ("ppo", "ppo-penalty", "grpo", "trpo")


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def train(*argv: str) -> None:
    code = main(list(argv))
    assert code == 0, f"python -m rlkern.train {' '.join(argv)} exited with {code}"


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory) -> str:
    """A tiny model fine-tuned for a few SFT steps: the starting point of the other algorithms."""
    out = str(tmp_path_factory.mktemp("sft") / "run")
    train("sft", "--out", out, "--steps", "30", "--batch-size", "32", "--lr", "1e-2", "--warmup", "5", *TINY)
    return os.path.join(out, "final")


# ---- task and tokenizer ------------------------------------------------------------------------
def test_tokenizer_is_char_level_and_round_trips(tmp_path):
    from transformers import AutoTokenizer

    tok = build_char_tokenizer()
    ids = tok("37+48=")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 7  # bos + one token per character
    assert tok.decode(ids, skip_special_tokens=True) == "37+48="
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("37+48=")["input_ids"] == ids
    assert again.pad_token_id is not None and again.eos_token_id is not None


def test_task_split_answers_and_reward():
    task = ArithmeticTask(max_operand=99, n_heldout=500)
    held = {tuple(p) for p in task.heldout.tolist()}
    assert len(held) == 500 and not held & {tuple(p) for p in task.train.tolist()}
    assert len(task.train) + len(task.heldout) == 100 * 100
    g = torch.Generator().manual_seed(0)
    problems = task.sample_train(2000, g)
    assert not {tuple(p) for p in problems.tolist()} & held
    wrong = task.wrong_answers(problems, g)
    answers = task.answers(problems)
    assert all(w != a and w.isdigit() for w, a in zip(wrong, answers))
    assert task.reward(problems[:2], task.answers(problems[:2])).tolist() == [1.0, 1.0]
    assert task.reward(problems[:2], wrong[:2]).tolist() == [0.0, 0.0]
    assert task.prompt(37, 48) == "37+48=" and task.answer(37, 48) == "085"
    assert task.prompt(7, 5) == "07+05=" and task.answer(7, 5) == "012"
    assert task.reward(problems[:1], [answers[0].lstrip("0")]).tolist() == [float(answers[0][0] != "0")]


def test_sft_teacher_drops_the_carry_at_the_stated_rate():
    """The demonstrator is right on every problem without a units carry and right on a carry problem
    with probability teacher_carry (else it writes a + b - 10)."""
    task = ArithmeticTask(max_operand=99, n_heldout=500)
    g = torch.Generator().manual_seed(0)
    problems = task.sample_train(20000, g)
    demos = task.demonstrations(problems, g, carry_rate=0.3)
    carry = (problems % 10).sum(-1) >= 10
    right = task.reward(problems, demos).bool()
    sums = problems.sum(-1)
    assert right[~carry].all()
    assert all(d == task.format(int(s) - 10) for d, s, r in zip(demos, sums, right.tolist()) if not r)
    assert abs(float(right[carry].float().mean()) - 0.3) < 0.02  # binomial sd ~0.005 over ~9000 draws
    assert task.demonstrations(problems, g, carry_rate=1.0) == task.answers(problems)


def test_flash_attention_only_on_cuda_with_the_package_else_sdpa(monkeypatch, tmp_path):
    import importlib.util

    from rlkern.train import models

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a))
    assert models.attn_implementation("cuda", torch.bfloat16) == "flash_attention_2"
    assert models.attn_implementation(torch.device("cuda", 1), torch.float16) == "flash_attention_2"
    assert models.attn_implementation("cpu", torch.bfloat16) == "sdpa"
    assert models.attn_implementation("cuda", torch.float32) == "sdpa"  # flash-attn has no fp32 kernel
    # The fallback forced: no flash_attn package, so sdpa on CUDA too, and the built model uses it.
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn" else real_find_spec(name, *a))
    assert models.attn_implementation("cuda", torch.bfloat16) == "sdpa"
    model = models.build_tiny_model(build_char_tokenizer(), models.TinyModelSpec(hidden_size=16, num_layers=1,
                                                                                 intermediate_size=16), 0)
    assert model.config._attn_implementation == "sdpa"


# ---- configuration -----------------------------------------------------------------------------
@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_documents_every_field(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    docs = field_docs(COMMANDS[command])
    for field in COMMANDS[command].__dataclass_fields__:
        assert field in docs, f"{command}: field {field} has no docstring"
        assert "--" + field.replace("_", "-") in text
        assert docs[field][:40] in text, f"{command}: --help does not show the docstring of {field}"


def test_config_file_flags_win_and_resolved_config_saved(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 0.02\nbatch-size: 16\nsteps: 5\n")
    out = str(tmp_path / "run")
    train("sft", "--config", str(cfg_file), "--out", out, "--steps", "2", *TINY)
    saved = json.load(open(os.path.join(out, "config.json")))
    assert (saved["lr"], saved["batch_size"], saved["steps"], saved["command"]) == (0.02, 16, 2, "sft")
    assert "batch_size" in capsys.readouterr().out  # the resolved config is printed at the start
    assert [r["step"] for r in metrics(out)] == [0, 1, 2]


# ---- every algorithm on the tiny model ---------------------------------------------------------
def _flat_params(path: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("command", RL_COMMANDS + ("dpo", "rm"))
def test_algorithm_runs_learns_something_and_checkpoints_load(command, sft_model, tmp_path):
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / command)
    extra = ON_POLICY if command in RL_COMMANDS else ["--batch-size", "16"]
    if command == "grpo":
        extra = ["--rollout-batch", "4", "--group-size", "4", "--max-new-tokens", "3"]
    train(command, "--model", sft_model, "--out", out, "--steps", "3", "--save-every", "2", *extra, *TINY)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for row in rows:
        assert all(math.isfinite(v) for v in row.values()), row
    loss_key = {"rm": "rm/loss", "dpo": "dpo/loss", "trpo": "value/loss"}.get(command, "policy/loss")
    assert all(loss_key in r for r in rows[1:])
    final = os.path.join(out, "final")
    model = AutoModelForCausalLM.from_pretrained(final)  # a plain HF causal LM, safetensors
    assert os.path.isfile(os.path.join(final, "model.safetensors")) and model.config.model_type == "llama"
    start = _flat_params(sft_model)
    assert not torch.equal(_flat_params(final), start), "the parameters did not change"
    if command in RL_COMMANDS:
        # After an update the policy has moved away from the reference: the sampled KL is nonzero.
        assert any(abs(r["rollout/kl"]) > 0 for r in rows[2:])
    if command == "rm":
        assert os.path.isfile(os.path.join(final, "reward_head.safetensors"))
    if command in ("ppo", "ppo-penalty", "trpo"):
        assert os.path.isfile(os.path.join(final, "critic", "value_head.safetensors"))
    ckpts = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert ckpts == ["step_000002", "step_000003"]
    AutoModelForCausalLM.from_pretrained(os.path.join(out, "checkpoints", "step_000002", "policy"
                                                      if command != "rm" else "reward_model"))
    assert os.path.isfile(os.path.join(out, "metrics.csv"))
    assert os.path.isfile(os.path.join(out, "config.json"))


def test_grpo_variants_and_ppo_controls(sft_model, tmp_path):
    """Every advantage estimator and loss normalisation, the adaptive KL controller, target-KL early
    stop and reference refresh run and stay finite."""
    for i, (method, loss_type) in enumerate([("rloo", "dr_grpo"), ("winrate", "dapo"),
                                             ("reinforce_baseline", "bnpo")]):
        out = str(tmp_path / f"g{i}")
        train("grpo", "--model", sft_model, "--out", out, "--steps", "2", "--rollout-batch", "2",
              "--group-size", "3", "--method", method, "--loss-type", loss_type, "--no-scale-by-std",
              "--max-new-tokens", "3", *TINY)
        assert all(math.isfinite(v) for r in metrics(out) for v in r.values())
    out = str(tmp_path / "ppo")
    # --lr 1e-3: large enough that the second minibatch's approximate KL is well above 1.5e-6.
    train("ppo", "--model", sft_model, "--out", out, "--steps", "2", "--adaptive-kl", "--target-kl", "1e-6",
          "--lr", "1e-3",
          "--ref-sync-every", "1", *ON_POLICY, *TINY)
    rows = metrics(out)
    assert rows[-1]["policy/early_stop"] == 1.0  # a tiny target KL stops the epochs early
    assert rows[1]["kl/beta"] != rows[2]["kl/beta"]  # the adaptive controller moved beta
    assert "reference" in os.listdir(os.path.join(out, "checkpoints", "step_000002"))


# ---- GRPO: loss variants, rollout correction, entropy mask (issue #13) -------------------------
GRPO_SMALL = ["--steps", "2", "--rollout-batch", "2", "--group-size", "4", "--max-new-tokens", "3"]
BASE_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def _spy(monkeypatch, name: str) -> list[dict]:
    """Records the keyword arguments (and the positional ones, under "args") of every call of
    ``rlkern.ops.<name>`` (the trainer looks the op up on the module at each call)."""
    import rlkern.ops

    real, calls = getattr(rlkern.ops, name), []

    def spy(*args, **kwargs):
        calls.append({"args": args, **kwargs})
        return real(*args, **kwargs)

    monkeypatch.setattr(rlkern.ops, name, spy)
    return calls


def _finite_run(out: str) -> list[dict]:
    rows = metrics(out)
    assert len(rows) == 3 and all(math.isfinite(v) for r in rows for v in r.values()), rows
    return rows[1:]


def test_grpo_loss_type_variants_reach_the_op(sft_model, tmp_path, monkeypatch):
    """Every --loss-type beyond TRL's four normalisations that this build's ops.grpo_loss implements
    (gspo = grpo with the sequence-level ratio) runs with a finite loss and reaches the op as asked."""
    from rlkern.train.config import grpo_loss_options

    loss_types, levels = grpo_loss_options()
    variants = [t for t in loss_types if t not in BASE_LOSS_TYPES]
    assert "gspo" in variants and "sequence" in levels, variants
    for lt in variants:
        calls = _spy(monkeypatch, "grpo_loss")
        out = str(tmp_path / lt)
        clip = ["--clip-high", "5.0"] if lt == "cispo" else []  # TRL's epsilon_high: an absolute cap there
        train("grpo", "--model", sft_model, "--out", out, "--loss-type", lt, *clip, *GRPO_SMALL, *TINY)
        _finite_run(out)
        want = ("grpo", "sequence") if lt == "gspo" else (lt, "token")
        got = {(c["loss_type"], c.get("importance_sampling_level", "token")) for c in calls}
        assert got == {want}, (lt, got)


def test_grpo_is_correction_reaches_the_op_with_the_samplers_logprobs(sft_model, tmp_path, monkeypatch):
    """--is-correction tis computes the weights once per rollout through ops.rollout_correction and
    passes them to every grpo_loss call. The sampler is the same fp32 model as the trainer, so its
    recorded log-probs differ from the recomputed ones by rounding only (KV cache vs one full pass:
    <= 1e-4 is ~100x what was seen) and the weights are 1 to that precision."""
    corrections, losses = _spy(monkeypatch, "rollout_correction"), _spy(monkeypatch, "grpo_loss")
    out = str(tmp_path / "tis")
    train("grpo", "--model", sft_model, "--out", out, "--is-correction", "tis", *GRPO_SMALL, *TINY)
    rows = _finite_run(out)
    assert len(corrections) == 2 and all(c["mode"] == "truncate" and c["lower"] == 0.5 and c["upper"] == 5.0
                                         for c in corrections)
    assert losses and all(c.get("weights") is not None for c in losses)
    for r in rows:
        assert r["rollout/is_log_ratio_max"] <= 1e-4
        assert r["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-4)


def test_is_correction_weights_follow_openrlhf():
    """The three OpenRLHF corrections, on log-probs far enough apart that the bounds bite, against
    their formulas (OpenRLHF models/loss.py PolicyLoss: tis clamps, icepop zeroes outside [lo, hi],
    seq-mask-tis zeroes rows whose geometric-mean ratio is outside it)."""
    from types import SimpleNamespace

    from rlkern.train.grpo import is_correction_weights

    lp = -torch.rand(5, 11, dtype=torch.float64)
    sampler = lp + 0.4 * torch.randn(5, 11, dtype=torch.float64)
    mask = (torch.rand(5, 11) < 0.8).double()
    mask[:, 0] = 1
    ratio = (lp - sampler).exp()
    inside = lambda r: (r >= 0.8) & (r <= 1.25)  # noqa: E731
    geo = (((lp - sampler) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)).exp()
    want = {"tis": ratio.clamp(0.8, 1.25), "icepop": ratio * inside(ratio),
            "seq-mask-tis": ratio * inside(geo)}
    for kind, expected in want.items():
        cfg = SimpleNamespace(is_correction=kind, is_clip_low=0.8, is_clip_high=1.25)
        got = is_correction_weights(cfg, lp, sampler, mask)
        torch.testing.assert_close(got * mask, expected * mask, msg=kind)


def test_grpo_top_entropy_quantile_masks_the_surrogate(sft_model, tmp_path, monkeypatch):
    """--top-entropy-quantile 0.25 calls ops.high_entropy_mask at TRL's threshold 1 - 0.25 once per
    minibatch and hands grpo_loss 0/1 weights that keep about a quarter of the valid tokens (the top
    quarter by entropy, plus ties at the threshold: <= half of them)."""
    masks, losses = _spy(monkeypatch, "high_entropy_mask"), _spy(monkeypatch, "grpo_loss")
    out = str(tmp_path / "entropy")
    train("grpo", "--model", sft_model, "--out", out, "--top-entropy-quantile", "0.25", *GRPO_SMALL, *TINY)
    rows = _finite_run(out)
    assert len(masks) == len(losses) == 2 and all(m["args"][2] == pytest.approx(0.75) for m in masks)
    for c in losses:
        w = c["weights"]
        assert set(w.unique().tolist()) <= {0.0, 1.0}
    for r in rows:
        assert 0 < r["policy/entropy_mask_frac"] <= 0.5


# ---- resume, ops backends ----------------------------------------------------------------------
VOLATILE = ("time/", "perf/")


def _stable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def test_resume_reproduces_uninterrupted_run(sft_model, tmp_path):
    args = ["--model", sft_model, "--steps", "4", "--save-every", "2", *ON_POLICY, *TINY]
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    train("ppo", "--out", straight, *args)
    train("ppo", "--out", broken, *args)
    # Make "broken" look killed after its step-2 checkpoint, in the middle of writing step 4.
    ckpts = os.path.join(broken, "checkpoints")
    os.rename(os.path.join(ckpts, "step_000004"), os.path.join(ckpts, ".tmp_step_000004"))
    os.remove(os.path.join(ckpts, ".tmp_step_000004", "state.pt"))
    shutil.rmtree(os.path.join(broken, "final"))
    os.remove(os.path.join(broken, "DONE"))
    train("ppo", "--out", broken, "--resume", *args)
    assert _stable(metrics(broken)) == _stable(metrics(straight))
    resumed, uninterrupted = os.path.join(broken, "final"), os.path.join(straight, "final")
    assert torch.equal(_flat_params(resumed), _flat_params(uninterrupted))


def test_ops_reference_and_rlkern_give_the_same_losses(sft_model, tmp_path):
    runs = {}
    for ops in ("reference", "rlkern"):
        out = str(tmp_path / ops)
        train("ppo", "--model", sft_model, "--out", out, "--steps", "2", "--ops", ops, *ON_POLICY, *TINY)
        runs[ops] = metrics(out)
    for ref, ker in zip(runs["reference"][1:], runs["rlkern"][1:]):
        for key in ("policy/loss", "value/loss", "policy/approx_kl", "policy/entropy", "rollout/kl"):
            # fp32 kernels vs the fp32 reference: the same maths in a different summation order.
            assert ref[key] == pytest.approx(ker[key], rel=1e-3, abs=1e-5), key


# ---- errors ------------------------------------------------------------------------------------
def _error(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_errors_are_one_line(tmp_path, capsys, sft_model):
    assert "is not a directory" in _error(capsys, "ppo", "--model", str(tmp_path / "nope"), "--out",
                                          str(tmp_path / "a"), *TINY)
    from transformers import ViTConfig

    vit = tmp_path / "vit"
    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
              intermediate_size=8).save_pretrained(vit)
    assert "is not a causal LM" in _error(capsys, "sft", "--model", str(vit), "--out", str(tmp_path / "b"),
                                          *TINY)
    no_pad = tmp_path / "nopad"
    shutil.copytree(sft_model, no_pad)
    tok_cfg = no_pad / "tokenizer_config.json"
    data = json.loads(tok_cfg.read_text())
    data["pad_token"] = None
    tok_cfg.write_text(json.dumps(data))
    special = no_pad / "special_tokens_map.json"
    if special.exists():
        kept = {k: v for k, v in json.loads(special.read_text()).items() if k != "pad_token"}
        special.write_text(json.dumps(kept))
    assert "no pad token" in _error(capsys, "sft", "--model", str(no_pad), "--out", str(tmp_path / "c"),
                                    *TINY)
    assert "--group-size must be >= 2" in _error(capsys, "grpo", "--group-size", "1", *TINY)
    assert "cannot be split into 3 equal minibatches" in _error(
        capsys, "ppo", "--minibatches", "3", "--out", str(tmp_path / "d"), *ON_POLICY, *TINY)
    assert "no complete checkpoint" in _error(capsys, "sft", "--resume", "--out", str(tmp_path / "e"), *TINY)
    assert "--loss-type must be one of" in _error(capsys, "dpo", "--loss-type", "grpo", *TINY)
    assert "--clip-low must lie in [0, 1)" in _error(capsys, "ppo", "--clip-low", "1.5", *TINY)


@pytest.mark.parametrize("flags, expected", [
    (["sft", "--max-grad-norm", "nan"], "--max-grad-norm must be a finite number >= 0"),
    (["sft", "--max-grad-norm", "-1"], "--max-grad-norm must be a finite number >= 0"),
    (["ppo", "--ref-sync-every", "-1"], "--ref-sync-every must be >= 0"),
    (["sft", "--save-every", "-1"], "--save-every must be >= 0"),
    (["sft", "--eval-every", "-2"], "--eval-every must be >= 0"),
    (["sft", "--threads", "-1"], "--threads must be >= 0"),
    (["sft", "--eval-size", "30"], "--eval-size must lie in [1, --heldout=20]"),
    (["sft", "--lr", "inf"], "--lr must be a finite number > 0"),
    (["grpo", "--temperature", "1e-30"], "--temperature must be a finite number >= 0.01"),
    (["grpo", "--top-entropy-quantile", "1.5"], "--top-entropy-quantile must lie in [0, 1]"),
    (["grpo", "--is-correction", "vtrace"], "--is-correction must be one of"),
    (["grpo", "--is-clip-low", "3", "--is-clip-high", "2"], "--is-clip-low (3.0) must be <= --is-clip-high"),
    (["grpo", "--loss-type", "ppo"], "--loss-type must be one of"),
    (["sft", "--device", "bogus"], "--device 'bogus' is not a torch device"),
    (["sft", "--hidden-size", "0"], "--hidden-size must be a positive multiple of 4"),
    (["ppo", "--adaptive-kl", "--kl-horizon", "2", "--rollout-batch", "10"], "--kl-horizon 2 is too short"),
    (["ppo", "--reward-model", "/tmp"], "--reward-model '/tmp' has no readable config.json"),
])
def test_bad_flags_are_one_line_naming_the_flag_before_any_work(flags, expected, tmp_path, capsys, sft_model):
    out = tmp_path / "run"
    extra = ["--model", sft_model] if flags[0] == "ppo" else []
    # TINY first: a flag given twice takes its last value.
    assert expected in _error(capsys, flags[0], *TINY, *flags[1:], *extra, "--out", str(out))
    assert not out.exists()  # nothing was written


def test_cuda_device_without_a_gpu_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    assert "no CUDA GPU is visible" in _error(capsys, "sft", "--device", "cuda", "--out", str(tmp_path / "r"),
                                              *TINY)


def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert "--out" in _error(capsys, "sft", "--out", str(target), *TINY)
    assert "--out" in _error(capsys, "rlhf", "--out", str(target), *TINY)


def test_damaged_model_files_are_one_line(tmp_path, capsys, sft_model):
    truncated = tmp_path / "truncated"
    shutil.copytree(sft_model, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = _error(capsys, "sft", "--model", str(truncated), "--out", str(tmp_path / "a"), *TINY)
    assert line.startswith("rlkern.train sft: error: --model") and "weights cannot be loaded" in line
    garbage = tmp_path / "garbage"
    shutil.copytree(sft_model, garbage)
    (garbage / "tokenizer.json").write_text("{not json")
    line = _error(capsys, "sft", "--model", str(garbage), "--out", str(tmp_path / "b"), *TINY)
    assert "--model" in line and "no loadable tokenizer" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_resume_refuses_another_commands_run_or_a_shorter_budget(tmp_path, capsys, sft_model):
    sft = str(tmp_path / "sft")
    train("sft", "--out", sft, "--steps", "2", "--save-every", "1", *TINY)
    before = metrics(sft)
    assert "holds a sft run, not grpo" in _error(capsys, "grpo", "--resume", "--model", sft_model, "--out",
                                                 sft, "--rollout-batch", "2", "--group-size", "2", *TINY)
    assert "holds a sft run, not ppo" in _error(capsys, "ppo", "--resume", "--model", sft_model, "--out", sft,
                                                *ON_POLICY, *TINY)
    assert metrics(sft) == before  # nothing appended
    assert "at step 2, past --steps 1" in _error(capsys, "sft", "--resume", "--out", sft, "--steps", "1",
                                                 *TINY)


def test_resume_falls_back_from_a_damaged_checkpoint_and_drops_a_stale_done(tmp_path, capsys, monkeypatch):
    args = ["--steps", "4", "--save-every", "2", *TINY]
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    train("sft", "--out", straight, *args)
    train("sft", "--out", broken, *args)
    newest = os.path.join(broken, "checkpoints", "step_000004")
    for victim in ("policy/model.safetensors", "state.pt", "rng_rank0.pt"):
        path = os.path.join(newest, victim)
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) // 3)
        assert os.path.isfile(os.path.join(broken, "DONE"))
        capsys.readouterr()
        train("sft", "--out", broken, "--resume", *args)
        assert "is damaged" in capsys.readouterr().err  # the fallback is said, not silent
        assert _stable(metrics(broken)) == _stable(metrics(straight))
        newest_again = os.path.join(broken, "checkpoints", "step_000004")
        assert torch.equal(_flat_params(os.path.join(broken, "final")),
                           _flat_params(os.path.join(straight, "final")))
        assert newest_again == newest  # rewritten intact by the resumed run
    # A resumed run whose final save fails must not leave the DONE of the earlier completion behind
    # (the rlhf pipeline skips a stage that has one).
    import rlkern.train.sft as sft_module

    real_save = sft_module.save_causal_lm

    def failing_final_save(model, tok, path):
        if os.path.basename(path) == "final":
            raise OSError("disk full")
        real_save(model, tok, path)

    monkeypatch.setattr(sft_module, "save_causal_lm", failing_final_save)
    with pytest.raises(OSError, match="disk full"):
        main(["sft", "--out", broken, "--resume", *args, "--steps", "5"])
    assert not os.path.exists(os.path.join(broken, "DONE"))


def test_existing_run_is_never_overwritten_without_consent(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert "already exists" in _error(capsys, "sft", "--out", str(out), "--steps", "1", *TINY)
    assert os.listdir(out) == ["precious.txt"]
    train("sft", "--out", str(out), "--steps", "1", "--overwrite", *TINY)
    assert not (out / "precious.txt").exists() and (out / "final").is_dir()


# ---- slow: learning and multi-process ----------------------------------------------------------
# Learning tests run the default recipe from seed 1, not the default 0 (RLKERN_TEST_SEED picks
# another), and assert margins, never one seed's bits. Seeds 0-4 left SFT's initial plateau between
# steps ~300 and ~900 of the 1600 (README); seed 1 earliest, so another machine's arithmetic has the
# most room.
SEED = os.environ.get("RLKERN_TEST_SEED", "1")
RLHF_STEPS, RLHF_MIN_GAIN = 40, 0.10
LEARN = ["--seed", SEED, "--eval-size", "200", "--eval-every", "0", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def teacher_sft(tmp_path_factory) -> tuple[str, float]:
    """The built-in model after the default SFT (1600 steps of the carry-dropping teacher): (model dir,
    held-out greedy accuracy on the first 200 held-out problems)."""
    out = str(tmp_path_factory.mktemp("teacher_sft") / "run")
    train("sft", "--out", out, *LEARN)
    return os.path.join(out, "final"), metrics(out)[-1]["eval/accuracy"]


@pytest.mark.slow
def test_sft_imitates_the_teacher_to_its_partial_accuracy(teacher_sft):
    """The teacher is right exactly on the problems without a units carry (and on 30% of the others,
    never the majority), so the imitating policy's greedy accuracy sits near the no-carry fraction of
    the evaluated problems: partial (measured over seeds 0-4: 53.6-60.4% on 500 problems against 53.2%)."""
    _, acc = teacher_sft
    no_carry = 1 - ArithmeticTask(99, 500).carry_fraction(ArithmeticTask(99, 500).heldout[:200])
    assert no_carry - 0.15 <= acc <= no_carry + 0.15, f"SFT accuracy {acc:.3f}, teacher's {no_carry:.3f}"


@pytest.mark.slow
def test_ppo_with_the_checker_goes_beyond_the_teacher(teacher_sft, tmp_path):
    """RL with the exact-match reward learns the carry the teacher mostly dropped: +15 points or more
    within 40 PPO steps (measured at step 40 on 500 problems over seeds 0-4: +37 to +46 points)."""
    model, before = teacher_sft
    out = str(tmp_path / "ppo")
    train("ppo", "--model", model, "--reward", "rule", "--out", out, "--steps", "40", *LEARN)
    after = metrics(out)[-1]["eval/accuracy"]
    assert after >= before + 0.15, f"held-out accuracy {before:.3f} -> {after:.3f}"


@pytest.fixture(scope="module")
def teacher_rm(teacher_sft, tmp_path_factory) -> str:
    """The default reward-model stage (300 steps) on top of the teacher-imitating SFT model."""
    out = str(tmp_path_factory.mktemp("teacher_rm") / "run")
    train("rm", "--model", teacher_sft[0], "--out", out, *LEARN)
    return os.path.join(out, "final")


@pytest.mark.slow
def test_rlhf_against_the_reward_model_beats_sft_without_collapse(teacher_sft, teacher_rm, tmp_path):
    """PPO against the learned reward model (the checker only labels the refresh samples and grades
    the early-stopping slice of training problems) raises held-out accuracy by 10 points or more over
    SFT within 40 steps, and does not collapse: the last evaluation is within 10 points of the best.
    Measured in the README's sweep (500 problems, the held-out accuracy of the policy that early
    stopping keeps at step 40) over seeds 0-4: +27.8, +29.8, +26.6, +23.6, +34.0; the margin covers
    the 200-problem evaluation (sd of a gain ~3.5 points) and another machine's arithmetic."""
    model, before = teacher_sft
    out = str(tmp_path / "rlhf")
    train("ppo", "--model", model, "--reward-model", teacher_rm, "--reward", "model", "--out", out,
          "--steps", str(RLHF_STEPS), *LEARN, "--eval-every", "10")
    curve = [r["eval/accuracy"] for r in metrics(out) if "eval/accuracy" in r]
    assert curve[0] == pytest.approx(before)  # the same SFT model, the same 200 problems
    assert curve[-1] >= before + RLHF_MIN_GAIN, f"held-out accuracy over the run: {curve}"
    assert curve[-1] >= max(curve) - 0.10, f"collapse late in the run: {curve}"


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, sft_model):
    out = str(tmp_path / "ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "-m",
           "rlkern.train", "grpo", "--model", sft_model, "--out", out, "--steps", "2", "--rollout-batch", "4",
           "--group-size", "2", "--max-new-tokens", "3", "--save-every", "1", *TINY]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(os.path.join(out, "config.json")))["world_size"] == 2
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]  # only rank 0 writes, once per step
    assert all(math.isfinite(v) for r in rows for v in r.values())
    ckpt = os.path.join(out, "checkpoints", "step_000002")
    assert {"rng_rank0.pt", "rng_rank1.pt", "state.pt", "policy"} <= set(os.listdir(ckpt))


def test_sweep_runs_seeds_and_tabulates_them(tmp_path, capsys):
    """The sweep command on the tiny setting: two seeds in parallel, one table row each read back from
    the runs, the PNG; then the rule-reward sweep reusing their SFT and reward-model stages."""
    from rlkern.train.sweep import main as sweep

    tiny = [*TINY, "--sft-steps", "5", "--rm-steps", "3", "--steps", "2", *ON_POLICY]
    out = tmp_path / "sweep"
    assert sweep(["--seeds", "0", "1", "--jobs", "2", "--out", str(out), *tiny]) == 0
    printed = capsys.readouterr().out
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["seed"] for r in rows] == [0, 1]
    assert all(0 <= r["final_accuracy"] <= 1 and r["wall_s"] > 0 for r in rows)
    assert "| 0 |" in printed and "| 1 |" in printed and (out / "sweep.png").stat().st_size > 0
    rule = tmp_path / "rule"
    assert sweep(["--seeds", "1", "--out", str(rule), "--reuse", str(out), *tiny, "--reward", "rule"]) == 0
    again = json.loads((rule / "sweep.json").read_text())["rows"][0]
    assert again["sft_accuracy"] == rows[1]["sft_accuracy"]  # the same SFT model, not retrained
    ppo_cfg = json.loads((rule / "seed_1" / "ppo" / "config.json").read_text())
    assert ppo_cfg["reward"] == "rule"
