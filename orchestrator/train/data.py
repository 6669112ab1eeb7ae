"""The orchestrator's data: data sets, the non-IID split across clients, and shards on disk.

A :class:`Dataset` is already normalised (float32, N×C×H×W) and records the per-channel
mean/std it applied, so an exported model's manifest can tell devices what their inputs
look like. :func:`dirichlet_partition` is the label-Dirichlet split used throughout the
federated-learning literature; :func:`assign_resources` marks which clients can run
first-order training (the warm-up) and which only forward passes. :func:`write_partition`
turns both into one ``.npz`` shard per client in the format ``edge_agent.shard`` reads.

Randomness comes from ``np.random.default_rng(seed)``: a partition is reproducible from
its seed for a given numpy version. That is enough here: partitions are made once, on the
workstation, and shipped as files; only perturbation directions must agree across
machines and versions, and those live in ``protocols``.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.shard import read_meta, save_shard
from protocols.errors import ProtocolError, ZoError

DATASETS = ("digits", "cifar10", "npz")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
PARTITION_INDEX = "partition.json"
TEST_FILE = "test.npz"
MAX_PARTITION_ATTEMPTS = 1000


class DataError(ZoError):
    """A data set, partition request or output directory cannot be used as asked."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """A normalised train/test split; ``mean``/``std`` are what was applied, per channel.

    ``mean`` and ``std`` are in units of the pixel values after scaling to [0, 1]
    (digits divided by 16, uint8 images by 255): ``x = (pixel - mean) / std``.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()


# ---------------------------------------------------------------------------- loading


def load_dataset(name: str, path: str | Path | None = None, seed: int = 0,
                 test_fraction: float = 0.2) -> Dataset:
    """Load ``name`` ("digits", "cifar10" or "npz"), normalised and split into train/test.

    ``seed`` and ``test_fraction`` drive the stratified split where the source has none
    (digits, an ``.npz`` with only ``x``/``y``); CIFAR-10 keeps its official split.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    if name == "digits":
        return _load_digits(seed, test_fraction)
    if name == "cifar10":
        return _load_cifar10(path)
    if name == "npz":
        return _load_npz(path, seed, test_fraction)
    raise DataError(f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}")


def _load_digits(seed: int, test_fraction: float) -> Dataset:
    """scikit-learn's bundled UCI digits: a real data set that needs no network."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the 'digits' data set needs scikit-learn: pip install "
                        "'zowarmup[orchestrator]'") from None
    bunch = load_digits()
    x = (bunch.images.astype(np.float64) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    test = stratified_test_mask(y, test_fraction, seed)
    return _finish("digits", x[~test], y[~test], x[test], y[test], 10,
                   class_names=tuple(str(d) for d in range(10)))


def _finish(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
            y_test: np.ndarray, num_classes: int, mean: tuple[float, ...] | None = None,
            std: tuple[float, ...] | None = None, class_names: tuple[str, ...] = ()) -> Dataset:
    """Normalise both splits with one mean/std (the training set's unless given)."""
    if mean is None or std is None:
        mean, std = channel_stats(x_train)
    if len(mean) != x_train.shape[1] or len(std) != x_train.shape[1]:
        raise DataError(f"{name}: mean/std have {len(mean)}/{len(std)} entries, the images "
                        f"have {x_train.shape[1]} channels")
    if min(std) <= 0:
        raise DataError(f"{name}: std must be positive, got {list(std)}")
    return Dataset(name=name,
                   x_train=_normalise(x_train, mean, std), y_train=y_train.astype(np.int64),
                   x_test=_normalise(x_test, mean, std), y_test=y_test.astype(np.int64),
                   num_classes=int(num_classes),
                   input_shape=tuple(int(d) for d in x_train.shape[1:]),
                   mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std),
                   class_names=class_names)


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std over (N, H, W); a constant channel gets std 1, not 0."""
    mean = x.mean(axis=(0, 2, 3), dtype=np.float64)
    std = x.std(axis=(0, 2, 3), dtype=np.float64)
    std = np.where(std > 0, std, 1.0)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _normalise(x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    m = np.asarray(mean, dtype=np.float64).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float64).reshape(1, -1, 1, 1)
    return np.ascontiguousarray(((x - m) / s).astype(np.float32))


def stratified_test_mask(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """True for test samples: each class gives round(n_class * test_fraction) of its samples.

    Per-class selection keeps label proportions equal in both splits; samples keep their
    original order inside each split.
    """
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        n_test = int(math.floor(len(idx) * test_fraction + 0.5))
        mask[rng.permutation(idx)[:n_test]] = True
    if not mask.any() or mask.all():
        raise DataError(f"a test fraction of {test_fraction} leaves an empty split with "
                        f"{len(labels)} samples")
    return mask


# ---------------------------------------------------------------------------- CIFAR-10


def _cifar_hint(path: object) -> str:
    return (f"CIFAR-10 expects the python-format archive cifar-10-python.tar.gz (or its "
            f"extracted directory {CIFAR10_DIR}/ holding data_batch_1..5 and test_batch); "
            f"got {path}. Download it from {CIFAR10_URL} and pass its path")


def _load_cifar10(path: str | Path | None) -> Dataset:
    """CIFAR-10 from the official python-format archive or its extracted directory.

    The batches are Python pickles: unpickling can run code, so they are read only from
    the path the user gave, and only because pickle is the format the data set ships in.
    """
    if path is None:
        raise DataError(_cifar_hint("no path"))
    path = Path(path)
    batches = _cifar_from_dir(path) if path.is_dir() else _cifar_from_tar(path)
    x_train = np.concatenate([batches[n][0] for n in CIFAR10_TRAIN])
    y_train = np.concatenate([batches[n][1] for n in CIFAR10_TRAIN])
    x_test, y_test = batches[CIFAR10_TEST]
    return _finish("cifar10", x_train / 255.0, y_train, x_test / 255.0, y_test, 10,
                   mean=CIFAR10_MEAN, std=CIFAR10_STD, class_names=CIFAR10_CLASSES)


def _cifar_from_dir(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Accept the batches directory itself, or a folder holding it or the archive."""
    if (path / CIFAR10_DIR).is_dir():
        path = path / CIFAR10_DIR
    elif (path / "cifar-10-python.tar.gz").is_file():
        return _cifar_from_tar(path / "cifar-10-python.tar.gz")
    out = {}
    for name in (*CIFAR10_TRAIN, CIFAR10_TEST):
        file = path / name
        if not file.is_file():
            raise DataError(f"{file} is missing. {_cifar_hint(path)}")
        out[name] = _cifar_batch(file.read_bytes(), str(file))
    return out


def _cifar_from_tar(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read the batches straight out of the archive; nothing is extracted to disk."""
    if not path.is_file():
        raise DataError(f"{path} does not exist. {_cifar_hint(path)}")
    wanted = {*CIFAR10_TRAIN, CIFAR10_TEST}
    out = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted and base not in out:
                    raw = tar.extractfile(member).read()
                    out[base] = _cifar_batch(raw, f"{path}:{member.name}")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{path} is not a readable tar archive ({exc}). "
                        f"{_cifar_hint(path)}") from None
    missing = sorted(wanted - set(out))
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}. {_cifar_hint(path)}")
    return out


def _cifar_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch → (N×3×32×32 uint8, N int64 labels), checked."""
    try:
        batch = pickle.load(io.BytesIO(raw), encoding="bytes")  # the official format
    except Exception as exc:  # a corrupt pickle can raise nearly anything
        raise DataError(f"{where} is not a CIFAR-10 python batch: {exc}") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{where} is not a CIFAR-10 python batch (no b'data'/b'labels')")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{where}: data is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (data.shape[0],) or (labels.size and (labels.min() < 0
                                                             or labels.max() > 9)):
        raise DataError(f"{where}: expected {data.shape[0]} labels in 0..9")
    return data.reshape(-1, 3, 32, 32), labels


# ---------------------------------------------------------------------------- .npz


def _load_npz(path: str | Path | None, seed: int, test_fraction: float) -> Dataset:
    """Any ``.npz`` with x_train/y_train/x_test/y_test, or x/y to be split here.

    An optional ``meta`` JSON string may set ``num_classes``, ``class_names`` and
    ``mean``/``std`` (in [0, 1] units) to use instead of the training set's statistics.
    """
    if path is None:
        raise DataError("the 'npz' data set needs a path to a .npz file")
    path = Path(path)
    arrays = _read_npz(path)
    meta = _npz_meta(arrays.get("meta"), path)
    if {"x_train", "y_train", "x_test", "y_test"} <= arrays.keys():
        x_train, y_train = _xy(arrays["x_train"], arrays["y_train"], f"{path}: x_train/y_train")
        x_test, y_test = _xy(arrays["x_test"], arrays["y_test"], f"{path}: x_test/y_test")
        if x_train.shape[1:] != x_test.shape[1:]:
            raise DataError(f"{path}: x_train images are {x_train.shape[1:]}, x_test images "
                            f"are {x_test.shape[1:]}")
    elif {"x", "y"} <= arrays.keys():
        x, y = _xy(arrays["x"], arrays["y"], f"{path}: x/y")
        test = stratified_test_mask(y, test_fraction, seed)
        x_train, y_train, x_test, y_test = x[~test], y[~test], x[test], y[test]
    else:
        raise DataError(f"{path} must hold x_train, y_train, x_test, y_test or x, y; it has "
                        f"{', '.join(sorted(arrays)) or 'nothing'}")
    num_classes = _num_classes(meta, int(max(y_train.max(), y_test.max())) + 1, path)
    mean, std = meta.get("mean"), meta.get("std")
    return _finish("npz", x_train, y_train, x_test, y_test, num_classes,
                   mean=tuple(mean) if mean is not None else None,
                   std=tuple(std) if std is not None else None,
                   class_names=tuple(str(c) for c in meta.get("class_names", ())))


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise DataError(f"{path} does not exist") from None
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a readable .npz file: {exc}") from None


def _npz_meta(raw: np.ndarray | None, path: Path) -> dict:
    try:
        return read_meta(raw, str(path))
    except ProtocolError as exc:
        raise DataError(str(exc)) from None


def _xy(x: np.ndarray, y: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Check one x/y pair; returns x as float64 N×C×H×W in [0, 1] units, y as int64."""
    if x.ndim == 3:
        x = x[:, None, :, :]
    if x.ndim != 4:
        raise DataError(f"{where}: x has shape {x.shape}, expected (N, C, H, W) or (N, H, W)")
    if x.dtype == np.uint8:
        x = x.astype(np.float64) / 255.0
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    else:
        raise DataError(f"{where}: x is {x.dtype}, expected a float type or uint8")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"{where}: y has shape {y.shape}, expected ({x.shape[0]},): "
                        "one label per image")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: y is {y.dtype}, labels must be integers")
    if x.shape[0] == 0:
        raise DataError(f"{where}: no samples")
    if y.min() < 0:
        raise DataError(f"{where}: labels must be non-negative, the smallest is {y.min()}")
    if not np.isfinite(x).all():
        raise DataError(f"{where}: x holds NaN or infinite values")
    return x, y.astype(np.int64)


def _num_classes(meta: dict, seen: int, path: Path) -> int:
    given = meta.get("num_classes")
    if given is None:
        return seen
    if not isinstance(given, int) or given < seen:
        raise DataError(f"{path}: meta num_classes={given!r}, but labels go up to {seen - 1}")
    return given


# ---------------------------------------------------------------------------- partitioning


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                        min_size: int = 2, iid: bool = False) -> list[np.ndarray]:
    """Split sample indices across clients, label-skewed by a Dirichlet(alpha) prior.

    For each class, proportions over clients are drawn from Dir(alpha) and the class's
    shuffled indices are cut accordingly; a client already holding its fair share (N /
    num_clients) gets no more of the next class, which keeps sizes from running away. The
    whole draw is repeated until every client has ``min_size`` samples. Small alpha gives
    few classes per client; ``alpha=inf`` or ``iid=True`` gives an IID split into sizes
    differing by at most one. Each client's indices come back in a deterministic random
    order (not sorted), so a shard's first batch mixes its labels even when the source is
    sorted by class.
    """
    labels = np.asarray(labels)
    n = len(labels)
    _check_partition_request(n, num_clients, alpha, min_size)
    rng = np.random.default_rng(seed)
    if iid or math.isinf(alpha):
        return [np.asarray(p, dtype=np.int64) for p in np.array_split(rng.permutation(n),
                                                                      num_clients)]
    for _ in range(MAX_PARTITION_ATTEMPTS):
        parts = _dirichlet_draw(labels, num_clients, alpha, rng)
        if min(len(p) for p in parts) >= min_size:
            return [rng.permutation(np.asarray(p, dtype=np.int64)) for p in parts]
    raise DataError(f"no Dirichlet(alpha={alpha}) split of {n} samples gave all {num_clients} "
                    f"clients at least {min_size} samples in {MAX_PARTITION_ATTEMPTS} tries; "
                    "raise alpha, lower min_size or use fewer clients")


def _check_partition_request(n: int, num_clients: int, alpha: float, min_size: int) -> None:
    if num_clients < 1:
        raise DataError(f"num_clients must be at least 1, got {num_clients}")
    if not alpha > 0:
        raise DataError(f"alpha must be positive (or inf for IID), got {alpha}")
    if min_size < 0:
        raise DataError(f"min_size must be non-negative, got {min_size}")
    if num_clients * max(min_size, 1) > n:
        raise DataError(f"cannot give {num_clients} clients at least {max(min_size, 1)} "
                        f"samples each from {n} samples")


def _dirichlet_draw(labels: np.ndarray, num_clients: int, alpha: float,
                    rng: np.random.Generator) -> list[list[int]]:
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    fair = len(labels) / num_clients
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        props = _class_proportions(rng, alpha, np.array([len(p) < fair for p in parts]))
        cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
        for part, chunk in zip(parts, np.split(idx, cuts)):
            part.extend(chunk.tolist())
    return parts


def _class_proportions(rng: np.random.Generator, alpha: float, open_: np.ndarray) -> np.ndarray:
    """Dir(alpha) shares over clients, zeroed for those already full (``open_`` False).

    With tiny alpha all the mass can land on full clients; then the cap is dropped for
    this class rather than dividing by zero.
    """
    props = rng.dirichlet(np.full(len(open_), alpha))
    if not np.isfinite(props).all() or props.sum() <= 0:
        props = np.eye(len(open_))[rng.integers(len(open_))]
    capped = props * open_
    props = capped if capped.sum() > 0 else props
    return props / props.sum()


def label_histogram(labels: np.ndarray, num_classes: int) -> list[int]:
    """Samples per class, as plain ints for JSON."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels span [{labels.min()}, {labels.max()}], outside "
                        f"0..{num_classes - 1}")
    return [int(c) for c in np.bincount(labels, minlength=num_classes)]


# ---------------------------------------------------------------------------- resources


def assign_resources(num_clients: int, high_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask, True = high-resource client (can run first-order warm-up training).

    Exactly round-half-up(high_fraction × num_clients) clients are high, at least one when
    the fraction is positive, chosen uniformly at random from the seed.
    """
    if num_clients < 1:
        raise DataError(f"num_clients must be at least 1, got {num_clients}")
    if not 0.0 <= high_fraction <= 1.0:
        raise DataError(f"high_fraction must be in [0, 1], got {high_fraction}")
    count = int(math.floor(round(high_fraction * num_clients, 9) + 0.5))
    if high_fraction > 0:
        count = max(count, 1)
    mask = np.zeros(num_clients, dtype=bool)
    mask[np.random.default_rng(seed).choice(num_clients, size=count, replace=False)] = True
    return mask


def parse_split(text: str) -> float:
    """``"30/70"`` (high/low percent, summing to 100) → 0.3, the high-resource fraction."""
    pieces = str(text).split("/")
    try:
        if len(pieces) != 2:
            raise ValueError
        high, low = (float(p.strip()) for p in pieces)
    except ValueError:
        raise DataError(f"resource split {text!r} must look like HIGH/LOW in percent, "
                        "e.g. 30/70") from None
    if not (math.isfinite(high) and math.isfinite(low)) or high < 0 or low < 0:
        raise DataError(f"resource split {text!r}: both percentages must be non-negative")
    if abs(high + low - 100.0) > 1e-9:
        raise DataError(f"resource split {text!r}: percentages must sum to 100, "
                        f"they sum to {high + low:g}")
    return high / 100.0


# ---------------------------------------------------------------------------- writing shards


def write_partition(dataset: Dataset, parts: list[np.ndarray], high: np.ndarray, out_dir: Path,
                    seed: int, alpha: float) -> list[Path]:
    """Write ``client-NNN.npz`` shards, ``test.npz`` and the ``partition.json`` index.

    A directory that is not empty and holds no ``partition.json`` is refused, so a typo
    cannot scatter shards among someone's files; an earlier partition is replaced (its
    shards removed first). The index is written last: its presence means the set is whole.
    """
    out_dir = Path(out_dir)
    high = np.asarray(high, dtype=bool)
    _check_parts(dataset, parts, high)
    _prepare_dir(out_dir)
    files = []
    for i, (idx, is_high) in enumerate(zip(parts, high)):
        file = out_dir / f"client-{i:03d}.npz"
        meta = _client_meta(dataset, idx, i, bool(is_high), seed, alpha)
        save_shard(file, dataset.x_train[idx], dataset.y_train[idx], meta)
        files.append(file)
    save_shard(out_dir / TEST_FILE, dataset.x_test, dataset.y_test,
               {**_common_meta(dataset, seed, alpha), "split": "test",
                "samples": int(len(dataset.y_test)),
                "label_counts": label_histogram(dataset.y_test, dataset.num_classes)})
    _write_index(out_dir, dataset, files, parts, high, seed, alpha)
    return files


def _check_parts(dataset: Dataset, parts: list[np.ndarray], high: np.ndarray) -> None:
    if len(parts) == 0:
        raise DataError("no clients to write")
    if high.shape != (len(parts),):
        raise DataError(f"resource mask has shape {high.shape}, expected ({len(parts)},)")
    n = len(dataset.y_train)
    for i, idx in enumerate(parts):
        idx = np.asarray(idx)
        if idx.size == 0:
            raise DataError(f"client {i} has no samples; every shard needs at least one")
        if not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0 or idx.max() >= n:
            raise DataError(f"client {i}: indices must be integers in 0..{n - 1}")
    everything = np.concatenate([np.asarray(p) for p in parts])
    if len(np.unique(everything)) != len(everything):
        raise DataError("clients share samples: an index appears in more than one part")


def _prepare_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / PARTITION_INDEX).is_file():
            raise DataError(f"{out_dir} is not empty and holds no {PARTITION_INDEX}; "
                            "refusing to write shards among other files, choose an empty or "
                            "new directory")
        (out_dir / PARTITION_INDEX).unlink()
        for old in [*out_dir.glob("client-*.npz"), out_dir / TEST_FILE]:
            old.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def _common_meta(dataset: Dataset, seed: int, alpha: float) -> dict:
    iid = math.isinf(alpha)
    return {"dataset": dataset.name, "partition_seed": int(seed),
            "scheme": "iid" if iid else "dirichlet", "alpha": None if iid else float(alpha),
            "num_classes": dataset.num_classes, "input_shape": list(dataset.input_shape),
            "normalization": {"mean": list(dataset.mean), "std": list(dataset.std)}}


def _client_meta(dataset: Dataset, idx: np.ndarray, client: int, is_high: bool, seed: int,
                 alpha: float) -> dict:
    return {**_common_meta(dataset, seed, alpha), "client": client,
            "resource": "high" if is_high else "low", "samples": int(len(idx)),
            "label_counts": label_histogram(dataset.y_train[idx], dataset.num_classes)}


def _write_index(out_dir: Path, dataset: Dataset, files: list[Path], parts: list[np.ndarray],
                 high: np.ndarray, seed: int, alpha: float) -> None:
    index = {**_common_meta(dataset, seed, alpha), "seed": int(seed), "num_clients": len(files),
             "high_fraction": float(high.mean()), "test": TEST_FILE,
             "test_samples": int(len(dataset.y_test)),
             "clients": [{"client": i, "file": f.name, "samples": int(len(idx)),
                          "resource": "high" if h else "low",
                          "label_counts": label_histogram(dataset.y_train[idx],
                                                          dataset.num_classes)}
                         for i, (f, idx, h) in enumerate(zip(files, parts, high))]}
    tmp = out_dir / (PARTITION_INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    tmp.replace(out_dir / PARTITION_INDEX)
