"""The commit log (issue 14, live streams): one row per writer commit that stored readings, in
the same transaction as the readings, holding exactly the readings that commit added
(`points`: JSON `[[device_id, [series_id...], [ts...], [value...]], ...]`, one entry per part of
the commit). Live streams tail it, so they see only committed readings, each once, in commit
order, whichever gateway instance committed them; a stream that reconnects resumes from its
last event's id. Rows older than FIELDGATE_LIVE_LOG_WINDOW_S are deleted (gateway/live.py),
but never the newest one, which tells a resuming stream where the log stands.

Ids follow commit order: SQLite has one writer at a time; on PostgreSQL each commit takes a
transaction-level advisory lock just before its row is inserted (gateway/store/commit_log.py),
held until it commits, so no id becomes visible before a smaller one."""

from tortoise import migrations
from tortoise.migrations import operations as ops

DDL = {
    "sqlite": [
        "CREATE TABLE commit_log (id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " at_us INTEGER NOT NULL, points TEXT NOT NULL)",
        "CREATE INDEX commit_log_at ON commit_log (at_us)",
    ],
    "postgres": [
        "CREATE TABLE commit_log (id BIGSERIAL PRIMARY KEY,"
        " at_us BIGINT NOT NULL, points TEXT NOT NULL)",
        "CREATE INDEX commit_log_at ON commit_log (at_us)",
    ],
}


async def create_table(apps, schema_editor) -> None:
    dialect = schema_editor.client.capabilities.dialect
    if dialect not in DDL:
        raise RuntimeError(f"fieldgate supports sqlite and postgres, not {dialect}")
    for statement in DDL[dialect]:
        await schema_editor.client.execute_script(statement)


async def drop_table(apps, schema_editor) -> None:
    await schema_editor.client.execute_script("DROP TABLE commit_log")


class Migration(migrations.Migration):
    dependencies = [("models", "0008_series_unit")]

    initial = False

    operations = [ops.RunPython(create_table, drop_table)]
