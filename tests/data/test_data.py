"""Activation datasets: readers, bad-data errors, value scans, the toy generator (order: test_order.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sae_core.cli.main import main as sae_main
from sae_core.cli.toy import cli_toy
from sae_core.config import ConfigError, TrainConfig
from sae_core.data.activations import open_activations
from sae_core.data.checks import DatasetError, check_dataset, find_nonfinite
from sae_core.data.toy import ToyGenerator, write_toy
from tests.conftest import REPO, subprocess_env


def random_rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32))


def read(ds, rows) -> torch.Tensor:
    """Rows of an activation set as the trainer sees them (ActivationSet reads numpy)."""
    return torch.from_numpy(ds.read(np.asarray(rows)))


def save_st(path: Path, **tensors: torch.Tensor) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def config_for(source: Path, batch_size: int = 64, holdout_tokens: int = 16, **extra) -> TrainConfig:
    return TrainConfig(
        activation_source=str(source),
        d_sae=16,
        k=4,
        total_steps=10,
        batch_size=batch_size,
        holdout_tokens=holdout_tokens,
        **extra,
    )


def dataset_error(source: Path, **cfg) -> str:
    with pytest.raises(DatasetError) as info:
        check_dataset(config_for(source, **cfg))
    return str(info.value)


# ---------------------------------------------------------------------------------------------------------- readers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_safetensors_rows_read_back_exactly_in_the_order_given(tmp_path, dtype):
    source = random_rows(50, 8).to(dtype)
    path = save_st(tmp_path / "acts.safetensors", activations=source, other=torch.zeros(3))
    ds = open_activations(path)
    rows = np.array([49, 0, 7, 7, 23, 1, 48])  # unsorted, with a repeat
    got = read(ds, rows)
    assert (ds.n_rows, ds.d_in, ds.dtype) == (50, 8, str(dtype).removeprefix("torch."))
    assert got.dtype == torch.float32 and got.shape == (7, 8)
    assert torch.equal(got, source[rows].to(torch.float32))


def test_npy_is_memory_mapped_and_reads_back(tmp_path):
    source = random_rows(40, 6).numpy()
    np.save(tmp_path / "acts.npy", source)
    ds = open_activations(tmp_path / "acts.npy")
    assert isinstance(ds.shards[0].array, np.memmap)
    rows = np.array([39, 3, 12, 0])
    assert torch.equal(read(ds, rows), torch.from_numpy(source[rows]))
    assert ds.read(np.array([], dtype=np.int64)).shape == (0, 6)


def test_fortran_order_and_big_endian_npy_read_back(tmp_path):
    source = random_rows(20, 5).numpy()
    np.save(tmp_path / "f.npy", np.asfortranarray(source))
    np.save(tmp_path / "be.npy", source.astype(">f4"))
    rows = np.array([19, 2, 5])
    for name in ("f.npy", "be.npy"):
        ds = open_activations(tmp_path / name)
        assert torch.equal(read(ds, rows), torch.from_numpy(source[rows]))
        block = ds.read_range(3, 17)  # the block reader copies these out of the memory map instead of pread
        assert block.flags.c_contiguous and block.dtype.isnative and np.array_equal(block, source[3:17])


def test_shard_directory_concatenates_rows_across_shards(tmp_path):
    parts = [random_rows(n, 4, seed=i) for i, n in enumerate((10, 7, 13))]
    np.save(tmp_path / "shard_00.npy", parts[0].numpy())
    save_st(tmp_path / "shard_01.safetensors", activations=parts[1])
    np.save(tmp_path / "shard_02.npy", parts[2].numpy().astype(np.float16))
    (tmp_path / "README.txt").write_text("not a shard")
    whole = torch.cat([parts[0], parts[1], parts[2].half().float()])
    ds = open_activations(tmp_path)
    assert [s.path.name for s in ds.shards] == ["shard_00.npy", "shard_01.safetensors", "shard_02.npy"]
    assert (ds.n_rows, ds.d_in, ds.dtype) == (30, 4, "float16+float32")
    rows = np.random.default_rng(0).permutation(30)
    assert torch.equal(read(ds, rows), whole[rows])
    assert torch.equal(read(ds, np.arange(8, 19)), whole[8:19])  # a run of rows that crosses two shards
    assert torch.equal(read(ds, np.arange(30)), whole)


def test_ground_truth_features_are_found_in_the_file_a_sibling_or_the_directory(tmp_path):
    acts, features = random_rows(30, 4), random_rows(5, 4, seed=1)
    save_st(tmp_path / "one.safetensors", activations=acts, features=features)
    assert torch.equal(torch.from_numpy(open_activations(tmp_path / "one.safetensors").features), features)
    np.save(tmp_path / "two.npy", acts.numpy())
    assert open_activations(tmp_path / "two.npy").features is None
    np.save(tmp_path / "two.features.npy", features.numpy())
    assert torch.equal(torch.from_numpy(open_activations(tmp_path / "two.npy").features), features)
    shards = tmp_path / "shards"
    shards.mkdir()
    np.save(shards / "a.npy", acts.numpy())
    save_st(shards / "features.safetensors", features=features)
    ds = open_activations(shards)
    assert ds.n_rows == 30 and torch.equal(torch.from_numpy(ds.features), features)  # the features file is not a shard


def test_features_of_the_wrong_width_are_an_error(tmp_path):
    path = save_st(tmp_path / "a.safetensors", activations=random_rows(30, 4), features=random_rows(5, 3))
    with pytest.raises(DatasetError, match=r"features have shape \[5, 3\]; expected \[n_features, 4\]"):
        open_activations(path)


def test_read_rejects_rows_out_of_range(tmp_path):
    np.save(tmp_path / "a.npy", random_rows(10, 2).numpy())
    ds = open_activations(tmp_path / "a.npy")
    with pytest.raises(IndexError, match="row 10 is out of range"):
        ds.read(np.array([0, 10]))
    with pytest.raises(IndexError, match="row -1"):
        ds.read(np.array([-1]))


# ---------------------------------------------------------------------------------------------------------- bad data


def test_missing_source_says_not_found(tmp_path):
    message = dataset_error(tmp_path / "nope.safetensors")
    assert "not found" in message and "nope.safetensors" in message


def test_unsupported_suffix_names_the_allowed_ones(tmp_path):
    (tmp_path / "acts.pt").write_bytes(b"x")
    message = dataset_error(tmp_path / "acts.pt")
    assert "'.pt'" in message and ".safetensors" in message and ".npy" in message


def test_empty_directory_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "holds no activation shards" in dataset_error(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "acts.pt").write_bytes(b"x")
    message = dataset_error(tmp_path / "other")
    assert "holds no activation shards" in message and "acts.pt" not in message  # what else it holds is not named


def test_unknown_tensor_key_lists_the_keys_present(tmp_path):
    path = save_st(tmp_path / "a.safetensors", acts=random_rows(100, 4), features=random_rows(3, 4))
    message = dataset_error(path)
    assert "no tensor named 'activations'" in message and "'acts'" in message and "'features'" in message
    assert check_dataset(config_for(path, activation_key="acts")).n_rows == 100


@pytest.mark.parametrize("shape", [(100,), (10, 10, 4)])
def test_data_that_is_not_2d_says_its_shape(tmp_path, shape):
    path = save_st(tmp_path / "a.safetensors", activations=torch.zeros(shape))
    assert f"shape {list(shape)}" in dataset_error(path)
    np.save(tmp_path / "a.npy", np.zeros(shape, np.float32))
    assert f"shape {list(shape)}" in dataset_error(tmp_path / "a.npy")


@pytest.mark.parametrize(
    ("writer", "expected"),
    [
        (lambda p: save_st(p.with_suffix(".safetensors"), activations=torch.zeros(100, 4, dtype=torch.int32)), "I32"),
        (lambda p: save_st(p.with_suffix(".safetensors"), activations=torch.zeros(100, 4, dtype=torch.bool)), "BOOL"),
        (lambda p: np.save(p.with_suffix(".npy"), np.zeros((100, 4), np.int64)) or p.with_suffix(".npy"), "int64"),
        (lambda p: np.save(p.with_suffix(".npy"), np.zeros((100, 4), bool)) or p.with_suffix(".npy"), "bool"),
    ],
)
def test_integer_and_bool_dtypes_are_refused_naming_the_dtype(tmp_path, writer, expected):
    message = dataset_error(writer(tmp_path / "a"))
    assert expected in message and "allowed: float32, float16, bfloat16, float64" in message


@pytest.mark.parametrize(
    ("dtype", "value", "what"),
    [
        (torch.float32, float("nan"), "NaN"),
        (torch.float32, float("inf"), "Inf"),
        (torch.float16, float("-inf"), "-Inf"),
        (torch.bfloat16, float("nan"), "NaN"),
        (torch.float64, 1e300, "1e+300, too large for float32"),
    ],
)
def test_non_finite_values_name_the_first_bad_row(tmp_path, dtype, value, what):
    data = random_rows(200, 4).to(dtype)
    data[150, 2] = value
    data[170, 0] = value
    message = dataset_error(save_st(tmp_path / "a.safetensors", activations=data))
    assert f"row 150, column 2 holds {what}" in message


def test_non_finite_value_in_a_later_shard_names_the_global_row(tmp_path):
    np.save(tmp_path / "s0.npy", random_rows(60, 4).numpy())
    bad = random_rows(60, 4).numpy()
    bad[5, 1] = np.nan
    np.save(tmp_path / "s1.npy", bad)
    assert "row 65 (row 5 of shard s1.npy), column 1 holds NaN" in dataset_error(tmp_path)


def test_too_few_rows_names_rows_batch_and_holdout(tmp_path):
    path = save_st(tmp_path / "a.safetensors", activations=random_rows(79, 4))
    message = dataset_error(path, batch_size=64, holdout_tokens=16)
    assert "79 rows" in message and "batch_size 64" in message and "holdout_tokens 16" in message
    save_st(path, activations=random_rows(80, 4))
    assert check_dataset(config_for(path, batch_size=64, holdout_tokens=16)).n_rows == 80


def test_shards_of_differing_width_name_both_shards_and_widths(tmp_path):
    np.save(tmp_path / "a.npy", random_rows(50, 4).numpy())
    np.save(tmp_path / "b.npy", random_rows(50, 5).numpy())
    message = dataset_error(tmp_path)
    assert "a.npy has d_in 4" in message and "b.npy has 5" in message


@pytest.mark.parametrize("content", [b"", b"\x05\x00\x00\x00\x00\x00\x00\x00{not", b"\xff" * 20])
def test_corrupt_safetensors_is_a_dataset_error(tmp_path, content):
    (tmp_path / "a.safetensors").write_bytes(content)
    assert "not a safetensors file" in dataset_error(tmp_path / "a.safetensors")


def test_truncated_files_are_dataset_errors(tmp_path):
    path = save_st(tmp_path / "a.safetensors", activations=random_rows(100, 4))
    path.write_bytes(path.read_bytes()[:-10])
    assert "truncated or corrupt" in dataset_error(path)
    np.save(tmp_path / "b.npy", random_rows(100, 4).numpy())
    (tmp_path / "b.npy").write_bytes((tmp_path / "b.npy").read_bytes()[:-10])
    assert "b.npy" in dataset_error(tmp_path / "b.npy")


def test_check_dataset_refuses_a_batch_that_does_not_split_across_ranks(tmp_path):
    path = save_st(tmp_path / "a.safetensors", activations=random_rows(100, 4))
    with pytest.raises(ConfigError, match="batch_size 64 .* 3 ranks"):
        check_dataset(config_for(path), world_size=3)
    assert check_dataset(config_for(path), world_size=4).d_in == 4


def private_rss() -> int:
    """Resident memory that is this process's own: mapped file pages are the shared page cache, not a copy."""
    info = psutil.Process().memory_info()
    return info.rss - info.shared


def test_reading_and_scanning_never_load_the_whole_file(tmp_path):
    path = tmp_path / "big.npy"
    big = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(400_000, 128))  # 205 MB, sparse
    big[-1, 7] = np.inf  # only a full scan finds it
    big.flush()
    del big
    size = path.stat().st_size
    before = private_rss()
    ds = open_activations(path)
    batch = ds.read(np.random.default_rng(0).choice(ds.n_rows, 4096, replace=False))
    assert batch.shape == (4096, 128)
    assert private_rss() - before < size / 8
    tracemalloc.start()
    try:
        problem = find_nonfinite(ds, chunk_bytes=8 * 2**20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "row 399999, column 7 holds Inf" in problem
    assert peak < size / 8  # numpy allocations in the scan stay near the chunk size


# ---------------------------------------------------------------------------------------------------------- toy


def test_toy_file_has_the_contract_tensors(toy_path):
    with safe_open(str(toy_path), framework="pt") as f:  # the reference reader accepts our streamed file
        assert set(f.keys()) == {"activations", "features"}
        acts, features = f.get_tensor("activations"), f.get_tensor("features")
    assert acts.shape == (16384, 32) and acts.dtype == torch.float32
    assert features.shape == (64, 32) and features.dtype == torch.float32
    assert torch.allclose(features.norm(dim=1), torch.ones(64), atol=1e-6)
    ds = open_activations(toy_path)
    assert torch.equal(torch.from_numpy(ds.features), features) and find_nonfinite(ds) is None


def test_toy_activations_are_sparse_non_negative_mixes_with_spread_frequencies(toy_path):
    acts = open_activations(toy_path).read(np.arange(16384))
    generator = ToyGenerator(32, 64, seed=0)
    fired = np.zeros(64)
    rows_seen = 0
    for start, codes, chunk in generator.iter_chunks(16384):
        assert np.array_equal(chunk, acts[start : start + len(chunk)])  # codes regenerate the file exactly
        assert (codes.magnitude > 0).all()
        residual = chunk - generator.decode(codes, len(chunk))
        assert 0.02 < np.linalg.norm(residual, axis=1).mean() < 0.1  # only the small noise is left
        assert np.array_equal(np.unique(codes.row * 64 + codes.feature), codes.row * 64 + codes.feature)
        fired += np.bincount(codes.feature, minlength=64)
        rows_seen += len(chunk)
    assert rows_seen == 16384
    assert 2 <= fired.sum() / rows_seen <= 6  # a few features per token on average
    frequency = fired / rows_seen
    assert frequency.min() > 0 and frequency.max() / frequency.min() >= 10


def test_toy_sets_depend_on_the_seed_only(tmp_path):
    paths = [write_toy(tmp_path / f"{i}.safetensors", 300, 8, 16, seed=s).path for i, s in enumerate((1, 1, 2))]
    data = [Path(p).read_bytes() for p in paths]
    assert data[0] == data[1] and data[0] != data[2]


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--tokens", "0"], "--tokens"),
        (["--d-in", "x"], "--d-in"),
        (["--features", "-3"], "--features"),
        (["--seed", "-1"], "--seed"),
        (["--features", "70000", "--d-in", "4096"], "--features x --d-in"),
    ],
)
def test_toy_cli_rejects_bad_flags_naming_them(tmp_path, capsys, argv, flag):
    out = tmp_path / "t.safetensors"
    assert cli_toy([str(out), *argv]) == 2
    assert flag in capsys.readouterr().err
    assert not out.exists()


def test_toy_cli_refuses_another_suffix(tmp_path, capsys):
    assert cli_toy([str(tmp_path / "t.npy"), "--tokens", "10"]) == 2
    assert ".safetensors" in capsys.readouterr().err


def test_toy_command_is_routed_and_exits_2_on_a_bad_flag(tmp_path, capsys):
    assert sae_main(["toy", str(tmp_path / "t.safetensors"), "--tokens", "-5"]) == 2
    assert "--tokens" in capsys.readouterr().err


@pytest.mark.slow
def test_toy_cli_writes_the_set(tmp_path):
    out = tmp_path / "sub" / "toy.safetensors"
    command = [sys.executable, "-m", "sae_core", "toy", str(out), "--tokens", "500", "--d-in", "8", "--features", "20"]
    done = subprocess.run([*command, "--json"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["tokens"], summary["d_in"], summary["features"], summary["seed"]) == (500, 8, 20, 0)
    ds = open_activations(out)
    assert (ds.n_rows, ds.d_in, ds.features.shape) == (500, 8, (20, 8))


# ------------------------------------------------------------------------------------------- hardening (issue 11)


def test_a_fifo_is_refused_before_it_is_opened(tmp_path):
    os.mkfifo(tmp_path / "x.safetensors")  # opening it would block until a writer came
    started = time.monotonic()
    assert "not a regular file" in dataset_error(tmp_path / "x.safetensors")
    shards = tmp_path / "shards"
    shards.mkdir()
    np.save(shards / "a.npy", random_rows(30, 4).numpy())
    os.mkfifo(shards / "b.npy")  # not a shard: only regular files are
    assert open_activations(shards).n_rows == 30
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("name", ["a" * 300 + ".npy", "a\x00b.npy"])  # a name too long for the OS; a NUL
def test_an_unopenable_path_is_a_dataset_error_not_an_os_error(tmp_path, name):
    message = dataset_error(tmp_path / name)
    assert "cannot be read" in message and len(message) < 400  # the path is repeated briefly
