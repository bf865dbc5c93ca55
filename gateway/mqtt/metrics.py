"""Prometheus metrics of the MQTT bridge (served at /metrics with the rest)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

MESSAGES_RECEIVED = Counter("fieldgate_mqtt_messages_total", "MQTT messages received")
MESSAGES_REJECTED = Counter(
    "fieldgate_mqtt_messages_rejected_total",
    "MQTT messages (wholly or partly) refused and kept as dead letters, by reason",
    ["reason"],
)
CONNECTED = Gauge("fieldgate_mqtt_connected", "1 while the bridge is connected to the broker")
CONNECTS = Counter(
    "fieldgate_mqtt_connects_total",
    "Successful connections, by whether the session was kept",
    ["session_present"],
)
IN_FLIGHT = Gauge("fieldgate_mqtt_in_flight_messages", "Messages received and not yet acknowledged")
STORE_RETRIES = Counter(
    "fieldgate_mqtt_store_retries_total", "Batches retried because the database refused them"
)
STORE_PERMANENT_FAILURES = Counter(
    "fieldgate_mqtt_store_permanent_failures_total",
    "Batches (or single messages) whose storing failed for good; the culprit is put aside",
)
RETRYING_BATCHES = Gauge(
    "fieldgate_mqtt_retrying_batches", "Batches waiting to retry (the database is unavailable)"
)
MESSAGES_DROPPED = Counter(
    "fieldgate_mqtt_messages_dropped_total",
    "Messages acknowledged unstored: storing them and their dead letter failed for good",
)
