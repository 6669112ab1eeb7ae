"""`serve-model`: the frozen model's scoring API over real HTTP, and every refusal it makes."""

from __future__ import annotations

import base64
import http.client
import json
import time

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the test black boxes are built with onnx")

from edge_agent.blackbox import BlackBoxError, LocalBlackBox, RemoteBlackBox  # noqa: E402
from orchestrator.bbpt.endpoint import Limits, ModelServer, ScoringService  # noqa: E402
from protocols.scoring import DEVICE_HEADER, array_to_wire  # noqa: E402
from tests.blackboxes import linear_blackbox  # noqa: E402

KEY = "k" * 24


@pytest.fixture
def box_dir(tmp_path):
    return linear_blackbox(tmp_path / "bb", features=6, classes=3)


def serve(box_dir, **limits) -> ModelServer:
    return ModelServer(ScoringService(box_dir, KEY, Limits(**limits))).start()


@pytest.fixture
def server(box_dir):
    s = serve(box_dir)
    yield s
    s.stop()


def batch(n: int = 5, seed: int = 1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 6)).astype(np.float32), rng.integers(0, 3, n)


def raw(server: ModelServer, method: str, path: str, body: bytes | None = None,
        headers: dict | None = None) -> tuple[int, dict]:
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read() or b"{}")
    finally:
        conn.close()


def good_headers(device: str = "dev-1") -> dict:
    return {"Authorization": f"Bearer {KEY}", DEVICE_HEADER: device}


def body_of(x, y, **changes) -> bytes:
    data = {"inputs": array_to_wire(x, "float32"), "labels": array_to_wire(y, "int64")}
    data.update(changes)
    return json.dumps(data).encode()


def test_a_device_scores_through_the_endpoint_as_the_owner_would_locally(server, box_dir):
    x, y = batch()
    remote = RemoteBlackBox(server.url, KEY, "dev-1")
    local = LocalBlackBox(box_dir)
    got, want = remote.score(x, y), local.score(x, y)
    assert got == want and got.count == 5
    assert remote.spec == local.spec and remote.queries == 1
    assert server.service.queries() == {"dev-1": 1}


X, Y = batch()
BAD = {
    "no key": ({DEVICE_HEADER: "dev-1"}, body_of(X, Y), 401, "no_key"),
    "wrong key": ({"Authorization": "Bearer " + "x" * 24, DEVICE_HEADER: "dev-1"},
                  body_of(X, Y), 401, "bad_key"),
    "no device": ({"Authorization": f"Bearer {KEY}"}, body_of(X, Y), 400, "bad_device"),
    "bad device id": (good_headers("../etc"), body_of(X, Y), 400, "bad_device"),
    "not JSON": (good_headers(), b"{inputs", 400, "bad_json"),
    "wrong dtype": (good_headers(), body_of(X, Y, inputs=array_to_wire(X.astype(np.int64),
                                                                       "int64")),
                    400, "bad_dtype"),
    "wrong shape": (good_headers(), body_of(X[:, :4], Y), 400, "bad_shape"),
    "labels do not match": (good_headers(), body_of(X, Y[:3]), 400, "bad_shape"),
    "label out of range": (good_headers(), body_of(X, np.array([0, 1, 2, 3, 0])), 400,
                           "bad_label"),
    "NaN input": (good_headers(), body_of(np.full_like(X, np.nan), Y), 400, "non_finite"),
    "absurd input": (good_headers(), body_of(X * 1e9, Y), 400, "out_of_range"),
    "not base64": (good_headers(), body_of(X, Y, labels={"dtype": "int64", "shape": [5],
                                                         "data": "!!!!"}), 400, "bad_data"),
    "short data": (good_headers(), body_of(X, Y, labels={
        "dtype": "int64", "shape": [5], "data": base64.b64encode(b"\0" * 8).decode()}),
        400, "bad_data"),
    "extra field": (good_headers(), body_of(X, Y, model="other"), 400, "unknown_field"),
    "batch too large": (good_headers(), body_of(np.zeros((2000, 6), np.float32),
                                                np.zeros(2000, np.int64)), 400, "too_big"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_request_is_refused_with_its_reason_and_counts_nothing(server, case):
    headers, body, status, code = BAD[case]
    got, reply = raw(server, "POST", "/v1/score", body, headers)
    assert (got, reply["error"]) == (status, code) and reply["detail"]
    assert server.service.queries().get("dev-1", 0) == 0
    assert raw(server, "POST", "/v1/score", body_of(X, Y), good_headers())[0] == 200


def test_size_method_and_path_are_checked_before_the_body_is_read(box_dir):
    server = serve(box_dir, max_request_bytes=1000)
    try:
        status, reply = raw(server, "POST", "/v1/score", body_of(np.zeros((100, 6), np.float32),
                                                                 np.zeros(100, np.int64)),
                            good_headers())
        assert (status, reply["error"]) == (413, "too_big")
        assert raw(server, "GET", "/v1/score", None, good_headers())[1]["error"] == "bad_method"
        assert raw(server, "GET", "/v1/weights", None, good_headers())[1]["error"] == "not_found"
        assert raw(server, "GET", "/v1/info", None, {DEVICE_HEADER: "d"})[0] == 401
        assert server.service.queries() == {}
    finally:
        server.stop()


def test_each_device_has_its_own_budget(box_dir):
    server = serve(box_dir, budget=3)
    try:
        x, y = batch()
        first = RemoteBlackBox(server.url, KEY, "dev-1")
        for _ in range(3):
            first.score(x, y)
        assert first.budget_left == 0
        with pytest.raises(BlackBoxError) as refused:
            first.score(x, y)
        assert refused.value.code == "budget_exhausted" and first.queries == 3
        RemoteBlackBox(server.url, KEY, "dev-2").score(x, y)  # another device is unaffected
        assert server.service.queries() == {"dev-1": 3, "dev-2": 1}
    finally:
        server.stop()


def test_a_burst_over_the_rate_is_refused_and_the_client_waits_its_turn(box_dir):
    server = serve(box_dir, rate=5.0, burst=1)
    try:
        x, y = batch()
        assert raw(server, "POST", "/v1/score", body_of(x, y), good_headers())[0] == 200
        status, reply = raw(server, "POST", "/v1/score", body_of(x, y), good_headers())
        assert (status, reply["error"]) == (429, "rate_limited")
        client = RemoteBlackBox(server.url, KEY, "dev-1")
        started = time.monotonic()
        client.score(x, y)
        client.score(x, y)  # refused at first, then answered after Retry-After
        assert time.monotonic() - started >= 0.9 and client.queries == 2
        assert server.service.queries()["dev-1"] == 3
    finally:
        server.stop()


def test_a_short_api_key_is_refused(box_dir):
    with pytest.raises(ValueError, match="16 characters"):
        ScoringService(box_dir, "short")


def test_the_serve_model_command_serves_until_terminated(box_dir, tmp_path):
    import os
    import re
    import signal
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("ZOWARMUP_API_KEY", None)
    cmd = [sys.executable, "-m", "orchestrator.cli", "serve-model", str(box_dir), "--port", "0"]
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "API key" in refused.stderr
    proc = subprocess.Popen(cmd + ["--budget", "5"], env={**env, "ZOWARMUP_API_KEY": KEY},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://[0-9.]+:[0-9]+", line).group(0)
        box = RemoteBlackBox(url, KEY, "pi-7")
        assert box.score(*batch()).count == 5 and box.budget_left == 4
        box.close()
    finally:
        proc.send_signal(signal.SIGTERM)  # as systemd stops it; Ctrl-C goes the same way
        out, _ = proc.communicate(timeout=30)
    assert "pi-7: 1 queries" in out and proc.returncode == 0


def test_a_black_box_whose_graph_was_swapped_is_refused(box_dir, tmp_path):
    other = linear_blackbox(tmp_path / "other", features=6, classes=3, seed=9)
    (box_dir / "model.onnx").write_bytes((other / "model.onnx").read_bytes())
    with pytest.raises(BlackBoxError, match="SHA-256"):
        LocalBlackBox(box_dir)
    with pytest.raises(BlackBoxError, match="blackbox.json"):
        LocalBlackBox(tmp_path)
