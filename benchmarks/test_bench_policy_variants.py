"""pytest-benchmark cases of the policy_variants family (see pytest_cases.py):
``pytest benchmarks/test_bench_policy_variants.py``."""

import pytest

from benchmarks.pytest_cases import params, run


@pytest.mark.parametrize(("shape_index", "case_index", "impl"), params("policy_variants"))
def test_bench_policy_variants(benchmark, shape_index, case_index, impl):
    run(benchmark, "policy_variants", shape_index, case_index, impl)


def test_rows_of_a_case_compute_the_same_loss_and_gradient():
    """Every implementation of a variant (the peer's, the same maths eager and compiled, rlkern's)
    computes the same loss and d loss / d logp on small inputs, so a speedup is one at equal maths.
    Tolerance: fp32 sums in other orders (rlkern's kernels, Inductor's reductions), 1e-5 relative +
    1e-6 absolute. A variant whose rlkern op has not landed is compared without its rlkern row."""
    import torch

    from benchmarks import policy_variants as pv

    x = pv._inputs(pv.Shape(6, 50))
    for variant in pv.VARIANTS:
        _, peer, names, same_maths = pv._PEERS[variant]
        fns = {"peer": peer, "same maths": same_maths, "compiled": pv.compile_column(variant)}
        calls = {name: (pv._call(fn, x, names, "fwd"), pv._call(fn, x, names, "fwd+bwd"))
                 for name, fn in fns.items()}
        ours = pv.rlkern_fn(variant)
        if ours is not None:
            calls["rlkern"] = (pv._rlkern_call(ours, x, "fwd"), pv._rlkern_call(ours, x, "fwd+bwd"))
        want_loss, want_grad = (f() for f in calls["peer"])
        if isinstance(want_loss, tuple):  # TRL's (loss, the metric tensors _compute_loss logs)
            want_loss, metrics = want_loss
            _check_metrics(variant, x, metrics)
        for name, (loss, grad) in calls.items():
            got = loss()
            got = got[0] if isinstance(got, tuple) else got
            torch.testing.assert_close(got, want_loss, rtol=1e-5, atol=1e-6, msg=f"{variant} {name} loss")
            torch.testing.assert_close(grad(), want_grad, rtol=1e-5, atol=1e-6, msg=f"{variant} {name} grad")


# TRL's metric names -> rlkern.ops.grpo_loss's stats: the timed rows compute the same numbers.
_TRL_METRICS = {"kl": "kl", "cispo_clip_ratio": "cispo_clip_ratio", "clip_ratio/low_mean": "clip_ratio_low",
                "clip_ratio/high_mean": "clip_ratio_high", "clip_ratio/region_mean": "clip_ratio"}


def _check_metrics(variant, x, metrics):
    """The metrics the TRL transcription (and its compiled form) computes are rlkern's stats."""
    import torch

    from benchmarks import policy_variants as pv
    from rlkern import ops

    assert metrics, variant
    kw = {"gspo": dict(beta=0.0, clip_low=pv.GSPO_EPS_LOW, clip_high=pv.GSPO_EPS_HIGH,
                       importance_sampling_level="sequence"),
          "cispo": dict(beta=0.0, clip_high=pv.CISPO_EPS_HIGH, loss_type="cispo"),
          "tis_grpo": dict(beta=pv.TIS_BETA,
                           weights=pv.trl_vllm_is_ratio(x["old"], x["sampling"], x["mask"]))}
    ref = x["ref"] if variant == "tis_grpo" else None
    _, stats = ops.grpo_loss(x["logp"], x["old"], ref, x["adv_seq"], x["mask"], use_bias_correction_kl=True,
                             **kw[variant])
    for name, value in metrics.items():
        torch.testing.assert_close(stats[_TRL_METRICS[name]], value, rtol=1e-5, atol=1e-6,
                                   msg=f"{variant} {name}")
