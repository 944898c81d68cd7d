"""TRL 1.16's real GRPOTrainer with the loss options rlkern fuses since issue 13 (loss_type cispo / sapo /
luspo / vespo, importance_sampling_level="sequence", delta), run unpatched and after
``rlkern.compat.patch("trl")`` on the tiny Llama of tests/test_compat_trl_trainers.py: every step's
loss must reach rlkern.ops.grpo_loss (counted per step, no fallback) and every metric TRL logs must
agree to fp32 tolerance (that file's RTOL / ATOL: the same terms summed in other orders, compounded
over 3 optimizer steps).
"""

from __future__ import annotations

import pytest

pytest.importorskip("trl")
pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

from tests.test_compat_trl_trainers import assert_same_metrics, grpo_trainer, run  # noqa: E402

BASE_KEYS = ("loss", "grad_norm", "entropy")
CLIP_KEYS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
             "clip_ratio/high_max")


@pytest.mark.parametrize("config", [
    dict(loss_type="cispo", epsilon_high=5.0, num_iterations=2),
    dict(loss_type="cispo", epsilon_high=1.02, beta=0.04, num_iterations=2, gradient_accumulation_steps=2),
    dict(loss_type="sapo", num_iterations=2, beta=0.04),
    dict(loss_type="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=2.0, num_iterations=2,
         steps_per_generation=2),
    dict(loss_type="luspo", importance_sampling_level="sequence", num_iterations=2, beta=0.04),
    dict(loss_type="grpo", importance_sampling_level="sequence", num_iterations=2, epsilon=3e-4,
         epsilon_high=4e-4),
    dict(loss_type="dapo", importance_sampling_level="sequence", num_iterations=2, steps_per_generation=2),
    dict(loss_type="dapo", delta=1.05, num_iterations=2, epsilon_high=0.28),
    dict(loss_type="bnpo", delta=1.02, beta=0.1, num_iterations=2, entropy_coef=0.05),
    dict(loss_type="vespo", num_iterations=2),
    dict(loss_type="vespo", num_iterations=2, beta=0.04, use_bias_correction_kl=True, steps_per_generation=2),
    dict(loss_type="vespo", num_iterations=2, vespo_k_pos=1.0, vespo_lambda_pos=0.5, vespo_k_neg=4.0,
         vespo_lambda_neg=1.5, gradient_accumulation_steps=2, entropy_coef=0.05),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_grpo_trainer_variants_run_on_rlkern_and_match(tmp_path, config):
    make = grpo_trainer(tmp_path, **config)
    base, base_calls = run(make, patched=False)
    fused, fused_calls = run(make, patched=True)
    assert all(c["grpo_loss"] == 0 for c in base_calls)
    for step, c in enumerate(fused_calls):
        assert c["grpo_loss"] >= 1, (step, c)  # every step's loss through rlkern.ops.grpo_loss
        assert not any(k.startswith("fallback") for k in c), (step, c)
    keys = BASE_KEYS + (("kl",) if config.get("beta") else ())
    if config["loss_type"] == "cispo":
        keys += ("cispo_clip_ratio",)
    elif config["loss_type"] == "vespo":
        keys += ("vespo/phi_seq_mean",)
    elif config["loss_type"] != "sapo":
        keys += CLIP_KEYS
    keys += ("policy_loss", "entropy_coef") if config.get("entropy_coef") else ()
    assert_same_metrics(base, fused, keys)
