"""Data sets, the Dirichlet partition, resource assignment and shards written to disk."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edge_agent.shard import load_shard
from orchestrator.train.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10_URL,
    DataError,
    assign_resources,
    dirichlet_partition,
    label_histogram,
    load_dataset,
    parse_split,
    write_partition,
)
from protocols.errors import ZoError


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


# ---------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_normalisation(digits):
    ds = digits
    assert ds.x_train.dtype == np.float32 and ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert ds.x_train.shape[1:] == (1, 8, 8) and ds.input_shape == (1, 8, 8)
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert len(ds.x_test) == pytest.approx(0.2 * 1797, abs=10)
    assert ds.num_classes == 10 and len(ds.mean) == len(ds.std) == 1
    assert abs(ds.x_train.mean(axis=(0, 2, 3))[0]) < 1e-4
    assert ds.x_train.std(axis=(0, 2, 3))[0] == pytest.approx(1.0, abs=1e-4)
    # The recorded mean/std undo the normalisation back to pixel/16 in [0, 1].
    raw = ds.x_train.astype(np.float64) * ds.std[0] + ds.mean[0]
    assert raw.min() == pytest.approx(0.0, abs=1e-5) and raw.max() == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(raw * 16, np.round(raw * 16), atol=1e-4)


def test_digits_split_is_stratified_and_reproducible(digits):
    ds = digits
    train_share = np.bincount(ds.y_train, minlength=10) / len(ds.y_train)
    test_share = np.bincount(ds.y_test, minlength=10) / len(ds.y_test)
    assert np.abs(train_share - test_share).max() < 0.01
    again = load_dataset("digits", seed=0)
    assert np.array_equal(again.x_train, ds.x_train) and np.array_equal(again.y_test, ds.y_test)
    other = load_dataset("digits", seed=1)
    assert not np.array_equal(other.y_test, ds.y_test) or not np.array_equal(
        other.x_test, ds.x_test)
    half = load_dataset("digits", seed=0, test_fraction=0.5)
    assert len(half.y_test) == pytest.approx(1797 / 2, abs=10)


def test_unknown_name_lists_valid_names():
    with pytest.raises(DataError, match="digits.*cifar10.*npz") as err:
        load_dataset("mnist")
    assert isinstance(err.value, ZoError)


# ---------------------------------------------------------------------------- CIFAR-10


def _fake_cifar_batches(seed: int = 0) -> dict[str, dict]:
    rng = np.random.default_rng(seed)
    sizes = {f"data_batch_{i}": 3 + i for i in range(1, 6)} | {"test_batch": 4}
    return {name: {b"batch_label": name.encode(),
                   b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                   b"labels": [int(v) for v in rng.integers(0, 10, size=n)]}
            for name, n in sizes.items()}


def _write_fake_cifar(tmp_path: Path) -> tuple[Path, Path, dict]:
    batches = _fake_cifar_batches()
    folder = tmp_path / "extracted" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, batch in batches.items():
            raw = pickle.dumps(batch, protocol=2)
            (folder / name).write_bytes(raw)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return archive, folder, batches


def test_cifar10_from_archive_and_directory(tmp_path):
    archive, folder, batches = _write_fake_cifar(tmp_path)
    ds = load_dataset("cifar10", archive)
    n_train = sum(len(batches[f"data_batch_{i}"][b"labels"]) for i in range(1, 6))
    assert ds.x_train.shape == (n_train, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert ds.mean == pytest.approx(CIFAR10_MEAN) and ds.std == pytest.approx(CIFAR10_STD)
    # Official order (batch 1..5) and the standard per-channel normalisation.
    raw = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    want = (raw.reshape(-1, 3, 32, 32) / 255.0 - np.array(CIFAR10_MEAN)[:, None, None]) \
        / np.array(CIFAR10_STD)[:, None, None]
    assert np.allclose(ds.x_train, want, atol=1e-5)
    labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert ds.y_train.tolist() == labels
    assert ds.y_test.tolist() == batches["test_batch"][b"labels"]
    for where in (folder, folder.parent):
        from_dir = load_dataset("cifar10", where)
        assert np.array_equal(from_dir.x_train, ds.x_train)
        assert np.array_equal(from_dir.y_test, ds.y_test)


def test_cifar10_wrong_path_explains_what_to_get(tmp_path):
    for bad in (tmp_path / "nope.tar.gz", None):
        with pytest.raises(DataError) as err:
            load_dataset("cifar10", bad)
        assert CIFAR10_URL in str(err.value) and "cifar-10-python.tar.gz" in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="data_batch_1"):
        load_dataset("cifar10", empty)
    not_tar = tmp_path / "junk.tar.gz"
    not_tar.write_bytes(b"not an archive")
    with pytest.raises(DataError, match=CIFAR10_URL.replace(".", r"\.")):
        load_dataset("cifar10", not_tar)


def test_cifar10_archive_missing_a_batch(tmp_path):
    archive = tmp_path / "partial.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        raw = pickle.dumps(_fake_cifar_batches()["data_batch_1"])
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", archive)


# ---------------------------------------------------------------------------- npz


def test_npz_with_x_y_is_split_stratified(tmp_path):
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(4), 25)
    x = rng.integers(0, 256, size=(100, 6, 5), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset("npz", tmp_path / "d.npz", seed=5, test_fraction=0.2)
    assert ds.input_shape == (1, 6, 5) and ds.num_classes == 4
    assert np.bincount(ds.y_test).tolist() == [5, 5, 5, 5]
    assert abs(float(ds.x_train.mean())) < 1e-4
    again = load_dataset("npz", tmp_path / "d.npz", seed=5, test_fraction=0.2)
    assert np.array_equal(again.x_test, ds.x_test)


def test_npz_presplit_layout_and_meta(tmp_path):
    rng = np.random.default_rng(4)
    x_train = rng.normal(size=(20, 2, 3, 3)).astype(np.float32)
    x_test = rng.normal(size=(6, 2, 3, 3)).astype(np.float32)
    meta = json.dumps({"num_classes": 7, "mean": [0.0, 0.0], "std": [2.0, 2.0]})
    np.savez(tmp_path / "s.npz", x_train=x_train, y_train=rng.integers(0, 3, 20),
             x_test=x_test, y_test=rng.integers(0, 3, 6), meta=meta)
    ds = load_dataset("npz", tmp_path / "s.npz")
    assert ds.num_classes == 7 and ds.input_shape == (2, 3, 3)
    assert np.allclose(ds.x_test, x_test / 2.0) and ds.std == (2.0, 2.0)
    np.savez(tmp_path / "t.npz", x_train=x_train, y_train=np.full(20, 2),
             x_test=x_test, y_test=np.full(6, 5))
    assert load_dataset("npz", tmp_path / "t.npz").num_classes == 6


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.zeros((4, 2, 2))}, "must hold"),
    ({"x": np.zeros((4, 2, 2)), "y": np.zeros(3, dtype=int)}, "one label per image"),
    ({"x": np.full((10, 2, 2), np.nan), "y": np.arange(10) % 2}, "NaN"),
    ({"x": np.zeros((10, 2, 2)), "y": np.arange(10) % 2 - 1}, "non-negative"),
    ({"x": np.zeros((10, 2)), "y": np.arange(10) % 2}, r"\(N, C, H, W\)"),
    ({"x": np.zeros((10, 2, 2)), "y": np.linspace(0, 1, 10)}, "integers"),
    ({"x_train": np.zeros((4, 1, 2, 2)), "y_train": np.zeros(4, dtype=int),
      "x_test": np.zeros((4, 1, 3, 3)), "y_test": np.zeros(4, dtype=int)}, "x_test images"),
])
def test_npz_refusals_say_what_is_wrong(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_dataset("npz", tmp_path / "bad.npz")


def test_npz_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("npz", tmp_path / "missing.npz")


# ---------------------------------------------------------------------------- partition


def _mean_label_entropy(parts: list[np.ndarray], labels: np.ndarray) -> float:
    values = []
    for idx in parts:
        p = np.bincount(labels[idx], minlength=10) / len(idx)
        p = p[p > 0]
        values.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(values))


def test_dirichlet_covers_every_index_once_and_is_reproducible(digits):
    y = digits.y_train
    parts = dirichlet_partition(y, 10, 0.5, seed=7)
    assert len(parts) == 10 and min(len(p) for p in parts) >= 2
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(y)))
    same = dirichlet_partition(y, 10, 0.5, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(parts, same))
    other = dirichlet_partition(y, 10, 0.5, seed=8)
    assert any(len(a) != len(b) or not np.array_equal(a, b) for a, b in zip(parts, other))


def test_small_alpha_is_more_skewed_than_large_alpha(digits):
    y = digits.y_train
    skewed = np.mean([_mean_label_entropy(dirichlet_partition(y, 10, 0.1, s), y)
                      for s in range(3)])
    mixed = np.mean([_mean_label_entropy(dirichlet_partition(y, 10, 100.0, s), y)
                     for s in range(3)])
    assert skewed < mixed - 0.5
    assert mixed > 0.9 * np.log(10)


def test_iid_split_is_balanced_and_complete(digits):
    y = digits.y_train
    for parts in (dirichlet_partition(y, 7, float("inf"), 1),
                  dirichlet_partition(y, 7, 0.1, 1, iid=True)):
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(y)))
        assert _mean_label_entropy(parts, y) > 0.95 * np.log(10)


def test_impossible_partitions_raise():
    y = np.arange(10) % 2
    with pytest.raises(DataError, match="11 clients"):
        dirichlet_partition(y, 11, 1.0, 0, min_size=1)
    with pytest.raises(DataError, match="at least 3"):
        dirichlet_partition(y, 4, 1.0, 0, min_size=3)
    with pytest.raises(DataError, match="alpha"):
        dirichlet_partition(y, 2, 0.0, 0)
    # Possible only with all ten samples split 2-2-2-2-2: tiny alpha never lands there.
    with pytest.raises(DataError, match="tries"):
        dirichlet_partition(y, 5, 0.001, 0, min_size=2)


def test_label_histogram():
    assert label_histogram(np.array([0, 2, 2, 3]), 5) == [1, 0, 2, 1, 0]
    with pytest.raises(DataError):
        label_histogram(np.array([0, 5]), 5)


# ---------------------------------------------------------------------------- resources


@pytest.mark.parametrize("high", range(10, 100, 10))
def test_assign_resources_counts(high):
    fraction = parse_split(f"{high}/{100 - high}")
    assert fraction == pytest.approx(high / 100)
    mask = assign_resources(50, fraction, seed=high)
    assert mask.dtype == bool and mask.shape == (50,)
    assert int(mask.sum()) == high // 2
    assert np.array_equal(mask, assign_resources(50, fraction, seed=high))


def test_assign_resources_edges_and_randomness():
    assert assign_resources(5, 0.01, 0).sum() == 1
    assert assign_resources(5, 0.0, 0).sum() == 0
    assert assign_resources(5, 1.0, 0).all()
    masks = {tuple(assign_resources(50, 0.3, s)) for s in range(5)}
    assert len(masks) > 1
    with pytest.raises(DataError):
        assign_resources(5, 1.5, 0)


@pytest.mark.parametrize("text", ["30", "30/60", "a/b", "30/70/0", "-10/110", ""])
def test_parse_split_errors(text):
    with pytest.raises(DataError, match="split"):
        parse_split(text)


def test_parse_split_accepts_spaces_and_decimals():
    assert parse_split(" 12.5 / 87.5 ") == pytest.approx(0.125)
    assert parse_split("0/100") == 0.0


# ---------------------------------------------------------------------------- writing


def test_write_partition_shards_load_back(tmp_path, digits):
    ds = digits
    parts = dirichlet_partition(ds.y_train, 6, 0.5, seed=2)
    high = assign_resources(6, 0.3, seed=2)
    out = tmp_path / "part"
    files = write_partition(ds, parts, high, out, seed=2, alpha=0.5)
    assert [f.name for f in files] == [f"client-{i:03d}.npz" for i in range(6)]
    manifest = SimpleNamespace(input_shape=ds.input_shape, num_classes=ds.num_classes)
    for i, file in enumerate(files):
        shard = load_shard(file, manifest)
        assert np.array_equal(shard.x, ds.x_train[parts[i]])
        assert np.array_equal(shard.y, ds.y_train[parts[i]])
        assert shard.meta["client"] == i and shard.meta["dataset"] == "digits"
        assert shard.meta["partition_seed"] == 2 and shard.meta["alpha"] == 0.5
        assert shard.meta["resource"] == ("high" if high[i] else "low")
        assert shard.meta["samples"] == len(parts[i])
        assert shard.meta["label_counts"] == label_histogram(ds.y_train[parts[i]], 10)
    test = load_shard(out / "test.npz", manifest)
    assert np.array_equal(test.y, ds.y_test)
    index = json.loads((out / "partition.json").read_text())
    assert index["dataset"] == "digits" and index["num_clients"] == 6
    assert index["seed"] == 2
    assert index["alpha"] == 0.5 and index["high_fraction"] == pytest.approx(high.mean())
    assert [c["file"] for c in index["clients"]] == [f.name for f in files]
    assert [c["resource"] == "high" for c in index["clients"]] == high.tolist()
    assert sum(c["samples"] for c in index["clients"]) == len(ds.y_train)
    assert index["normalization"]["mean"] == list(ds.mean)


def test_write_partition_replaces_own_and_refuses_foreign(tmp_path, digits):
    ds = digits
    out = tmp_path / "part"
    write_partition(ds, dirichlet_partition(ds.y_train, 5, 1.0, 0),
                    assign_resources(5, 0.2, 0), out, seed=0, alpha=1.0)
    write_partition(ds, dirichlet_partition(ds.y_train, 3, float("inf"), 0),
                    assign_resources(3, 0.2, 0), out, seed=0, alpha=float("inf"))
    assert sorted(p.name for p in out.iterdir()) == [
        "client-000.npz", "client-001.npz", "client-002.npz", "partition.json", "test.npz"]
    assert json.loads((out / "partition.json").read_text())["scheme"] == "iid"
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty"):
        write_partition(ds, [np.arange(10)], np.array([True]), foreign, seed=0, alpha=1.0)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_write_partition_refuses_overlapping_parts(tmp_path, digits):
    with pytest.raises(DataError, match="more than one"):
        write_partition(digits, [np.arange(5), np.arange(3, 8)], np.array([True, False]),
                        tmp_path / "p", seed=0, alpha=1.0)
