"""lab.db, the one channel between SAE Lab's processes: engine, tables and schema upgrades (no torch)."""

from .engine import dispose_engines, get_engine, read_session, write_session
from .health import LabDatabaseError

__all__ = ["LabDatabaseError", "dispose_engines", "get_engine", "read_session", "write_session"]
