"""Initial schema: devices, tokens, series (Tortoise models) and the readings table.

`reading` is keyed by (series_id, ts) and is no Tortoise model (Tortoise cannot declare a
composite primary key), so it is created here with the one DDL difference between the dialects.
"""

from orjson import loads
from tortoise import fields, migrations
from tortoise.fields.base import OnDelete
from tortoise.fields.data import JSON_DUMPS
from tortoise.migrations import operations as ops

from devices.models import Role

READING_DDL = {
    "sqlite": (
        "CREATE TABLE reading (series_id INTEGER NOT NULL, ts INTEGER NOT NULL,"
        " value REAL NOT NULL, PRIMARY KEY (series_id, ts)) WITHOUT ROWID"
    ),
    "postgres": (
        "CREATE TABLE reading (series_id INTEGER NOT NULL, ts BIGINT NOT NULL,"
        " value DOUBLE PRECISION NOT NULL, PRIMARY KEY (series_id, ts))"
    ),
}


async def create_reading_table(apps, schema_editor) -> None:
    dialect = schema_editor.client.capabilities.dialect
    if dialect not in READING_DDL:
        raise RuntimeError(f"fieldgate supports sqlite and postgres, not {dialect}")
    await schema_editor.client.execute_script(READING_DDL[dialect])


async def drop_reading_table(apps, schema_editor) -> None:
    await schema_editor.client.execute_script("DROP TABLE reading")


class Migration(migrations.Migration):
    initial = True

    operations = [
        ops.CreateModel(
            name="Device",
            fields=[
                (
                    "id",
                    fields.CharField(primary_key=True, unique=True, db_index=True, max_length=64),
                ),
                ("name", fields.CharField(default="", max_length=200)),
                ("metadata", fields.JSONField(default=dict, encoder=JSON_DUMPS, decoder=loads)),
                ("enabled", fields.BooleanField(default=True)),
                ("created_at", fields.DatetimeField(auto_now=False, auto_now_add=True)),
                ("updated_at", fields.DatetimeField(auto_now=True, auto_now_add=False)),
                ("last_seen_us", fields.BigIntField(null=True)),
            ],
            options={"table": "device", "app": "models", "pk_attr": "id"},
            bases=["Model"],
        ),
        ops.CreateModel(
            name="ApiToken",
            fields=[
                (
                    "id",
                    fields.IntField(generated=True, primary_key=True, unique=True, db_index=True),
                ),
                ("token_hash", fields.CharField(unique=True, max_length=64)),
                (
                    "role",
                    fields.CharEnumField(
                        description="ADMIN: admin\nOPERATOR: operator\nDEVICE: device",
                        enum_type=Role,
                        max_length=16,
                    ),
                ),
                (
                    "device",
                    fields.ForeignKeyField(
                        "models.Device",
                        source_field="device_id",
                        null=True,
                        db_constraint=True,
                        to_field="id",
                        related_name="tokens",
                        on_delete=OnDelete.CASCADE,
                    ),
                ),
                ("name", fields.CharField(default="", max_length=200)),
                ("created_at", fields.DatetimeField(auto_now=False, auto_now_add=True)),
            ],
            options={"table": "api_token", "app": "models", "pk_attr": "id"},
            bases=["Model"],
        ),
        ops.CreateModel(
            name="Series",
            fields=[
                (
                    "id",
                    fields.IntField(generated=True, primary_key=True, unique=True, db_index=True),
                ),
                (
                    "device",
                    fields.ForeignKeyField(
                        "models.Device",
                        source_field="device_id",
                        db_constraint=True,
                        to_field="id",
                        related_name="series",
                        on_delete=OnDelete.CASCADE,
                    ),
                ),
                ("metric", fields.CharField(max_length=64)),
            ],
            options={
                "table": "series",
                "app": "models",
                "unique_together": (("device", "metric"),),
                "pk_attr": "id",
            },
            bases=["Model"],
        ),
        ops.RunPython(create_reading_table, drop_reading_table),
    ]
