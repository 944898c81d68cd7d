"""KL controllers: update rules against hand-computed sequences, checkpoint round trips, bad input."""

from __future__ import annotations

import math

import pytest
import torch

import rlkern
from rlkern.ops import AdaptiveKLController, FixedKLController, PenaltyKLController


def test_exported_from_ops():
    assert {"FixedKLController", "AdaptiveKLController", "PenaltyKLController"} <= set(rlkern.ops.__all__)


def test_fixed_never_changes():
    ctl = FixedKLController(0.05)
    for kl in (0.0, 1.0, 100.0):
        assert ctl.update(kl, 64) == 0.05
    assert FixedKLController(0.0).update(3.0) == 0.0  # 0 = no KL penalty is allowed


def test_adaptive_matches_the_proportional_rule():
    ctl = AdaptiveKLController(0.2, target_kl=6.0, horizon=10000)
    beta = 0.2
    for kl, n in ((12.0, 256), (6.6, 256), (1.0, 512), (6.0, 256), (5.7, 128)):
        err = min(max(kl / 6.0 - 1, -0.2), 0.2)  # 12 -> +0.2 (clipped), 1 -> -0.2 (clipped), 6.6 -> +0.1
        beta *= 1 + err * n / 10000
        assert math.isclose(ctl.update(kl, n), beta, rel_tol=1e-12)
    assert math.isclose(ctl.value, beta, rel_tol=1e-12)


def test_penalty_halves_doubles_or_keeps():
    ctl = PenaltyKLController(1.0, target_kl=0.01)
    assert ctl.update(0.001) == 0.5  # below 0.01 / 1.5
    assert ctl.update(0.02) == 1.0  # above 1.5 * 0.01
    assert ctl.update(0.01) == 1.0  # inside the band
    assert ctl.update(0.01 / 1.5) == 1.0 and ctl.update(1.5 * 0.01) == 1.0  # the edges are inside


def test_tensor_kl_is_accepted():
    ctl = AdaptiveKLController(0.1, 1.0, 100)
    assert math.isclose(ctl.update(torch.tensor(2.0), 10), 0.1 * (1 + 0.2 * 10 / 100))


@pytest.mark.parametrize("make", [lambda: FixedKLController(0.3), lambda: AdaptiveKLController(0.1, 3.0, 500),
                                  lambda: PenaltyKLController(0.5, 0.02)])
def test_state_dict_round_trip(make):
    a = make()
    for kl in (0.5, 4.0, 0.001):
        a.update(kl, 8)
    state = a.state_dict()
    assert all(isinstance(v, float) for v in state.values())
    b = make()
    b.load_state_dict(dict(state))
    assert b.state_dict() == state and repr(b) == repr(a)
    for kl in (0.2, 9.0, 0.05):  # restored controllers continue identically
        assert a.update(kl, 8) == b.update(kl, 8)


@pytest.mark.parametrize("make, error, match", [
    (lambda: FixedKLController(-0.1), ValueError, "kl_coef must be a finite number >= 0"),
    (lambda: AdaptiveKLController(0.0, 1.0, 10), ValueError, "init_kl_coef must be a finite number > 0"),
    (lambda: AdaptiveKLController(0.1, float("nan"), 10), ValueError,
     "target_kl must be a finite number > 0"),
    (lambda: AdaptiveKLController(0.1, 1.0, 0), ValueError, "horizon must be a finite number > 0"),
    (lambda: PenaltyKLController(0.1, -1.0), ValueError, "target_kl must be a finite number > 0"),
    (lambda: AdaptiveKLController(0.1, 1.0, 10).update(float("nan")), ValueError,
     "current_kl must be finite"),
    (lambda: PenaltyKLController(0.1, 1.0).update(torch.ones(2)), ValueError,
     "current_kl must be a number or a one-element tensor"),
    (lambda: PenaltyKLController(0.1, 1.0).update("0.1"), TypeError, "current_kl must be a real number"),
    # One rule for numbers (rlkern.ops._common.check_number): bool is not a number anywhere.
    (lambda: AdaptiveKLController(True, 1.0, 10), TypeError, "init_kl_coef must be a real number"),
    (lambda: FixedKLController(False), TypeError, "kl_coef must be a real number"),
    (lambda: AdaptiveKLController(0.1, 1.0, 10).update(True), TypeError, "current_kl must be a real number"),
    (lambda: AdaptiveKLController(0.1, 1.0, 10).update(0.5, True), TypeError, "n_steps must be an int"),
    (lambda: AdaptiveKLController(0.1, 1.0, 10).update(0.5, -1), ValueError, "n_steps must be an int >= 0"),
    (lambda: AdaptiveKLController(0.1, 1.0, 10).update(0.5, 51), ValueError, r"n_steps must be < 5 \* hor"),
    # Exactly 5 * horizon with KL far below target would set beta to 0.0 (and the checkpoint would not load).
    (lambda: AdaptiveKLController(0.1, 1.0, 10).update(0.0, 50), ValueError, r"n_steps must be < 5 \* hor"),
    (lambda: AdaptiveKLController(0.1, 1.0, 10).load_state_dict({"value": 0.1}), KeyError,
     r"missing \['horizon', 'target_kl'\]"),
    (lambda: PenaltyKLController(0.1, 1.0).load_state_dict({"value": 0.1, "target_kl": 1.0, "x": 1}),
     KeyError, r"unexpected \['x'\]"),
    (lambda: PenaltyKLController(0.1, 1.0).load_state_dict({"value": -1.0, "target_kl": 1.0}), ValueError,
     r"state\['value'\] must be a finite number > 0"),
    (lambda: FixedKLController(0.1).load_state_dict({"beta": 0.1}), KeyError,
     "expects exactly the key 'value'"),
])
def test_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("kl", [0.0, 100.0])
def test_penalty_beta_stays_finite_and_positive_and_its_state_loads(kl):
    """A KL always below (or above) target would halve (double) beta to 0 (inf) after ~1000 steps."""
    ctl = PenaltyKLController(1.0, 0.01)
    for _ in range(1200):
        ctl.update(kl)
    assert 0 < ctl.value < float("inf")
    again = PenaltyKLController(1.0, 0.01)
    again.load_state_dict(ctl.state_dict())
    assert again.value == ctl.value
