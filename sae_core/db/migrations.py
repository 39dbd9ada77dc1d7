"""Schema versions of lab.db and the in-place upgrades between them.

Version 1 is the first schema (the tables as first released). Each later version
appends one function to MIGRATIONS that turns version N-1 into N without losing
rows: ALTER TABLE ... ADD COLUMN (nullable or with a default), new indices,
backfills. New *tables* need no migration: create_all() adds missing tables.

The upgrade runs inside one BEGIN IMMEDIATE transaction, so several processes
opening an old file at once upgrade it exactly once (the others wait for the
lock, then find the new version and skip). A file newer than this code is
refused rather than silently "downgraded".
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlmodel import SQLModel

from . import tables  # noqa: F401  (registers every table on SQLModel.metadata)


class SchemaError(RuntimeError):
    """lab.db cannot be used by this version of SAE Lab."""


def _add_column(conn: Connection, table: str, column: str, sql_type: str) -> None:
    # Idempotent: a half-finished manual upgrade must not make the next one fail.
    existing = {c["name"] for c in inspect(conn).get_columns(table)}
    if column not in existing:
        conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}"))


def _v2_cancel_grace_metric_time_and_step_index(conn: Connection) -> None:
    """v2: job.term_sent_at, job.last_metric_at; metric_point index on (job_id, step)."""
    _add_column(conn, "job", "term_sent_at", "FLOAT")
    _add_column(conn, "job", "last_metric_at", "FLOAT")
    conn.execute(text("DROP INDEX IF EXISTS ix_metric_point_job_id"))
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_metric_point_job_step ON metric_point (job_id, step)"))


def _v3_data_wait(conn: Connection) -> None:
    """v3: metric_point.data_wait (the fraction of step time spent waiting for data)."""
    _add_column(conn, "metric_point", "data_wait", "FLOAT")


def _v4_job_kinds_dependencies_and_disk(conn: Connection) -> None:
    """v4: job.kind (every older job trained), job.depends_on; metric_point.disk_bytes."""
    _add_column(conn, "job", "kind", "VARCHAR NOT NULL DEFAULT 'train'")
    _add_column(conn, "job", "depends_on", "INTEGER REFERENCES job (id)")
    _add_column(conn, "metric_point", "disk_bytes", "FLOAT")


def _v5_named_losses_and_stats(conn: Connection) -> None:
    """v5: metric_point.losses_json and stats_json (an architecture's loss terms and stats, by name)."""
    _add_column(conn, "metric_point", "losses_json", "VARCHAR")
    _add_column(conn, "metric_point", "stats_json", "VARCHAR")


def _v6_sweep_members(conn: Connection) -> None:
    """v6: metric_point.member (the sweep member a record is of; NULL for a single run's)."""
    _add_column(conn, "metric_point", "member", "VARCHAR")


# MIGRATIONS[i] upgrades version i+1 to version i+2.
MIGRATIONS: list[Callable[[Connection], None]] = [
    _v2_cancel_grace_metric_time_and_step_index,
    _v3_data_wait,
    _v4_job_kinds_dependencies_and_disk,
    _v5_named_losses_and_stats,
    _v6_sweep_members,
]
SCHEMA_VERSION = 1 + len(MIGRATIONS)


def current_version(conn: Connection) -> int | None:
    """The file's schema version; None for an empty file."""
    if not inspect(conn).has_table("schema_info"):
        # A file from before schema_info existed still has a job table: that is version 1.
        return 1 if inspect(conn).has_table("job") else None
    row = conn.execute(text("SELECT version FROM schema_info WHERE id = 1")).first()
    if row is None:
        return 1 if inspect(conn).has_table("job") else None
    return int(row[0])


def _up_to_date(engine: Engine) -> bool:
    """Read-only check, so that a process opening a current file never waits for the write lock."""
    with engine.connect() as conn, conn.begin():
        missing = set(SQLModel.metadata.tables) - set(inspect(conn).get_table_names())
        return not missing and current_version(conn) == SCHEMA_VERSION


def upgrade(engine: Engine) -> int:
    """Bring the file to SCHEMA_VERSION (creating it if empty); returns the version it had (None -> 0)."""
    if _up_to_date(engine):
        return SCHEMA_VERSION
    with engine.connect() as conn:
        conn.info["write"] = True
        try:
            with conn.begin():
                version = current_version(conn)
                if version is not None and version > SCHEMA_VERSION:
                    raise SchemaError(
                        f"{engine.url.database} has schema version {version}, newer than this SAE Lab "
                        f"understands ({SCHEMA_VERSION}); update SAE Lab instead of opening it with an old copy"
                    )
                if version is not None:
                    for number in range(version + 1, SCHEMA_VERSION + 1):
                        MIGRATIONS[number - 2](conn)
                SQLModel.metadata.create_all(conn)
                if version != SCHEMA_VERSION:
                    conn.execute(
                        text(
                            "INSERT INTO schema_info (id, version) VALUES (1, :v) "
                            "ON CONFLICT(id) DO UPDATE SET version = :v"
                        ),
                        {"v": SCHEMA_VERSION},
                    )
        finally:
            conn.info["write"] = False
    return version or 0


__all__ = ["SCHEMA_VERSION", "MIGRATIONS", "SchemaError", "upgrade", "current_version"]
