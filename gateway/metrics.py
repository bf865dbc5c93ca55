"""Prometheus metrics, declared once (served at /metrics).

With `serve --workers N` each worker process writes its metrics to files in the directory
PROMETHEUS_MULTIPROC_DIR names (prometheus_client's multiprocess mode; the parent makes it,
gateway/workers.py), and /metrics, answered by any one worker, reads them all (`exposition`):
counters and histograms are summed; each gauge says how its workers' values combine
(`multiprocess_mode`, ignored in one process): amounts held by each worker are summed over the
living ones (`livesum`), states are the worst living worker's (`livemin`: 0 if any is
disconnected), and figures of the shared store are the latest any worker measured
(`mostrecent`). Process metrics (`process_*`, `python_*`) are not served then: prometheus_client
cannot sum them.
"""

from __future__ import annotations

import glob
import os
import re

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

READINGS_ACCEPTED = Counter(
    "fieldgate_readings_accepted_total", "Readings stored (new rows)", ["transport"]
)
READINGS_DUPLICATE = Counter(
    "fieldgate_readings_duplicate_total", "Readings ignored as already stored", ["transport"]
)
READINGS_REJECTED = Counter(
    "fieldgate_readings_rejected_total",
    "Messages or readings rejected by validation, by code",
    ["transport", "code"],
)
HTTP_REQUESTS = Counter(
    "fieldgate_http_requests_total",
    "HTTP requests by route and status",
    ["method", "route", "status"],
)
WRITER_QUEUE_DEPTH = Gauge(
    "fieldgate_writer_queue_readings",
    "Readings waiting for the writer (accepted, not committed)",
    multiprocess_mode="livesum",
)
WRITER_BATCH_READINGS = Histogram(
    "fieldgate_writer_batch_readings",
    "Readings per commit",
    buckets=(1, 10, 50, 100, 500, 1_000, 2_000, 5_000, 10_000, 50_000),
)
WRITER_BATCH_REQUESTS = Histogram(
    "fieldgate_writer_batch_requests",
    "Write requests (HTTP requests / MQTT message groups) sharing one commit",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
WRITER_COMMIT_SECONDS = Histogram(
    "fieldgate_writer_commit_seconds",
    "Time to insert and commit one batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
STREAMS_OPEN = Gauge(
    "fieldgate_streams_open",
    "Live streams (SSE) open now",
    multiprocess_mode="livesum",
)
STREAM_EVENTS = Counter("fieldgate_stream_events_total", "Events sent on live streams")
STREAM_ENDS = Counter(
    "fieldgate_stream_ends_total",
    "Live streams ended by the gateway, by reason (overflow: the consumer fell behind)",
    ["reason"],
)
WRITER_FAILURES = Counter("fieldgate_writer_failures_total", "Batches whose commit failed")
QUEUE_FULL = Counter(
    "fieldgate_writer_queue_full_total", "Writes refused because the queue was full"
)
DATABASE_UP = Gauge(
    "fieldgate_database_up",
    "1 while the database answers, 0 during an outage (as last seen)",
    multiprocess_mode="livemin",
)
DATABASE_OUTAGES = Counter(
    "fieldgate_database_outages_total", "Times the database became unavailable"
)
DATABASE_REFUSED = Counter(
    "fieldgate_database_refused_requests",
    "Requests answered 503 database_unavailable because the database could not answer",
)

# The MQTT bridge.
MQTT_MESSAGES_RECEIVED = Counter("fieldgate_mqtt_messages_total", "MQTT messages received")
MQTT_MESSAGES_REJECTED = Counter(
    "fieldgate_mqtt_messages_rejected_total",
    "MQTT messages (wholly or partly) refused and kept as dead letters, by reason",
    ["reason"],
)
MQTT_CONNECTED = Gauge(
    "fieldgate_mqtt_connected",
    "1 while the bridge is connected to the broker (with workers: every worker's)",
    multiprocess_mode="livemin",
)
MQTT_CONNECTS = Counter(
    "fieldgate_mqtt_connects_total",
    "Successful connections, by whether the session was kept",
    ["session_present"],
)
MQTT_IN_FLIGHT = Gauge(
    "fieldgate_mqtt_in_flight_messages",
    "Messages received and not yet acknowledged",
    multiprocess_mode="livesum",
)
MQTT_STORE_RETRIES = Counter(
    "fieldgate_mqtt_store_retries_total", "Batches retried because the database refused them"
)
MQTT_STORE_PERMANENT_FAILURES = Counter(
    "fieldgate_mqtt_store_permanent_failures_total",
    "Batches (or single messages) whose storing failed for good; the culprit is put aside",
)
MQTT_RETRYING_BATCHES = Gauge(
    "fieldgate_mqtt_retrying_batches",
    "Batches waiting to retry (the database is unavailable)",
    multiprocess_mode="livesum",
)
MQTT_MESSAGES_DROPPED = Counter(
    "fieldgate_mqtt_messages_dropped_total",
    "Messages acknowledged unstored: storing them and their dead letter failed for good",
)

# History: packing, retention and the maintenance job (gateway/maintenance.py). The counters
# count what this process's runs did; the gauges are the store as last measured (after a run
# of this instance, or a GET /api/v1/storage).
READINGS_PACKED = Counter(
    "fieldgate_readings_packed_total", "Readings moved from rows into compressed chunks"
)
CHUNKS_WRITTEN = Counter(
    "fieldgate_chunks_written_total", "Chunks written by packing (new or rewritten)"
)
RETENTION_DROPPED_READINGS = Counter(
    "fieldgate_retention_dropped_readings_total",
    "Readings deleted by retention (in whole chunks, and unpacked rows)",
)
RETENTION_DROPPED_CHUNKS = Counter(
    "fieldgate_retention_dropped_chunks_total", "Chunks deleted by retention"
)
PARTITIONS_DROPPED = Counter(
    "fieldgate_retention_dropped_partitions_total",
    "PostgreSQL partitions of the chunk table dropped once empty",
)
RECLAIMED_BYTES = Counter(
    "fieldgate_reclaimed_bytes_total", "Bytes of free pages returned to the file system (SQLite)"
)
MAINTENANCE_RUNS = Counter(
    "fieldgate_maintenance_runs_total", "Maintenance jobs run to their end, by job", ["job"]
)
MAINTENANCE_FAILURES = Counter(
    "fieldgate_maintenance_failures_total", "Maintenance jobs that failed, by job", ["job"]
)
MAINTENANCE_FAILED_ROUNDS = Counter(
    "fieldgate_maintenance_failed_rounds_total",
    "Rounds of the serve loop that ended in an error (a database outage, or a bug: logged)",
)
MAINTENANCE_SKIPPED = Counter(
    "fieldgate_maintenance_skipped_total",
    "Maintenance rounds skipped because another instance held the lock (PostgreSQL)",
)
MAINTENANCE_LAST_RUN = Gauge(
    "fieldgate_maintenance_last_run_timestamp_seconds",
    "When this instance last started each maintenance job (Unix time)",
    ["job"],
    multiprocess_mode="max",
)
MAINTENANCE_DURATION = Gauge(
    "fieldgate_maintenance_duration_seconds",
    "How long this instance's last run of each maintenance job took",
    ["job"],
    multiprocess_mode="mostrecent",
)
STORED_READINGS = Gauge(
    "fieldgate_stored_readings",
    "Readings stored, by state: unpacked (rows) or packed",
    ["state"],
    multiprocess_mode="mostrecent",
)
STORED_CHUNKS = Gauge(
    "fieldgate_stored_chunks", "Chunks of packed readings stored", multiprocess_mode="mostrecent"
)
STORAGE_BYTES = Gauge(
    "fieldgate_storage_bytes",
    "Bytes on disk, by part: total, readings, chunks, series (PostgreSQL), free, wal (SQLite)",
    ["part"],
    multiprocess_mode="mostrecent",
)
OLDEST_UNPACKED_AGE = Gauge(
    "fieldgate_oldest_unpacked_reading_age_seconds",
    "Age of the oldest reading not packed yet (by its timestamp); 0 when none",
    multiprocess_mode="mostrecent",
)


def multiprocess_dir() -> str | None:
    """The directory the workers write their metrics to; None in one process."""
    return os.environ.get(MULTIPROC_ENV) or None


def exposition() -> bytes:
    """/metrics: this process's metrics, or with workers every worker's, combined."""
    directory = multiprocess_dir()
    if directory is None:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


def process_stopped() -> None:
    """A worker that ends takes its living-worker gauges (`live*` modes) out of the sums."""
    directory = multiprocess_dir()
    if directory is not None:
        multiprocess.mark_process_dead(os.getpid(), directory)  # type: ignore[no-untyped-call]


def forget_dead_processes() -> None:
    """A worker starting takes out the living-worker gauges of workers that died without
    `process_stopped` (killed): their queue would otherwise be counted until the run ends."""
    directory = multiprocess_dir()
    if directory is None:
        return
    pids = set()
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        found = re.search(r"_(\d+)\.db$", path)
        if found:
            pids.add(int(found.group(1)))
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
        except PermissionError:  # alive, someone else's
            continue


def own_total(counter: Counter) -> float:
    """This process's count of `counter`, over all its labels (with workers: this worker's)."""
    return sum(
        sample.value
        for metric in counter.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    )
