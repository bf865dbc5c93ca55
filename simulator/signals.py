"""What a simulated sensor reads: one signal per metric, generated a batch at a time.

Kinds: `sine` (a daily-style cycle with gaussian noise: temperature), `walk` (a bounded random
walk: pressure), `counter` (monotonic, increments proportional to elapsed time: energy) and `step`
(holds a level, jumps to another now and then: a set point, a door). Each device gets its own
`random.Random` seeded from (seed, device id), so the same seed gives the same values for the
same timestamps, whatever else runs. Values are rounded to `decimals` (sensors have a
resolution, and short numbers make short payloads); -0.0 is folded to 0.0 so a stored value
compares bit for bit with the one sent.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

TWO_PI: Final = 2.0 * math.pi


class SignalKind(StrEnum):
    SINE = "sine"
    WALK = "walk"
    COUNTER = "counter"
    STEP = "step"


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric of a simulated device: its name, signal and range."""

    name: str
    signal: SignalKind
    min: float = 0.0
    max: float = 100.0
    noise: float = 0.0  # sine: std-dev of the gaussian noise
    period_s: float = 86_400.0  # sine: length of one cycle
    step: float = 1.0  # walk: std-dev of one step per second; counter: mean increase per second
    change_per_s: float = 0.01  # step: chance per second of jumping to another level
    levels: tuple[float, ...] = ()  # step: the levels it jumps between (default: min and max)
    dropout: float = 0.0  # chance that a message lacks this reading
    decimals: int = 3


DEFAULT_METRICS: Final = (
    MetricSpec("temperature", SignalKind.SINE, min=15.0, max=25.0, noise=0.2, decimals=2),
    MetricSpec("humidity", SignalKind.SINE, min=30.0, max=70.0, noise=1.0, period_s=43_200.0),
    MetricSpec("pressure", SignalKind.WALK, min=980.0, max=1040.0, step=0.05, decimals=2),
    MetricSpec("energy_wh", SignalKind.COUNTER, min=0.0, max=0.0, step=0.5, decimals=3),
    MetricSpec("setpoint", SignalKind.STEP, levels=(18.0, 20.5, 22.0), change_per_s=0.002),
)


class Signal:
    """The state of one metric on one device; `values` continues it over a list of times."""

    __slots__ = ("_last_t", "_phase", "_spec", "_state")

    def __init__(self, spec: MetricSpec, rng: random.Random) -> None:
        self._spec = spec
        self._phase = rng.uniform(0.0, TWO_PI)
        self._last_t: float | None = None
        lo, hi = spec.min, spec.max
        if spec.signal is SignalKind.WALK:
            self._state = rng.uniform(lo + (hi - lo) * 0.25, hi - (hi - lo) * 0.25)
        elif spec.signal is SignalKind.COUNTER:
            self._state = lo + rng.uniform(0.0, 1000.0) * spec.step
        elif spec.signal is SignalKind.STEP:
            self._state = rng.choice(self.levels)
        else:
            self._state = 0.0

    @property
    def spec(self) -> MetricSpec:
        return self._spec

    @property
    def levels(self) -> tuple[float, ...]:
        return self._spec.levels or (self._spec.min, self._spec.max)

    def values(self, times_s: Sequence[float], rng: random.Random) -> list[float]:
        """The readings at `times_s` (seconds, increasing), continuing from the last call."""
        spec = self._spec
        kind = spec.signal
        if kind is SignalKind.SINE:
            out = self._sine(times_s, rng)
        elif kind is SignalKind.WALK:
            out = self._walk(times_s, rng)
        elif kind is SignalKind.COUNTER:
            out = self._counter(times_s, rng)
        else:
            out = self._step(times_s, rng)
        if times_s:
            self._last_t = times_s[-1]
        nd = spec.decimals
        return [round(v, nd) + 0.0 for v in out]

    def _gaps(self, times_s: Sequence[float]) -> list[float]:
        prev = self._last_t if self._last_t is not None else (times_s[0] if times_s else 0.0)
        return [b - a for a, b in zip([prev, *times_s], times_s, strict=False)]

    def _sine(self, times_s: Sequence[float], rng: random.Random) -> list[float]:
        spec = self._spec
        mid = (spec.max + spec.min) / 2.0
        amp = (spec.max - spec.min) / 2.0
        w = TWO_PI / spec.period_s
        ph = self._phase
        sin, rnd = math.sin, rng.random
        if spec.noise:
            k = 2.0 * spec.noise  # see `_normal`: the sum of 3 uniforms minus 1.5 has std-dev 1/2
            return [
                mid + amp * sin(w * t + ph) + k * (rnd() + rnd() + rnd() - 1.5) for t in times_s
            ]
        return [mid + amp * sin(w * t + ph) for t in times_s]

    def _walk(self, times_s: Sequence[float], rng: random.Random) -> list[float]:
        spec = self._spec
        lo, hi, x = spec.min, spec.max, self._state
        rnd, sqrt, k = rng.random, math.sqrt, 2.0 * spec.step
        out = []
        for dt in self._gaps(times_s):
            x += k * sqrt(dt) * (rnd() + rnd() + rnd() - 1.5)
            if x < lo:  # reflect at the bounds
                x = min(2 * lo - x, hi)
            elif x > hi:
                x = max(2 * hi - x, lo)
            out.append(x)
        self._state = x
        return out

    def _counter(self, times_s: Sequence[float], rng: random.Random) -> list[float]:
        x, rate, uniform = self._state, self._spec.step, rng.uniform
        out = []
        for dt in self._gaps(times_s):
            x += uniform(0.0, 2.0 * rate * dt)
            out.append(x)
        self._state = x
        return out

    def _step(self, times_s: Sequence[float], rng: random.Random) -> list[float]:
        x, p, levels, random_ = self._state, self._spec.change_per_s, self.levels, rng.random
        out = []
        for dt in self._gaps(times_s):
            if dt and random_() < 1.0 - (1.0 - min(p, 1.0)) ** dt:
                x = rng.choice(levels)
            out.append(x)
        self._state = x
        return out


def device_rng(seed: int, device_id: str, stream: str = "values") -> random.Random:
    """A generator of its own per (seed, device, purpose): reproducible and independent."""
    return random.Random(f"{seed}:{device_id}:{stream}")
