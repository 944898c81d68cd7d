"""TRL's own trainers (GRPOTrainer, RLOOTrainer, DPOTrainer of the installed trl) run a few steps on a
tiny Llama built here (random weights, a word-level tokenizer made in memory: no Hub), once as TRL
ships them and once after ``rlkern.compat.patch("trl")``. rlkern must run on every step (the calls
are counted per step) and every metric TRL logs must agree within fp32 tolerance.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

import rlkern.compat  # noqa: E402
from rlkern.compat import _trl_fused  # noqa: E402
from rlkern.compat import trl as trl_shim  # noqa: E402

WORDS = [f"w{i}" for i in range(60)]
# fp32 (bf16=False: TRL's configs default to bf16 autocast, on CPU too); rlkern and TRL sum the same
# terms in different orders, a few ulps per reduction, compounded over 3 optimizer steps (measured:
# <= 2e-7 relative). ATOL covers losses that are 0 up to rounding (on-policy GRPO with centred
# advantages).
RTOL, ATOL = 2e-5, 1e-6


def tiny_tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>", bos_token="<eos>")


def tiny_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                                      bos_token_id=1,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    model.generation_config.pad_token_id = 0
    return model


def prompts(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(WORDS), (n, 4), generator=g)
    return [" ".join(WORDS[int(i)] for i in row) for row in ids]


def reward_len(completions, **_):
    # A reward that varies within a group, so the advantages are not all 0.
    return [float(len(c.split()) % 3) + 0.1 * sum(w.endswith("7") for w in c.split()) for c in completions]


class StepCalls(transformers.TrainerCallback):
    """Snapshots rlkern.compat.trl.calls at every optimizer step."""

    def __init__(self):
        self.per_step = []
        self._last = trl_shim.calls.copy()

    def on_step_end(self, args, state, control, **kwargs):
        now = trl_shim.calls.copy()
        self.per_step.append(now - self._last)
        self._last = now


def common_args(tmp_path, **kw):
    return {**dict(output_dir=str(tmp_path), max_steps=3, logging_steps=1, report_to="none",
                   save_strategy="no", use_cpu=True, seed=0, learning_rate=1e-2, disable_tqdm=True,
                   bf16=False), **kw}


def run(make_trainer, patched: bool):
    """(log_history, per-step rlkern calls) of one run, patched or not."""
    if patched:
        rlkern.compat.patch("trl")
    try:
        callback = StepCalls()
        trainer = make_trainer()
        trainer.add_callback(callback)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train()
        return [h for h in trainer.state.log_history if "loss" in h], callback.per_step
    finally:
        if patched:
            rlkern.compat.unpatch("trl")


def assert_same_metrics(base, fused, keys, rtol=RTOL):
    """Every key is logged at least once and on the same steps by both runs (RLOO logs its KL on
    generation steps only), and agrees wherever it is logged."""
    assert len(base) == len(fused) and base
    seen = set()
    for step, (b, f) in enumerate(zip(base, fused)):
        for key in keys:
            assert (key in b) == (key in f), (step, key)
            if key in b:
                seen.add(key)
                x, y = b[key], f[key]
                assert math.isclose(x, y, rel_tol=rtol, abs_tol=ATOL), (step, key, x, y)
    assert seen == set(keys), set(keys) - seen


GRPO_KEYS = ("loss", "grad_norm", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
             "clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max")


def saved_model(tmp_path, tok) -> str:
    """A local directory holding the tiny model: with beta > 0 TRL builds its reference model by
    loading the policy's path again."""
    path = tmp_path / "tiny-llama"
    tiny_model(tok).save_pretrained(path)
    return str(path)


def grpo_trainer(tmp_path, **config):
    tok = tiny_tokenizer()
    data = datasets.Dataset.from_dict({"prompt": prompts()})
    model = saved_model(tmp_path, tok)
    args = trl.GRPOConfig(**common_args(tmp_path, per_device_train_batch_size=4, num_generations=4,
                                        max_completion_length=6, temperature=1.0, **config))
    return lambda: trl.GRPOTrainer(model=model, reward_funcs=reward_len, args=args, train_dataset=data,
                                   processing_class=tok)


@pytest.mark.parametrize("config", [
    dict(loss_type="dapo"),
    dict(loss_type="grpo", beta=0.04, num_iterations=2, epsilon_high=0.28),
    dict(loss_type="bnpo", beta=0.1, num_iterations=2, use_bias_correction_kl=False),
    dict(loss_type="dr_grpo", gradient_accumulation_steps=2),
    dict(loss_type="dapo", beta=0.04, steps_per_generation=2, num_iterations=2),
    dict(loss_type="bnpo", entropy_coef=0.05, gradient_accumulation_steps=2),
    dict(loss_type="grpo", beta=0.04, top_entropy_quantile=0.5, entropy_coef=0.05),
    dict(loss_type="dapo", num_iterations=2, off_policy_mask_threshold=0.0, epsilon_high=0.28),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_grpo_trainer_runs_on_rlkern_and_matches(tmp_path, config):
    make = grpo_trainer(tmp_path, **config)
    base, base_calls = run(make, patched=False)
    fused, fused_calls = run(make, patched=True)
    assert all(c["linear_logprobs"] == 0 and c["grpo_loss"] == 0 for c in base_calls)
    for step, c in enumerate(fused_calls):
        # every step: the policy forward of each micro-batch through rlkern's fused head, its loss
        # through rlkern's grpo_loss, and no fallback
        assert c["linear_logprobs"] >= c["grpo_loss"] >= 1, (step, c)
        assert not any(k.startswith("fallback") for k in c), (step, c)
        # the top-entropy-quantile mask too (one process: rlkern's selection, not TRL's sort)
        entropy_masks = c["grpo_loss"] if "top_entropy_quantile" in config else 0
        assert c["high_entropy_mask"] == entropy_masks, (step, c)
    keys = GRPO_KEYS + (("kl",) if config.get("beta") else ())
    keys += ("policy_loss", "entropy_coef") if config.get("entropy_coef") else ()
    assert_same_metrics(base, fused, keys)


def test_grpo_trainer_default_bf16_autocast(tmp_path):
    """TRL's configs default to bf16=True, which on CPU runs the model under bf16 autocast: TRL's head
    then multiplies in bf16, and so does rlkern's (it takes the autocast dtype). Both accumulate in
    fp32 but tile differently, so the agreement is bf16's, not fp32's (measured: 2.5e-5 relative)."""
    make = grpo_trainer(tmp_path, loss_type="dapo", bf16=True)
    base, _ = run(make, patched=False)
    fused, fused_calls = run(make, patched=True)
    assert all(c["linear_logprobs"] >= 1 and c["grpo_loss"] >= 1 for c in fused_calls), fused_calls
    assert_same_metrics(base, fused, GRPO_KEYS, rtol=1e-3)


def test_grpo_unfused_option_falls_back_once_and_says_so(tmp_path):
    """An option rlkern does not fuse (``use_adaptive_entropy``, TRL's adaptive entropy controller) runs
    TRL's own loss, warns once naming it, and the fused LM head still runs on rlkern."""
    make = grpo_trainer(tmp_path, use_adaptive_entropy=True)
    base, _ = run(make, patched=False)
    rlkern.compat.patch("trl")
    try:
        _trl_fused._warned.clear()  # "once" is per process: make this test independent of order
        callback = StepCalls()
        trainer = make()
        trainer.add_callback(callback)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
    finally:
        rlkern.compat.unpatch("trl")
    ours = [w for w in caught if "rlkern" in str(w.message)]
    assert len(ours) == 1 and "use_adaptive_entropy" in str(ours[0].message), [str(w.message) for w in ours]
    for step, c in enumerate(callback.per_step):
        reason = "fallback:grpo_loss:use_adaptive_entropy (the adaptive entropy controller)"
        assert c["grpo_loss"] == 0 and c[reason] >= 1, (step, c)
        assert c["linear_logprobs"] >= 1, (step, c)
    fused = [h for h in trainer.state.log_history if "loss" in h]
    assert_same_metrics(base, fused, ("loss", "grad_norm", "entropy", "entropy_coef"))


def rloo_trainer(tmp_path, **config):
    tok = tiny_tokenizer()
    data = datasets.Dataset.from_dict({"prompt": prompts()})
    model = saved_model(tmp_path, tok)
    args = trl.RLOOConfig(**common_args(tmp_path, per_device_train_batch_size=4, num_generations=4,
                                        max_completion_length=6, **config))
    return lambda: trl.RLOOTrainer(model=model, reward_funcs=reward_len, args=args, train_dataset=data,
                                   processing_class=tok)


@pytest.mark.parametrize("config", [dict(), dict(beta=0.05, num_iterations=2)],
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_rloo_trainer_runs_on_rlkern_and_matches(tmp_path, config):
    """RLOO's log-probs (policy, old, reference) go through rlkern's fused head; its loss and
    advantages stay TRL's (computed inline in RLOOTrainer)."""
    make = rloo_trainer(tmp_path, **config)
    base, _ = run(make, patched=False)
    fused, fused_calls = run(make, patched=True)
    for step, c in enumerate(fused_calls):
        assert c["linear_logprobs"] >= 1 and not any(k.startswith("fallback") for k in c), (step, c)
    keys = ("loss", "grad_norm", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
            "clip_ratio/region_mean")
    assert_same_metrics(base, fused, keys + (("kl",) if config.get("beta") else ()))


def dpo_trainer(tmp_path, **config):
    tok = tiny_tokenizer()
    p = prompts(8, seed=1)
    data = datasets.Dataset.from_dict({"prompt": p, "chosen": [" ".join(WORDS[:3])] * 8,
                                       "rejected": [" ".join(WORDS[-4:])] * 8})
    model = saved_model(tmp_path, tok)
    args = trl.DPOConfig(**common_args(tmp_path, per_device_train_batch_size=4, max_length=16, **config))
    return lambda: trl.DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok)


@pytest.mark.parametrize("config", [dict(), dict(loss_type=["ipo"], beta=0.3)],
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_dpo_trainer_runs_on_rlkern_and_matches(tmp_path, config):
    """DPO's policy and reference log-probs, entropy, mean logits and top-1 flags come from rlkern's
    fused head (the top-1 flag from one extra no-grad pass); the DPO loss stays TRL's."""
    make = dpo_trainer(tmp_path, **config)
    base, _ = run(make, patched=False)
    fused, fused_calls = run(make, patched=True)
    for step, c in enumerate(fused_calls):
        assert c["linear_logprobs"] >= 2 and not any(k.startswith("fallback") for k in c), (step, c)
    keys = ("loss", "grad_norm", "entropy", "rewards/chosen", "rewards/rejected", "rewards/margins",
            "rewards/accuracies", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
            "mean_token_accuracy")
    assert_same_metrics(base, fused, keys)


OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")


@pytest.mark.parametrize("case", ["plain", "bias-temperature-scale", "ties", "empty", "bf16-head"])
def test_fused_head_stand_in_matches_trl_kernel(case):
    """rlkern's stand-in for TRL's ChunkedLogProbFunction against TRL's own (its CPU path), values
    and gradients: bias, temperature and logit_scale (folded into the temperature), exact ties (all
    logits equal: TRL's top-1 rule picks the first id), no tokens at all, and a bf16 head with fp32
    hidden states (``cast_lm_head_to_fp32``: both multiply in fp32)."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction as trl_head

    stand_in = _trl_fused.wrap_chunked_logprob(trl_head)
    g = torch.Generator().manual_seed(0)
    n, h, v = {"empty": (0, 8, 11)}.get(case, (13, 8, 37))
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.5
    bias, temperature, scale = None, 1.0, 1.0
    if case == "bias-temperature-scale":
        bias, temperature, scale = torch.randn(v, generator=g), 0.7, 2.5
    if case == "ties":
        weight = torch.zeros(v, h)
    if case == "bf16-head":
        weight = weight.bfloat16()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[:2] = 0 if n else targets[:2]
    grads = torch.randn(2, n, generator=g)
    results = []
    for head in (trl_head, stand_in):
        hh, ww = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp, ent, _, mean_logits, top1 = head.apply(hh, ww, bias, targets, temperature, 32768, None, scale,
                                                   OUTPUTS)
        (lp * grads[0] + ent * grads[1]).sum().backward()
        results.append((lp, ent, mean_logits, hh.grad, ww.grad, top1))
    (want, got) = results
    # Both are fp32 and differ from a float64 evaluation by ~1e-6 of the largest gradient (checked:
    # rlkern's error is the smaller one); the 1/T * scale = 3.6 factor makes gradients of order 20.
    names = ("log_probs", "entropy", "mean_logits", "d hidden", "d weight")
    for w, x, what in zip(want[:5], got[:5], names):
        assert x.dtype == w.dtype, what
        torch.testing.assert_close(x.float(), w.float(), rtol=1e-5, atol=1e-4, msg=what)
    assert torch.equal(got[5], want[5])


def test_fused_head_softcap_falls_back_to_trl():
    """Gemma-style final_logit_softcapping is not fused: TRL's kernel runs, with one warning."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction as trl_head

    stand_in = _trl_fused.wrap_chunked_logprob(trl_head)
    _trl_fused._warned.clear()
    hidden, weight, targets = torch.randn(4, 8), torch.randn(11, 8), torch.randint(0, 11, (4,))
    before = trl_shim.calls["linear_logprobs"]
    with pytest.warns(RuntimeWarning, match="final_logit_softcapping"):
        got = stand_in.apply(hidden, weight, None, targets, 1.0, 32768, 30.0, 1.0, ("log_probs",))
    want = trl_head.apply(hidden, weight, None, targets, 1.0, 32768, 30.0, 1.0, ("log_probs",))
    assert torch.equal(got[0], want[0]) and trl_shim.calls["linear_logprobs"] == before


def test_other_trl_release_runs_its_own_code(monkeypatch):
    """rlkern reproduces TRL 1.16's GRPOTrainer._compute_loss and ChunkedLogProbFunction; another
    release (another version string, another kernel signature) runs its own code, and says so."""
    from rlkern.compat._trl_fused import wrap_grpo_compute_loss

    _trl_fused._warned.clear()
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    seen = []
    wrapped = wrap_grpo_compute_loss(lambda self, model, inputs: seen.append("trl") or 0.0)
    with pytest.warns(RuntimeWarning, match=r"TRL 1\.17\.0 \(rlkern mirrors"):
        assert wrapped(object(), None, {}) == 0.0
    assert seen == ["trl"]

    class OtherHead(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, targets):  # a different signature
            return (hidden @ weight.t()).log_softmax(-1).gather(1, targets[:, None])[:, 0]

    stand_in = _trl_fused.wrap_chunked_logprob(OtherHead)
    hidden, weight, targets = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 4, 2])
    with pytest.warns(RuntimeWarning, match="signature differs"):
        got = stand_in.apply(hidden, weight, targets)  # that release's own call, passed on as it is
    assert torch.equal(got, OtherHead.apply(hidden, weight, targets))
