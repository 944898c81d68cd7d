"""policy_loss / grpo_loss / value_loss on NaN input (issue 9): every backend gives the same answer.

The policy under test (rlkern/ops/losses.py, rlkern.reference, csrc/losses.cpp, kernels/losses.py):

* a NaN in any input of a valid token (mask set) makes the loss NaN and that token's gradient NaN;
  the other tokens' gradients are exactly what they are without the NaN (the aggregation scale of a
  row depends on the mask only);
* the stats follow the same rule: clip / dual fractions are NaN when a valid token's clipped
  surrogate is NaN, approx_kl when its log-ratio is, kl when its k3 term is;
* a NaN at a masked-out token never reaches anything: loss, stats and gradients are bit for bit
  those of the same input with clean padding, and the token's gradient is 0. (verl's masked_mean
  multiplies by the mask, so 0 * NaN would leak there; rlkern selects, as torch.where does.)

The defects these tests pin (measured before the fix, B=3, T=37): the C++ and Triton clamps and
maxes returned the non-NaN operand, so a NaN logp gave policy_loss -0.0330 (cpp) and 0.0865
(triton) against NaN (torch), and grpo_loss / value_loss finite losses with zero gradients; the
reference itself gave a NaN logp token gradient 0 (torch.clamp's backward) and a NaN old value a
finite one, and counted NaN tokens as unclipped in the clip fractions.
"""

from __future__ import annotations

import math

import pytest
import torch

import rlkern
from rlkern import reference
from rlkern.ops import losses
from tests.conftest import ALL_BACKENDS

ops = rlkern.ops
NAN = float("nan")
B, T = 3, 37  # T = 37: two full 16-lane C++ blocks and a 5-lane tail; one 64-wide Triton block
# Token positions of row 1: the first, the C++ kernel's second block's first lane, the tail's last
# lane, the whole row.
POSITIONS = {"first": 0, "block_start": 16, "last": T - 1, "all": slice(None)}
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

# (loss, poisoned input) -> the stats that must be NaN when that input is NaN at a valid token.
CASES = {
    ("policy", "logp"): {"clip_frac", "clip_frac_lower", "approx_kl"},
    ("policy", "old_logp"): {"clip_frac", "clip_frac_lower", "approx_kl"},
    ("policy", "advantages"): {"clip_frac", "clip_frac_lower"},
    ("policy", "weights"): set(),
    ("grpo", "logp"): {"kl", "clip_ratio", "clip_ratio_low", "clip_ratio_high", "approx_kl"},
    ("grpo", "old_logp"): {"clip_ratio", "clip_ratio_low", "clip_ratio_high", "approx_kl"},
    ("grpo", "advantages"): {"clip_ratio", "clip_ratio_low", "clip_ratio_high"},
    ("grpo", "ref_logp"): {"kl"},
    ("grpo", "weights"): set(),
    ("grpo_bc", "old_logp"): {"kl", "clip_ratio", "clip_ratio_low", "clip_ratio_high", "approx_kl"},
    ("grpo_bc", "ref_logp"): {"kl"},
    ("value", "values"): {"clip_frac"},
    ("value", "old_values"): {"clip_frac"},
    ("value", "returns"): {"clip_frac"},
}


def _inputs(kind: str) -> dict[str, torch.Tensor]:
    """Log-ratios around +-0.4 (about a third of the tokens clipped), advantages of both signs."""
    def r(scale=0.3, shift=0.0):
        return torch.randn(B, T) * scale + shift
    if kind == "value":
        return {"values": r(), "old_values": r(), "returns": r()}
    t = {"logp": r(shift=-1.0), "old_logp": r(shift=-1.0), "advantages": torch.randn(B, T),
         "weights": torch.rand(B, T) + 0.5}
    if kind != "policy":
        t["ref_logp"] = r(shift=-1.0)
    return t


def _run(kind: str, t: dict[str, torch.Tensor], mask: torch.Tensor, **kw):
    """(loss, stats as floats, d loss / d main input) through autograd on the current backend."""
    main = "values" if kind == "value" else "logp"
    x = t[main].clone().requires_grad_()
    if kind == "value":
        loss, stats = ops.value_loss(x, t["old_values"], t["returns"], mask, **kw)
    elif kind == "policy":
        loss, stats = ops.policy_loss(x, t["old_logp"], t["advantages"], mask, dual_clip=3.0,
                                      weights=t["weights"], **kw)
    else:
        loss, stats = ops.grpo_loss(x, t["old_logp"], t["ref_logp"], t["advantages"], mask, beta=0.1,
                                    weights=t["weights"], use_bias_correction_kl=kind == "grpo_bc", **kw)
    loss.backward()
    return loss.detach(), {k: float(v) for k, v in stats.items()}, x.grad


@pytest.mark.parametrize("masked", [False, True], ids=["valid", "masked_out"])
@pytest.mark.parametrize("position", list(POSITIONS))
@pytest.mark.parametrize("kind,name", list(CASES))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_input_poisons_its_token_or_nothing(backend, kind, name, position, masked):
    t = _inputs(kind)
    mask = torch.rand(B, T) > 0.2
    pos = (1, POSITIONS[position])
    mask[pos] = not masked
    poisoned = dict(t, **{name: t[name].clone()})
    poisoned[name][pos] = NAN
    with rlkern.use_backend(backend):
        clean_loss, clean_stats, clean_grad = _run(kind, t, mask)
        loss, stats, grad = _run(kind, poisoned, mask)
    others = torch.ones(B, T, dtype=torch.bool)
    others[pos] = False
    # The other tokens' gradients do not depend on the poisoned token: bit for bit the clean ones.
    assert torch.equal(grad[others], clean_grad[others]), "a NaN token changed another token's gradient"
    if masked:
        assert torch.equal(loss, clean_loss), f"masked-out NaN leaked into the loss: {loss} != {clean_loss}"
        assert stats == clean_stats, f"masked-out NaN leaked into the stats: {stats} != {clean_stats}"
        assert (grad[pos] == 0).all(), f"masked-out token's gradient is {grad[pos]}"
        return
    assert loss.isnan(), f"NaN in {name} at a valid token, loss {loss}"
    assert grad[pos].isnan().all(), f"NaN in {name} at a valid token, its gradient {grad[pos]}"
    nan_stats = {k for k, v in stats.items() if math.isnan(v)}
    assert nan_stats == CASES[kind, name], \
        f"NaN stats {sorted(nan_stats)}, expected {sorted(CASES[kind, name])}"
    for k in stats.keys() - nan_stats:
        # A NaN token leaves the stats it does not feed exactly as they were (the counts are the mask's).
        assert stats[k] == clean_stats[k], f"{k}: {stats[k]} != {clean_stats[k]}"


@pytest.mark.parametrize("agg", reference.POLICY_AGGS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_logp_gives_nan_policy_loss_under_every_agg(backend, agg):
    """The lead's measurement (cpp -0.0330, triton 0.0865, torch NaN), under every aggregation."""
    logp, old, adv = torch.randn(B, T) - 1, torch.randn(B, T) - 1, torch.randn(B, T)
    logp[1, 5] = NAN
    with rlkern.use_backend(backend):
        loss, stats = ops.policy_loss(logp, old, adv, torch.ones(B, T, dtype=torch.bool), agg=agg)
    assert loss.isnan() and stats["approx_kl"].isnan() and stats["clip_frac"].isnan()
    # Without the dual clip too, as the reference: the dual flag describes the same NaN surrogate.
    assert stats["clip_frac_lower"].isnan()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_per_sequence_advantage_poisons_only_a_live_row(backend):
    """A per-sequence advantage reaches every token of its row: NaN for a row with a valid token,
    nothing for a fully masked row."""
    logp, old, ref = (torch.randn(B, T) - 1 for _ in range(3))
    adv = torch.tensor([0.5, NAN, -1.0])
    mask = torch.ones(B, T, dtype=torch.bool)
    with rlkern.use_backend(backend):
        x = logp.clone().requires_grad_()
        loss, stats = ops.grpo_loss(x, old, ref, adv, mask)
        loss.backward()
        assert loss.isnan() and stats["clip_ratio"] != stats["clip_ratio"]
        assert x.grad[1].isnan().all() and x.grad[[0, 2]].isfinite().all()
        mask[1] = False
        x = logp.clone().requires_grad_()
        loss, stats = ops.grpo_loss(x, old, ref, adv, mask)
        loss.backward()
    assert loss.isfinite() and all(v.isfinite() for v in stats.values())
    assert torch.equal(x.grad[1], torch.zeros(T))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_ref_logp_reaches_the_grpo_loss_even_with_beta_zero(backend):
    """beta = 0 still computes the kl stat from ref_logp, and beta * k3 = 0 * NaN = NaN: one rule,
    NaN in an input of a valid token reaches the loss, with no exception for a zero coefficient."""
    logp, old, ref = (torch.randn(B, T) - 1 for _ in range(3))
    ref[2, T - 1] = NAN
    with rlkern.use_backend(backend):
        loss, stats = ops.grpo_loss(logp, old, ref, torch.randn(B), torch.ones(B, T, dtype=torch.bool),
                                    beta=0.0)
    assert loss.isnan() and stats["kl"].isnan() and stats["clip_ratio"].isfinite()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_in_half_precision_inputs_propagates(backend, dtype):
    t = {k: v.to(dtype) for k, v in _inputs("grpo").items()}
    t["logp"][0, 0] = NAN
    mask = torch.ones(B, T, dtype=torch.bool)
    with rlkern.use_backend(backend):
        loss, grad, stats = losses.grpo_loss_and_grad(t["logp"], t["old_logp"], t["ref_logp"],
                                                      t["advantages"], mask)
    assert loss.isnan() and grad[0, 0].isnan() and grad.isnan().sum() == 1
    # cispo_clip_ratio / phi_seq_mean: 0 unless loss_type="cispo" / "vespo"
    assert all(v.isnan() for k, v in stats.items() if k not in ("cispo_clip_ratio", "phi_seq_mean"))


@pytest.mark.parametrize("value", [float("inf"), -float("inf")], ids=["inf", "-inf"])
@pytest.mark.parametrize("kind,name", [("policy", "advantages"), ("policy", "old_logp"), ("grpo", "ref_logp"),
                                       ("value", "values"), ("value", "old_values"), ("value", "returns")])
def test_infinite_input_gives_torchs_answer_on_every_backend(kind, name, value):
    """An infinite input follows torch autograd's arithmetic on every backend. The kernels used to
    multiply by the clamp's 0/1 pass flag where torch.clamp's backward selects: an infinite old
    value gave a NaN gradient (torch: 0) and an infinite return NaN (torch: -+inf)."""
    t = _inputs(kind)
    t[name][1, 3] = value
    if name == "advantages":  # a clamped log-ratio as well: inf * (clamp passes nothing) is 0 in torch
        t["old_logp"][1, 3] = 30.0
    mask = torch.ones(B, T, dtype=torch.bool)
    results = {}
    for backend in ALL_BACKENDS:
        with rlkern.use_backend(backend):
            results[backend] = _run(kind, t, mask)
    want_loss, want_stats, want_grad = results["torch"]
    for backend, (loss, stats, grad) in results.items():
        assert torch.allclose(loss, want_loss, rtol=1e-5, equal_nan=True), (backend, loss, want_loss)
        assert stats.keys() == want_stats.keys()
        for k, v in stats.items():
            w = want_stats[k]
            same = math.isclose(v, w, rel_tol=1e-5, abs_tol=1e-6) or (math.isnan(v) and math.isnan(w))
            assert same, (backend, k, v, w)
        assert torch.allclose(grad, want_grad, rtol=1e-5, atol=1e-7, equal_nan=True), (
            backend, grad[1, 3], want_grad[1, 3])
