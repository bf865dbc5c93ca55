"""The one schema history for SQLite and PostgreSQL (Tortoise ORM's built-in migrations)."""
