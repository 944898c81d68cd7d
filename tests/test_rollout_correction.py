"""rlkern.ops.rollout_correction and rlkern.ops.off_policy_sequence_mask against the float64 oracle
(rlkern.reference.rollout_correction: one token at a time in Python floats), against transcriptions of
TRL's and OpenRLHF's code (TRL's vLLM IS block lives inside GRPOTrainer's batch preparation and
OpenRLHF's inside PolicyLoss.forward, neither callable alone), against TRL's own ``get_off_policy_mask``
when TRL is installed, by hand, and without host synchronisation. Comparisons with verl's functions,
metrics included, are in tests/test_compat_verl_installed.py.

Tolerance: weights are single exponentials of a log-ratio of O(1) (or a row sum of at most 13 of
them), computed in fp32 from the same (upcast) inputs as the oracle: atol 1e-6 + rtol 2e-6 covers
the fp32 rounding of exp and of a 13-term sum. Masks are compared exactly: the inputs are continuous
random values and the thresholds sit in the bulk of the statistic, so a fp32-vs-fp64 flip needs a
statistic within ~1e-6 of a threshold (probability ~1e-5 per row, whatever the seed).
"""

from __future__ import annotations

import math

import pytest
import torch

import rlkern
from rlkern import reference
from rlkern.ops.rollout_correction import parse_is_threshold, parse_rs
from tests.conftest import KERNEL_BACKENDS

ops = rlkern.ops
B, T = 7, 13


def _inputs(dtype=torch.float32, mask_dtype=torch.float32, seed=0, shape=(B, T), scale=0.3):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(*shape, generator=g) * 3
    roll = old + scale * torch.randn(*shape, generator=g)
    mask = torch.rand(*shape, generator=g) < 0.75
    if shape[0] > 2 and shape[-1] > 0:
        mask[..., 1, :] = False  # a zero-length response
        mask[..., 0, :] = True
    return old.to(dtype), roll.to(dtype), mask.to(mask_dtype)


CONVENTIONS = {
    "verl_tis_token": {"level": "token", "upper": 2.0},
    "verl_tis_seq": {"level": "sequence", "upper": 2.0},
    "verl_icepop_token": {"level": "token", "mode": "mask", "lower": 0.8, "upper": 1.25},
    "verl_icepop_seq": {"level": "sequence", "mode": "mask", "lower": 0.5, "upper": 2.0},
    "trl_token_truncate": {"level": "token", "upper": 1.3, "lower": 0.9, "padding": "trl", "log_clamp": None},
    "trl_seq_truncate": {"level": "sequence", "upper": 3.0, "lower": None, "padding": "trl",
                         "log_clamp": None},
    "trl_token_mask": {"level": "token", "mode": "mask", "upper": 1.3, "lower": 0.8, "padding": "trl",
                       "log_clamp": None},
    "trl_seq_mask": {"level": "sequence", "mode": "mask", "upper": 3.0, "lower": 0.3, "padding": "trl",
                     "log_clamp": None},
    "openrlhf_tis": {"level": "token", "lower": 0.5, "upper": 1.2, "padding": "raw", "log_clamp": None},
    "openrlhf_icepop": {"level": "token", "mode": "mask", "lower": 0.8, "upper": 1.25, "padding": "raw",
                        "log_clamp": None},
    "openrlhf_seq_mask_tis": {"level": "token", "mode": "none", "upper": None, "padding": "raw",
                              "log_clamp": None, "seq_gate": (0.9, 1.1)},
}
RS = [("token_k1", "0.8_1.25"), ("token_k2", 0.03), ("token_k3", 0.03), ("seq_sum_k1", "0.5_2"),
      ("seq_sum_k2", 0.2), ("seq_sum_k3", 0.2), ("seq_mean_k1", 1.05), ("seq_mean_k2", 0.04),
      ("seq_mean_k3", 0.04), ("seq_max_k2", 0.1), ("seq_max_k3", 0.1),
      ("token_k1,seq_mean_k3,seq_max_k2", "0.7_1.4,0.04,0.15")]


def _check(got, want, what):
    if want is None:
        assert got is None, what
        return
    assert got.shape == want.shape, what
    torch.testing.assert_close(got.double(), want.double(), atol=1e-6, rtol=2e-6, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.int64, torch.bool], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_weights_match_oracle(name, dtype, mask_dtype):
    old, roll, mask = _inputs(dtype, mask_dtype, seed=hash(name) % 1000)
    kw = CONVENTIONS[name]
    res = ops.rollout_correction(old, roll, mask, **kw)
    assert res.weights.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert res.mask is mask  # no rejection asked: the caller's mask, untouched
    w, _ = reference.rollout_correction(old, roll, mask, **kw)
    _check(res.weights, w, name)


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.int64, torch.bool], ids=str)
@pytest.mark.parametrize("rs,threshold", RS, ids=[r for r, _ in RS])
def test_rejection_matches_oracle(rs, threshold, mask_dtype):
    old, roll, mask = _inputs(torch.float32, mask_dtype, seed=3)
    res = ops.rollout_correction(old, roll, mask, level=None, rs=rs, rs_threshold=threshold)
    assert res.weights is None and res.mask.dtype == mask.dtype
    _, want = reference.rollout_correction(old, roll, mask, level=None, rs=parse_rs(rs, threshold))
    assert torch.equal(res.mask, want), rs


def test_leading_dims_and_log_ratio_input():
    old, roll, mask = _inputs(shape=(2, 3, T), seed=4)
    for kw in CONVENTIONS.values():
        res = ops.rollout_correction(old, roll, mask, **kw, rs="seq_mean_k1,token_k2",
                                     rs_threshold="1.1,0.05")
        flat = ops.rollout_correction(old.view(6, T), roll.view(6, T), mask.view(6, T), **kw,
                                      rs="seq_mean_k1,token_k2", rs_threshold="1.1,0.05")
        _check(res.weights.view(6, T), flat.weights, str(kw))
        assert torch.equal(res.mask.view(6, T), flat.mask)
        # the log-ratio itself (rollout_log_prob=None) gives the same weights and mask
        pre = ops.rollout_correction(old - roll, None, mask, **kw, rs="seq_mean_k1,token_k2",
                                     rs_threshold="1.1,0.05")
        _check(pre.weights, res.weights, str(kw))
        assert torch.equal(pre.mask, res.mask)


def test_by_hand():
    d = torch.tensor([[math.log(3.0), math.log(0.5), 0.0, 30.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    zero = torch.zeros_like(d)
    w = lambda **kw: ops.rollout_correction(d, zero, mask, **kw).weights[0].tolist()  # noqa: E731
    assert w() == pytest.approx([2.0, 0.5, 1.0, 0.0])  # verl TIS: upper only, padding 0
    assert w(mode="mask", lower=0.6, upper=2.0) == pytest.approx([0.0, 0.0, 1.0, 0.0])  # IcePop
    assert w(level="sequence", upper=10.0) == pytest.approx([1.5, 1.5, 1.5, 0.0])  # exp(Σ valid d)
    # TRL: padding d * 0 = 0 -> ratio 1, then clamped to [lo, hi]
    assert w(lower=0.6, upper=2.0, padding="trl", log_clamp=None) == pytest.approx([2.0, 0.6, 1.0, 1.0])
    # OpenRLHF: padding keeps exp(d) (e^30, clamped to hi here)
    assert w(lower=0.6, upper=2.0, padding="raw", log_clamp=None) == pytest.approx([2.0, 0.6, 1.0, 2.0])
    # verl clamps log-ratios to ±20 before exp: e^20 on the padded token, zeroed by the mask anyway
    raw = ops.rollout_correction(d, zero, torch.ones_like(mask), upper=None, mode="none").weights
    assert raw[0, 3].item() == pytest.approx(math.exp(20.0), rel=1e-6)
    # seq-mask-tis: geometric mean exp((log 3 + log .5 + 0) / 3) = 1.145 -> outside (0.9, 1.1): row dropped
    gated = w(mode="none", upper=None, padding="raw", log_clamp=None, seq_gate=(0.9, 1.1))
    assert gated == [0.0] * 4
    assert w(mode="none", upper=None, padding="raw", log_clamp=None, seq_gate=(0.9, 1.2))[:3] == \
        pytest.approx([3.0, 0.5, 1.0])
    # rejection: token_k1 keeps -d in [log .8, log 1.25]; seq_max_k2 = max d²/2 = (log 3)²/2 = 0.603
    keep = lambda rs, thr: ops.rollout_correction(d, zero, mask, level=None, rs=rs,  # noqa: E731
                                                  rs_threshold=thr).mask[0].tolist()
    assert keep("token_k1", "0.8_1.25") == [0.0, 0.0, 1.0, 0.0]
    assert keep("seq_max_k2", 0.7) == [1.0, 1.0, 1.0, 0.0]
    assert keep("seq_max_k2", 0.6) == [0.0, 0.0, 0.0, 0.0]


def test_batch_normalize():
    old, roll, mask = _inputs(seed=5)
    for level in ("token", "sequence"):
        plain = ops.rollout_correction(old, roll, mask, level=level).weights
        res = ops.rollout_correction(old, roll, mask, level=level, batch_normalize=True)
        factor = res.metrics["rollout_is_batch_norm_factor"]
        _check(res.weights * factor, plain, level)
        if level == "token":
            mean = (res.weights * mask).sum() / mask.sum()
        else:
            rows = mask.sum(-1) > 0
            mean = ((res.weights * mask).sum(-1)[rows] / mask.sum(-1)[rows]).mean()
        assert mean.item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["verl_tis_token", "verl_tis_seq", "trl_token_truncate", "openrlhf_tis"])
def test_non_finite_log_probs_never_give_a_plausible_weight(name, bad):
    """A NaN log-prob on a valid token gives a NaN weight (verl, OpenRLHF) or TRL's documented ratio 1
    (TRL maps NaN to 0 on purpose); ±inf gives the clamped extreme, as in each peer."""
    old, roll, mask = _inputs(seed=6)
    mask = torch.ones_like(mask)
    old[2, 4] = bad
    kw = CONVENTIONS[name]
    res = ops.rollout_correction(old, roll, mask, **kw)
    want, _ = reference.rollout_correction(old, roll, mask, **kw)
    _check(res.weights, want, name)
    if math.isnan(bad) and kw.get("padding") != "trl":
        cell = res.weights[2] if kw["level"] == "sequence" else res.weights[2, 4]
        assert cell.isnan().all()
        assert res.metrics["rollout_is_mean"].isnan()
        assert res.metrics["kl"].isnan()


def test_empty_inputs():
    for shape in ((0, T), (3, 0)):
        old, roll, mask = (torch.zeros(shape), torch.zeros(shape), torch.zeros(shape))
        res = ops.rollout_correction(old, roll, mask, rs="seq_mean_k1", rs_threshold=1.1)
        assert res.weights.shape == shape and res.mask.shape == shape and res.metrics == {}


def test_no_host_sync_on_meta_tensors():
    """Any .item(), bool(tensor), nonzero or data-dependent shape raises on the meta device."""
    meta = lambda dtype=torch.float32: torch.empty(B, T, dtype=dtype, device="meta")  # noqa: E731
    for mask_dtype in (torch.float32, torch.int64, torch.bool):
        for kw in CONVENTIONS.values():
            for bn in (False, True):
                res = ops.rollout_correction(meta(torch.bfloat16), meta(), meta(mask_dtype), **kw,
                                             rs="token_k1,seq_sum_k2,seq_mean_k3,seq_max_k3",
                                             rs_threshold="0.5_2,1,1,1", batch_normalize=bn)
                assert res.weights.device.type == "meta" and res.mask.dtype == mask_dtype
                assert all(v.device.type == "meta" and v.dim() == 0 for v in res.metrics.values())
    out = ops.off_policy_sequence_mask(meta(), meta(), meta(), torch.empty(B, device="meta"), 0.5)
    assert out.shape == (B, 1)


def _trl_vllm_is(old, sampling, mask, mode, clip_min, clip_max):
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, the vLLM importance-sampling block."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = clip_min if clip_min is not None else -math.inf
    hi = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < lo) | (ratio > hi), value=0.0)


@pytest.mark.parametrize("clip_min", [None, 0.8])
@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_trl_vllm_importance_sampling_modes(mode, clip_min):
    old, roll, mask = _inputs(seed=7, scale=0.2)
    mask = mask.long()
    old[3, 2] = float("nan")  # TRL: a NaN sampling log-prob gives ratio 1
    level, how = mode.split("_")
    got = ops.rollout_correction(old, roll, mask, level=level, mode=how, lower=clip_min, upper=1.5,
                                 padding="trl", log_clamp=None, metrics=False).weights
    want = _trl_vllm_is(old, roll, mask, mode, clip_min, 1.5).expand_as(old)
    _check(got, want, mode)
    assert not got.isnan().any()


def _openrlhf_is(old, rollout, mask, kind, low, high):
    """OpenRLHF PolicyLoss.forward: the vllm_is coefficient per correction type."""
    log_ratio = old - rollout
    if kind == "icepop":
        w = torch.exp(log_ratio)
        return w * ((w >= low) & (w <= high))
    if kind == "seq-mask-tis":
        seq = torch.exp((log_ratio * mask).sum(-1) / mask.sum(-1))
        return ((seq >= low) & (seq <= high)).unsqueeze(-1) * torch.exp(log_ratio)
    return torch.exp(log_ratio).clamp(min=low, max=high)


@pytest.mark.parametrize("kind", ["tis", "icepop", "seq-mask-tis"])
def test_openrlhf_correction_types(kind):
    old, roll, mask = _inputs(seed=8, scale=0.1)
    mask[1, 0] = True  # OpenRLHF's masked mean has no epsilon: keep every row non-empty
    low, high = (0.97, 1.03) if kind == "seq-mask-tis" else (0.9, 1.1)
    kw = {"tis": {"lower": low, "upper": high},
          "icepop": {"mode": "mask", "lower": low, "upper": high},
          "seq-mask-tis": {"mode": "none", "upper": None, "seq_gate": (low, high)}}[kind]
    got = ops.rollout_correction(old, roll, mask, level="token", padding="raw", log_clamp=None, **kw).weights
    _check(got, _openrlhf_is(old, roll, mask.float(), kind, low, high), kind)


def _off_policy_mask_transcription(advantages, per_token_logps, sampling, mask, threshold):
    kl_div = torch.nan_to_num(sampling - per_token_logps.detach(), nan=0.0)
    avg = (kl_div * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (avg <= threshold)).to(dtype=mask.dtype)


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.int64], ids=str)
def test_off_policy_sequence_mask(mask_dtype):
    old, roll, mask = _inputs(seed=9, mask_dtype=mask_dtype)
    roll[4, 3] = float("nan")
    adv = torch.randn(B, 1, generator=torch.Generator().manual_seed(1))
    thr = 0.02
    got = ops.off_policy_sequence_mask(old, roll, mask, adv, thr)
    try:
        from trl.trainer.grpo_trainer import GRPOTrainer
        want = GRPOTrainer.get_off_policy_mask(adv, old, roll, mask, thr)
    except ImportError:
        want = _off_policy_mask_transcription(adv, old, roll, mask, thr)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(ops.off_policy_sequence_mask(old, roll, mask, adv.squeeze(1), thr), got)


@pytest.mark.parametrize("call,error,match", [
    (lambda: ops.rollout_correction(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3)), ValueError,
     "rollout_log_prob shape"),
    (lambda: ops.rollout_correction(torch.zeros(2, 3), None, torch.ones(2, 4)), ValueError, "mask"),
    (lambda: ops.rollout_correction(torch.zeros(2, 3), None, torch.ones(2, 3), level="seq"), ValueError,
     "level"),
    (lambda: ops.rollout_correction(torch.zeros(2, 3), None, torch.ones(2, 3), mode="clip"), ValueError,
     "mode"),
    (lambda: ops.rollout_correction(torch.zeros(2, 3), None, torch.ones(2, 3), padding="x"), ValueError,
     "padding"),
    (lambda: ops.rollout_correction(torch.zeros(2, 3), None, torch.ones(2, 3), upper=float("nan")),
     ValueError, "upper"),
    (lambda: ops.rollout_correction(torch.zeros(2, 3), None, torch.ones(2, 3), level=None, rs="token_k4",
                                    rs_threshold=1.0), ValueError, "Invalid rollout_rs option"),
    (lambda: ops.rollout_correction(torch.zeros(2, 3, dtype=torch.long), None, torch.ones(2, 3)), TypeError,
     "log_prob"),
])
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_threshold_parsing_is_verls():
    assert parse_is_threshold(2) == (2.0, None)
    assert parse_is_threshold(" 0.5_2.0 ") == (2.0, 0.5)
    for bad, error in ((True, TypeError), ("", ValueError), ("a_b", ValueError), (-1.0, ValueError),
                       ("3_2", ValueError), ("0_2", ValueError), ([2.0], TypeError)):
        with pytest.raises(error):
            parse_is_threshold(bad)
    assert parse_rs("token_k1, seq_max_k2,token_k1", "2") == [
        ("token_k1", 0.5, 2.0), ("seq_max_k2", None, 2.0)]
    assert parse_rs("seq_mean_k1,seq_sum_k3", "0.9_1.1,0.3") == [
        ("seq_mean_k1", 0.9, 1.1), ("seq_sum_k3", None, 0.3)]
    for rs, thr in (("seq_max_k1", 1.0), ("token_k2", "0.1_0.2"), ("token_k1,token_k2", "1,2,3"),
                    ("token_k2", None), (None, 1.0), (",", 1.0), ("token_k2", -1.0), ("token_k1", "2_1")):
        with pytest.raises(ValueError):
            parse_rs(rs, thr)


def _rc_all(old, roll, mask, **kw):
    res = ops.rollout_correction(old, roll, mask, **kw)
    return res.weights, res.mask, res.metrics


@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.int64, torch.bool, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_cpp_kernel_matches_torch_path(name, mask_dtype):
    """The fused C++ kernel (float64 row sums) against the vectorised torch path (fp32 sums): weights to
    fp32 rounding, masks exactly, every metric to 1e-5 relative (sums of <= 13 * 7 fp32 terms)."""
    pytest.importorskip("rlkern._C")
    old, roll, mask = _inputs(torch.bfloat16, mask_dtype, seed=11)
    old[4, 5] = float("nan")
    rs, thr = "token_k1,seq_sum_k2,seq_mean_k3,seq_max_k2,seq_mean_k1", "0.8_1.25,0.3,0.04,0.1,0.9_1.1"
    for kw in ({**CONVENTIONS[name]}, {**CONVENTIONS[name], "rs": rs, "rs_threshold": thr},
               {**CONVENTIONS[name], "batch_normalize": True}):
        with rlkern.use_backend("cpp"):
            got = _rc_all(old, roll, mask, **kw)
        with rlkern.use_backend("torch"):
            want = _rc_all(old, roll, mask, **kw)
        _check(got[0], want[0], name)
        assert got[1].dtype == want[1].dtype and torch.equal(got[1], want[1]), name
        assert got[2].keys() == want[2].keys(), set(got[2]) ^ set(want[2])
        for key in want[2]:
            torch.testing.assert_close(got[2][key], want[2][key], atol=1e-6, rtol=1e-5, equal_nan=True,
                                       msg=lambda m, key=key: f"{name} {key}: {m}")
    # the log-ratio form, and rows with no valid token only
    with rlkern.use_backend("cpp"):
        got = _rc_all(old - roll, None, torch.zeros_like(mask), rs=rs, rs_threshold=thr, **CONVENTIONS[name])
    with rlkern.use_backend("torch"):
        want = _rc_all(old - roll, None, torch.zeros_like(mask), rs=rs, rs_threshold=thr, **CONVENTIONS[name])
    _check(got[0], want[0], name)
    assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_triton_kernel_matches_torch_path(name):
    """The Triton kernel (through TRITON_INTERPRET on CPU; compiled for sm_80/sm_90 by tests/gpu_compile)
    against the torch path, on small shapes (rows of 37 tokens span one 512-token block; one row of 2100
    spans five), with a NaN token and a zero-length row. The kernel takes no rejection options: calls with
    them run the torch path on CUDA (kernels/rollout_correction.py says why), and the kernel refuses them."""
    # tests/conftest.py sets TRITON_INTERPRET=1, so the Triton backend runs on CPU tensors here
    assert "triton" in rlkern.backend.available(torch.device("cpu"))
    from rlkern.kernels import rollout_correction as triton_rc

    with pytest.raises(ValueError, match="no rejection options"):
        x = torch.zeros(2, 8)
        triton_rc.rollout_correction_fwd(x, None, x, 1, 0, 0, *[float("nan")] * 5, [1], [0.0], [1.0], x,
                                         x.clone(), torch.zeros(2, 27, dtype=torch.float64))
    for shape, mask_dtype in (((5, 37), torch.float32), ((5, 37), torch.bool), ((1, 2100), torch.int64)):
        old, roll, mask = _inputs(torch.float32, mask_dtype, seed=12, shape=shape)
        old[0, 5] = float("nan")
        for extra in ({}, {"batch_normalize": True}):
            with rlkern.use_backend("triton"):
                got = _rc_all(old, roll, mask, **CONVENTIONS[name], **extra)
            with rlkern.use_backend("torch"):
                want = _rc_all(old, roll, mask, **CONVENTIONS[name], **extra)
            _check(got[0], want[0], name)
            assert got[1].dtype == want[1].dtype and torch.equal(got[1], want[1]), name
            assert got[2].keys() == want[2].keys()
            for key in want[2]:
                # *_std is sqrt(E[x²] - E[x]²) (verl's formula): where every weight of the batch is equal
                # (one sequence-level row) the cancellation leaves sqrt(fp32 rounding) ~ 3e-4 per unit
                # of the weights, different for fp32 block sums and torch's sums
                atol = 2e-3 if key.endswith("_std") else 1e-6
                torch.testing.assert_close(got[2][key], want[2][key], atol=atol, rtol=1e-5, equal_nan=True,
                                           msg=lambda m, key=key: f"{name} {key}: {m}")


# ------------------------------------------------------------------------------------------------
# torch.library registration: the kernel is the op rlkern::rollout_correction_fwd
# ------------------------------------------------------------------------------------------------

_NAN = float("nan")


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bool, torch.int64], ids=str)
def test_opcheck(backend_name, mask_dtype):
    """opcheck (schema, fake tensor, AOT dispatch) of the registered kernel op, with and without the
    rollout log-probs, the weights (level 0) and rejection options (C++ only: Triton takes none)."""
    old, roll, mask = _inputs(torch.float32, mask_dtype, seed=13)
    codes, lows, highs = [1, 22, 33], [math.log(0.8), 0.0, 0.0], [math.log(1.25), 0.04, 0.1]
    cases = [(old, roll, 1, 0, 0, _NAN, 2.0, 20.0, _NAN, _NAN, [], [], []),
             (old, roll, 2, 1, 1, 0.5, 2.0, _NAN, _NAN, _NAN, [], [], []),
             (old - roll, None, 1, 2, 2, _NAN, _NAN, _NAN, 0.9, 1.1, [], [], [])]
    if backend_name == "cpp":
        cases += [(old, roll, 0, 0, 0, _NAN, 2.0, 20.0, _NAN, _NAN, codes, lows, highs),
                  (old, roll, 1, 1, 0, 0.8, 1.25, 20.0, _NAN, _NAN, codes, lows, highs)]
    for lp, rlp, *args in cases:
        torch.library.opcheck(torch.ops.rlkern.rollout_correction_fwd.default,
                              (lp, rlp, mask, *args, backend_name))


def _rc_tuple(res):
    return res.weights, res.mask, res.metrics


@pytest.mark.parametrize("backend_name", ["torch"] + KERNEL_BACKENDS)
def test_torch_compile_fullgraph(backend_name):
    """torch.compile(fullgraph=True) traces rollout_correction (the kernel as a registered op, verl's
    metrics from its row sums) and off_policy_sequence_mask without a graph break, and gives eager's
    weights, masks and metrics (aot_eager: the custom op stays a call; the torch path's own ops run as
    in eager). Triton: the conventions without rejection options (those run the torch path on CUDA)."""
    torch._dynamo.reset()
    old, roll, mask = _inputs(torch.float32, torch.float32, seed=14)
    adv = torch.randn(B, generator=torch.Generator().manual_seed(2))
    rs = None if backend_name == "triton" else ("token_k1,seq_mean_k3,seq_max_k2", "0.8_1.25,0.04,0.1")
    calls = [dict(CONVENTIONS["verl_tis_seq"], batch_normalize=True),
             dict(CONVENTIONS["trl_seq_mask"]), dict(CONVENTIONS["openrlhf_seq_mask_tis"])]
    if rs is not None:
        calls.append(dict(CONVENTIONS["verl_icepop_token"], rs=rs[0], rs_threshold=rs[1]))

    with rlkern.use_backend(backend_name):
        for kw in calls:
            def step(old, roll, mask, kw=kw):  # the options are constants of the traced function
                return _rc_tuple(ops.rollout_correction(old, roll, mask, **kw)), \
                    ops.off_policy_sequence_mask(old, roll, mask, adv, 0.02)

            (w_c, m_c, metrics_c), opm_c = torch.compile(step, fullgraph=True, backend="aot_eager")(
                old, roll, mask)
            (w_e, m_e, metrics_e), opm_e = step(old, roll, mask)
            _check(w_c, w_e, str(kw))
            assert torch.equal(m_c, m_e) and torch.equal(opm_c, opm_e)
            assert metrics_c.keys() == metrics_e.keys()
            for key in metrics_e:
                torch.testing.assert_close(metrics_c[key], metrics_e[key], equal_nan=True,
                                           msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_weights_alone_equal_the_kernels(name):
    """On CPU a call for the weights alone (metrics=False, no rs, no batch_normalize) runs the torch
    path's few elementwise passes: the same weights as the C++ kernel's (fp32 rounding of exp and of the
    row sums), for every convention."""
    pytest.importorskip("rlkern._C")
    old, roll, mask = _inputs(torch.float32, torch.float32, seed=15)
    with rlkern.use_backend("cpp"):
        alone = ops.rollout_correction(old, roll, mask, **CONVENTIONS[name], metrics=False)
        kernel = ops.rollout_correction(old, roll, mask, **CONVENTIONS[name])
    assert alone.metrics == {} and kernel.metrics
    _check(alone.weights, kernel.weights, name)
    assert alone.mask is mask


# ------------------------------------------------------------------------------------------------
# the weights alone: the lean kernel rlkern::rollout_weights_fwd (one pass, fp32 weights only)
# ------------------------------------------------------------------------------------------------

# (log-prob dtype, mask dtype): every kernel storage type, every native mask dtype
LEAN_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bool), (torch.float16, torch.int64),
               (torch.float32, torch.bfloat16), (torch.bfloat16, torch.uint8), (torch.float16, torch.int32)]
# one row of 1100 tokens spans two of the C++ kernel's 1024-token mask chunks and three Triton blocks
LEAN_SHAPES = [(7, 13), (3, 1), (2, 1100)]


@pytest.mark.parametrize("dtypes", LEAN_DTYPES, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_weights_alone_match_oracle(kernel_backend, name, dtypes):
    """The lean kernel (metrics=False, no rs, no batch_normalize) on every backend, log-prob storage type
    and mask dtype, against the float64 oracle run on the same (upcast) inputs: the weights are written
    in full (outputs start NaN), the mask is the caller's. Sequence rows sum in float64 lanes, so the
    module tolerance holds for the 1100-token rows too (scale 0.02 keeps their weights inside the bounds
    often enough to be tested, not only clamped)."""
    dtype, mask_dtype = dtypes
    kw = CONVENTIONS[name]
    for shape in LEAN_SHAPES:
        old, roll, mask = _inputs(dtype, mask_dtype, seed=hash((name, shape)) % 1000, shape=shape,
                                  scale=0.02 if shape[-1] > 100 else 0.3)
        res = ops.rollout_correction(old, roll, mask, **kw, metrics=False)
        assert res.metrics == {} and res.mask is mask and res.weights.dtype == torch.float32
        want, _ = reference.rollout_correction(old, roll, mask, **kw)
        _check(res.weights, want, f"{name} {shape}")


@pytest.mark.parametrize("name", ["verl_tis_token", "verl_tis_seq", "trl_token_truncate", "trl_seq_mask",
                                  "openrlhf_tis", "openrlhf_icepop", "openrlhf_seq_mask_tis"])
def test_weights_alone_hostile_values(kernel_backend, name):
    """NaN, ±inf and huge log-ratios (exp overflowing to inf and underflowing through the subnormals to
    0), at valid and padded tokens, give the torch path's weights on every backend (the kernel's exp
    covers the whole float32 range, torch's does). Sequence levels and the row gate get the finite
    values only: a row sum of ±FLT_MAX and ±1e30 terms depends on the summation order in fp32 (torch's)
    and not in the kernels' float64."""
    kw = CONVENTIONS[name]
    row_stat = kw["level"] == "sequence" or kw.get("seq_gate") is not None
    d = torch.tensor([[0.0, float("nan"), float("inf"), float("-inf"), 88.5, 88.8, -87.5, -95.0, -103.5,
                       -120.0, 30.0, -30.0, 1e30, -1e30, 0.3, -0.3, 5.0]])
    if row_stat:
        d = torch.tensor([[0.0, float("nan"), 0.2, -0.1, 0.05, 1.5, -0.7, 0.01]])
    d = torch.cat([d, d.flip(-1), torch.zeros_like(d)])
    mask = torch.ones_like(d)
    mask[1, ::2] = 0.0
    mask[2] = 0.0
    got = ops.rollout_correction(d, torch.zeros_like(d), mask, **kw, metrics=False).weights
    with rlkern.use_backend("torch"):
        want = ops.rollout_correction(d, torch.zeros_like(d), mask, **kw, metrics=False).weights
    torch.testing.assert_close(got, want, atol=1e-44, rtol=5e-7, equal_nan=True)
    # the whole-range exp by itself, on the raw weights (no bound, no clamp): subnormals included
    x = torch.linspace(-110.0, 90.0, 4001).unsqueeze(0)
    raw = ops.rollout_correction(x, None, torch.ones_like(x), mode="none", upper=None, log_clamp=None,
                                 padding="raw", metrics=False).weights
    torch.testing.assert_close(raw, torch.exp(x), atol=1e-44, rtol=5e-7)


def test_weights_alone_leading_dims_and_empty(kernel_backend):
    old, roll, mask = _inputs(shape=(2, 3, T), seed=16)
    for kw in CONVENTIONS.values():
        got = ops.rollout_correction(old, roll, mask, **kw, metrics=False).weights
        flat = ops.rollout_correction(old.view(6, T), roll.view(6, T), mask.view(6, T), **kw,
                                      metrics=False).weights
        assert got.shape == old.shape
        _check(got.view(6, T), flat, str(kw))
    for shape in ((0, T), (3, 0)):
        z = torch.zeros(shape)
        assert ops.rollout_correction(z, z, z, metrics=False).weights.shape == shape
    assert ops.rollout_correction(old, roll, mask, level=None, metrics=False).weights is None


# ------------------------------------------------------------------------------------------------
# the trust-region gate: verl's DPPO (dppo_tv / dppo_kl) and OpenRLHF's binary_kl / tv gating
# ------------------------------------------------------------------------------------------------


def _verl_dppo_gate(log_prob, old_log_prob, advantages, mask, divergence, low, high, clip_c):
    """verl 0.9.1 core_algos.compute_policy_loss_dppo_tv / compute_policy_loss_dppo_kl: the per-token
    factor of pg_losses (truncated_ratio * valid_mask) and its pg_clipfrac / pg_clipfrac_lower."""
    from verl.utils.torch_functional import masked_mean

    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    truncated_ratio = torch.clamp(ratio, max=clip_c)
    prob, old_prob = torch.exp(log_prob), torch.exp(old_log_prob)
    if divergence == "tv":
        valid_positive_mask = (prob - old_prob) <= high
        valid_negative_mask = (prob - old_prob) >= -low
    else:
        binary_kl = old_prob * (old_log_prob - log_prob) + (1 - old_prob) * torch.log(
            (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
        valid_positive_mask = (binary_kl <= high) | (prob <= old_prob)
        valid_negative_mask = (binary_kl <= low) | (prob >= old_prob)
    valid_mask = torch.where(advantages > 0, valid_positive_mask, valid_negative_mask).to(log_prob.dtype)
    return truncated_ratio * valid_mask, {
        "pg_clipfrac": masked_mean(1.0 - valid_mask, mask),
        "pg_clipfrac_lower": masked_mean((ratio > clip_c).to(log_prob.dtype) * valid_mask, mask)}


def _openrlhf_gate(old_log_probs, rollout_log_probs, action_mask, gating, level, low, high):
    """OpenRLHF 0.11.2 models/loss.py::PolicyLoss.forward, is_correction_mode="mask" with a divergence
    gating: the coefficient of each token's loss and is_filter_ratio (utils.py::masked_mean)."""
    def masked_mean(tensor, mask, dim=None):
        return (tensor * mask).sum(dim=dim) / mask.sum(dim=dim)

    is_log_ratio = old_log_probs - rollout_log_probs
    token_is = is_log_ratio.exp()
    p = rollout_log_probs.exp().clamp(1e-6, 1 - 1e-6)
    q = old_log_probs.exp().clamp(1e-6, 1 - 1e-6)
    if gating == "binary_kl":
        stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    else:
        stat = (p - q).abs()
    if level == "seq":
        stat = masked_mean(stat, action_mask, dim=-1).unsqueeze(-1)
    keep = (stat >= low) & (stat <= high)
    coef = torch.where(keep, token_is, 0.0)
    filtered = ~keep
    ratio = filtered.to(old_log_probs.dtype).mean() if level == "seq" else \
        masked_mean(filtered.to(old_log_probs.dtype), action_mask, dim=None)
    return coef, {"is_filter_ratio": ratio}


# (convention, divergence, level, low, high): thresholds in the bulk of the statistic for _gate_inputs
GATES = {
    "verl_tv": ("verl", "tv", "token", 0.03, 0.04),
    "verl_kl": ("verl", "kl", "token", 0.004, 0.006),
    "openrlhf_tv_token": ("openrlhf", "tv", "token", 0.0, 0.03),
    "openrlhf_kl_token": ("openrlhf", "kl", "token", float("-inf"), 0.004),
    "openrlhf_tv_seq": ("openrlhf", "tv", "sequence", 0.0, 0.085),
    "openrlhf_kl_seq": ("openrlhf", "kl", "sequence", 0.0, 0.04),
}


def _gate_inputs(dtype, mask_dtype, seed, shape=(B, T)):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(*shape, generator=g) * 2.5
    ref = logp + 0.3 * torch.randn(*shape, generator=g)
    adv = torch.randn(*shape, generator=g)
    mask = torch.rand(*shape, generator=g) < 0.75
    if shape[0] > 2:
        mask[1] = False
        mask[0] = True
    return logp.to(dtype), ref.to(dtype), adv, mask.to(mask_dtype)


def _gate_want(name, logp, ref, adv, mask, clip_c=2.0):
    convention, divergence, level, low, high = GATES[name]
    x, y, a, m = (t.double() for t in (logp, ref, adv, mask))
    if convention == "verl":
        return _verl_dppo_gate(x, y, a, m, divergence, low, high, clip_c)
    return _openrlhf_gate(x, y, m, "binary_kl" if divergence == "kl" else "tv",
                          "seq" if level == "sequence" else "token", low, high)


def _gate_got(name, logp, ref, adv, mask, clip_c=2.0):
    convention, divergence, level, low, high = GATES[name]
    return ops.trust_region_gate(logp, ref, mask, adv if convention == "verl" else None,
                                 divergence=divergence, low=low, high=high, clip_c=clip_c,
                                 convention=convention, level=level)


def _check_gate(got, want, what, shares=1e-6):
    _check(got.weights, want[0].expand_as(got.weights), what)
    assert got.metrics.keys() == want[1].keys(), what
    for key, value in want[1].items():
        torch.testing.assert_close(got.metrics[key].double(), value.double(), atol=shares, rtol=1e-6,
                                   equal_nan=True, msg=lambda m, key=key: f"{what} {key}: {m}")


GATE_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bool), (torch.float16, torch.int64),
               (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("dtypes", GATE_DTYPES, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
@pytest.mark.parametrize("name", list(GATES))
def test_trust_region_matches_peers(backend, name, dtypes):
    """Every backend against the peers' formulas (verl's DPPO lines, OpenRLHF 0.11.2's gating lines) run
    in float64 on the same (upcast) inputs: weights to the module tolerance, the metrics to 1e-6 (shares
    of <= 2200 tokens or rows). The thresholds sit in the bulk of each statistic (a fp32 rounding flips
    a token's side only within ~1e-7 relative of a threshold, probability ~1e-5 per token whatever the
    seed); rows of 1100 tokens span the C++ kernel's chunks and the Triton blocks."""
    dtype, mask_dtype = dtypes
    for shape in ((B, T), (2, 1100), (3, 1)):
        logp, ref, adv, mask = _gate_inputs(dtype, mask_dtype, seed=hash((name, shape)) % 1000, shape=shape)
        want = _gate_want(name, logp, ref, adv, mask)
        _check_gate(_gate_got(name, logp, ref, adv, mask), want, f"{name} {shape}")
        if GATES[name][0] == "verl":  # per-sequence advantages, [B] and [B, 1]
            row_adv = adv[:, :1]
            want = _gate_want(name, logp, ref, row_adv, mask)
            _check_gate(_gate_got(name, logp, ref, row_adv, mask), want, f"{name} {shape} per row")
            _check_gate(_gate_got(name, logp, ref, row_adv.squeeze(-1), mask), want, f"{name} {shape} [B]")


def test_trust_region_acts(backend):
    """The inputs of the parity test exercise every branch: some tokens dropped, some kept, the
    truncation at clip_c taken (verl), rows dropped and kept (OpenRLHF's sequence level)."""
    logp, ref, adv, mask = _gate_inputs(torch.float32, torch.float32, seed=3, shape=(16, 64))
    for name in GATES:
        got = _gate_got(name, logp, ref, adv, mask, clip_c=1.2)
        w = got.weights[mask != 0]
        assert (w == 0).any() and (w > 0).any(), name
        if GATES[name][0] == "verl":
            assert (w == 1.2).any() and 0 < got.metrics["pg_clipfrac_lower"] < got.metrics["pg_clipfrac"] + 1
        else:
            assert 0 < got.metrics["is_filter_ratio"] < 1, name


@pytest.mark.parametrize("name", list(GATES))
def test_trust_region_non_finite(backend, name):
    """NaN and ±inf log-probs: verl's weight is NaN through r (and 0 * NaN), OpenRLHF drops the token
    (its comparisons fail on NaN) or keeps exp(±inf); on every backend as in the peers' formulas."""
    logp, ref, adv, mask = _gate_inputs(torch.float32, torch.float32, seed=5)
    mask = torch.ones_like(mask)
    logp[2, 3], ref[3, 4], logp[4, 5], ref[5, 6], logp[6, 7] = (float("nan"), float("nan"), float("-inf"),
                                                                float("-inf"), 0.0)
    want = _gate_want(name, logp, ref, adv, mask)
    got = _gate_got(name, logp, ref, adv, mask)
    _check(got.weights, want[0].expand_as(got.weights), name)
    if GATES[name][0] == "verl":
        assert got.weights[2, 3].isnan() and got.weights[3, 4].isnan()


def test_trust_region_no_host_sync_on_meta_tensors():
    meta = lambda dtype=torch.float32: torch.empty(B, T, dtype=dtype, device="meta")  # noqa: E731
    for name, (convention, divergence, level, low, high) in GATES.items():
        out = ops.trust_region_gate(meta(torch.bfloat16), meta(torch.bfloat16), meta(torch.bool), meta(),
                                    divergence=divergence, low=low, high=high, convention=convention,
                                    level=level)
        assert out.weights.device.type == "meta" and out.weights.shape == (B, T), name
        assert all(v.device.type == "meta" and v.dim() == 0 for v in out.metrics.values())


@pytest.mark.parametrize("backend_name", KERNEL_BACKENDS)
def test_trust_region_opcheck_and_compile(backend_name):
    """opcheck of both new kernel ops (schema, fake tensors, AOT dispatch), and torch.compile(fullgraph)
    of the public functions giving eager's weights and metrics."""
    logp, ref, adv, mask = _gate_inputs(torch.float32, torch.bool, seed=9)
    m8 = mask.contiguous()
    for args in ((logp, ref, adv, m8, 0, 1, 1, 0.004, 0.006, 2.0), (logp, ref, adv[:, :1].contiguous(), m8, 0,
                 0, 1, 0.03, 0.04, 2.0), (logp, ref, None, m8, 1, 1, 2, 0.0, 0.004, 0.0),
                 (logp, ref, None, m8, 1, 0, 1, float("-inf"), 0.03, 0.0)):
        torch.library.opcheck(torch.ops.rlkern.trust_region_fwd.default, (*args, backend_name))
    for args in ((logp, ref, m8, 1, 0, 1, _NAN, 3.0, _NAN, _NAN, _NAN),
                 (logp.bfloat16(), ref.bfloat16(), m8, 2, 1, 0, 0.5, 2.0, 20.0, _NAN, _NAN),
                 (logp - ref, None, m8, 1, 2, 2, _NAN, _NAN, _NAN, 0.9, 1.1)):
        torch.library.opcheck(torch.ops.rlkern.rollout_weights_fwd.default, (*args, backend_name))
    torch._dynamo.reset()
    with rlkern.use_backend(backend_name):
        def step(logp, ref, adv, mask):
            gate = ops.trust_region_gate(logp, ref, mask, adv, divergence="kl", low=0.004, high=0.006)
            seq = ops.trust_region_gate(logp, ref, mask, convention="openrlhf", level="sequence", low=0.0,
                                        high=0.004)
            tis = ops.rollout_correction(logp, ref, mask, upper=3.0, padding="trl", log_clamp=None,
                                         metrics=False).weights
            return gate.weights, gate.metrics, seq.weights, seq.metrics, tis

        got = torch.compile(step, fullgraph=True, backend="aot_eager")(logp, ref, adv, mask)
        want = step(logp, ref, adv, mask)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, equal_nan=True)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(convention="trl"), ValueError, "convention"),
    (dict(divergence="js"), ValueError, "divergence"),
    (dict(level="sequence"), ValueError, "level"),
    (dict(low=float("nan")), ValueError, "low"),
    (dict(high=None), ValueError, "high"),
    (dict(advantages=None), ValueError, "advantages"),
    (dict(advantages=torch.zeros(2, 2)), ValueError, "advantages"),
    (dict(mask=torch.ones(2, 4)), ValueError, "mask"),
    (dict(ref_logp=torch.zeros(2, 4)), ValueError, "ref_logp"),
    (dict(logp=torch.zeros(2, 3, dtype=torch.long)), TypeError, "logp"),
])
def test_trust_region_bad_inputs(kwargs, error, match):
    args = dict(logp=torch.zeros(2, 3), ref_logp=torch.zeros(2, 3), mask=torch.ones(2, 3),
                advantages=torch.zeros(2, 3))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ops.trust_region_gate(**args)
