"""Text read and tokenised in bounded pieces: a long document packs to the tokens of the whole, and a real
200 MB one-line file costs what the contexts asked for, not what the line holds (issue 21)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from sae_core.data.text import PIECE_CHARS, Specials, iter_pieces, pack_contexts
from sae_core.model.loading import load_tokenizer
from tests.conftest import subprocess_env
from tests.hf_models import WORDS


def long_document(words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), words))


def pack_all(tokenizer, pieces, context_size: int = 64) -> np.ndarray:
    specials = Specials.of(tokenizer)
    tokens, ran_out = pack_contexts(tokenizer, pieces, context_size, False, lambda _new: False, specials)
    assert ran_out
    return tokens


def test_a_long_line_is_read_in_bounded_pieces_that_join_to_it(tmp_path):
    document = long_document(60_000)  # ~330,000 characters on one line
    path = tmp_path / "one_line.txt"
    path.write_text(f"first document\n{document}\n\n   \nlast one")
    pieces = list(iter_pieces(str(path)))
    assert max(len(p.text) for p in pieces) <= PIECE_CHARS
    assert [p.text for p in pieces if p.last] == ["first document", pieces[-2].text, "last one"]  # blank lines skipped
    assert "".join(p.text for p in pieces[1:-1]) == document and len(pieces) > 5
    assert all(p.text.startswith(" ") for p in pieces[2:-1])  # cut before a space: the next word keeps it


def test_a_long_document_packs_to_the_tokens_of_the_whole(tmp_path, hf):
    tokenizer = load_tokenizer(hf["gpt2"])
    documents = [long_document(50_000, seed=1), "a short one", long_document(30_000, seed=2)]
    (tmp_path / "docs.txt").write_text("\n".join(documents) + "\n")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    whole = []
    for document in documents:  # the reference: every document tokenised at once, then its EOS
        whole += tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    expected = np.asarray(whole[: len(whole) // 64 * 64], np.int32).reshape(-1, 64)
    for name in ("docs.txt", "docs.jsonl"):
        np.testing.assert_array_equal(pack_all(tokenizer, iter_pieces(str(tmp_path / name))), expected, err_msg=name)


# A child, so that its peak RSS is its own: the extraction's own packing of 4,096 rows from the file, after
# the gate's first-document check, measured against the peak once torch, the model and tokenizer are loaded.
MEMORY_SCRIPT = r"""
import json, resource, sys
from sae_core.config import ExtractConfig
from sae_core.jobs.source_checks import first_document
from sae_core.model.run import Source, pack

cfg = ExtractConfig(model=sys.argv[1], hook="transformer.h.0", dataset=sys.argv[2], n_tokens=4096, context_size=128)
source = Source(cfg)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert first_document(cfg.dataset, cfg.text_field, cfg.split) == []
tokens = pack(cfg, source)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grew_kib": after - before, "contexts": len(tokens)}))
"""


@pytest.mark.slow
def test_a_200_mb_one_line_file_costs_what_the_contexts_ask_for(tmp_path, hf):
    path = tmp_path / "one_line.txt"
    block = (long_document(20_000) + " ").encode()
    with open(path, "wb") as f:  # 200 MB of words and not one newline
        while f.tell() < 200 * 2**20:
            f.write(block)
    child = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(hf["gpt2"]), str(path)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    assert measured["contexts"] == 4096 // 128  # GPT-2 adds no BOS: every position is a row
    assert measured["grew_kib"] < 64 * 1024, measured  # the line alone is 200 MB; its tokens were 5 GB
