"""The snapshot table: the latest value of a named record (the sampler's probe, the launcher's status),
replaced whole each time, so readers get current details without asking the writer."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine

from .engine import write_session
from .tables import Snapshot


def upsert(key: str, t: float, payload: str):
    """The statement that stores `payload` under `key` (to run in the caller's transaction)."""
    statement = sqlite_insert(Snapshot).values(key=key, t=t, payload=payload)
    return statement.on_conflict_do_update(index_elements=["key"], set_={"t": t, "payload": payload})


def put(engine: Engine, key: str, t: float, payload: str) -> None:
    with write_session(engine) as session:
        session.connection().execute(upsert(key, t, payload))


def get(source: Engine | Connection, key: str) -> str | None:
    """The payload stored under `key`, or None."""
    if isinstance(source, Engine):
        with source.connect() as conn:
            return get(conn, key)
    row = source.execute(text("SELECT payload FROM snapshot WHERE key = :k"), {"k": key}).first()
    return None if row is None else str(row[0])
