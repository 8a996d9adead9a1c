"""The rule set as data: every number of the programme lives in a versioned YAML file.

Two clinics run different numbers without a code change, and a replay under another
file answers "what would this rule change have cost us". The model is strict and
refuses unknown keys, so a typo in an operator's file fails loudly at load time instead
of silently paying the default.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from schemas.grants import TIERS, Tier


class RuleSetError(ValueError):
    """A rule-set file that cannot be used; the message names the field and the reason."""


def _to_decimal(v: Any) -> Any:
    # YAML gives 1.2 as a float; going through str keeps the operator's digits exactly
    # (Decimal(1.2) would carry binary noise into floor()).
    if isinstance(v, bool):
        return v
    if isinstance(v, int | float | str):
        try:
            return Decimal(str(v))
        except ArithmeticError:
            return v
    return v


def _to_datetime(v: Any) -> Any:
    # PyYAML parses unquoted timestamps itself; a quoted one arrives as text.
    if isinstance(v, str):
        try:
            return datetime.fromisoformat(v)
        except ValueError:
            return v
    return v


Num = Annotated[Decimal, BeforeValidator(_to_decimal), Field(ge=0)]

# Upper bounds on the spans a rule set sets: past them the calendar arithmetic the rules
# and the ledger do with them overflows (a 100,000-month window is a year out of range),
# and every event priced under the version would be dead-lettered instead of paid.
MAX_MONTHS = 120
MAX_LEAD_HOURS = 24 * 365
MAX_BURST_WINDOW_S = 7 * 24 * 3600
MAX_PENDING_DAYS = 3650
Points = Annotated[int, Field(ge=0)]
When = Annotated[AwareDatetime, BeforeValidator(_to_datetime)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


_THRESHOLDS: dict[Tier, Decimal] = {
    "silver": Decimal(10000),
    "gold": Decimal(30000),
    "diamond": Decimal(100000),
}
_MULTIPLIERS: dict[Tier, Decimal] = {
    "member": Decimal(1),
    "silver": Decimal("1.2"),
    "gold": Decimal("1.5"),
    "diamond": Decimal(2),
}
_CASH_RATES: dict[Tier, int] = {"member": 100, "silver": 100, "gold": 80, "diamond": 60}


class TierRules(_Strict):
    thresholds: dict[Tier, Num] = Field(default_factory=lambda: dict(_THRESHOLDS))
    multipliers: dict[Tier, Num] = Field(default_factory=lambda: dict(_MULTIPLIERS))
    window_months: int = Field(default=12, ge=1, le=MAX_MONTHS)
    keep_months: int = Field(default=12, ge=1, le=MAX_MONTHS)

    @model_validator(mode="after")
    def _complete(self) -> TierRules:
        missing = [t for t in TIERS if t not in self.multipliers]
        if missing:
            raise ValueError(f"multipliers missing for tiers {missing}")
        ranked = [self.thresholds[t] for t in TIERS[1:] if t in self.thresholds]
        if ranked != sorted(ranked):
            raise ValueError("thresholds must rise with the tier (silver <= gold <= diamond)")
        return self


class BigTicketStep(_Strict):
    """Total bonus once a single purchase reaches `min_amount` (steps are not summed)."""

    min_amount: Num
    points: Points


class Combo(_Strict):
    name: str = Field(min_length=1)
    projects: list[str] = Field(min_length=1)
    points: Points = 300


class PurchaseRules(_Strict):
    points_per_cny: Num = Decimal(1)
    big_ticket: list[BigTicketStep] = Field(
        default_factory=lambda: [
            BigTicketStep(min_amount=Decimal(1000), points=100),
            BigTicketStep(min_amount=Decimal(3000), points=600),
        ]
    )
    first_purchase_points: Points = 200
    new_projects: list[str] = Field(default_factory=lambda: ["gold-rf-microneedle"])
    new_project_points: Points = 500
    combos: list[Combo] = Field(
        default_factory=lambda: [
            Combo(name="facial-and-massage", projects=["facial-basic", "neck-shoulder-massage"])
        ]
    )
    stack_purchase_bonuses: bool = False
    birthday_multiplier: Num = Decimal(2)


class VisitRules(_Strict):
    points: Points = 50
    min_booking_lead_hours: Annotated[Num, Field(le=MAX_LEAD_HOURS)] = Decimal(24)
    grace_minutes: Num = Decimal(15)
    streak_every: int = Field(default=3, ge=0)
    streak_points: Points = 200


class SignInRules(_Strict):
    points: Points = 5
    streak_every: int = Field(default=7, ge=0)
    streak_points: Points = 20


class ReviewRules(_Strict):
    points: Points = 50
    featured_multiplier: Num = Decimal(2)
    suggestion_points: Points = 200


class ShareRules(_Strict):
    points: Points = 100
    likes_threshold: int | None = Field(default=10, ge=1)
    pays_on_approval: bool = True
    max_per_day: int | None = Field(default=3, ge=0)


class ReferralRules(_Strict):
    referrer_points: Points = 500
    new_member_points: Points = 500
    indirect_points: Points = 50


class Campaign(_Strict):
    name: str = Field(min_length=1)
    starts_at: When
    ends_at: When
    multiplier: Num
    store_ids: list[str] | None = None
    project_codes: list[str] | None = None

    @model_validator(mode="after")
    def _window(self) -> Campaign:
        if self.ends_at <= self.starts_at:
            raise ValueError("ends_at must be after starts_at")
        return self


class EngagementRules(_Strict):
    daily_cap: Points | None = 200
    burst_max_events: int | None = Field(default=20, ge=1)
    burst_window_seconds: int = Field(default=60, ge=1, le=MAX_BURST_WINDOW_S)


class RedemptionRules(_Strict):
    min_balance: Points = 500
    points_per_cny: dict[Tier, Points] = Field(default_factory=lambda: dict(_CASH_RATES))
    catalogue: dict[str, Points] = Field(
        default_factory=lambda: {
            "face-mask": 500,
            "neck-shoulder-massage": 3000,
            "free-facial": 5000,
            "priority-booking": 2000,
            "skincare-plan": 5000,
            "device-treatment": 20000,
            "lucky-draw": 100,
        }
    )


class ExpiryRules(_Strict):
    """`lot_lifetime_months` is the ledger's: a grant's points live as long as the version
    that priced it says. The ledger's expiry sweep warns 30 and 7 days ahead for every
    version alike (`publish_problems` refuses other days)."""

    lot_lifetime_months: int = Field(default=12, ge=1, le=MAX_MONTHS)
    warn_days_before: list[int] = Field(default_factory=lambda: [30, 7])


class RuleIds(_Strict):
    """Stable names that reports group by; renaming one splits history in two."""

    base: str = "base"
    big_ticket: str = "big_ticket"
    first_purchase: str = "first_purchase"
    new_project: str = "new_project"
    combo: str = "combo"
    on_time_visit: str = "on_time_visit"
    punctuality_streak: str = "punctuality_streak"
    sign_in: str = "sign_in"
    sign_in_streak: str = "sign_in_streak"
    review: str = "review"
    featured_review: str = "featured_review"
    suggestion_adopted: str = "suggestion_adopted"
    share: str = "share"
    referral_referrer: str = "referral_referrer"
    referral_new_member: str = "referral_new_member"
    referral_indirect: str = "referral_indirect"
    tier: str = "tier"

    @model_validator(mode="after")
    def _distinct(self) -> Self:
        """Payouts and grant ids are keyed by rule id: two rules under one id would
        overwrite each other's points (a bonus replacing the base)."""
        by_id: dict[str, list[str]] = {}
        for rule, rule_id in self.model_dump().items():
            by_id.setdefault(rule_id, []).append(rule)
        if "" in by_id:
            raise ValueError(f"rule ids must not be empty: {', '.join(by_id[''])}")
        shared = {i: rules for i, rules in by_id.items() if len(rules) > 1}
        if shared:
            raise ValueError(
                "rule ids must be distinct: "
                + "; ".join(f"{i!r} names {', '.join(r)}" for i, r in shared.items())
            )
        return self


class RuleSet(_Strict):
    version: str = Field(min_length=1)
    effective_from: When
    timezone: str = "Asia/Shanghai"
    pending_days: int = Field(default=0, ge=0, le=MAX_PENDING_DAYS)
    tiers: TierRules = TierRules()
    purchase: PurchaseRules = PurchaseRules()
    visit: VisitRules = VisitRules()
    sign_in: SignInRules = SignInRules()
    review: ReviewRules = ReviewRules()
    share: ShareRules = ShareRules()
    referral: ReferralRules = ReferralRules()
    campaigns: list[Campaign] = Field(default_factory=list)
    engagement: EngagementRules = EngagementRules()
    redemption: RedemptionRules = RedemptionRules()
    expiry: ExpiryRules = ExpiryRules()
    rule_ids: RuleIds = RuleIds()

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        # OSError: a name that is a directory of the zone database (`Asia`) or a file it
        # cannot read; it crashed `rules publish` instead of refusing the field.
        except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
            raise ValueError(f"unknown time zone {v!r}") from exc
        return v

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


@dataclass(frozen=True, slots=True)
class Derived:
    """Values the evaluator derives from a rule set on every event, computed once per set."""

    zone: ZoneInfo
    keep_months: int
    history_months: int  # forgotten orders' spend: keep_months plus a tier window
    burst_window: timedelta
    burst_reason: str
    min_booking_lead: timedelta
    grace: timedelta
    new_projects: frozenset[str]
    combos: tuple[tuple[frozenset[str], int], ...]


_DERIVED: dict[int, tuple[RuleSet, Derived]] = {}


def derived(ruleset: RuleSet) -> Derived:
    """Rule sets are immutable, so what they imply is cached by identity (few sets per run)."""
    known = _DERIVED.get(id(ruleset))
    if known is not None and known[0] is ruleset:
        return known[1]
    eng = ruleset.engagement
    value = Derived(
        zone=ruleset.zone,
        keep_months=max(ruleset.tiers.window_months, ruleset.expiry.lot_lifetime_months),
        history_months=max(ruleset.tiers.window_months, ruleset.expiry.lot_lifetime_months)
        + ruleset.tiers.window_months,
        burst_window=timedelta(seconds=eng.burst_window_seconds),
        burst_reason=(
            f"more than {eng.burst_max_events} engagement events in {eng.burst_window_seconds}s"
        ),
        min_booking_lead=timedelta(hours=float(ruleset.visit.min_booking_lead_hours)),
        grace=timedelta(minutes=float(ruleset.visit.grace_minutes)),
        new_projects=frozenset(ruleset.purchase.new_projects),
        combos=tuple((frozenset(c.projects), c.points) for c in ruleset.purchase.combos),
    )
    if len(_DERIVED) > 64:  # rule sets are few; bound the cache anyway
        _DERIVED.clear()
    _DERIVED[id(ruleset)] = (ruleset, value)
    return value


def _readable(exc: ValidationError, origin: str) -> str:
    lines = [f"rule set {origin} refused:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


def parse_ruleset(data: Any, origin: str = "<data>") -> RuleSet:
    if not isinstance(data, dict):
        raise RuleSetError(f"rule set {origin} refused: the document must be a mapping")
    try:
        return RuleSet.model_validate(data)
    except ValidationError as exc:
        raise RuleSetError(_readable(exc, origin)) from exc


def load_ruleset(path_or_text: str | Path, *, allow_duplicate_keys: bool = False) -> RuleSet:
    """A Path, or a str naming an existing .yaml/.yml file, is read; any other str is YAML.

    ``allow_duplicate_keys`` is for bodies already published: one stored before keys
    given twice were refused loads as it was accepted then (the last one counts), so the
    services still start.
    """
    origin = "<text>"
    text: str
    if isinstance(path_or_text, Path):
        origin = str(path_or_text)
        text = read_ruleset_file(path_or_text)
    elif (
        "\n" not in path_or_text
        and path_or_text.endswith((".yaml", ".yml"))
        and _is_file(path_or_text)
    ):
        origin = path_or_text
        text = read_ruleset_file(Path(path_or_text))
    else:
        text = path_or_text
    loader = yaml.SafeLoader if allow_duplicate_keys else _UniqueKeyLoader
    try:
        data = yaml.load(text, Loader=loader)  # both are SafeLoaders
    except DuplicateKey as exc:
        raise RuleSetError(f"rule set {origin} refused: {exc}") from exc
    except yaml.YAMLError as exc:
        raise RuleSetError(f"rule set {origin} refused: not valid YAML: {exc}") from exc
    return parse_ruleset(data, origin)


def read_ruleset_file(path: Path) -> str:
    """The file's text; one that is not UTF-8 (saved as GBK by an editor) or cannot be
    read is a `RuleSetError` naming it, not a traceback."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RuleSetError(
            f"rule set {path} refused: not UTF-8 (byte 0x{exc.object[exc.start]:02x} at"
            f" offset {exc.start}); save it as UTF-8"
        ) from exc
    except OSError as exc:
        raise RuleSetError(f"rule set {path}: cannot be read: {exc.strerror or exc}") from exc


class DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """Refuses a key given twice in one mapping. PyYAML keeps the last one silently, so a
    second `tiers:` pasted lower down, meant to change one threshold, replaced the whole
    section (the other tiers gone, the multipliers back to their defaults)."""

    def construct_document(self, node: yaml.Node) -> Any:
        _refuse_duplicates(self, node, (), set())
        return super().construct_document(node)


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _refuse_duplicates(
    loader: yaml.SafeLoader, node: yaml.Node, path: tuple[str, ...], seen: set[int]
) -> None:
    if id(node) in seen:  # an alias: checked where its anchor is (and no endless loop)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[object, yaml.Node] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<: *base`: keys given beside it override it
                continue
            key = loader.construct_object(key_node, deep=True)
            try:
                earlier = first.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the constructor refuses it itself
                continue
            where = ".".join((*path, str(key)))
            if earlier is not key_node:
                raise DuplicateKey(
                    f"{where}: key given twice (lines {earlier.start_mark.line + 1} and"
                    f" {key_node.start_mark.line + 1}); only the last would count"
                )
            _refuse_duplicates(loader, value_node, (*path, str(key)), seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicates(loader, item, (*path, str(i)), seen)


def _is_file(name: str) -> bool:
    """A one-line flow-style body may end in ".yaml" too (a comment naming its source)."""
    try:
        return Path(name).is_file()
    except (OSError, ValueError):  # a name too long, or with a NUL, is no file
        return False


def publish_problems(ruleset: RuleSet) -> list[str]:
    """What the ledger cannot honour in a rule set, checked when a version is published.

    Kept out of the models' validation on purpose: a version published before a check
    existed must still load (the services would not start otherwise); only new versions
    are held to it.
    """
    problems = []
    try:  # stored as UTC: 9999-12-31T23:00:00-10:00 is a moment in year 10000
        ruleset.effective_from.astimezone(UTC)
    except OverflowError:
        problems.append(
            f"effective_from: {ruleset.effective_from.isoformat()} is out of range"
            " (years 1 to 9999 in UTC)"
        )
    if sorted(ruleset.expiry.warn_days_before, reverse=True) != [30, 7]:
        problems.append(
            "expiry.warn_days_before: the ledger warns 30 and 7 days before points expire;"
            " other warning days are not supported yet (give [30, 7] or leave the key out)"
        )
    rates = ruleset.redemption.points_per_cny
    missing = [t for t in ("member", "silver", "gold", "diamond") if t not in rates]
    if missing:
        problems.append(f"redemption.points_per_cny: missing tiers {missing}")
    zero = sorted(t for t, rate in rates.items() if rate <= 0)
    if zero:
        problems.append(f"redemption.points_per_cny: rates must be above 0 (not for {zero})")
    free = sorted(code for code, points in ruleset.redemption.catalogue.items() if points <= 0)
    if free:
        problems.append(f"redemption.catalogue: points must be above 0 (not for {free})")
    return problems


class RuleBook:
    """Every published version, so a replay prices each event by the rules of its time."""

    def __init__(self, versions: Iterable[RuleSet]) -> None:
        ordered = sorted(versions, key=lambda r: r.effective_from)
        if not ordered:
            raise RuleSetError("a rule book needs at least one rule set")
        seen: set[str] = set()
        for r in ordered:
            if r.version in seen:
                raise RuleSetError(f"rule set version {r.version!r} appears twice")
            seen.add(r.version)
        self._versions: tuple[RuleSet, ...] = tuple(ordered)
        self._starts = [r.effective_from for r in ordered]

    @property
    def versions(self) -> Sequence[RuleSet]:
        return self._versions

    def at(self, occurred_at: datetime) -> RuleSet:
        """The version in force at event time; events before the first use the first."""
        i = bisect.bisect_right(self._starts, occurred_at) - 1
        return self._versions[max(i, 0)]

    def tiers_at(self, moment: datetime) -> TierRules:
        """The tier rules in force at `moment` (`tiers.TiersAt`)."""
        return self.at(moment).tiers

    def span(self, occurred_at: datetime) -> tuple[RuleSet, datetime | None, datetime | None]:
        """`at(occurred_at)` with the times it is in force from (inclusive; None: from the
        beginning) and until (exclusive; None: no later version), for callers that cache."""
        starts = self._starts
        i = max(bisect.bisect_right(starts, occurred_at) - 1, 0)
        since = starts[i] if i > 0 else None
        until = starts[i + 1] if i + 1 < len(starts) else None
        return self._versions[i], since, until
