"""Shard folders with a manifest.json: opened from the manifest alone, checked against it on first read."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sae_core.data.activations import open_activations
from sae_core.data.formats import DatasetError
from sae_core.data.manifest import Manifest, ShardEntry, read_manifest, write_manifest
from sae_core.files import MANIFEST_FILE, shard_file_name

PROVENANCE = {"model": "tiny-gpt2", "hook": "blocks.1.hook_resid_post", "context_size": 16, "n_contexts": 6}


def write_folder(directory, sizes=(40, 30, 26), d_in=6) -> torch.Tensor:
    rows = torch.randn(sum(sizes), d_in)
    entries = []
    for i, part in enumerate(torch.split(rows, list(sizes))):
        save_file({"activations": part.to(torch.float16)}, str(directory / shard_file_name(i)))
        entries.append(ShardEntry(shard_file_name(i), len(part)))
    write_manifest(directory, Manifest(d_in, "float16", tuple(entries), PROVENANCE))
    return rows.to(torch.float16).float()


def test_a_manifest_folder_reads_back_with_its_provenance(tmp_path):
    rows = write_folder(tmp_path)
    ds = open_activations(tmp_path)
    assert (ds.n_rows, ds.d_in, ds.dtype) == (96, 6, "float16")
    assert ds.manifest is not None and ds.manifest.provenance == PROVENANCE
    assert torch.equal(torch.from_numpy(ds.read(np.array([95, 0, 41, 70]))), rows[[95, 0, 41, 70]])
    body = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert (
        body["kind"] == "activations"
        and body["n_rows"] == 96
        and body["shards"][2]
        == {
            "file": "shard_00002.safetensors",
            "rows": 26,
        }
    )
    assert not list(tmp_path.glob(".*tmp"))  # written through a temporary file, renamed into place


def test_no_shard_is_opened_until_one_of_its_rows_is_read(tmp_path):
    write_folder(tmp_path)
    (tmp_path / shard_file_name(2)).write_bytes(b"not a safetensors file at all")
    ds = open_activations(tmp_path)  # the broken shard's header is not touched
    assert ds.n_rows == 96 and all(s._array is None for s in ds.shards[1:])
    assert ds.read_range(0, 40).shape == (40, 6)
    with pytest.raises(DatasetError, match="shard_00002.safetensors: not a safetensors file"):
        ds.read_range(60, 80)


def test_a_shard_that_disagrees_with_the_manifest_is_named_when_read(tmp_path):
    write_folder(tmp_path)
    save_file({"activations": torch.zeros(31, 6, dtype=torch.float16)}, str(tmp_path / shard_file_name(1)))
    ds = open_activations(tmp_path)
    with pytest.raises(DatasetError, match=r"holds \[31, 6\] float16 but the manifest says \[30, 6\] float16"):
        ds.read_range(41, 42)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "weights"}, "kind must be 'activations'"),
        ({"d_in": 0}, "d_in must be an integer ≥ 1"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"n_rows": 97}, "n_rows is 97 but the shards hold 96 rows"),
        ({"shards": []}, "shards must be a non-empty list"),
        ({"shards": [{"file": "../escape.safetensors", "rows": 96}]}, r"shards\[0\].file must be a file name"),
        ({"shards": [{"file": "shard_00000.safetensors", "rows": -1}]}, r"shards\[0\]: rows must be an integer"),
        ({"shards": [{"file": "gone.safetensors", "rows": 96}]}, "listed in manifest.json but not a regular file"),
    ],
)
def test_a_bad_manifest_names_the_field(tmp_path, change, message):
    write_folder(tmp_path)
    body = {**json.loads((tmp_path / MANIFEST_FILE).read_text()), **change}
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(body))
    with pytest.raises(DatasetError, match=message):
        open_activations(tmp_path)


def test_a_folder_without_a_manifest_is_scanned_and_a_manifest_that_is_not_json_is_refused(tmp_path):
    rows = write_folder(tmp_path)
    (tmp_path / MANIFEST_FILE).unlink()
    assert read_manifest(tmp_path) is None
    ds = open_activations(tmp_path)
    assert ds.manifest is None and torch.equal(torch.from_numpy(ds.read(np.arange(96))), rows)
    (tmp_path / MANIFEST_FILE).write_text("{oops")
    with pytest.raises(DatasetError, match="manifest .* is not valid JSON"):
        open_activations(tmp_path)


# --------------------------------------------------------------------------- hardening (issue 21)


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "scanned"])
def test_a_shard_linked_to_a_file_outside_its_folder_is_refused(tmp_path, manifest):
    folder, outside = tmp_path / "set", tmp_path / "private"
    folder.mkdir(), outside.mkdir()
    write_folder(folder)
    save_file({"activations": torch.zeros(30, 6, dtype=torch.float16)}, str(outside / "secret.safetensors"))
    (folder / shard_file_name(1)).unlink()
    (folder / shard_file_name(1)).symlink_to(outside / "secret.safetensors")
    if not manifest:
        (folder / MANIFEST_FILE).unlink()
    with pytest.raises(DatasetError) as refused:
        open_activations(folder)
    assert str(refused.value).endswith(
        "shard_00001.safetensors: a link to a file outside its folder; a set's shards must lie in it"
    )
    assert "private" not in str(refused.value)  # where it leads is not said


def test_features_linked_from_outside_the_folder_are_refused(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    write_folder(folder)
    save_file({"features": torch.ones(4, 6)}, str(tmp_path / "truth.safetensors"))
    (folder / "features.safetensors").symlink_to(tmp_path / "truth.safetensors")
    with pytest.raises(DatasetError, match="features.safetensors: a link to a file outside its folder"):
        open_activations(folder)


def test_a_link_inside_the_folder_is_a_shard_like_any_other(tmp_path):
    rows = write_folder(tmp_path)
    (tmp_path / "store").mkdir()
    (tmp_path / shard_file_name(2)).rename(tmp_path / "store" / "last.safetensors")
    (tmp_path / shard_file_name(2)).symlink_to(tmp_path / "store" / "last.safetensors")
    ds = open_activations(tmp_path)
    assert torch.equal(torch.from_numpy(ds.read(np.arange(96))), rows)


def test_a_shard_listed_twice_is_refused(tmp_path):
    write_folder(tmp_path)
    body = json.loads((tmp_path / MANIFEST_FILE).read_text())
    body["shards"].append(body["shards"][0])  # its rows would be trained on, and held out, twice
    body["n_rows"] += body["shards"][0]["rows"]
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(body))
    with pytest.raises(
        DatasetError, match=r"shards\[3\].file 'shard_00000.safetensors' is listed twice \(also shards\[0\]\)"
    ):
        open_activations(tmp_path)


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "scanned"])
def test_a_second_name_for_a_shard_is_refused(tmp_path, manifest):
    write_folder(tmp_path)
    (tmp_path / shard_file_name(2)).unlink()
    (tmp_path / shard_file_name(2)).symlink_to(tmp_path / shard_file_name(0))
    if not manifest:
        (tmp_path / MANIFEST_FILE).unlink()
    with pytest.raises(DatasetError, match="shard_00002.safetensors: the same file as shard_00000.safetensors"):
        open_activations(tmp_path)
