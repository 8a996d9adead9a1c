"""Pure redemption policy: the reward catalogue, cash rates per tier, and conversions.

All numbers are data held in a `RedemptionPolicy`, so a clinic with other numbers passes
its own policy; `DEFAULT_POLICY` is the default rule set of DOMAIN.md:

* points can be redeemed only from a balance of at least 500 (``min_balance``);
* cash deduction: 100 points = 1 CNY for member and silver, 80 for gold, 60 for diamond;
  points for a cash amount are rounded **up** (the member never gets more than they pay
  for), the cash value of points is rounded **down** to the fen;
* catalogue rewards at fixed points (`DEFAULT_CATALOGUE`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from types import MappingProxyType

from schemas.grants import TIERS, Tier
from services.ledger.accounting import DEFAULT_MIN_BALANCE

__all__ = [
    "DEFAULT_CASH_RATES",
    "DEFAULT_CATALOGUE",
    "DEFAULT_MIN_BALANCE",
    "DEFAULT_POLICY",
    "RedemptionPolicy",
    "Reward",
    "UnknownReward",
    "cash_value",
    "points_for_cash",
    "reward_points",
]

_FEN_PER_CNY = 100


class UnknownReward(KeyError):
    """The reward code is not in the policy's catalogue."""


@dataclass(frozen=True, slots=True)
class Reward:
    code: str
    points: int
    name: str
    name_zh: str

    def __post_init__(self) -> None:
        if not self.code:
            raise ValueError("a reward needs a code")
        if self.points <= 0:
            raise ValueError(f"reward {self.code}: points must be positive")


DEFAULT_CATALOGUE: tuple[Reward, ...] = (
    Reward("face-mask", 500, "Face mask", "面膜"),
    Reward("neck-shoulder-massage", 3_000, "Neck-and-shoulder massage", "肩颈按摩"),
    Reward("free-facial", 5_000, "Free facial", "免费面部护理"),
    Reward("priority-booking", 2_000, "Priority booking", "优先预约"),
    Reward("skincare-plan", 5_000, "Personal skincare plan", "个人专属护肤方案"),
    Reward("device-treatment", 20_000, "High-end device treatment", "高端仪器护理"),
    Reward("lucky-draw", 100, "One lucky draw", "抽奖一次"),
)

# Points per 1 CNY of cash deduction.
DEFAULT_CASH_RATES: Mapping[Tier, int] = MappingProxyType(
    {"member": 100, "silver": 100, "gold": 80, "diamond": 60}
)


@dataclass(frozen=True, slots=True)
class RedemptionPolicy:
    """Redemption numbers of one clinic. Frozen; the mappings are read-only views."""

    min_balance: int = DEFAULT_MIN_BALANCE
    cash_rates: Mapping[Tier, int] = field(default_factory=lambda: DEFAULT_CASH_RATES)
    catalogue: tuple[Reward, ...] = DEFAULT_CATALOGUE

    def __post_init__(self) -> None:
        if self.min_balance < 0:
            raise ValueError("min_balance must not be negative")
        missing = [tier for tier in TIERS if tier not in self.cash_rates]
        if missing:
            raise ValueError(f"cash rates missing for tiers {missing}")
        bad = {tier: rate for tier, rate in self.cash_rates.items() if rate <= 0}
        if bad:
            raise ValueError(f"cash rates must be positive points per CNY: {bad}")
        codes = [reward.code for reward in self.catalogue]
        if len(codes) != len(set(codes)):
            raise ValueError("reward codes must be unique")
        object.__setattr__(self, "cash_rates", MappingProxyType(dict(self.cash_rates)))
        object.__setattr__(self, "catalogue", tuple(self.catalogue))

    @property
    def rewards(self) -> Mapping[str, Reward]:
        return MappingProxyType({reward.code: reward for reward in self.catalogue})

    def reward(self, code: str) -> Reward:
        for reward in self.catalogue:
            if reward.code == code:
                return reward
        raise UnknownReward(code)

    def rate(self, tier: Tier) -> int:
        try:
            return self.cash_rates[tier]
        except KeyError:
            raise ValueError(f"unknown tier {tier!r}") from None

    def points_for_cash(self, tier: Tier, cny: Decimal) -> int:
        """Points needed for a ``cny`` deduction, rounded up to a whole point."""
        if not cny.is_finite() or cny < 0:
            raise ValueError(f"cash amount must be a non-negative number, got {cny}")
        return int((cny * self.rate(tier)).to_integral_value(rounding=ROUND_CEILING))

    def cash_value(self, tier: Tier, points: int) -> Decimal:
        """CNY worth of ``points`` as a deduction, rounded down to the fen (2 dp)."""
        if points < 0:
            raise ValueError(f"points must not be negative, got {points}")
        fen = points * _FEN_PER_CNY // self.rate(tier)  # exact integer floor
        return Decimal(fen).scaleb(-2)


DEFAULT_POLICY = RedemptionPolicy()


def points_for_cash(tier: Tier, cny: Decimal, policy: RedemptionPolicy = DEFAULT_POLICY) -> int:
    return policy.points_for_cash(tier, cny)


def cash_value(tier: Tier, points: int, policy: RedemptionPolicy = DEFAULT_POLICY) -> Decimal:
    return policy.cash_value(tier, points)


def reward_points(code: str, policy: RedemptionPolicy = DEFAULT_POLICY) -> int:
    return policy.reward(code).points
