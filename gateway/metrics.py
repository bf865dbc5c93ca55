"""Prometheus metrics, declared once (served at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
    "fieldgate_writer_queue_readings", "Readings waiting for the writer (accepted, not committed)"
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
WRITER_FAILURES = Counter("fieldgate_writer_failures_total", "Batches whose commit failed")
QUEUE_FULL = Counter(
    "fieldgate_writer_queue_full_total", "Writes refused because the queue was full"
)
DATABASE_UP = Gauge(
    "fieldgate_database_up", "1 while the database answers, 0 during an outage (as last seen)"
)
DATABASE_OUTAGES = Counter(
    "fieldgate_database_outages_total", "Times the database became unavailable"
)
DATABASE_REFUSED = Counter(
    "fieldgate_database_refused_requests",
    "Requests answered 503 database_unavailable because the database could not answer",
)
