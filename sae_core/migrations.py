"""Schema versions of lab.db and the in-place upgrades between them.

A new version appends a function to MIGRATIONS that turns version N-1 into N
without losing rows (ALTER TABLE ... ADD COLUMN, new tables, backfills).
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlmodel import SQLModel

from . import models

# version 1: the first released schema. Its tables are created by create_all().
MIGRATIONS: list[Callable[[Connection], None]] = []
SCHEMA_VERSION = 1 + len(MIGRATIONS)


def current_version(conn: Connection) -> int | None:
    if not inspect(conn).has_table("schema_info"):
        return None
    row = conn.execute(text("SELECT version FROM schema_info WHERE id = 1")).first()
    return row[0] if row else None


def upgrade(engine: Engine) -> None:
    with engine.connect() as conn:
        conn.info["write"] = True
        with conn.begin():
            version = current_version(conn)
            if version is None and inspect(conn).has_table("job"):
                version = 1  # a file from before schema_info existed
            for number in range((version or SCHEMA_VERSION) + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[number - 2](conn)
            SQLModel.metadata.create_all(conn)
            conn.execute(
                text("INSERT INTO schema_info (id, version) VALUES (1, :v) ON CONFLICT(id) DO UPDATE SET version = :v"),
                {"v": SCHEMA_VERSION},
            )
        conn.info["write"] = False


__all__ = ["SCHEMA_VERSION", "upgrade", "current_version", "models"]
