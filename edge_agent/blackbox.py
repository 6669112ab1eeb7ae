"""A frozen model the device can only query: ``score(inputs, labels) -> loss, correct``.

Black-box prompt tuning (Fed-BBPT) trains a small prompt generator against a model whose
weights the device never holds. Two implementations share one interface:

* :class:`RemoteBlackBox`: the model owner's endpoint (``zowarmup serve-model``), over
  HTTP with an API key. The device has no file of the weights: this is the real setting.
* :class:`LocalBlackBox`: the same frozen graph run here by ONNX Runtime, every weight a
  constant inside the graph. The tuning code only calls :meth:`score`; it never reads them.

Either counts its queries (one per ``score`` call), so a round can report what it cost.
"""

from __future__ import annotations

import http.client
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import onnxruntime as ort

from protocols.errors import ProtocolError, ZoError
from protocols.scoring import (
    DEVICE_HEADER,
    DTYPES,
    SPEC_FILE,
    BlackBoxSpec,
    ScoreReply,
    decode_error,
    encode_request,
)

API_KEY_ENV = "ZOWARMUP_API_KEY"


class BlackBoxError(ZoError):
    """The black box refused a query or cannot be reached; ``code`` says why."""

    def __init__(self, message: str, code: str = "refused") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Score:
    loss: float  # mean cross-entropy over the batch
    correct: int
    count: int


class BlackBox:
    """What the tuning code may do with a frozen model: ask it to score a batch."""

    spec: BlackBoxSpec
    queries: int = 0

    def score(self, inputs: np.ndarray, labels: np.ndarray) -> Score:
        raise NotImplementedError

    def close(self) -> None:
        """Release the connection or session."""


class LocalBlackBox(BlackBox):
    """The frozen graph of a black-box directory, run by ONNX Runtime on this machine."""

    def __init__(self, directory: Path, threads: int | None = None) -> None:
        directory = Path(directory)
        try:
            self.spec = BlackBoxSpec.from_json((directory / SPEC_FILE).read_bytes())
        except FileNotFoundError:
            raise BlackBoxError(f"{directory} holds no {SPEC_FILE}: not a black-box "
                                "directory", "missing_file") from None
        _check_files(directory, self.spec)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads or 1
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(directory / self.spec.graph), options,
                                             providers=["CPUExecutionProvider"])
        self.queries = 0

    def score(self, inputs: np.ndarray, labels: np.ndarray) -> Score:
        x = np.ascontiguousarray(inputs, dtype=DTYPES[self.spec.input_dtype])
        loss, correct = self._session.run(["loss", "correct"], {
            "x": x, "y": np.ascontiguousarray(labels, dtype=np.int64)})
        self.queries += 1
        return Score(float(loss), int(correct), int(x.shape[0]))


def _check_files(directory: Path, spec: BlackBoxSpec) -> None:
    """The graph must be the file the spec was sealed with (size and SHA-256)."""
    from protocols.manifest import file_sha256
    info = spec.files.get(spec.graph)
    path = directory / spec.graph
    if info is None or not path.is_file():
        raise BlackBoxError(f"{directory}: {SPEC_FILE} lists no graph {spec.graph!r}, or the "
                            "file is missing", "missing_file")
    if path.stat().st_size != info.get("bytes") or file_sha256(path) != info.get("sha256"):
        raise BlackBoxError(f"{path} is not the graph {SPEC_FILE} was written for (size or "
                            "SHA-256 differs)", "bad_file")


class RemoteBlackBox(BlackBox):
    """A ``zowarmup serve-model`` endpoint: one kept-alive HTTP connection, retried once."""

    def __init__(self, url: str, api_key: str, device: str, timeout: float = 60.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BlackBoxError(f"black-box URL {url!r} must be http://HOST:PORT or "
                                "https://HOST:PORT", "bad_url")
        if not api_key:
            raise BlackBoxError(f"no API key for {url}: pass --api-key-file or set "
                                f"{API_KEY_ENV}", "no_key")
        self.url, self.device, self.timeout = url, device, timeout
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self._headers = {"Authorization": f"Bearer {api_key}", DEVICE_HEADER: device,
                         "Content-Type": "application/json"}
        self._conn: http.client.HTTPConnection | None = None
        self.queries = 0
        self.budget_left = -1
        self.spec = BlackBoxSpec.from_json(self._request("GET", "/v1/info", b""))

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            kind = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = kind(self._host, self._port, timeout=self.timeout)
        return self._conn

    def _request(self, method: str, path: str, body: bytes) -> bytes:
        """One request; over the rate limit, wait as told and ask again (for up to 60 s)."""
        end = time.monotonic() + 60.0
        while True:
            status, data, wait = self._once(method, path, body)
            if status != 429 or decode_error(data)[0] != "rate_limited" \
                    or time.monotonic() + wait > end:
                break
            time.sleep(wait)
        if status != 200:
            code, detail = decode_error(data)
            raise BlackBoxError(f"black box {self.url} refused the query (HTTP {status} "
                                f"{code}): {detail}", code)
        return data

    def _once(self, method: str, path: str, body: bytes) -> tuple[int, bytes, float]:
        for attempt in (1, 2):  # a kept-alive connection the server closed: reconnect once
            try:
                conn = self._connection()
                conn.request(method, path, body=body, headers=self._headers)
                reply = conn.getresponse()
                data = reply.read()
                if reply.will_close:
                    self.close()
                break
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if attempt == 2:
                    raise BlackBoxError(f"black box {self.url} cannot be reached: {exc}",
                                        "unreachable") from None
                time.sleep(0.2)
        retry = reply.getheader("Retry-After", "1")
        return reply.status, data, float(retry) if retry.isdigit() else 1.0

    def score(self, inputs: np.ndarray, labels: np.ndarray) -> Score:
        body = encode_request(inputs, labels, self.spec)
        try:
            reply = ScoreReply.decode(self._request("POST", "/v1/score", body))
        except ProtocolError as exc:
            raise BlackBoxError(f"black box {self.url} sent a malformed answer: {exc}",
                                "bad_reply") from None
        self.queries += 1
        self.budget_left = reply.budget_left
        return Score(reply.loss, reply.correct, reply.count)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def open_blackbox(address: str, device: str, api_key: str | None = None,
                  threads: int | None = None) -> BlackBox:
    """``http(s)://...`` for an endpoint (the key from ``api_key`` or the environment),
    anything else for a black-box directory on this machine."""
    if address.startswith(("http://", "https://")):
        return RemoteBlackBox(address, api_key or os.environ.get(API_KEY_ENV, ""), device)
    return LocalBlackBox(Path(address), threads)
