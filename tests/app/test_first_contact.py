"""A new user's first look (AppTest): the Train and Extract pages open without red errors, name what is still
missing as hints, and turn those into errors only once Submit is pressed; the Extract page says where models
are looked for and how to add one, and what it found there."""

from __future__ import annotations

import shutil

import pytest

from sae_core.jobs import store
from tests.app.conftest import rendered
from tests.fakes import fake_pynvml as fake


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache of the test's own (not the machine's)."""
    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def errors(at) -> list[str]:
    return [rendered(str(e.value)) for e in at.error]


def hints(at) -> str:
    return "\n".join(rendered(str(e.value)) for e in at.info)


def test_a_fresh_train_page_hints_at_what_is_missing_until_submit(lab):
    lab.sample(fake.no_driver())
    at = lab.page("views/train.py")  # no dataset in the lab, no name given yet
    assert not at.exception
    assert errors(at) == []
    assert "dataset: choose a dataset" in hints(at) and "your name:" in hints(at)
    submit = at.button(key="train_submit")
    assert not submit.disabled
    submit.click().run()
    assert not at.exception
    shown = "\n".join(errors(at))
    assert "dataset: choose a dataset" in shown and "your name:" in shown
    assert store.list_jobs() == []


def test_a_wrong_value_is_an_error_at_once(lab):
    lab.sample(fake.no_driver())
    lab.toy_dataset()
    at = lab.page("views/train.py")
    at.number_input(key="train_k").set_value(5000).run()  # more than d_sae
    assert any(e.startswith("k (5000) must be at most d_sae") for e in errors(at))
    assert at.button(key="train_submit").disabled


def test_a_fresh_extract_page_says_where_models_are_looked_for(lab, hub_cache):
    lab.sample(fake.no_driver())
    at = lab.page("views/extract.py")
    assert not at.exception
    assert errors(at) == []
    shown = hints(at)
    assert "No model found yet" in shown
    assert str(lab.home / "models") in shown and str(hub_cache) in shown and "hf download" in shown
    for missing in ("model: choose one", "text dataset: choose one", "your name:"):
        assert missing in shown
    at.button(key="extract_submit").click().run()
    assert not at.exception
    shown = "\n".join(errors(at))
    assert "model: choose one" in shown and "text dataset: choose one" in shown and "your name:" in shown
    assert store.list_jobs() == []


def test_the_extract_page_lists_the_models_it_found(lab, hf, hub_cache):
    shutil.copytree(hf["llama"], lab.home / "models" / "tiny-llama")
    (hub_cache / "models--some-org--cached-model").mkdir()
    lab.sample(fake.no_driver())
    at = lab.page("views/extract.py", user_name="ana")
    assert not at.exception
    options = at.selectbox(key="extract_model").options
    assert str(lab.home / "models" / "tiny-llama") in options and "some-org/cached-model" in options
    captions = "\n".join(rendered(str(c.value)) for c in at.caption)
    assert f"1 model(s) in {lab.home / 'models'}, 1 in the Hugging Face cache {hub_cache}" in captions
    assert "No model found" not in hints(at)
