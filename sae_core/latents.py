"""An SAE's `inspect/` folder, read without torch: what the Explore page shows, one latent at a time.

The inspect job (model/inspect.py) writes `summary.json`, `latents.safetensors` (per-latent arrays, latent
first) and `tokens.json` (the text of every token id used). Reading a latent slices the arrays it needs from
the file (no full load), so a latent of a wide SAE appears at once. `neuronpedia_feature` turns a latent into
the JSON layout of a Neuronpedia feature (README documents the mapping); `neuronpedia_zip` packs them all.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from .files import INSPECT_DIR, INSPECT_LATENTS_FILE, INSPECT_SUMMARY_FILE, INSPECT_TOKENS_FILE
from .outputs import plain_file, read_json

INSPECT_VERSION = 1
WINDOW_BEFORE, WINDOW_AFTER = 10, 5  # tokens of an example shown before and after its peak
WINDOW = WINDOW_BEFORE + 1 + WINDOW_AFTER
NO_TOKEN = -1
TABLE_ARRAYS = ("frequency", "max_activation", "mean_activation")  # read whole for the latents table


@dataclass(frozen=True)
class Example:
    tokens: list[str]  # the window's token texts, the peak at `peak`
    acts: list[float]  # the latent's activation on each token (0 where unknown or not fired)
    value: float  # the activation at the peak
    peak: int
    row: int


@dataclass(frozen=True)
class LatentView:
    index: int
    frequency: float
    max_activation: float
    mean_activation: float
    histogram: list[int]
    top: list[Example]
    bands: list[list[Example]]  # examples per activation band, lowest band first
    logit_top: list[tuple[str, float]]
    logit_bottom: list[tuple[str, float]]
    nearest: list[tuple[int, float]]
    true_feature: tuple[int, float] | None


class Inspection:
    """The inspect folder of one SAE; `latent(j)` reads latent j's view."""

    def __init__(self, folder: Path, summary: dict, token_text: dict[str, str]):
        self.folder, self.summary, self.token_text = folder, summary, token_text
        self._file = folder / INSPECT_LATENTS_FILE
        with safe_open(str(self._file), framework="numpy") as f:
            self.names = set(f.keys())
            self.table_arrays = {name: f.get_tensor(name) for name in TABLE_ARRAYS}
            self.edges = f.get_tensor("histogram_edges")
            self.logit_top_ids = f.get_tensor("logit_top_ids") if "logit_top_ids" in self.names else None
        self.d_sae = len(self.table_arrays["frequency"])

    def text(self, token_id: int) -> str:
        return self.token_text.get(str(int(token_id)), f"<{int(token_id)}>")

    def window_text(self, ids: np.ndarray) -> list[str]:
        return [self.text(i) if i != NO_TOKEN else "" for i in ids]

    def latent(self, index: int) -> LatentView:
        if not 0 <= index < self.d_sae:
            raise IndexError(f"latent {index} is not between 0 and {self.d_sae - 1}")
        with safe_open(str(self._file), framework="numpy") as f:
            return self._view(index, self._row(f, index))

    def all_latents(self):
        """Every latent's view in order, the file opened once (the export)."""
        with safe_open(str(self._file), framework="numpy") as f:
            for index in range(self.d_sae):
                yield self._view(index, self._row(f, index))

    def _row(self, f, index: int) -> dict:
        return {name: f.get_slice(name)[index] for name in self.names if name != "histogram_edges"}

    def _view(self, index: int, row: dict) -> LatentView:
        before = int(self.summary.get("window_before", 0))
        text = "top_tokens" in row  # rows extracted from a model carry their text; a toy set's do not
        top = [
            self._example(row["top_tokens"][slot] if text else None, row["top_token_acts"][slot] if text else None,
                          row["top_values"][slot], before, row["top_rows"][slot])
            for slot in range(len(row["top_rows"])) if row["top_rows"][slot] >= 0
        ]  # fmt: skip
        bands = []
        per_band = int(self.summary.get("band_examples", 1))
        for band in range(int(self.summary.get("bands", 0))):
            slots = [s for s in range(band * per_band, (band + 1) * per_band) if row["band_rows"][s] >= 0]
            bands.append([
                self._example(row["band_tokens"][s] if text else None, None, row["band_values"][s], before,
                              row["band_rows"][s])
                for s in slots
            ])  # fmt: skip
        return LatentView(
            index=index,
            frequency=float(self.table_arrays["frequency"][index]),
            max_activation=float(self.table_arrays["max_activation"][index]),
            mean_activation=float(self.table_arrays["mean_activation"][index]),
            histogram=[int(c) for c in row["histogram"]],
            top=top,
            bands=bands,
            logit_top=self._effects(row, "logit_top"),
            logit_bottom=self._effects(row, "logit_bottom"),
            nearest=[(int(i), float(c)) for i, c in zip(row["nearest"], row["nearest_cosine"], strict=True)],
            true_feature=(int(row["true_feature"]), float(row["true_cosine"])) if "true_feature" in row else None,
        )

    def _example(self, ids, acts, value, peak: int, row_id) -> Example:
        """An example's window; without text (ids None) only its row and value."""
        if ids is None:
            return Example([], [], float(value), 0, int(row_id))
        shown = [float(a) for a in acts] if acts is not None else [0.0] * len(ids)
        if acts is None:
            shown[peak] = float(value)
        return Example(self.window_text(ids), shown, float(value), peak, int(row_id))

    def _effects(self, row: dict, name: str) -> list[tuple[str, float]]:
        if f"{name}_ids" not in row:
            return []
        return [(self.text(i), float(v)) for i, v in zip(row[f"{name}_ids"], row[name], strict=True)]

    def histogram_bins(self) -> list[tuple[float, float]]:
        """The (low, high) activation of each histogram bin (the edges are log10)."""
        return [(10 ** float(a), 10 ** float(b)) for a, b in zip(self.edges[:-1], self.edges[1:], strict=True)]


def inspection_stamp(sae_dir: Path) -> float | None:
    """When the SAE's inspect folder was last written (its summary's mtime), None when there is none: what a
    cached reader is keyed by, so a rerun of the inspect job is picked up."""
    summary = Path(sae_dir) / INSPECT_DIR / INSPECT_SUMMARY_FILE
    return summary.stat().st_mtime if plain_file(summary) else None


def read_inspection(sae_dir: Path) -> Inspection | None:
    """The SAE's inspect folder, or None when there is none (or it is unreadable, a link, another version)."""
    folder = Path(sae_dir) / INSPECT_DIR
    summary = read_json(folder / INSPECT_SUMMARY_FILE)
    if summary.get("version") != INSPECT_VERSION or not plain_file(folder / INSPECT_LATENTS_FILE):
        return None
    tokens = read_json(folder / INSPECT_TOKENS_FILE)
    try:
        return Inspection(folder, summary, {str(k): str(v) for k, v in tokens.items()})
    except (SafetensorError, OSError, KeyError):
        return None


# --------------------------------------------------------------------------- Neuronpedia export


def neuronpedia_feature(inspection: Inspection, view: LatentView) -> dict:
    """One latent in the layout of a Neuronpedia feature JSON (field names as Neuronpedia's bulk import reads)."""
    bins = inspection.histogram_bins()
    return {
        "modelId": inspection.summary.get("model") or "",
        "layer": inspection.summary.get("hook") or "",
        "index": view.index,
        "maxActApprox": view.max_activation,
        "frac_nonzero": view.frequency,
        "activations": [
            {
                "tokens": example.tokens,
                "values": example.acts,
                "maxValue": example.value,
                "maxValueTokenIndex": example.peak,
            }
            for example in view.top
        ],
        "pos_str": [text for text, _ in view.logit_top],
        "pos_values": [value for _, value in view.logit_top],
        "neg_str": [text for text, _ in view.logit_bottom],
        "neg_values": [value for _, value in view.logit_bottom],
        "freq_hist_data_bar_heights": view.histogram,
        "freq_hist_data_bar_values": [math.sqrt(low * high) for low, high in bins],
    }


def neuronpedia_zip(inspection: Inspection) -> bytes:
    """Every latent's Neuronpedia JSON (`<index>.json`) in one zip."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for view in inspection.all_latents():
            zf.writestr(f"{view.index}.json", json.dumps(neuronpedia_feature(inspection, view)))
    return buffer.getvalue()
