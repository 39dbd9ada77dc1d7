"""Issue 21 §5 on the pages (AppTest): a binary .jsonl text on the Extract page and an .npy whose header gives an
impossible shape on the Train page are named beside the form, with no exception, traceback or code path."""

from __future__ import annotations

import shutil

from tests.app.conftest import rendered
from tests.fakes import fake_pynvml as fake
from tests.jobs.test_gate_errors import leaks_nothing, npy_with_shape


def errors(at) -> list[str]:
    return [rendered(str(e.value)) for e in at.error]


def test_a_binary_jsonl_on_the_extract_page_is_one_named_error(lab, hf):
    shutil.copytree(hf["llama"], lab.home / "models" / "tiny-llama")
    binary = lab.home / "datasets" / "binary.jsonl"
    binary.parent.mkdir()
    binary.write_bytes(bytes(range(128, 256)) * 8)
    lab.sample(fake.no_driver())
    at = lab.page("views/extract.py", user_name="ana")
    at.selectbox(key="extract_dataset").set_value(str(binary)).run()
    assert not at.exception
    assert errors(at) == [f"dataset: {binary} is not UTF-8 text"]


def test_an_impossible_npy_header_on_the_train_page_is_one_named_error(lab):
    (lab.home / "datasets").mkdir()
    npy_with_shape(lab.home / "datasets" / "acts.npy", "(99999999999999999999, 3)")
    lab.sample(fake.no_driver())
    at = lab.page("views/train.py", user_name="ana")
    assert at.selectbox(key="train_dataset").value == "acts.npy"
    assert not at.exception
    (message,) = errors(at)
    assert message.startswith("dataset: ") and "not a readable .npy array" in message and leaks_nothing(message)
