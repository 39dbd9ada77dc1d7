"""Toy activations with ground truth: sparse non-negative mixes of known unit directions, plus noise.

`write_toy` streams a set far larger than RAM to one safetensors file (`activations`, `features`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..files import FEATURES_KEY

_TOY_STREAM = 3  # a random stream of its own, apart from the data order's (order.py)


@dataclass(frozen=True)
class ToyCodes:
    """Ground-truth sparse codes of one chunk: feature `feature[i]` fires on chunk row `row[i]` with `magnitude[i]`.

    Entries are unique per (row, feature) and sorted by row, then feature.
    """

    row: np.ndarray  # int64 [E]
    feature: np.ndarray  # int64 [E]
    magnitude: np.ndarray  # float32 [E], > 0


def _check_toy_args(tokens: int, d_in: int, features: int, seed: int) -> None:
    for name, value, low in (("tokens", tokens, 1), ("d_in", d_in, 1), ("features", features, 1), ("seed", seed, 0)):
        if not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{name} must be an integer of at least {low}, got {value!r}")
    if features * d_in > 2**28:
        raise ValueError(
            f"features x d_in (--features x --d-in) = {features * d_in:,} is too large (at most {2**28:,}); lower one"
        )


class ToyGenerator:
    """Activations that are sparse non-negative combinations of known unit directions, plus small noise.

    In a chunk of n tokens feature i fires Binomial(n, p_i) times on uniformly random tokens (two firings on one
    token merge, so its firing frequency is about p_i); the p_i are log-uniform over `freq_decades` decades (a few
    common features, many rare ones), scaled so that about `mean_active` features fire per token. A firing has an Exponential(1) magnitude. Noise is Gaussian with expected norm
    `noise_norm`. Chunk `i` is generated from its own seed, so any chunk can be regenerated on its own.
    """

    def __init__(
        self,
        d_in: int,
        features: int,
        seed: int,
        *,
        mean_active: float = 3.0,
        freq_decades: float = 1.5,
        noise_norm: float = 0.05,
    ):
        _check_toy_args(1, d_in, features, seed)
        self.d_in, self.n_features, self.seed, self.noise_norm = d_in, features, seed, noise_norm
        rng = np.random.default_rng([seed, _TOY_STREAM])
        directions = rng.standard_normal((features, d_in))
        self.features = (directions / np.linalg.norm(directions, axis=1, keepdims=True)).astype(np.float32)
        weights = 10.0 ** rng.uniform(0.0, freq_decades, size=features)
        self.firing_prob = np.minimum(weights * (mean_active / weights.sum()), 1.0)
        # Keep a chunk's activations and firing contributions near 16 MB each, whatever the width.
        self.chunk_rows = int(np.clip(2**22 // (d_in * max(1.0, mean_active)), 64, 65536))

    def codes(self, index: int, n_rows: int) -> ToyCodes:
        rng = np.random.default_rng([self.seed, _TOY_STREAM, 1, index])
        counts = rng.binomial(n_rows, self.firing_prob)  # firings of each feature in this chunk
        feature = np.repeat(np.arange(self.n_features, dtype=np.int64), counts)
        row = rng.integers(0, n_rows, size=feature.size, dtype=np.int64)
        magnitude = rng.exponential(1.0, size=feature.size)
        # Two firings of one feature on one token merge into one, magnitudes added.
        key, inverse = np.unique(row * self.n_features + feature, return_inverse=True)
        merged = np.bincount(inverse.ravel(), weights=magnitude, minlength=key.size).astype(np.float32)
        return ToyCodes(row=key // self.n_features, feature=key % self.n_features, magnitude=merged)

    def decode(self, codes: ToyCodes, n_rows: int) -> np.ndarray:
        """Noise-free activations of a chunk: sum of magnitude x feature direction per row. float32 [n_rows, d_in]."""
        sparse = torch.sparse_coo_tensor(
            torch.from_numpy(np.stack([codes.row, codes.feature])),
            torch.from_numpy(codes.magnitude),
            (n_rows, self.n_features),
            is_coalesced=True,  # entries are unique and sorted
            check_invariants=False,
        )
        return torch.sparse.mm(sparse, torch.from_numpy(self.features)).numpy()  # [n_rows, d_in]

    def chunk(self, index: int, n_rows: int) -> tuple[ToyCodes, np.ndarray]:
        codes = self.codes(index, n_rows)
        rng = np.random.default_rng([self.seed, _TOY_STREAM, 2, index])
        noise = rng.standard_normal((n_rows, self.d_in), dtype=np.float32) * np.float32(
            self.noise_norm / math.sqrt(self.d_in)
        )
        return codes, self.decode(codes, n_rows) + noise

    def iter_chunks(self, tokens: int) -> Iterator[tuple[int, ToyCodes, np.ndarray]]:
        """(first row, codes, float32 activations) for the chunks of a `tokens`-row set, in order."""
        for index, start in enumerate(range(0, tokens, self.chunk_rows)):
            codes, acts = self.chunk(index, min(self.chunk_rows, tokens - start))
            yield start, codes, acts


@dataclass(frozen=True)
class ToySummary:
    path: str
    tokens: int
    d_in: int
    features: int
    seed: int
    nbytes: int
    mean_active: float  # measured mean number of firing features per token
    rarest_frequency: float  # measured firing frequency of the rarest / commonest feature
    commonest_frequency: float

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (
            f"wrote {self.path} ({self.nbytes / 1e6:,.1f} MB): activations [{self.tokens}, {self.d_in}] float32, "
            f"features [{self.features}, {self.d_in}] float32; {self.mean_active:.2f} active features per token "
            f"on average; firing frequencies from {self.rarest_frequency:.2g} to {self.commonest_frequency:.2g}"
        )


def _safetensors_header(tensors: list[tuple[str, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """Header for float32 tensors laid out back to back in the order given, padded to 8 bytes as the format wants."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_toy(
    path: str | Path,
    tokens: int,
    d_in: int,
    features: int,
    seed: int,
    **generator_options: float,
) -> ToySummary:
    """Write a toy set (`activations` [tokens, d_in], `features` [features, d_in]) chunk by chunk.

    The file is streamed (header, features, then activation chunks), so sets far larger than RAM can be written;
    it appears under its name only when complete. `generator_options` go to `ToyGenerator`.
    """
    _check_toy_args(tokens, d_in, features, seed)
    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"output file must end in .safetensors, got {path.name!r}")
    generator = ToyGenerator(d_in, features, seed, **generator_options)
    header = _safetensors_header(
        [(FEATURES_KEY, (features, d_in)), ("activations", (tokens, d_in))],
        {"format": "pt", "generator": "sae_core toy", "seed": str(seed)},
    )
    total = len(header) + 4 * d_in * (features + tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if total > free:
        raise ValueError(f"the toy set needs {total / 1e9:.2f} GB but {path.parent} has {free / 1e9:.2f} GB free")

    fired = np.zeros(features, dtype=np.int64)
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f:
            f.write(header)
            f.write(np.ascontiguousarray(generator.features, dtype="<f4").tobytes())
            for _, codes, acts in generator.iter_chunks(tokens):
                fired += np.bincount(codes.feature, minlength=features)
                f.write(np.ascontiguousarray(acts, dtype="<f4").data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    frequency = fired / tokens
    return ToySummary(
        path=str(path),
        tokens=tokens,
        d_in=d_in,
        features=features,
        seed=seed,
        nbytes=total,
        mean_active=float(fired.sum() / tokens),
        rarest_frequency=float(frequency.min()),
        commonest_frequency=float(frequency.max()),
    )
