"""The MQTT bridge: a real broker's `devices/{id}/telemetry` messages into the shared ingest path.

`client.py` is the adapter around aiomqtt (manual acknowledgement, session flag), `service.py`
turns a batch of messages into stored readings and dead letters, `bridge.py` owns the connection:
reconnects, batching, acknowledgement after commit, readiness and shutdown.
"""
