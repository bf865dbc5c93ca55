"""Packed history (issue 10): chunks of compressed readings, each with its 1-hour rollup; the
per-series packed watermark; per-device retention; the record of maintenance runs.

`chunk` holds one series' consecutive readings, `first_ts` to `last_ts` (inclusive), encoded by
gateway/store/chunk_codec.py (`data`), with the chunk's summary as columns, its per-hour
partial aggregates (`hours`: the 1-hour rollup) and, for dense chunks, per-minute ones
(`minutes`: the 1-minute rollup; NULL below MINUTE_ROLLUP_DENSITY readings a minute):
gateway/store/partials.py, gateway/store/packed.py. Chunks of a series never overlap. Like
`reading` it is no Tortoise model (a composite key, and bytes Tortoise would copy around).

`series.packed_until_us`: the last ts any chunk of the series holds (NULL: none). A reading
timed after it cannot be in a chunk, so the insert checks chunks only for readings at or before
it (gateway/store/readings.py).

On PostgreSQL `chunk` is partitioned by `first_ts` (a partition per 7 days, made by the
maintenance job as it packs: gateway/store/packed.py), so retention drops whole partitions and
returns their space; no constraint spans series (the Citus path of docs/scaling.md).
"""

from tortoise import fields, migrations
from tortoise.migrations import operations as ops

_CHUNK_COLUMNS = (
    "series_id {int} NOT NULL, first_ts {big} NOT NULL, last_ts {big} NOT NULL,"
    " n {int} NOT NULL, s {real} NOT NULL, lo {real} NOT NULL, hi {real} NOT NULL,"
    " v0 {real} NOT NULL, v1 {real} NOT NULL, mean {real} NOT NULL, mean_err {real} NOT NULL,"
    " m2 {real} NOT NULL, hours {blob} NOT NULL, minutes {blob}, data {blob} NOT NULL,"
    " PRIMARY KEY (series_id, first_ts)"
)
_RUN_COLUMNS = (
    "job {text} PRIMARY KEY, started_us {big} NOT NULL, took_ms {real} NOT NULL,"
    " result {text} NOT NULL"
)
DDL = {
    "sqlite": [
        "CREATE TABLE chunk ("
        + _CHUNK_COLUMNS.format(int="INTEGER", big="INTEGER", real="REAL", blob="BLOB")
        + ")",
        "CREATE INDEX chunk_series_last ON chunk (series_id, last_ts)",
        "CREATE TABLE maintenance_run ("
        + _RUN_COLUMNS.format(text="TEXT", big="INTEGER", real="REAL")
        + ")",
    ],
    "postgres": [
        "CREATE TABLE chunk ("
        + _CHUNK_COLUMNS.format(int="INTEGER", big="BIGINT", real="DOUBLE PRECISION", blob="BYTEA")
        + ") PARTITION BY RANGE (first_ts)",
        "CREATE INDEX chunk_series_last ON chunk (series_id, last_ts)",
        "CREATE TABLE maintenance_run ("
        + _RUN_COLUMNS.format(text="TEXT", big="BIGINT", real="DOUBLE PRECISION")
        + ")",
    ],
}


async def create_tables(apps, schema_editor) -> None:
    dialect = schema_editor.client.capabilities.dialect
    if dialect not in DDL:
        raise RuntimeError(f"fieldgate supports sqlite and postgres, not {dialect}")
    for statement in DDL[dialect]:
        await schema_editor.client.execute_script(statement)


async def drop_tables(apps, schema_editor) -> None:
    await schema_editor.client.execute_script("DROP TABLE maintenance_run")
    await schema_editor.client.execute_script("DROP TABLE chunk")


class Migration(migrations.Migration):
    dependencies = [("models", "0003_dead_letter_payload_bytes")]

    initial = False

    operations = [
        ops.AddField(
            model_name="Series", name="packed_until_us", field=fields.BigIntField(null=True)
        ),
        ops.AddField(
            model_name="Device", name="retention_days", field=fields.FloatField(null=True)
        ),
        ops.RunPython(create_tables, drop_tables),
    ]
