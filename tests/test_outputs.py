"""What the pages may serve from a run folder: only plain files inside SAE_LAB_HOME, never through a link."""

from __future__ import annotations

import errno
import json
import zipfile

import pytest

from sae_core import outputs
from sae_core.ui.downloads import file_reader


def sae_folder(path, secret):
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 4, "d_sae": 8, "k": 2}))
    (path / "sae_weights.safetensors").write_bytes(b"weights")
    (path / "eval.json").symlink_to(secret)  # a link to a file outside: must not be read or zipped
    return path


def test_the_zip_never_follows_a_link(tmp_path):
    secret = tmp_path / "shadow"
    secret.write_text("root:secret")
    sae = sae_folder(tmp_path / "home" / "jobs" / "1", secret)
    outside = tmp_path / "outside.zip"
    (sae / "sae.zip.partial").symlink_to(outside)  # nor write through one
    zipped = outputs.build_sae_zip(sae)
    with zipfile.ZipFile(zipped) as zf:
        assert sorted(zf.namelist()) == ["cfg.json", "sae_weights.safetensors"]
    assert not outside.exists() and secret.read_text() == "root:secret"
    assert outputs.read_json(sae / "eval.json") == {}  # the link is not read either


def test_a_trained_sae_needs_plain_files(tmp_path):
    sae = tmp_path / "jobs" / "2"
    sae.mkdir(parents=True)
    (sae / "cfg.json").symlink_to("/etc/passwd")
    (sae / "sae_weights.safetensors").write_bytes(b"w")
    assert not outputs.is_trained_sae(sae) and outputs.find_trained_saes(tmp_path) == []


def test_only_folders_inside_the_home_are_served(tmp_path):
    home = tmp_path / "home"
    (home / "jobs" / "3").mkdir(parents=True)
    (home / "jobs" / "4").symlink_to("/etc")
    assert outputs.served_dir(home / "jobs" / "3", home) == home / "jobs" / "3"
    assert outputs.served_dir("/etc", home) is None
    assert outputs.served_dir(home / "jobs" / "4", home) is None  # a link out of the home
    assert outputs.served_dir(home / "jobs" / ".." / ".." / "..", home) is None


def test_the_deferred_download_refuses_a_link_swapped_in_later(tmp_path):
    target = tmp_path / "sae.zip"
    target.write_bytes(b"zip")
    opener = file_reader(target)
    target.unlink()
    target.symlink_to("/etc/passwd")
    with pytest.raises(OSError) as refused:
        opener()
    assert refused.value.errno == errno.ELOOP
