"""The package's layers, read from the source: who may import whom (arrows point down), where torch and
Streamlit may appear, and the shape rules every module keeps (a one-line docstring, ~500 lines at most)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "sae_core"
SHARED = {
    "config",
    "architectures",
    "limits",
    "jsonfile",
    "paths",
    "files",
    "outputs",
    "access",
    "text",
    "log_backoff",
    "strict_config",
    "model_source",
    "sweep",
}  # facts and files every layer shares

# layer -> the sae_core layers it must never import
FORBIDDEN = {
    "db": {"engine", "data", "model", "gpu", "jobs", "cli", "ui", "train", "extract", "sae"},
    "data": {"engine", "model", "gpu", "jobs", "cli", "ui", "db", "train", "extract", "sae"},
    "engine": {"model", "gpu", "jobs", "cli", "ui", "db", "train", "extract", "sae"},
    "model": {"gpu", "jobs", "cli", "ui", "db", "train", "extract", "sae"},
    "gpu": {"engine", "model", "jobs", "cli", "ui", "train", "extract", "sae"},
    "jobs": {"engine", "model", "cli", "ui", "train", "extract", "sae"},
    "ui": {"engine", "model", "jobs", "cli", "train", "extract", "sae"},
    **{
        name: {"engine", "data", "model", "gpu", "jobs", "cli", "ui", "db", "train", "extract", "sae"}
        for name in SHARED
    },
}
TORCH_LAYERS = {"engine", "data", "model"}
MAX_LINES = 500


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "csrc" not in p.parts)


def layer_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def imported(path: Path) -> set[str]:
    """Absolute names of every module `path` imports, at any depth (functions included)."""
    package = ".".join(("sae_core", *path.relative_to(PACKAGE).parent.parts))
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}  # `from . import store`
    return names


def layers_imported(path: Path) -> set[str]:
    return {name.split(".")[1] for name in imported(path) if name.startswith("sae_core.") and name.count(".") >= 1}


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_arrows_point_down(path):
    layer = layer_of(path)
    wrong = layers_imported(path) & FORBIDDEN.get(layer, set())
    assert not wrong, f"{path.relative_to(REPO)} ({layer}) imports {sorted(wrong)}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_torch_only_where_tensors_are_and_no_streamlit(path):
    names = {name.split(".")[0] for name in imported(path)}
    assert "streamlit" not in names, f"{path.relative_to(REPO)} imports streamlit (pages live in views/)"
    if layer_of(path) not in TORCH_LAYERS:
        assert not names & {"torch", "transformers", "tokenizers", "datasets"}, (
            f"{path.relative_to(REPO)} imports torch or transformers outside engine/, data/ and model/"
        )


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_says_what_it_owns_and_stays_small(path):
    source = path.read_text()
    docstring = ast.get_docstring(ast.parse(source))
    assert docstring and docstring.splitlines()[0].strip(), f"{path.relative_to(REPO)} has no one-line docstring"
    assert len(source.splitlines()) <= MAX_LINES, f"{path.relative_to(REPO)} has more than {MAX_LINES} lines"


def test_the_rule_reads_relative_imports():
    # The checker itself: a relative import two levels up resolves to the absolute module.
    names = imported(PACKAGE / "jobs" / "gate.py")
    assert {"sae_core.gpu.availability", "sae_core.jobs.placement", "sae_core.config"} <= names
    assert layers_imported(PACKAGE / "gpu" / "history.py") >= {"db", "gpu"}
