"""In-place upgrade of a lab.db written by the previous schema, rows kept."""

from __future__ import annotations

import sqlite3

import pytest

from sae_core import db
from sae_core.config import TrainConfig
from sae_core.db import migrations
from sae_core.jobs import metrics, store
from sae_core.jobs.placement import Submission

# The version-1 tables exactly as the first release created them (SQLModel's DDL of commit 2b9f57e).
V1_DDL = """
CREATE TABLE job (
    id INTEGER NOT NULL, name VARCHAR NOT NULL, submitted_by VARCHAR NOT NULL, config_json VARCHAR NOT NULL,
    gpu_ids VARCHAR NOT NULL, cpu_procs INTEGER, status VARCHAR NOT NULL, pid INTEGER, pid_start_time FLOAT,
    exit_code INTEGER, error VARCHAR, created_at FLOAT NOT NULL, started_at FLOAT, finished_at FLOAT,
    out_dir VARCHAR NOT NULL, resumed_from INTEGER, total_steps INTEGER NOT NULL, last_step INTEGER NOT NULL,
    tokens_per_s FLOAT, cancel_requested BOOLEAN NOT NULL,
    PRIMARY KEY (id), FOREIGN KEY(resumed_from) REFERENCES job (id)
);
CREATE INDEX ix_job_status ON job (status);
CREATE TABLE metric_point (
    id INTEGER NOT NULL, job_id INTEGER NOT NULL, step INTEGER NOT NULL, tokens INTEGER NOT NULL, loss FLOAT,
    mse FLOAT, fvu FLOAT, l0 FLOAT, dead_fraction FLOAT, lr FLOAT, tokens_per_s FLOAT, aux_loss FLOAT,
    peak_mem_json VARCHAR NOT NULL, time FLOAT NOT NULL,
    PRIMARY KEY (id), FOREIGN KEY(job_id) REFERENCES job (id)
);
CREATE INDEX ix_metric_point_job_id ON metric_point (job_id);
CREATE TABLE gpu_sample (
    id INTEGER NOT NULL, t FLOAT NOT NULL, gpu_index INTEGER NOT NULL, util_gpu FLOAT, util_mem FLOAT,
    mem_used INTEGER, mem_total INTEGER, temperature FLOAT, power_w FLOAT, power_limit_w FLOAT, PRIMARY KEY (id)
);
CREATE INDEX ix_gpu_sample_t ON gpu_sample (t);
"""
SCHEMA_INFO_V1 = """
CREATE TABLE schema_info (id INTEGER NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (id));
INSERT INTO schema_info (id, version) VALUES (1, 1);
"""
CONFIG = '{"activation_source": "/data/acts.safetensors", "d_sae": 64, "k": 8, "batch_size": 256, "total_steps": 50}'


def write_v1_file(path, with_schema_info: bool = True) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(V1_DDL + (SCHEMA_INFO_V1 if with_schema_info else ""))
    conn.execute(
        "INSERT INTO job VALUES (1, 'old run', 'ada', ?, '0,1', NULL, 'completed', 4242, 1700000000.5, 0, NULL,"
        " 1700000000.0, 1700000001.0, 1700000100.0, '/lab/jobs/1', NULL, 50, 50, 12345.0, 0)",
        (CONFIG,),
    )
    conn.execute(
        "INSERT INTO job VALUES (2, 'its resume', 'bob', ?, '', 2, 'failed', NULL, NULL, 1, 'rank 1: boom',"
        " 1700000200.0, 1700000201.0, 1700000300.0, '/lab/jobs/2', 1, 50, 20, NULL, 1)",
        (CONFIG,),
    )
    for step in (10, 20, 30):
        conn.execute(
            "INSERT INTO metric_point (job_id, step, tokens, loss, fvu, peak_mem_json, time) VALUES (1, ?, ?, ?, 0.1, '[1, 2]', ?)",
            (step, step * 256, 1.0 / step, 1700000000.0 + step),
        )
    conn.execute("INSERT INTO gpu_sample (t, gpu_index, util_gpu) VALUES (1700000000.0, 0, 55.0)")
    conn.commit()
    conn.close()


def columns(path, table: str) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def indices(path, table: str) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {row[1] for row in conn.execute(f"PRAGMA index_list({table})")}


@pytest.mark.parametrize("with_schema_info", [True, False], ids=["v1", "v1-before-schema_info"])
def test_v1_file_is_upgraded_in_place_with_rows_kept(lab_home, with_schema_info):
    path = lab_home / "lab.db"
    write_v1_file(path, with_schema_info)
    assert "term_sent_at" not in columns(path, "job")

    engine = db.get_engine(lab_home)

    with engine.connect() as conn:
        assert migrations.current_version(conn) == migrations.SCHEMA_VERSION == 6
    assert {"term_sent_at", "last_metric_at"} <= columns(path, "job")
    assert {"data_wait", "disk_bytes", "losses_json", "stats_json", "member"} <= columns(path, "metric_point")
    assert {"kind", "depends_on"} <= columns(path, "job")
    assert "ix_metric_point_job_step" in indices(path, "metric_point")
    assert "ix_metric_point_job_id" not in indices(path, "metric_point")
    old, resumed = store.get_job(1), store.get_job(2)
    assert (old.name, old.submitted_by, old.status, old.gpu_list, old.pid, old.pid_start_time) == (
        "old run",
        "ada",
        "completed",
        [0, 1],
        4242,
        1700000000.5,
    )
    assert (old.last_step, old.tokens_per_s, old.term_sent_at, old.last_metric_at) == (50, 12345.0, None, None)
    assert (old.kind, old.depends_on) == ("train", None)  # every job before v4 trained
    assert (resumed.resumed_from, resumed.cpu_procs, resumed.error, resumed.cancel_requested) == (
        1,
        2,
        "rank 1: boom",
        True,
    )
    frame = metrics.metrics_frame(1)
    assert frame["step"].tolist() == [10, 20, 30] and frame["peak_mem"].iloc[0] == [1, 2]
    assert frame["data_wait"].isna().all()  # old rows did not measure it
    assert metrics.named_columns(frame) == []  # nor name their loss terms
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT gpu_index, util_gpu FROM gpu_sample").fetchall() == [(0, 55.0)]
        # tables the old file lacked were created
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'snapshot'").fetchone()
    # the upgraded file is fully usable: new rows get the new columns
    new = store.submit_job(TrainConfig.model_validate_json(CONFIG), Submission(None, 1))
    assert new.id == 3
    store.mark_term_sent(new.id, 123.0)
    assert store.get_job(new.id).term_sent_at == 123.0


def test_upgrade_runs_once_and_a_fresh_file_starts_at_the_current_version(lab_home):
    engine = db.get_engine(lab_home)
    with engine.connect() as conn:
        assert migrations.current_version(conn) == migrations.SCHEMA_VERSION
    assert migrations.upgrade(engine) == migrations.SCHEMA_VERSION  # nothing left to do


def test_a_file_from_a_newer_sae_lab_is_refused(lab_home):
    path = lab_home / "lab.db"
    write_v1_file(path)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_info SET version = 99")
    with pytest.raises(migrations.SchemaError, match="schema version 99, newer"):
        db.get_engine(lab_home)
    with sqlite3.connect(path) as conn:  # left as it was
        assert conn.execute("SELECT version FROM schema_info").fetchone() == (99,)
