"""Which generations a retention policy keeps: a pure function of their numbers and times.

The rules are restic's (``restic forget``), so that each can be explained in one line:

* the newest generation (the highest number, the image's current state) is always kept;
* ``last N`` keeps the N newest generations (by number: commit order);
* ``hourly/daily/weekly/monthly/yearly N`` keeps, for each of the N most recent hours
  (days, ISO weeks starting on Monday, months, years) that hold a generation, the newest
  generation of that period; periods without a generation do not count;
* ``within D`` keeps every generation committed at most D seconds before the newest one
  (relative to the newest generation, not to the clock: backups that stop do not make
  history expire);
* the rules are independent and combine as a union: a generation is kept when any rule keeps
  it, and one generation may fill a slot of several rules. So a policy with larger numbers
  keeps a superset, and the union of two policies (a server's floor and a client's request)
  is the policy of their maxima.

Periods are calendar periods in local time (``localtime`` below: the machine that applies the
policy, the one holding the image), from each generation's commit time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

#: The period rules, oldest option first: name -> the period of a local time.
PERIODS: dict[str, Callable[[time.struct_time], tuple[int, ...]]] = {
    "hourly": lambda t: (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour),
    "daily": lambda t: (t.tm_year, t.tm_mon, t.tm_mday),
    "weekly": lambda t: _iso_week(t),
    "monthly": lambda t: (t.tm_year, t.tm_mon),
    "yearly": lambda t: (t.tm_year,),
}

_LABELS: dict[str, Callable[[tuple[int, ...]], str]] = {
    "hourly": lambda p: f"{p[0]:04}-{p[1]:02}-{p[2]:02} {p[3]:02}h",
    "daily": lambda p: f"{p[0]:04}-{p[1]:02}-{p[2]:02}",
    "weekly": lambda p: f"{p[0]:04}-W{p[1]:02}",
    "monthly": lambda p: f"{p[0]:04}-{p[1]:02}",
    "yearly": lambda p: f"{p[0]:04}",
}


def _iso_week(t: time.struct_time) -> tuple[int, int]:
    year, week = time.strftime("%G %V", t).split()
    return int(year), int(week)


@dataclass(frozen=True)
class Retention:
    """A retention policy: how many generations each rule keeps (0: rule off)."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: float = 0.0  # seconds before the newest generation

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"--keep-{f.name} must not be negative")

    @classmethod
    def keep_last(cls, n: int) -> Retention:
        return cls(last=n)

    @property
    def empty(self) -> bool:
        """No rule given (only the newest generation would be kept)."""
        return not any(getattr(self, f.name) for f in fields(self))

    def union(self, other: Retention) -> Retention:
        """The policy keeping what either keeps (rules are monotone: the maxima)."""
        return Retention(**{f.name: max(getattr(self, f.name), getattr(other, f.name))
                            for f in fields(self)})

    def covers(self, other: Retention) -> bool:
        """True when this policy keeps at least everything ``other`` keeps."""
        return self.union(other) == self

    def options(self) -> list[str]:
        """The command-line options that give this policy (``--keep-last 2 ...``)."""
        out: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value:
                out += [f"--keep-{f.name}", _seconds(value) if f.name == "within" else
                        str(value)]
        return out

    def describe(self) -> str:
        return " ".join(self.options()) or "(no rule: the newest generation only)"


def _seconds(value: float) -> str:
    """A duration as ``parse_duration`` reads it, in the largest unit that divides it."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if value >= size and value % size == 0:
            return f"{value / size:g}{unit}"
    return f"{value:g}s"


@dataclass(frozen=True)
class Verdict:
    """One generation's fate: kept (with every rule that keeps it) or pruned."""

    number: int
    time: float
    reasons: tuple[str, ...]

    @property
    def kept(self) -> bool:
        return bool(self.reasons)


def select(
    generations: Sequence[tuple[int, float]],
    policy: Retention,
    *,
    localtime: Callable[[float], time.struct_time] = time.localtime,
) -> list[Verdict]:
    """The verdict on each of ``generations`` ((number, commit time) pairs, any order), in
    the order given. Pure: the same input gives the same answer (``localtime`` is the only
    outside fact, and tests pass their own)."""
    if not generations:
        return []
    reasons: dict[int, list[str]] = {n: [] for n, _t in generations}
    by_number = sorted(generations, key=lambda g: g[0], reverse=True)
    reasons[by_number[0][0]].append("newest")
    for i, (n, _t) in enumerate(by_number[: policy.last]):
        reasons[n].append(f"last {i + 1}/{policy.last}")
    newest_time = max(t for _n, t in generations)
    if policy.within:
        for n, t in generations:
            if t >= newest_time - policy.within:
                reasons[n].append(f"within {_seconds(policy.within)} of the newest")
    by_time = sorted(generations, key=lambda g: (g[1], g[0]), reverse=True)
    for rule, period_of in PERIODS.items():
        count: int = getattr(policy, rule)
        seen: set[tuple[int, ...]] = set()
        for n, t in by_time:
            if len(seen) >= count:
                break
            period = period_of(localtime(t))
            if period in seen:
                continue
            seen.add(period)
            reasons[n].append(f"{rule} {_LABELS[rule](period)} ({len(seen)}/{count})")
    return [Verdict(n, t, tuple(reasons[n])) for n, t in generations]
