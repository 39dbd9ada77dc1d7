"""Text datasets and contexts: documents from files or `datasets`, tokenised and packed into fixed contexts.

No torch: the gate reads a dataset's first document to check it; the tokenizer is passed in by the caller.

Sources: a `.txt` file (one document per non-empty line), `.jsonl` (an object per line) or `.json` (a list
of objects, or an object of lists) with `text_field`, `.parquet` (column `text_field`), a folder of such
files (sorted by name), a folder written by `datasets.save_to_disk` (its `split`), or the name of a hub
dataset the local Hugging Face cache holds (catalog.hub_snapshot: the hub itself is never asked).

Pieces: a document is read and tokenised in pieces of at most PIECE_CHARS characters, cut before a
whitespace where there is one near the end (the space starts the next piece, as tokenizers that split
words with their leading space see it); a `.txt` line is never held whole, so a one-line file of any size
costs what the contexts asked for. Records of the other kinds are parsed whole, then cut the same way.

Packing: documents are tokenised without special tokens and joined into one stream, each followed by the
tokenizer's EOS when it has one; the stream is cut into contexts of `context_size` tokens, each starting
with the BOS (or CLS) token when `prepend_bos`. An incomplete tail is dropped; nothing is padded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TextIO

import numpy as np

from ..files import TEXT_SUFFIXES
from ..text import brief
from .catalog import hub_snapshot

PIECE_CHARS = 1 << 16  # the longest piece of a document read or tokenised at once
_TOKENIZE_BATCH = 256  # pieces per tokenizer call...
_TOKENIZE_CHARS = 1 << 18  # ...and at most about this many characters (the call's memory grows with them)


class TextError(ValueError):
    """A problem with the text dataset, phrased for a person."""


class Piece(NamedTuple):
    """Consecutive text of one document, at most PIECE_CHARS characters; `last`: the document ends with it."""

    text: str
    last: bool


# ------------------------------------------------------------------------------------------- documents
def iter_pieces(dataset: str, text_field: str = "text", split: str = "train") -> Iterator[Piece]:
    """The dataset's documents in a fixed order, as pieces; TextError for a source that cannot be read."""
    snapshot = hub_snapshot(dataset, "dataset")
    if snapshot is not None:
        yield from _split_all(_hub_dataset(snapshot, dataset, text_field, split))
        return
    path = Path(dataset).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            yield from _split_all(_saved_dataset(path, text_field, split))
            return
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise TextError(f"dataset: {brief(path)} holds no {', '.join(TEXT_SUFFIXES)} files")
        for file in files:
            yield from _file_pieces(file, text_field)
    elif path.is_file():
        yield from _file_pieces(path, text_field)
    else:
        raise TextError(f"dataset: {brief(path)} not found")


def _file_pieces(path: Path, text_field: str) -> Iterator[Piece]:
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise TextError(f"dataset: {brief(path)} has an unsupported type; allowed: {', '.join(TEXT_SUFFIXES)}")
    try:
        if suffix == ".txt":
            with open(path, encoding="utf-8", errors="replace") as f:
                yield from _line_pieces(f)
        elif suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        yield from _split(_field(_json(line, path, number), text_field, path, number))
        elif suffix == ".json":
            yield from _split_all(_json_documents(path, text_field))
        else:
            yield from _split_all(_parquet_documents(path, text_field))
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


def _hub_dataset(snapshot: Path, name: str, text_field: str, split: str) -> Iterator[str]:
    """A hub dataset's files as the local cache holds them, read as a local folder (no hub look-up)."""
    import datasets

    try:
        loaded = datasets.load_dataset(str(snapshot), split=split, streaming=True)
    except Exception as exc:  # noqa: BLE001  (no such split, files of no known kind)
        raise TextError(
            f"dataset: {brief(name, 100)!r} in the local Hugging Face cache does not load ({brief(exc, 160)})"
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


def _line_pieces(f: TextIO) -> Iterator[Piece]:
    """Each non-empty line of a text file as a document, read at most PIECE_CHARS characters at a time."""
    carry, continued = "", False  # the start of the next piece; whether its line has given pieces already
    while True:
        room = PIECE_CHARS - len(carry)
        part = f.readline(room)
        text = carry + part
        if part.endswith("\n") or len(part) < room:  # the line (or the file) ends here
            text = text.removesuffix("\n")
            if continued or text.strip():
                yield Piece(text, True)
            if not part:
                return
            carry, continued = "", False
        else:
            end = _cut(text)
            yield Piece(text[:end], False)
            carry, continued = text[end:], True


def _split_all(documents: Iterable[str]) -> Iterator[Piece]:
    for document in documents:
        yield from _split(document)


def _split(document: str) -> Iterator[Piece]:
    """A document held whole (a JSON record, a column's cell) as pieces."""
    start = 0
    while len(document) - start > PIECE_CHARS:
        end = start + _cut(document[start : start + PIECE_CHARS])
        yield Piece(document[start:end], False)
        start = end
    yield Piece(document[start:], True)


def _cut(text: str) -> int:
    """Where a piece of `text` ends: at its last space, tab or newline in its last quarter, else at its end.
    A quarter at most is carried over, so the next read is at least three quarters of a piece."""
    i = max(text.rfind(space, len(text) * 3 // 4) for space in " \t\n")
    return i if i > 0 else len(text)


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


def pack_contexts(tokenizer, pieces, context_size: int, prepend_bos: bool, enough, specials: Specials):
    """Contexts [n, context_size] int32 from the documents' token stream (`pieces`, as iter_pieces gives
    them), stopping once `enough(contexts)` says the contexts so far suffice (it sees the newest ones and
    returns True to stop). Returns the array and whether the documents ran out first. Memory: the contexts
    kept, and one tokenizer call's worth of text (_TOKENIZE_CHARS), however long a document is."""
    body = context_size - 1 if prepend_bos else context_size
    if prepend_bos and specials.start_id is None:
        raise TextError("prepend_bos: the tokenizer has no BOS or CLS token; set prepend_bos to false")
    stream: list[int] = []
    done: list[np.ndarray] = []
    batch: list[Piece] = []
    chars = 0

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

    for piece in pieces:
        batch.append(piece)
        chars += len(piece.text)
        if len(batch) >= _TOKENIZE_BATCH or chars >= _TOKENIZE_CHARS:
            _extend(stream, tokenizer, batch, specials)
            batch.clear()
            chars = 0
            if cut():
                return _stack(done, context_size), False
    if batch:
        _extend(stream, tokenizer, batch, specials)
    cut()
    return _stack(done, context_size), True


def _extend(stream: list[int], tokenizer, pieces: list[Piece], specials: Specials) -> None:
    encoded = tokenizer([piece.text for piece in pieces], add_special_tokens=False)["input_ids"]
    for piece, ids in zip(pieces, encoded, strict=True):
        stream.extend(ids)
        if piece.last and specials.separator_id is not None:
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
