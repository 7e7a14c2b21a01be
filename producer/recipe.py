"""A mixture's declared recipe: a weight schedule over tokens, and per-source limits.

`mix.toml` may declare, beside its sources (config.py reads the file):

    [schedule]                      # weights as a function of the tokens the stream mixed
    tokens = [0, 8e11, 1e12]        # breakpoints, increasing (before the first: its row)
    web = [0.7, 0.7, 0.4]           # one list per source, one weight per breakpoint
    code = [0.3, 0.3, 0.6]
    interpolate = "linear"          # or "step" (a row holds until the next breakpoint)

and per source `repeat = k`, `max_tokens = N`, `max_documents = N` (`Limits`).

A `Curve` is parsed once (from TOML by the daemon, from JSON out of a saved state) and
travels in the stream's MixState, so a resume replays with the schedule it was saved
with. The mixer (mixer.py) follows it by *cumulative* targets: at `x` tokens mixed,
source s should have taken `cumulative(x)[s]` = the integral of its weight from 0 to x
(piecewise quadratic under "linear", piecewise linear under "step"). Rows are normalized
to sum to 1, so the targets of all sources sum to x. Everything is computed from
integers and the stored floats in one fixed order: a replay gives the same choices.

Failure behaviour: a malformed schedule or limit is a ConfigError (from the file) or a
StateMismatchError (from a state) naming the key and what to write instead.
"""

from __future__ import annotations

import math
import os
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from tokenfeed.common.errors import ConfigError, StateMismatchError

INTERPOLATIONS = ("linear", "step")
Segment = tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]  # area, a, b
MAX_BREAKPOINTS = 1000
MAX_TOKENS = 1 << 62  # token counts and budgets: exact integers, far past any run


@dataclass(frozen=True)
class Curve:
    """Weights of `names` (sorted) at each breakpoint of `tokens`, rows summing to 1."""

    names: tuple[str, ...]
    tokens: tuple[int, ...]
    rows: tuple[tuple[float, ...], ...]
    interpolate: str = "linear"
    # the integral of every source's weight from 0 to each breakpoint
    _areas: tuple[tuple[float, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        areas = [tuple(self.tokens[0] * w for w in self.rows[0])]
        for k in range(len(self.tokens) - 1):
            span = self.tokens[k + 1] - self.tokens[k]
            a, b = self.rows[k], self.rows[k + 1]
            if self.interpolate == "step":
                seg = [span * wa for wa in a]
            else:
                seg = [span * (wa + wb) / 2 for wa, wb in zip(a, b, strict=True)]
            areas.append(tuple(p + s for p, s in zip(areas[-1], seg, strict=True)))
        object.__setattr__(self, "_areas", tuple(areas))

    def segment(self, x: int) -> tuple[int, float, Segment]:
        """The piece of the schedule holding `x`: from `lo` to `hi` tokens, every source's
        weight is `a + 2 * b * (x - lo)` and its target `area + (x - lo) * (a + b * (x - lo))`
        (one formula for weights, targets and the mixer, which keeps a segment while
        x stays in it)."""
        k = bisect_right(self.tokens, x) - 1  # -1: before the first breakpoint
        if k < 0:
            zero = tuple(0.0 for _ in self.names)
            return 0, float(self.tokens[0]), (zero, self.rows[0], zero)
        last = k == len(self.tokens) - 1
        hi = math.inf if last else float(self.tokens[k + 1])
        if last or self.interpolate == "step":
            return self.tokens[k], hi, (self._areas[k], self.rows[k],
                                        tuple(0.0 for _ in self.names))
        span = self.tokens[k + 1] - self.tokens[k]
        b = tuple((wb - wa) / (2 * span) for wa, wb in zip(self.rows[k], self.rows[k + 1],
                                                           strict=True))
        return self.tokens[k], hi, (self._areas[k], self.rows[k], b)

    def weights(self, x: int) -> list[float]:
        """Every source's weight at `x` tokens mixed."""
        lo, _, (_, a, b) = self.segment(x)
        dx = x - lo
        return [ai + 2 * bi * dx for ai, bi in zip(a, b, strict=True)]

    def cumulative(self, x: int) -> list[float]:
        """Every source's target tokens at `x` tokens mixed: its weight's integral."""
        lo, _, (area, a, b) = self.segment(x)
        dx = x - lo
        return [ci + dx * (ai + bi * dx) for ci, ai, bi in zip(area, a, b, strict=True)]

    def to_json(self) -> dict[str, Any]:
        return {"tokens": list(self.tokens), "interpolate": self.interpolate,
                "weights": {n: [r[i] for r in self.rows] for i, n in enumerate(self.names)}}

    def describe(self) -> str:
        return (f"tokens {list(self.tokens)}, " + ", ".join(
            f"{n} {[round(r[i], 6) for r in self.rows]}" for i, n in enumerate(self.names))
            + f", {self.interpolate}")

    @classmethod
    def parse(cls, d: Any) -> Curve:
        """A schedule from a saved state."""
        try:
            if not isinstance(d, dict):
                raise ConfigError("it is not a map")
            return cls.build(d.get("tokens"), d.get("weights"), d.get("interpolate"))
        except ConfigError as e:
            raise StateMismatchError(f"mixture state's schedule: {e}; pass the feed state "
                                     "unchanged") from None

    @classmethod
    def from_toml(cls, table: Any, names: list[str]) -> Curve:
        """`[schedule]` of a mix file whose sources are `names`."""
        if not isinstance(table, dict):
            raise ConfigError("[schedule] must be a table")
        keys = dict(table)
        tokens, interpolate = keys.pop("tokens", None), keys.pop("interpolate", "linear")
        unknown = sorted(set(keys) - set(names))
        if unknown:
            raise ConfigError(f"[schedule] names {unknown}, which are not sources "
                              f"({', '.join(names)})")
        missing = sorted(set(names) - set(keys))
        if missing:
            raise ConfigError(f"[schedule] gives no weights for {missing}; write one list per "
                              "source, e.g. code = [0.3, 0.6] (0 for none)")
        return cls.build(tokens, keys, interpolate)

    @classmethod
    def build(cls, tokens: Any, weights: Any, interpolate: Any) -> Curve:
        if interpolate not in INTERPOLATIONS:
            raise ConfigError(f"interpolate = {interpolate!r} must be \"linear\" or \"step\"")
        if not (isinstance(tokens, list) and 1 <= len(tokens) <= MAX_BREAKPOINTS):
            raise ConfigError(f"tokens = {str(tokens)[:80]} must be a list of 1 to "
                              f"{MAX_BREAKPOINTS} token counts, e.g. [0, 8e11, 1e12]")
        xs = []
        for t in tokens:
            if (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)
                    or t < 0 or t != int(t) or t >= MAX_TOKENS):
                raise ConfigError(f"tokens = {str(tokens)[:80]}: {t!r} is not a whole token "
                                  "count >= 0")
            xs.append(int(t))
        if any(b <= a for a, b in pairwise(xs)):
            raise ConfigError(f"tokens = {str(tokens)[:80]} must increase strictly")
        if not isinstance(weights, dict) or not weights:
            raise ConfigError("the schedule names no source")
        names = sorted(weights)
        for n in names:
            ws = weights[n]
            if not (isinstance(ws, list) and len(ws) == len(xs) and all(
                    isinstance(w, (int, float)) and not isinstance(w, bool)
                    and math.isfinite(w) and w >= 0 for w in ws)):
                raise ConfigError(f"{n} = {str(ws)[:80]} must be {len(xs)} weights >= 0, one "
                                  "per entry of tokens")
        rows = []
        for k in range(len(xs)):
            row = [float(weights[n][k]) for n in names]
            total = sum(row)
            if not total > 0:
                raise ConfigError(f"at tokens = {xs[k]} every weight is 0; give a source > 0")
            rows.append(tuple(w / total for w in row))
        return cls(tuple(names), tuple(xs), tuple(rows), interpolate)


LIMIT_KEYS = ("repeat", "max_tokens", "max_documents")


@dataclass(frozen=True)
class Limits:
    """When a source of a mixture is done: after `repeat` passes (epochs) over its data,
    or once it gave `max_tokens` tokens / `max_documents` documents (None: no bound)."""

    repeat: int | None = None
    max_tokens: int | None = None
    max_documents: int | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.repeat, self.max_tokens, self.max_documents))

    def to_json(self) -> dict[str, int]:
        return {k: v for k in LIMIT_KEYS if (v := getattr(self, k)) is not None}

    def describe(self) -> str:
        return ", ".join(f"{k} = {v}" for k, v in self.to_json().items())

    @classmethod
    def build(cls, table: Mapping[str, Any], where: str) -> Limits:
        values: dict[str, int] = {}
        for key in LIMIT_KEYS:
            v = table.get(key)
            if v is None:
                continue
            if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                    or v != int(v) or not 1 <= v < MAX_TOKENS):
                raise ConfigError(f"{where}.{key} = {v!r} must be a whole number >= 1")
            values[key] = int(v)
        return cls(**values)

    @classmethod
    def parse(cls, d: Any) -> Limits:
        """A source's limits from a saved state."""
        try:
            if not isinstance(d, dict) or set(d) - set(LIMIT_KEYS):
                raise ConfigError(f"{str(d)[:80]} is not a map of {', '.join(LIMIT_KEYS)}")
            return cls.build(d, "limits")
        except ConfigError as e:
            raise StateMismatchError(f"mixture state's limits: {e}; pass the feed state "
                                     "unchanged") from None


def parse_limits(d: Any, names: tuple[str, ...]) -> dict[str, Limits]:
    """Every source's limits from a saved state (sources it lacks: none)."""
    if not isinstance(d, dict) or not set(d) <= set(names):
        raise StateMismatchError("mixture state's 'limits' must map its sources to limits; "
                                 "pass the feed state unchanged")
    return {n: Limits.parse(d[n]) for n in sorted(d)}


def check_disjoint(files: Mapping[str, list[str]]) -> None:
    """No file in two sources (a symlinked or repeated folder would mix its documents
    twice): `files` maps each source to its shard paths."""
    seen: dict[str, str] = {}
    for name, paths in files.items():
        for path in paths:
            key = path if "://" in path else os.path.realpath(path)
            other = seen.setdefault(key, name)
            if other != name:
                raise ConfigError(f"file {path} is in sources {other} and {name}; a document "
                                  "would be mixed twice: give each source its own files")
