"""A full disk under the run directory: a clear error, and what was durable stays intact.

The disk really is full: a 1 MiB tmpfs mounted for the test, filled up. Where mounting is
not permitted (not root), the same scenario runs in a child process whose file-size limit
(RLIMIT_FSIZE) makes the kernel refuse the write instead (EFBIG rather than ENOSPC).
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from protocols.errors import JournalError
from protocols.journal import Journal, read_journal
from protocols.messages import CommitMessage
from protocols.zo import Commit

ROOT = Path(__file__).resolve().parents[1]


def fill(directory: Path) -> Callable[[], None]:
    """Fill the file system under ``directory``; returns what frees the space again."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler.unlink


def commit_message(round_id: int, pairs: int) -> CommitMessage:
    return CommitMessage(Commit(round_id, tuple((i + 1, 1e-3) for i in range(pairs))),
                         f"{round_id:032x}")


def journal_scenario(directory: Path, make_full: Callable[[Path], Callable[[], None]]) -> None:
    journal = Journal.create(directory / "journal", {"run_id": "r", "base_version": 0})
    journal.append_commit(commit_message(0, 10))
    size = (directory / "journal").stat().st_size
    free = make_full(directory)
    with pytest.raises(JournalError, match="cannot write to the journal") as info:
        journal.append_commit(commit_message(1, 2000))  # ~30 KB: needs new blocks
    assert "resume" in str(info.value)
    assert (directory / "journal").stat().st_size == size  # the partial write is cut off
    assert journal.version == 1
    free()
    journal.append_commit(commit_message(1, 2000))
    journal.close()
    contents = read_journal(directory / "journal")
    assert [m.commit.round for m in contents.commits] == [0, 1] and contents.torn_bytes == 0


def checkpoint_scenario(directory: Path, make_full: Callable[[Path], Callable[[], None]]
                        ) -> None:
    from sklearn.datasets import load_digits

    from orchestrator.train.fedavg import Warmup, WarmupConfig, WarmupError
    from orchestrator.train.zoo import build_model
    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32).reshape(-1, 1, 8, 8)
    clients = [(x[i:300:3], y[i:300:3]) for i in range(3)]
    config = WarmupConfig(batch_size=32, local_epochs=1, client_lr=0.05)

    def trainer() -> Warmup:
        return Warmup(build_model("cnn", 10, in_channels=1, image_size=8, width=8), clients,
                      [0, 1, 2], config, seed=1)
    first = trainer()
    first.run(1)
    path = directory / "warmup.pt"
    first.save_checkpoint(path)
    before = path.read_bytes()
    free = make_full(directory)
    first.run(1)
    with pytest.raises(WarmupError, match="previous checkpoint is intact") as info:
        first.save_checkpoint(path)
    assert "cannot write the warm-up checkpoint" in str(info.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in directory.iterdir()) in (["filler", "warmup.pt"],
                                                           ["warmup.pt"])  # no temp file
    restored = trainer()
    restored.load_checkpoint(path)
    assert restored.next_round == 1
    free()
    first.save_checkpoint(path)
    restored.load_checkpoint(path)
    assert restored.next_round == 2


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, or None where this process may not mount one."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def size_limit(directory: Path) -> Callable[[], None]:
    """The fallback's "full disk": no file may grow past 8 KiB (the process may not
    raise the limit again, so the space is never freed)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, resource.RLIM_INFINITY))
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)


def run_with_size_limit(scenario: str, directory: Path) -> None:
    code = (f"from pathlib import Path\nfrom tests.test_disk_faults import {scenario}, "
            f"size_limit\n{scenario}(Path({str(directory)!r}), size_limit)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_full_disk_fails_a_journal_append_cleanly(small_disk, tmp_path):
    if small_disk is None:
        run_with_size_limit("journal_scenario", tmp_path)
    else:
        journal_scenario(small_disk, fill)


def test_a_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(small_disk, tmp_path):
    pytest.importorskip("torch", reason="the warm-up needs the orchestrator extra")
    if small_disk is None:
        run_with_size_limit("checkpoint_scenario", tmp_path)
    else:
        checkpoint_scenario(small_disk, fill)
