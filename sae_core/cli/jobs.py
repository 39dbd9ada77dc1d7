"""`python -m sae_core submit | extract | evaluate | inspect | jobs | cancel | resume | logs`: the job commands of the CLI.

Each `cli_<name>(argv) -> exit code`. Exit 0 on success, 2 on a rejected request (the reason on
stderr, nothing written), 1 when an operation failed. `--json` prints data for scripts.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from pathlib import Path

from .. import paths
from ..config import ConfigError, EvaluateConfig, ExtractConfig, InspectConfig, TrainConfig
from ..db.tables import FINAL_STATUSES, JOB_STATUSES, Job
from ..files import METRICS_FILE, STDERR_LOG, STDOUT_LOG
from ..jobs import store, submission
from ..jobs.daemon_control import daemon_status, ensure_daemon
from ..jobs.errors import JobError
from ..jobs.kinds import job_kind
from ..jobs.lifecycle import GRACE_S, cancel_job
from ..jobs.logs import log_dir_of, tail_text
from ..jobs.placement import Submission
from ..jsonfile import read_json_object
from ..outputs import sweep_members
from ..sweep import Sweep, read_training_config
from ..text import brief, format_duration

REJECTED = 2


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return "unknown"


def _reject(message: str) -> int:
    print(f"rejected: {message}", file=sys.stderr)
    return REJECTED


def _daemon_note(no_daemon: bool, quiet: bool) -> None:
    """After queueing: make sure something will run the queue, and say so."""
    home = paths.lab_home()
    status = daemon_status(home)
    if status.running:
        return
    if no_daemon:
        print(
            f"note: no launcher is running for {home}; the job waits until `python -m sae_core serve` runs",
            file=sys.stderr,
        )
        return
    if not quiet:
        print(f"no launcher was running for {home}; starting one (log: {status.log_path})", file=sys.stderr)
    if not ensure_daemon(home):
        print(f"warning: the launcher did not start; see {status.log_path}", file=sys.stderr)


# --------------------------------------------------------------------------- submit


def _submission_args(parser: argparse.ArgumentParser) -> None:
    """Where the job runs, what it is called, who submits, how it is reported: the same for every kind."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--gpus", help="GPU indices (NVML / PCI bus order), e.g. 0,1.")
    where.add_argument("--cpu-procs", type=int, help="Run as N gloo processes on the CPU.")
    parser.add_argument("--name", default="", help="A name to find the job by (default job-<id>).")
    parser.add_argument("--user", default=None, help="Who submits (default: the login name).")
    parser.add_argument("--json", action="store_true", help="Print the queued job(s) as JSON.")
    parser.add_argument("--no-daemon", action="store_true", help="Do not start the launcher if none runs.")


def _submission(args: argparse.Namespace) -> Submission:
    return Submission(args.gpus, args.cpu_procs, name=args.name, submitted_by=args.user or _user())


def cli_submit(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sae_core submit",
        description='Queue a training job: one SAE, or a sweep of them (a config with "sweep" or "members").',
    )
    parser.add_argument("--config", required=True, help="TrainConfig JSON file (a single run or a sweep).")
    _submission_args(parser)
    args = parser.parse_args(argv)

    try:
        cfg = read_training_config(args.config)
        job, verdict = submission.submit(cfg, _submission(args))
    except (ConfigError, JobError) as exc:
        return _reject(str(exc))
    _print_notes(verdict.notes)
    if isinstance(cfg, Sweep):
        return _queued_sweep(job, args)
    return _queued(job, args, f"queued job {job.id} ({job.name}) on {_placement(job)}; output in {job.out_dir}")


def _queued_sweep(job: Job, args: argparse.Namespace) -> int:
    """A queued sweep: the job, the placement the gate chose, and its members (a line each; in JSON a list)."""
    sweep = store.job_config(job)
    members = [{"name": m.name, "overrides": m.overrides, "folder": str(m.folder(job.out_dir))} for m in sweep.members]
    if args.json:
        print(json.dumps({**store.job_to_dict(job), "placement": sweep.placement, "members": members}))
    else:
        lines = [
            f"queued sweep job {job.id} ({job.name}) on {_placement(job)}, placement {sweep.placement}: "
            f"{len(members)} member(s); output in {job.out_dir}",
            *(f"  {member['name']}" for member in members),
        ]
        print("\n".join(lines))
    _daemon_note(args.no_daemon, args.json)
    return 0


def cli_extract(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sae_core extract",
        description="Queue an extraction job (a model's activations at a hook, over a text dataset), and with "
        "--then-train a training on its output that waits for it.",
    )
    parser.add_argument("--config", required=True, help="ExtractConfig JSON file.")
    parser.add_argument(
        "--then-train", metavar="TRAIN.json", help="TrainConfig to train on the output (its activation_source is set)."
    )
    parser.add_argument(
        "--then-evaluate",
        metavar="CONTEXTS",
        type=int,
        help="After --then-train: evaluate the SAE with the model on this many held-out contexts.",
    )
    _submission_args(parser)
    args = parser.parse_args(argv)
    try:
        cfg = ExtractConfig.from_json_file(args.config)
        then_train = _then_train_config(args.then_train) if args.then_train else None
        then_evaluate = None
        if args.then_evaluate is not None:
            then_evaluate = EvaluateConfig.from_dict({"sae": "(the training)", "contexts": args.then_evaluate})
        extraction, training, verdict = submission.submit_extract(cfg, _submission(args), then_train, then_evaluate)
    except (ConfigError, JobError) as exc:
        return _reject(str(exc))
    _print_notes(verdict.notes)
    queued = [j for j in (extraction, training, verdict.then_evaluation) if j is not None]
    if args.json:
        print(json.dumps([store.job_to_dict(j) for j in queued]))
        _daemon_note(args.no_daemon, args.json)
        return 0
    message = f"queued extraction job {extraction.id} ({extraction.name}) on {_placement(extraction)}; output in {extraction.out_dir}"
    for before, job in zip(queued, queued[1:], strict=False):
        message += (
            f"\nqueued {job_kind(job.kind).noun} job {job.id} ({job.name}): starts when job {before.id} completes"
        )
    print(message)
    _daemon_note(args.no_daemon, args.json)
    return 0


def cli_evaluate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sae_core evaluate",
        description="Queue a model evaluation of an SAE: CE loss and KL recovered with the SAE spliced in at its "
        "hook (SAELens's ce_loss_score and kl_div_score), on held-out contexts of its training data or on a text.",
    )
    parser.add_argument("sae_dir", metavar="SAE_DIR", help="The SAE folder (SAE Lab's, or SAELens's format).")
    parser.add_argument("--contexts", type=int, default=256, help="Contexts to evaluate on (default 256).")
    parser.add_argument("--model", help="The causal LM (default: the one the SAE's activations came from).")
    parser.add_argument("--hook", help="The module the SAE reads (default: the one its activations came from).")
    parser.add_argument("--dataset", help="Text to evaluate on (default: the held-out contexts).")
    parser.add_argument("--text-field", default="text", help="The text's field in .jsonl/.parquet (default text).")
    parser.add_argument("--context-size", type=int, default=128, help="Tokens per context from --dataset.")
    parser.add_argument("--batch-size", type=int, default=8, help="Contexts per forward pass (default 8).")
    _submission_args(parser)
    args = parser.parse_args(argv)
    given = {
        "sae": str(Path(args.sae_dir).expanduser().resolve()), "contexts": args.contexts, "model": args.model,
        "hook": args.hook, "dataset": args.dataset, "text_field": args.text_field,
        "context_size": args.context_size, "batch_size": args.batch_size,
    }  # fmt: skip
    try:
        cfg = EvaluateConfig.from_dict({k: v for k, v in given.items() if v is not None})
        job, verdict = submission.submit(cfg, _submission(args))
    except (ConfigError, JobError) as exc:
        return _reject(str(exc))
    _print_notes(verdict.notes)
    return _queued(job, args, f"queued evaluation job {job.id} ({job.name}) on {_placement(job)} of {cfg.sae}")


def cli_inspect(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sae_core inspect",
        description="Queue an inspection of an SAE: per-latent statistics and top-activating examples for the "
        "Explore page, written to SAE_DIR/inspect/.",
    )
    parser.add_argument("sae_dir", metavar="SAE_DIR", help="The SAE folder.")
    parser.add_argument("--tokens", type=int, default=1_000_000, help="Rows to stream (the last ones, default 1M).")
    parser.add_argument("--top-k", type=int, default=20, help="Top examples kept per latent (default 20).")
    parser.add_argument("--activations", help="Activations to inspect on (default: the SAE's own).")
    _submission_args(parser)
    args = parser.parse_args(argv)
    given = {"sae": str(Path(args.sae_dir).expanduser().resolve()), "tokens": args.tokens, "top_k": args.top_k,
             "activations": args.activations}  # fmt: skip
    try:
        cfg = InspectConfig.from_dict({k: v for k, v in given.items() if v is not None})
        job, verdict = submission.submit(cfg, _submission(args))
    except (ConfigError, JobError) as exc:
        return _reject(str(exc))
    _print_notes(verdict.notes)
    return _queued(job, args, f"queued inspection job {job.id} ({job.name}) on {_placement(job)} of {cfg.sae}")


def _then_train_config(path: str) -> TrainConfig:
    """The training config of --then-train; its activation_source is the extraction's folder, whatever it says."""
    data = read_json_object(path, "config file", "TrainConfig keys")
    return TrainConfig.from_dict({**data, "activation_source": data.get("activation_source") or "(the extraction)"})


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


# --------------------------------------------------------------------------- jobs


def _queued(job: Job, args: argparse.Namespace, message: str) -> int:
    """Report a newly queued job (JSON or a sentence) and whether a launcher will pick it up."""
    print(json.dumps(store.job_to_dict(job)) if args.json else message)
    _daemon_note(args.no_daemon, args.json)
    return 0


def _placement(job: Job) -> str:
    return f"GPU {job.gpu_ids}" if job.gpu_list else f"CPU x{job.cpu_procs}"


def _duration(job: Job, now: float) -> str:
    if job.started_at is None:
        return f"queued {now - job.created_at:.0f}s"
    end = job.finished_at or now
    return format_duration(max(0.0, end - job.started_at))


def sweep_member_rows(job: Job) -> list[dict] | None:
    """A sweep job's members, as its folder shows them (name, status, error, last step and FVU, folder); None for
    a job that is not a sweep. Before the sweep writes its plan, the members are the config's, with the job's
    status."""
    if job_kind(job.kind).config is not Sweep:
        return None
    on_disk = {m.name: m for m in sweep_members(job.out_dir)} if job.out_dir else {}
    try:
        names = [m.name for m in store.job_config(job).members]
    except (ConfigError, ValueError):
        names = list(on_disk)
    rows = []
    for name in names:
        member = on_disk.get(name)
        if member is None:
            status = job.status if job.status in ("queued", "starting", "running") else "not started"
        else:  # a member still "running" in a sweep that ended stopped with it
            status = job.status if member.status == "running" and job.status in FINAL_STATUSES else member.status
        folder = Path(job.out_dir) / name if job.out_dir else None
        step, fvu = _last_step(folder / METRICS_FILE) if folder is not None else (None, None)
        if member is not None and isinstance(member.figures.get("fvu"), int | float):
            fvu = float(member.figures["fvu"])  # the holdout's, once evaluated
        error = member.error if member is not None else None
        rows.append({"name": name, "status": status, "error": error, "step": step, "fvu": fvu, "folder": str(folder)})
    return rows


def _last_step(path: Path) -> tuple[int | None, float | None]:
    """The step and FVU of the newest metrics record of a member (reading the file's end only)."""
    for line in reversed(tail_text(path, 8192).splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            fvu = record.get("fvu")
            return record["step"], float(fvu) if isinstance(fvu, int | float) else None
    return None, None


def _member_line(member: dict, total_steps: int) -> str:
    step = f"step {member['step']}/{total_steps}" if member["step"] is not None else ""
    fvu = f"fvu {member['fvu']:.4f}" if member["fvu"] is not None else ""
    error = brief(member["error"].splitlines()[0], 60) if member["error"] else ""
    cells = [brief(member["name"], 48).ljust(30), member["status"].ljust(11), step.ljust(14), fvu.ljust(11), error]
    return ("    " + "  ".join(cells)).rstrip()


def format_jobs(jobs: list[Job], now: float | None = None, members: dict[int, list[dict]] | None = None) -> str:
    """The jobs as a table; under a sweep (`members` by job id), a line per member."""
    now = time.time() if now is None else now
    members = members or {}
    header = ("ID", "NAME", "STATUS", "WHERE", "STEP", "TOK/S", "USER", "TIME", "ERROR")
    rows = [header]
    for job in jobs:
        error = brief(job.error.splitlines()[0], 60) if job.error else ""
        status = job.status + ("*" if job.cancel_requested and job.status not in FINAL_STATUSES else "")
        rows.append(
            (
                str(job.id),
                brief(job.name, 24),  # one line per job, whatever an older row holds
                status,
                _placement(job),
                f"{job.last_step}/{job.total_steps}",
                f"{job.tokens_per_s:,.0f}" if job.tokens_per_s else "-",
                brief(job.submitted_by, 12),
                _duration(job, now),
                error,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(rows[0], widths, strict=True)).rstrip()]
    for job, row in zip(jobs, rows[1:], strict=True):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        lines += [_member_line(member, job.total_steps) for member in members.get(job.id, [])]
    if any(j.cancel_requested and j.status not in FINAL_STATUSES for j in jobs):
        lines.append("* cancel requested")
    return "\n".join(lines)


def cli_jobs(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sae_core jobs", description="List jobs, newest first.")
    parser.add_argument("--status", action="append", choices=JOB_STATUSES, help="Only jobs in this status.")
    parser.add_argument("--limit", type=int, default=50, help="At most this many jobs (0 = all).")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    jobs = store.list_jobs(args.status, limit=args.limit or None)
    members = {job.id: rows for job in jobs if (rows := sweep_member_rows(job)) is not None}
    if args.json:
        print(
            json.dumps(
                [{**store.job_to_dict(j), **({"members": members[j.id]} if j.id in members else {})} for j in jobs]
            )
        )
        return 0
    print(format_jobs(jobs, members=members) if jobs else "no jobs")
    status = daemon_status(paths.lab_home())
    print(f"\n{status.message}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- cancel


def cli_cancel(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sae_core cancel", description="Cancel a job.")
    parser.add_argument("job_id", type=int)
    parser.add_argument("--wait", type=float, default=0.0, help="Wait up to this many seconds for the job to end.")
    parser.add_argument(
        "--grace",
        type=float,
        default=GRACE_S,
        help="SIGTERM -> SIGKILL seconds when this command stops the job itself.",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        job, message = cancel_job(args.job_id, grace_s=args.grace, wait_s=args.wait)
    except JobError as exc:
        return _reject(str(exc))
    if args.json:
        print(json.dumps(store.job_to_dict(job)))
    else:
        print(message)
    return 0


# --------------------------------------------------------------------------- resume


def cli_resume(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sae_core resume",
        description="Queue a job that continues a failed or cancelled one from its last complete checkpoint.",
    )
    parser.add_argument("job_id", type=int)
    parser.add_argument("--user", default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-daemon", action="store_true")
    args = parser.parse_args(argv)
    try:
        job, verdict = submission.resume(args.job_id, submitted_by=args.user or _user())
    except (JobError, ConfigError) as exc:
        return _reject(str(exc))
    _print_notes(verdict.notes)
    return _queued(job, args, f"queued job {job.id}, resuming job {args.job_id} on {_placement(job)}")


# --------------------------------------------------------------------------- logs


def _print_from(path: Path, offset: int) -> int:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            chunk = fh.read()
    except FileNotFoundError:
        return offset
    if chunk:
        sys.stdout.write(chunk.decode(errors="replace"))
        sys.stdout.flush()
    return offset + len(chunk)


def cli_logs(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sae_core logs", description="Show a job's console output.")
    parser.add_argument("job_id", type=int)
    parser.add_argument("--follow", "-f", action="store_true", help="Keep printing until the job ends.")
    parser.add_argument("--stderr", action="store_true", help="The stderr log (tracebacks, torchrun) instead.")
    parser.add_argument("--poll", type=float, default=0.5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        job = store.require_job(args.job_id)
    except JobError as exc:
        return _reject(str(exc))
    path = log_dir_of(job) / (STDERR_LOG if args.stderr else STDOUT_LOG)
    offset = _print_from(path, 0)
    try:
        while args.follow and job.status not in FINAL_STATUSES:
            time.sleep(args.poll)
            job = store.require_job(args.job_id)
            offset = _print_from(path, offset)
        offset = _print_from(path, offset)  # what was written between the last read and the end
    except KeyboardInterrupt:
        return 0
    if job.status == "failed" and job.error:
        print(f"\njob {job.id} failed: {job.error}", file=sys.stderr)
    elif job.status not in FINAL_STATUSES and not path.exists():
        print(f"job {job.id} is {job.status}; no output yet", file=sys.stderr)
    return 0
