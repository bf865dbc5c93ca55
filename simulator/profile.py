"""A device profile: which metrics a simulated device has, their signals, ranges and dropouts.

A profile is TOML (read with tomllib) or JSON with the same shape:

    [device]
    outage = 0.001      # chance per message that the device goes silent ...
    outage_s = 30       # ... for this many seconds (a dropout of the whole device)

    [[metrics]]
    name = "temperature"
    signal = "sine"     # sine | walk | counter | step
    min = 15.0
    max = 25.0
    noise = 0.2         # sine: gaussian noise (std-dev)
    period_s = 86400    # sine: one cycle
    dropout = 0.01      # chance that a message lacks this reading

Other metric keys: `step` (walk: std-dev per second; counter: mean increase per second),
`change_per_s` and `levels` (step), `decimals` (rounding, default 3).
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final

from simulator.signals import DEFAULT_METRICS, MetricSpec, SignalKind

# The gateway's rule for metric names (1-64 of A-Z a-z 0-9 _ . : / -), restated: the simulator
# is an outside client and imports nothing of the gateway.
METRIC_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.:/\-]{1,64}")
_METRIC_KEYS: Final = frozenset(f.name for f in fields(MetricSpec))


class ProfileError(ValueError):
    """The profile file cannot be used; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Profile:
    metrics: tuple[MetricSpec, ...] = DEFAULT_METRICS
    outage: float = 0.0  # chance per message that the device goes silent
    outage_s: float = 30.0

    def with_dropout(self, dropout: float) -> Profile:
        """The same profile with `dropout` on every metric that has none of its own."""
        if not dropout:
            return self
        metrics = tuple(m if m.dropout else _replace(m, dropout=dropout) for m in self.metrics)
        return Profile(metrics, self.outage, self.outage_s)


def _replace(spec: MetricSpec, **changes: Any) -> MetricSpec:
    values = {f.name: getattr(spec, f.name) for f in fields(MetricSpec)}
    values.update(changes)
    return MetricSpec(**values)


def _probability(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ProfileError(f"{where} must be a number from 0 to 1, not {value!r}")
    return float(value)


def _metric(raw: Any, index: int) -> MetricSpec:
    where = f"metrics[{index}]"
    if not isinstance(raw, dict):
        raise ProfileError(f"{where} must be a table/object")
    unknown = sorted(set(raw) - _METRIC_KEYS)
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {', '.join(unknown)}")
    name = raw.get("name")
    if not isinstance(name, str) or not METRIC_NAME_RE.fullmatch(name):
        raise ProfileError(f"{where}.name must be 1-64 of A-Z a-z 0-9 _ . : / -, not {name!r}")
    try:
        signal = SignalKind(raw.get("signal", "sine"))
    except ValueError:
        kinds = ", ".join(k.value for k in SignalKind)
        raise ProfileError(f"{where}.signal must be one of {kinds}") from None
    values: dict[str, Any] = {"name": name, "signal": signal}
    for key in ("min", "max", "noise", "period_s", "step", "change_per_s"):
        if key in raw:
            v = raw[key]
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ProfileError(f"{where}.{key} must be a number, not {v!r}")
            values[key] = float(v)
    if "levels" in raw:
        levels = raw["levels"]
        if (
            not isinstance(levels, list)
            or not levels
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in levels)
        ):
            raise ProfileError(f"{where}.levels must be a non-empty list of numbers")
        values["levels"] = tuple(float(v) for v in levels)
    if "dropout" in raw:
        values["dropout"] = _probability(raw["dropout"], f"{where}.dropout")
    if "decimals" in raw:
        d = raw["decimals"]
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= 12:
            raise ProfileError(f"{where}.decimals must be an integer from 0 to 12")
        values["decimals"] = d
    spec = MetricSpec(**values)
    if spec.min > spec.max:
        raise ProfileError(f"{where}: min is above max")
    if spec.period_s <= 0:
        raise ProfileError(f"{where}.period_s must be positive")
    return spec


def parse_profile(doc: Any) -> Profile:
    """A Profile from a decoded TOML/JSON document."""
    if not isinstance(doc, dict):
        raise ProfileError("a profile is a table/object with `metrics` (and optional `device`)")
    unknown = sorted(set(doc) - {"metrics", "device"})
    if unknown:
        raise ProfileError(f"unknown top-level key(s): {', '.join(unknown)}")
    raw_metrics = doc.get("metrics")
    if not isinstance(raw_metrics, list) or not raw_metrics:
        raise ProfileError("`metrics` must be a non-empty list of metric tables")
    metrics = tuple(_metric(m, i) for i, m in enumerate(raw_metrics))
    names = [m.name for m in metrics]
    if len(set(names)) != len(names):
        raise ProfileError("metric names must be unique")
    device = doc.get("device", {})
    if not isinstance(device, dict) or set(device) - {"outage", "outage_s"}:
        raise ProfileError("`device` takes only outage and outage_s")
    outage = _probability(device.get("outage", 0.0), "device.outage")
    outage_s = device.get("outage_s", 30.0)
    if isinstance(outage_s, bool) or not isinstance(outage_s, int | float) or outage_s < 0:
        raise ProfileError("device.outage_s must be a non-negative number")
    return Profile(metrics, outage, float(outage_s))


def load_profile(path: Path) -> Profile:
    """Read a profile from a .toml or .json file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ProfileError(f"cannot read {path}: {exc.strerror}") from None
    try:
        if path.suffix.lower() == ".json":
            doc = json.loads(raw)
        else:
            doc = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProfileError(
            f"{path} is not valid {path.suffix.lstrip('.') or 'TOML'}: {exc}"
        ) from None
    try:
        return parse_profile(doc)
    except ProfileError as exc:
        raise ProfileError(f"{path}: {exc}") from None
