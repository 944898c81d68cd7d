"""KL-penalty coefficient controllers: ``FixedKLController``, ``AdaptiveKLController``,
``PenaltyKLController``.

Plain Python objects holding one coefficient ``value`` (beta) that a trainer multiplies into its KL
penalty, and an ``update(current_kl, n_steps)`` called once per step with the measured KL. Each
checkpoints through ``state_dict()`` / ``load_state_dict()`` like a torch module or optimizer.

* Fixed: beta never changes (verl ``FixedKLController``).
* Adaptive: the proportional controller of Ziegler et al. 2019 as in verl / TRL
  ``AdaptiveKLController``: ``err = clip(KL / target - 1, -0.2, 0.2)``,
  ``beta <- beta (1 + err n_steps / horizon)``.
* Penalty: the PPO paper's adaptive-penalty rule (Schulman et al. 2017, sec. 4), target ``d``:
  ``beta <- beta / 2`` when ``KL < d / 1.5``, ``beta <- 2 beta`` when ``KL > 1.5 d``, else unchanged.
"""

from __future__ import annotations

from torch import Tensor

from rlkern.ops._common import check_finite, check_int, check_positive

__all__ = ["FixedKLController", "AdaptiveKLController", "PenaltyKLController"]


# Numbers follow rlkern.ops._common's one rule (check_number: a real Python or numpy scalar, never a
# bool); these add the ranges.
def _positive(value, name: str) -> float:
    return check_positive(value, name)


def _non_negative(value, name: str) -> float:
    value = check_finite(value, name)
    if value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def _kl_value(current_kl) -> float:
    """The measured KL as a float (a one-element tensor is read with .item(), a device sync on GPU).
    A NaN / inf KL is refused: folded into beta it would poison every later step."""
    if isinstance(current_kl, Tensor):
        if current_kl.numel() != 1:
            raise ValueError(f"current_kl must be a number or a one-element tensor, got shape "
                             f"{tuple(current_kl.shape)}")
        current_kl = current_kl.item()
    return check_finite(current_kl, "current_kl")


def _steps(n_steps) -> int:
    n_steps = check_int(n_steps, "n_steps")
    if n_steps < 0:
        raise ValueError(f"n_steps must be an int >= 0, got {n_steps!r}")
    return n_steps


class _Controller:
    """Shared checkpointing: the state is every field in ``_fields``, validated on load."""

    _fields: tuple[str, ...] = ("value",)

    value: float

    def state_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self._fields}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        missing = set(self._fields) - set(state)
        unexpected = set(state) - set(self._fields)
        if missing or unexpected:
            raise KeyError(f"{type(self).__name__}.load_state_dict expects keys {list(self._fields)}; "
                           f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        checked = {name: _positive(state[name], f"state[{name!r}]") for name in self._fields}
        for name, value in checked.items():
            setattr(self, name, value)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({fields})"


class FixedKLController(_Controller):
    """A constant coefficient; ``update`` validates its input and changes nothing."""

    def __init__(self, kl_coef: float):
        self.value = _non_negative(kl_coef, "kl_coef")

    def update(self, current_kl, n_steps: int = 1) -> float:
        _kl_value(current_kl)
        _steps(n_steps)
        return self.value

    def load_state_dict(self, state: dict) -> None:
        # A fixed coefficient may be 0 (no KL penalty), which the positive-only check would refuse.
        if not isinstance(state, dict) or set(state) != {"value"}:
            raise KeyError(f"FixedKLController.load_state_dict expects exactly the key 'value', got "
                           f"{state!r}")
        self.value = _non_negative(state["value"], "state['value']")


class AdaptiveKLController(_Controller):
    """Proportional control of the KL towards ``target_kl`` (Ziegler et al. 2019).

    ``update(kl, n_steps)``: ``err = clip(kl / target_kl - 1, -0.2, 0.2)``, then
    ``value *= 1 + err * n_steps / horizon``. ``n_steps`` is the number of samples (verl, TRL pass the
    batch size) the KL was measured over.
    """

    _fields = ("value", "target_kl", "horizon")

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: float):
        self.value = _positive(init_kl_coef, "init_kl_coef")
        self.target_kl = _positive(target_kl, "target_kl")
        self.horizon = _positive(horizon, "horizon")

    def update(self, current_kl, n_steps: int = 1) -> float:
        kl = _kl_value(current_kl)
        n_steps = _steps(n_steps)
        # With err = -0.2 the factor 1 - 0.2 n / horizon is 0 at n = 5 * horizon (beta would become 0,
        # and a zero beta never grows back), so n must stay strictly below it.
        if n_steps >= 5 * self.horizon:
            raise ValueError(f"n_steps must be < 5 * horizon = {5 * self.horizon}, got {n_steps}")
        err = min(max(kl / self.target_kl - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon
        return self.value


class PenaltyKLController(_Controller):
    """The PPO paper's adaptive KL penalty: halve beta below ``target_kl / 1.5``, double it above
    ``1.5 * target_kl``. ``n_steps`` is accepted for a uniform interface and not used (the rule is per
    update, not per sample)."""

    _fields = ("value", "target_kl")
    # Halving or doubling without bound reaches 0 or inf after ~1000 one-sided steps, and then the
    # state_dict() no longer loads (a checkpointed beta must be finite and > 0): beta is kept inside
    # this range, wide enough that no sane penalty ever touches it.
    MIN_VALUE, MAX_VALUE = 1e-12, 1e12

    def __init__(self, init_kl_coef: float, target_kl: float):
        self.value = _positive(init_kl_coef, "init_kl_coef")
        self.target_kl = _positive(target_kl, "target_kl")

    def update(self, current_kl, n_steps: int = 1) -> float:
        kl = _kl_value(current_kl)
        _steps(n_steps)
        if kl < self.target_kl / 1.5:
            self.value = max(self.value / 2.0, self.MIN_VALUE)
        elif kl > 1.5 * self.target_kl:
            self.value = min(self.value * 2.0, self.MAX_VALUE)
        return self.value
