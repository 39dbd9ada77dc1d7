"""What the GPU check writes: each step's result.json as it goes, environment.json, and the one-page summary.md
gathered from every step's files (bench/gpu_check.py runs the steps; bench/gpu_check.sh drives them)."""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

GiB = 1024**3
PINNED_TORCH = "2.13.0"
# Modules the steps import, as pip names them (pyproject.toml pins their versions).
NEEDED = {"torch": "torch", "numpy": "numpy", "safetensors": "safetensors", "pydantic": "pydantic",
          "sqlmodel": "sqlmodel", "pynvml": "nvidia-ml-py", "psutil": "psutil", "filelock": "filelock",
          "pandas": "pandas", "transformers": "transformers", "tokenizers": "tokenizers", "pytest": "pytest",
          "pytest_timeout": "pytest-timeout"}  # fmt: skip
MARK = {True: " ✓", False: " ✗", None: ""}  # a figure's target met, missed, or not judged


class Record:
    """A step's result.json (status, headline figures against their targets, tables, notes), written again after
    every change so that a step stopped by its time box keeps what it had measured."""

    def __init__(self, directory: Path, name: str, dry_run: bool):
        self.directory, self.dry_run = directory, dry_run
        self.data: dict = {"step": name, "status": "running", "reason": None, "figures": [], "tables": {}, "notes": []}
        self.save()

    def save(self) -> None:
        tmp = self.directory / "result.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.directory / "result.json")

    def figure(self, label: str, value: str, target: str | None = None, ok: bool | None = None) -> None:
        """A headline figure; whether it met its target is kept on a GPU run only (a dry run judges nothing)."""
        ok = None if self.dry_run else ok
        self.data["figures"].append({"label": label, "value": value, "target": target, "ok": ok})
        self.save()

    def row(self, table: str, columns: list[str], values: list) -> None:
        """A row of one of the step's tables (also written as table.md)."""
        entry = self.data["tables"].setdefault(table, {"columns": columns, "rows": []})
        entry["rows"].append([format_cell(v) for v in values])
        self.save()
        tables = self.data["tables"].items()
        (self.directory / "table.md").write_text("\n\n".join(f"### {n}\n\n{markdown_table(**t)}" for n, t in tables))

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.save()

    def finish(self, status: str | None = None, reason: str | None = None) -> None:
        """`status`, or by default "pass" unless a figure missed its target."""
        missed = any(f["ok"] is False for f in self.data["figures"])
        self.data["status"] = status or ("target missed" if missed else "pass")
        self.data["reason"] = reason
        self.save()


def format_cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def size_text(n: float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 2**20:.0f} MiB"


# --------------------------------------------------------------------------- environment.json
def environment(out: Path, dry_run: bool) -> dict:
    """Which python and torch the check runs with, what CUDA it sees, and which modules are missing."""
    missing = [pip for module, pip in NEEDED.items() if importlib.util.find_spec(module) is None]
    info = {"python": sys.executable, "python_version": platform.python_version(), "missing": missing,
            "dry_run": dry_run, "started": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    sae_core = importlib.util.find_spec("sae_core")
    info["sae_core"] = str(Path(sae_core.origin).parent.parent) if sae_core and sae_core.origin else None
    if "torch" not in missing:
        import torch

        info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    out.mkdir(parents=True, exist_ok=True)
    (out / "environment.json").write_text(json.dumps(info, indent=1))
    return info


def requirements(pyproject: Path) -> list[str]:
    """The pinned requirements (`name==version`) of the modules the check needs, from pyproject.toml: what to
    `pip download` on a machine with network and carry to a box without (torch: its CUDA build, see README)."""
    import tomllib

    project = tomllib.loads(pyproject.read_text())["project"]
    pinned = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    wanted = set(NEEDED.values())
    return [spec for spec in pinned if spec.split("==")[0] in wanted]


def environment_line(env: dict) -> str:
    torch = env.get("torch", "missing")
    line = f"python {env.get('python_version', '?')} ({env.get('python', '?')}), torch {torch} (CUDA {env.get('cuda') or 'none'})"
    if not torch.startswith(PINNED_TORCH):
        line += f", not the pinned {PINNED_TORCH}"
    line += f"; sae_core from {env.get('sae_core')}"
    if env.get("missing"):
        line += f"; missing modules: {', '.join(env['missing'])}"
    return line


# --------------------------------------------------------------------------- summary.md
def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def step_outcome(directory: Path) -> tuple[str, str, dict]:
    """(status, time taken, result) of a step from its files; a time-out or a crash overrides what it said."""
    result = read_json(directory / "result.json") or {"figures": [], "tables": {}, "notes": [], "reason": None}
    run = read_json(directory / "run.json")
    if run is None:
        return "skipped", "-", {**result, "reason": "not run: the time budget was spent"}
    status, code = result.get("status", "failed"), run["exit_code"]
    if code in (124, 137):  # timeout's code, or killed after its grace
        status, result["reason"] = "failed", f"timed out after its {run['time_box']} s time box (figures so far kept)"
    elif code != 0 or status == "running":
        status = "failed"
        result["reason"] = result.get("reason") or f"exit code {code}: {log_tail(directory / 'log.txt')}"
    return status, f"{run['seconds']} s / {run['time_box']} s", result


def log_tail(path: Path, lines: int = 3) -> str:
    try:
        return " / ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])[-400:]
    except OSError:
        return "no log"


def figures_text(result: dict) -> str:
    figures = [
        f"{f['label']}: {f['value']}" + (f" ({f['target']})" if f["target"] else "") + MARK[f["ok"]]
        for f in result["figures"]
    ]
    return "; ".join(figures) or result.get("reason") or ""


def summary(out: Path, steps: list[tuple[str, str]]) -> str:
    """One page: each step (name, title) with its status, time and figures against their targets; what failed;
    then the steps' tables."""
    env = read_json(out / "environment.json") or {}
    device = ", ".join(env.get("devices", [])) or "no CUDA device"
    title = "DRY RUN on the CPU (tiny sizes, fake NVML GPUs, no targets judged)" if env.get("dry_run") else device
    lines = [f"# GPU check {env.get('started', '?')}: {title}", "", environment_line(env), ""]
    lines += ["| step | status | time | figures (target) |", "|---|---|---|---|"]
    failures, tables = [], []
    if env.get("missing"):
        failures.append(f"- **environment**: {', '.join(env['missing'])} missing; carry them (`python -m bench.gpu_check "
                        "--requirements`, see the header of bench/gpu_check.sh)")  # fmt: skip
    for i, (name, step_title) in enumerate(steps, 1):
        status, took, result = step_outcome(out / name)
        lines.append(f"| {i}. {step_title} (`{name}`) | **{status}** | {took} | {figures_text(result)} |")
        if status in ("failed", "target missed"):
            notes = "".join(f"\n  - {n}" for n in result.get("notes", [])[:6])
            failures.append(f"- **{name}**: {result.get('reason') or 'a target was missed'}{notes}")
        for table_name, table in result.get("tables", {}).items():
            tables += [f"### {table_name}", "", markdown_table(**table), ""]
    lines += ["", "## What failed", "", *(failures or ["nothing"]), "", "## Figures", "", *tables]
    lines.append(f"Every figure and log: `{out}/STEP/` (result.json, log.txt, run.json and each step's own files).")
    return "\n".join(lines) + "\n"
