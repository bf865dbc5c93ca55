"""Whether the live phase kept its schedule, and when not, whether the simulator or the gateway
was the limit.

A run measures the gateway only while the simulator sends on time. Each sender process records:

- send lag: for every live batch, how long after its planned time (grid time plus jitter) the
  device task got to send it. It grows when the device is still waiting for the gateway's answer
  to its previous batch or for a free connection (the gateway is slow or refusing), and when the
  event loop runs late (the simulator is out of CPU).
- loop lag: how late a timer that should fire every 25 ms fires. It grows only when the event
  loop has more ready work than it can run (the process is out of CPU, or the machine gives it
  too little); a loop that is waiting on a slow gateway is idle and on time.
- CPU: the process's CPU time over the live phase's wall time (near 1.0: one core used up),
  and how busy the machine's CPUs were (Linux: /proc/stat), for a gateway on the same machine.

The criterion (`verdict`): the run *fell behind* when the 99th percentile of send lag is above
`BEHIND_LAG_MS`. Then:

1. the *simulator* was the limit when any sender process's loop lag had a 90th percentile above
   `LOOP_LAG_MS` or it used `FULL_CORE` of a core (it could not run its own work on time, so its
   latencies are inflated too; more `--processes` or a machine of its own);
2. else the *machine* when its CPUs were `MACHINE_BUSY` busy (the simulator shares them with
   whatever else runs there, the gateway too when it is local: neither alone is the limit);
3. else the *gateway* (the simulator was mostly idle, waiting for answers).

A run that did not fall behind names no limit: it offered what was asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from array import array
from dataclasses import dataclass, field
from typing import Any, Final

from simulator.report import percentile

BEHIND_LAG_MS: Final = 250.0  # p99 send lag above this: the live phase fell behind
LOOP_LAG_MS: Final = 20.0  # p90 loop lag above this: the sender's event loop was saturated
FULL_CORE: Final = 0.9  # CPU time / wall time of a sender at or above this: it used a core up
MACHINE_BUSY: Final = 0.95  # the machine's CPUs busy at least this share of the live phase
LOOP_TICK_S: Final = 0.025


def _machine_cpu() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot; None where /proc/stat is not there."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


@dataclass(slots=True)
class ProcessSchedule:
    """One sender process's record of its live phase (merged in the parent)."""

    lag_ms: array[float] = field(default_factory=lambda: array("d"))
    loop_lag_ms: array[float] = field(default_factory=lambda: array("d"))
    planned: int = 0  # batches the live phase planned
    sent: int = 0  # of those, batches sent (a stopped run sends fewer)
    window_s: float = 0.0  # the planned live window (first device start to last grid time)
    wall_s: float = 0.0  # the live phase as it happened
    cpu_s: float = 0.0
    machine_busy: float | None = None  # share of the machine's CPU time busy (all processes)

    @contextlib.asynccontextmanager
    async def watching(self) -> Any:
        """Measure loop lag and CPU while the live phase runs."""
        started, cpu, machine = time.monotonic(), time.process_time(), _machine_cpu()
        task = asyncio.create_task(self._tick(), name="loop-lag")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.wall_s = time.monotonic() - started
            self.cpu_s = time.process_time() - cpu
            after = _machine_cpu()
            if machine is not None and after is not None and after[1] > machine[1]:
                self.machine_busy = (after[0] - machine[0]) / (after[1] - machine[1])

    async def _tick(self) -> None:
        lags = self.loop_lag_ms
        clock = time.perf_counter
        while True:
            t = clock()
            await asyncio.sleep(LOOP_TICK_S)
            lags.append(max(0.0, (clock() - t - LOOP_TICK_S) * 1000.0))

    def summary(self) -> dict[str, float]:
        loop = sorted(self.loop_lag_ms)
        return {
            "loop_lag_p90_ms": round(percentile(loop, 90), 1),
            "loop_lag_max_ms": round(loop[-1], 1) if loop else 0.0,
            "cpu_share": round(self.cpu_s / self.wall_s, 2) if self.wall_s > 0 else 0.0,
            "cpu_s": round(self.cpu_s, 2),
            "send_lag_p99_ms": round(percentile(sorted(self.lag_ms), 99), 1),
            "machine_busy": round(self.machine_busy, 2) if self.machine_busy is not None else -1.0,
        }


def _judge(
    lag_p99: float,
    per_process: list[dict[str, float]],
    *,
    latency_p99_ms: float,
    retries: int,
    errors: int,
) -> tuple[str | None, str]:
    """(limit, why) of a run that had a live phase (the criterion in the module docstring)."""
    worst_loop = max((s["loop_lag_p90_ms"] for s in per_process), default=0.0)
    cpu = max((s["cpu_share"] for s in per_process), default=0.0)
    machine = max((s["machine_busy"] for s in per_process), default=-1.0)
    late = f"sends fell behind schedule (lag p99 {lag_p99:,.0f} ms)"
    if lag_p99 <= BEHIND_LAG_MS:
        return None, f"kept its schedule (send lag p99 {lag_p99:,.0f} ms)"
    if worst_loop > LOOP_LAG_MS or cpu >= FULL_CORE:
        return "simulator", (
            f"the simulator was the limit: {late} as a sender ran out of CPU (event loop late"
            f" by p90 {worst_loop:,.0f} ms; CPU {cpu:.0%} of a core); add --processes, or give"
            " it a machine of its own"
        )
    if machine >= MACHINE_BUSY:
        return "machine", (
            f"the machine's CPUs were the limit: {late} with its CPUs {machine:.0%} busy; the"
            f" simulator (up to {cpu:.0%} of a core a sender, loop late by p90"
            f" {worst_loop:,.0f} ms) shares them with whatever else runs there (the gateway"
            " too, if it is local)"
        )
    signs = [f"latency p99 {latency_p99_ms:,.0f} ms"]
    if retries:
        signs.append(f"{retries:,} retries (503 or connection errors)")
    if errors:
        signs.append(f"{errors:,} errors")
    return "gateway", (
        f"the gateway was the limit: {late} while the simulator's event loop was on time"
        f" (p90 {worst_loop:,.0f} ms); {', '.join(signs)}"
    )


def verdict(
    processes: list[ProcessSchedule],
    *,
    latency_p99_ms: float,
    retries: int,
    errors: int,
    interrupted: bool = False,
) -> dict[str, Any]:
    """The report's `schedule` block: the figures and who was the limit (module docstring)."""
    lags = sorted(x for p in processes for x in p.lag_ms)
    per_process = [p.summary() for p in processes]
    planned = sum(p.planned for p in processes)
    sent = sum(p.sent for p in processes)
    window = max((p.window_s for p in processes), default=0.0)
    wall = max((p.wall_s for p in processes), default=0.0)
    lag_p99 = percentile(lags, 99)
    limit: str | None = None
    if lags:
        limit, why = _judge(
            lag_p99, per_process, latency_p99_ms=latency_p99_ms, retries=retries, errors=errors
        )
        if interrupted and limit is None:
            why += " (until stopped)"
    else:
        why = "no live phase: no schedule to keep"
    return {
        "behind": limit is not None,
        "limit": limit,
        "why": why,
        "processes": len(processes),
        "planned_batches": planned,
        "sent_batches": sent,
        "planned_batches_per_s": round(planned / window, 1) if window > 0 else 0.0,
        "offered_batches_per_s": round(sent / wall, 1) if wall > 0 else 0.0,
        # the senders' CPU per batch sent live (what one more process buys is a core of this)
        "cpu_us_per_batch": round(sum(p.cpu_s for p in processes) / sent * 1e6, 1) if sent else 0.0,
        "send_lag_ms": {
            "p50": round(percentile(lags, 50), 1),
            "p99": round(lag_p99, 1),
            "max": round(lags[-1], 1) if lags else 0.0,
        },
        "per_process": per_process,
        "criterion": (
            f"behind when send lag p99 > {BEHIND_LAG_MS:.0f} ms; then the simulator was the"
            f" limit when a sender's loop lag p90 > {LOOP_LAG_MS:.0f} ms or its CPU >="
            f" {FULL_CORE:.0%} of a core, else the machine when its CPUs were >="
            f" {MACHINE_BUSY:.0%} busy, else the gateway"
        ),
    }
