"""Text datasets and contexts: documents from files or `datasets`, tokenised and packed into fixed contexts.

No torch: the gate reads a dataset's first document to check it; the tokenizer is passed in by the caller.

Sources: a `.txt` file (one document per non-empty line), `.jsonl` (an object per line) or `.json` (a list
of objects, or an object of lists) with `text_field`, `.parquet` (column `text_field`), a folder of such
files (sorted by name), a folder written by `datasets.save_to_disk` (its `split`), or a hub dataset name
(only where the hub is reachable: `HF_HUB_OFFLINE` is honoured).

Packing: documents are tokenised without special tokens and joined into one stream, each followed by the
tokenizer's EOS when it has one; the stream is cut into contexts of `context_size` tokens, each starting
with the BOS (or CLS) token when `prepend_bos`. An incomplete tail is dropped; nothing is padded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import TEXT_SUFFIXES
from ..text import brief

_TOKENIZE_BATCH = 256  # documents per tokenizer call


class TextError(ValueError):
    """A problem with the text dataset, phrased for a person."""


def is_hub_name(name: str) -> bool:
    """`org/name` or `name` (what the Hugging Face hub calls a repository), not a path on this machine."""
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1 and "\\" not in name


# ------------------------------------------------------------------------------------------- documents
def iter_documents(dataset: str, text_field: str = "text", split: str = "train") -> Iterator[str]:
    """The dataset's documents, in a fixed order; TextError for a source that cannot be read."""
    path = Path(dataset).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            yield from _saved_dataset(path, text_field, split)
            return
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise TextError(f"dataset: {brief(path)} holds no {', '.join(TEXT_SUFFIXES)} files")
        for file in files:
            yield from _file_documents(file, text_field)
    elif path.is_file():
        yield from _file_documents(path, text_field)
    elif is_hub_name(dataset) and "/" in dataset:
        yield from _hub_dataset(dataset, text_field, split)
    else:
        raise TextError(f"dataset: {brief(path)} not found")


def _file_documents(path: Path, text_field: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise TextError(f"dataset: {brief(path)} has an unsupported type; allowed: {', '.join(TEXT_SUFFIXES)}")
    try:
        if suffix == ".txt":
            with open(path, encoding="utf-8", errors="replace") as f:
                yield from (line.rstrip("\n") for line in f if line.strip())
        elif suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        yield _field(_json(line, path, number), text_field, path, number)
        elif suffix == ".json":
            yield from _json_documents(path, text_field)
        else:
            yield from _parquet_documents(path, text_field)
    except OSError as exc:
        raise TextError(f"dataset: {brief(path)} cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise TextError(f"dataset: {brief(path)} is not UTF-8 text") from None


def _json(line: str, path: Path, number: int):
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise TextError(f"dataset: {brief(path)} line {number} is not JSON ({exc.msg})") from None


def _field(record, text_field: str, path: Path, number: int) -> str:
    if not isinstance(record, dict) or text_field not in record:
        keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise TextError(
            f"text_field: {brief(path)} record {number} has no field {text_field!r} (it has: {brief(keys, 120)})"
        )
    value = record[text_field]
    if not isinstance(value, str):
        raise TextError(f"text_field: {text_field!r} of {brief(path)} record {number} is not text")
    return value


def _json_documents(path: Path, text_field: str) -> Iterator[str]:
    data = _json(path.read_text(encoding="utf-8"), path, 1)
    if isinstance(data, dict) and isinstance(data.get(text_field), list):  # an object of columns
        data = [{text_field: value} for value in data[text_field]]
    if not isinstance(data, list):
        raise TextError(f"dataset: {brief(path)} must hold a list of objects with {text_field!r}")
    for number, record in enumerate(data, 1):
        yield _field(record, text_field, path, number)


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001
        raise TextError(f"dataset: {brief(path)} is not a parquet file ({brief(exc, 120)})") from None
    if text_field not in table.schema_arrow.names:
        names = ", ".join(table.schema_arrow.names)
        raise TextError(f"text_field: {brief(path)} has no column {text_field!r} (it has: {brief(names, 120)})")
    for batch in table.iter_batches(columns=[text_field], batch_size=1024):
        yield from (value for value in batch.column(0).to_pylist() if isinstance(value, str))


def _saved_dataset(path: Path, text_field: str, split: str) -> Iterator[str]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001
        raise TextError(f"dataset: {brief(path)} does not load with datasets ({brief(exc, 120)})") from None
    yield from _dataset_texts(loaded, text_field, split, brief(path))


def _hub_dataset(name: str, text_field: str, split: str) -> Iterator[str]:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as exc:  # noqa: BLE001  (offline, unknown name, no such split)
        raise TextError(
            f"dataset: {brief(name, 100)!r} is not a file or folder, and the hub gave: {brief(exc, 160)}"
        ) from None
    yield from _dataset_texts(loaded, text_field, split, name)


def _dataset_texts(loaded, text_field: str, split: str, shown: str) -> Iterator[str]:
    if hasattr(loaded, "keys") and not hasattr(loaded, "features"):  # a DatasetDict: pick the split
        if split not in loaded:
            raise TextError(f"split: {shown} has no split {split!r} (it has: {', '.join(loaded.keys())})")
        loaded = loaded[split]
    columns = list(getattr(loaded, "column_names", None) or [])
    if columns and text_field not in columns:
        raise TextError(f"text_field: {shown} has no column {text_field!r} (it has: {brief(', '.join(columns), 120)})")
    for record in loaded:
        value = record.get(text_field)
        if isinstance(value, str):
            yield value


# ---------------------------------------------------------------------------------------------- packing
@dataclass(frozen=True)
class Specials:
    """The tokenizer's special tokens as the packing and the row filter need them."""

    start_id: int | None  # BOS, else CLS: what prepend_bos puts first
    separator_id: int | None  # EOS, else SEP: what ends each document in the stream
    special_ids: tuple[int, ...]  # every special token id (excluded from rows when asked)
    adds_start: bool  # whether the tokenizer itself starts a text with start_id

    @classmethod
    def of(cls, tokenizer) -> Specials:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        adds_start = start is not None and bool(probe) and probe[0] == start
        return cls(start, separator, tuple(sorted(set(tokenizer.all_special_ids))), adds_start)


def pack_contexts(tokenizer, documents, context_size: int, prepend_bos: bool, enough, specials: Specials):
    """Contexts [n, context_size] int32 from the documents' token stream, stopping once `enough(contexts)`
    says the contexts so far suffice (it sees the newest ones and returns True to stop). Returns the array
    and whether the documents ran out first."""
    body = context_size - 1 if prepend_bos else context_size
    if prepend_bos and specials.start_id is None:
        raise TextError("prepend_bos: the tokenizer has no BOS or CLS token; set prepend_bos to false")
    stream: list[int] = []
    done: list[np.ndarray] = []
    batch: list[str] = []

    def cut() -> bool:
        whole = len(stream) // body
        if not whole:
            return False
        tokens = np.asarray(stream[: whole * body], dtype=np.int32).reshape(whole, body)
        del stream[: whole * body]
        if prepend_bos:
            tokens = np.concatenate([np.full((whole, 1), specials.start_id, np.int32), tokens], axis=1)
        done.append(tokens)
        return bool(enough(tokens))

    for document in documents:
        batch.append(document)
        if len(batch) >= _TOKENIZE_BATCH:
            _extend(stream, tokenizer, batch, specials)
            batch.clear()
            if cut():
                return _stack(done, context_size), False
    if batch:
        _extend(stream, tokenizer, batch, specials)
    cut()
    return _stack(done, context_size), True


def _extend(stream: list[int], tokenizer, documents: list[str], specials: Specials) -> None:
    for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if specials.separator_id is not None:
            stream.append(specials.separator_id)


def _stack(done: list[np.ndarray], context_size: int) -> np.ndarray:
    return np.concatenate(done) if done else np.empty((0, context_size), np.int32)


def kept_positions(tokens: np.ndarray, specials: Specials, exclude_special: bool) -> np.ndarray:
    """bool [n, context_size]: the positions written as rows (all, or all but special tokens)."""
    if not exclude_special:
        return np.ones(tokens.shape, dtype=bool)
    return ~np.isin(tokens, np.asarray(specials.special_ids, dtype=np.int32))


def token_texts(tokenizer, ids) -> dict[str, str]:
    """The text of each token id as it reads inside running text, keyed by the id as a string. A byte-level
    BPE token decodes with its own leading space; a WordPiece token does not, so one that starts a word
    (no `##`) gets the space the tokenizer's decoder would put before it."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    wordpiece = type(decoder).__name__ == "WordPiece"
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    texts = {}
    for token_id in ids:
        text = tokenizer.decode([int(token_id)])
        if wordpiece and int(token_id) not in special:
            piece = tokenizer.convert_ids_to_tokens(int(token_id))
            text = piece[2:] if piece.startswith("##") else " " + text
        texts[str(int(token_id))] = text
    return texts
