"""Dead letters keep their payload as bytes (BLOB / BYTEA): any bytes a device sent, NUL and
invalid UTF-8 included, can be stored and shown exactly (PostgreSQL text refuses NUL).

`tortoise makemigrations` writes an AlterField for this, which Tortoise cannot apply to a change of
column type; so the column is replaced in steps instead, keeping the rows: the text column is
renamed, a bytes column is added, the old payloads are copied in as their UTF-8 bytes, the text
column is dropped and the bytes column made NOT NULL; a downgrade runs the steps backwards. The
end state is what the autodetector expects (tests/test_migrations.py checks it finds nothing to
add).
"""

from tortoise import fields, migrations
from tortoise.migrations import operations as ops

COPY_TO_BYTES = {
    # SQLite stores text as UTF-8 (the default encoding): the cast keeps the bytes.
    "sqlite": "UPDATE dead_letter SET payload = CAST(payload_text AS BLOB)",
    "postgres": "UPDATE dead_letter SET payload = convert_to(payload_text, 'UTF8')",
}


async def payload_to_bytes(apps, schema_editor) -> None:
    dialect = schema_editor.client.capabilities.dialect
    if dialect not in COPY_TO_BYTES:
        raise RuntimeError(f"fieldgate supports sqlite and postgres, not {dialect}")
    await schema_editor.client.execute_script(COPY_TO_BYTES[dialect])


async def payload_to_text(apps, schema_editor) -> None:
    """Back to text (a downgrade): invalid UTF-8 is replaced, NUL written as \\x00."""
    client = schema_editor.client
    mark = "?" if client.capabilities.dialect == "sqlite" else "$1"
    mark2 = "?" if client.capabilities.dialect == "sqlite" else "$2"
    _, rows = await client.execute_query("SELECT id, payload FROM dead_letter")
    values = [
        [bytes(row["payload"]).decode("utf-8", "replace").replace("\x00", "\\x00"), row["id"]]
        for row in rows
    ]
    if values:
        await client.execute_many(
            f"UPDATE dead_letter SET payload_text = {mark} WHERE id = {mark2}", values
        )


class Migration(migrations.Migration):
    dependencies = [("models", "0002_dead_letter")]

    initial = False

    operations = [
        ops.RenameField(model_name="DeadLetter", old_name="payload", new_name="payload_text"),
        ops.AddField(model_name="DeadLetter", name="payload", field=fields.BinaryField(null=True)),
        # (nullable, so that a downgrade can add the text column back to a table with rows)
        ops.AlterField(
            model_name="DeadLetter", name="payload_text", field=fields.TextField(null=True)
        ),
        ops.RunPython(payload_to_bytes, payload_to_text),
        ops.RemoveField(model_name="DeadLetter", name="payload_text"),
        ops.AlterField(model_name="DeadLetter", name="payload", field=fields.BinaryField()),
    ]
