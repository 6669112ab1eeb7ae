"""``zowarmup serve-model DIR``: a frozen model behind an HTTP scoring API, as its owner runs it.

Fed-BBPT's devices never hold the pre-trained model: they send inputs and labels and get
back a loss and a correct count (:mod:`protocols.scoring`). This is that API, on the
standard library's threading HTTP server, with the owner's protections:

* every request needs ``Authorization: Bearer KEY`` and a device id;
* a request's declared size is checked before its body is read; its JSON, dtypes,
  shapes, labels and values are checked before the model sees it;
* each device has a rate (a token bucket) and, if set, a budget of queries; a refused
  request is answered with its reason and counts against nothing.

:class:`ScoringService` decides (no sockets); :class:`ModelServer` serves it over HTTP in a
background thread, for ``zowarmup run`` and for tests; ``serve-model`` runs it in front.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from edge_agent.blackbox import LocalBlackBox
from protocols.errors import ProtocolError
from protocols.scoring import DEVICE_HEADER, ScoreReply, decode_request, error_body
from protocols.validate import check_identifier

log = logging.getLogger("zowarmup.serve_model")


@dataclass(frozen=True)
class Limits:
    """What one request and one device may ask of the model."""

    max_request_bytes: int = 4 << 20
    max_batch: int = 1024
    rate: float = 100.0  # queries per second per device, refilled continuously
    burst: int = 50  # queries a device may send at once
    budget: int = 0  # queries per device over the server's life; 0 = no budget
    max_devices: int = 10_000  # distinct device ids tracked; more are refused


@dataclass
class Usage:
    queries: int = 0  # answered
    refused: int = 0
    tokens: float = 0.0
    last: float = field(default_factory=time.monotonic)


class Refusal(Exception):
    def __init__(self, status: int, code: str, detail: str, retry_after: float = 0.0) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.retry_after = status, code, detail, retry_after


class ScoringService:
    """Authentication, limits and validation around a frozen model's ``score``."""

    def __init__(self, model_dir: Path, api_key: str, limits: Limits | None = None,
                 threads: int | None = None) -> None:
        if len(api_key) < 16:
            raise ValueError("the API key must be at least 16 characters")
        self.model = LocalBlackBox(Path(model_dir), threads)
        self.spec = self.model.spec
        self.limits = limits or Limits()
        self._key = api_key.encode()
        self._lock = threading.Lock()
        self.usage: dict[str, Usage] = {}
        self.refusals: dict[str, int] = {}

    def handle(self, method: str, path: str, headers: dict[str, str],
               read_body) -> tuple[int, bytes, dict[str, str]]:
        """One request: (status, body, extra headers). ``read_body(n)`` reads n bytes."""
        try:
            if path not in ("/v1/info", "/v1/score", "/v1/usage"):
                raise Refusal(404, "not_found", f"no such endpoint {path[:100]!r}; use "
                              "POST /v1/score, GET /v1/info or GET /v1/usage")
            wanted = "POST" if path == "/v1/score" else "GET"
            if method != wanted:
                raise Refusal(405, "bad_method", f"{path} takes {wanted}, not {method}")
            self._authenticate(headers)
            device = self._device(headers)
            if path == "/v1/info":
                return 200, self.spec.to_json().encode(), {}
            if path == "/v1/usage":
                return 200, json.dumps(self._usage_of(device)).encode(), {}
            return 200, self._score(device, headers, read_body), {}
        except Refusal as refusal:
            with self._lock:
                self.refusals[refusal.code] = self.refusals.get(refusal.code, 0) + 1
            extra = ({"Retry-After": f"{max(1, math.ceil(refusal.retry_after))}"}
                     if refusal.retry_after else {})
            return refusal.status, error_body(refusal.code, refusal.detail), extra

    def _authenticate(self, headers: dict[str, str]) -> None:
        given = headers.get("authorization", "")
        if not given.startswith("Bearer "):
            raise Refusal(401, "no_key", "send the API key as 'Authorization: Bearer KEY'")
        if not hmac.compare_digest(given[7:].strip().encode(), self._key):
            raise Refusal(401, "bad_key", "the API key is not valid")

    def _device(self, headers: dict[str, str]) -> str:
        raw = headers.get(DEVICE_HEADER.lower(), "")
        try:
            return check_identifier(raw, DEVICE_HEADER)
        except ProtocolError as exc:
            raise Refusal(400, "bad_device", f"{exc} (send the header {DEVICE_HEADER})") from None

    def _score(self, device: str, headers: dict[str, str], read_body) -> bytes:
        length = self._length(headers)
        self._admit(device)
        try:
            body = read_body(length)
            if len(body) != length:
                raise Refusal(400, "short_body", f"the body ended after {len(body)} of "
                              f"{length} bytes")
            try:
                x, y = decode_request(body, self.spec, self.limits.max_batch)
            except ProtocolError as exc:
                raise Refusal(400, exc.code, str(exc)) from None
            score = self.model.score(x, y)
        except BaseException:
            self._refund(device)
            raise
        usage = self.usage[device]
        left = max(0, self.limits.budget - usage.queries) if self.limits.budget else -1
        return ScoreReply(score.loss, score.correct, score.count, usage.queries, left).encode()

    def _length(self, headers: dict[str, str]) -> int:
        raw = headers.get("content-length")
        if raw is None or not raw.isdigit():
            raise Refusal(411, "no_length", "a score request needs a Content-Length")
        length = int(raw)
        if length > self.limits.max_request_bytes:
            raise Refusal(413, "too_big", f"the request is {length} bytes, at most "
                          f"{self.limits.max_request_bytes}")
        return length

    def _admit(self, device: str) -> None:
        """Count a query against the device's budget and rate, or refuse it."""
        limits, now = self.limits, time.monotonic()
        with self._lock:
            usage = self.usage.get(device)
            if usage is None:
                if len(self.usage) >= limits.max_devices:
                    raise Refusal(429, "too_many_devices", f"at most {limits.max_devices} "
                                  "devices are served")
                usage = self.usage[device] = Usage(tokens=float(limits.burst), last=now)
            usage.tokens = min(float(limits.burst), usage.tokens + (now - usage.last) * limits.rate)
            usage.last = now
            if limits.budget and usage.queries >= limits.budget:
                usage.refused += 1
                raise Refusal(403, "budget_exhausted", f"device {device} has used its "
                              f"{limits.budget} queries")
            if usage.tokens < 1.0:
                usage.refused += 1
                wait = (1.0 - usage.tokens) / limits.rate
                raise Refusal(429, "rate_limited", f"device {device} is over {limits.rate:g} "
                              f"queries/s; retry in {wait:.2f} s", wait)
            usage.tokens -= 1.0
            usage.queries += 1

    def _refund(self, device: str) -> None:
        with self._lock:
            self.usage[device].queries -= 1
            self.usage[device].refused += 1

    def _usage_of(self, device: str) -> dict:
        with self._lock:
            usage = self.usage.get(device, Usage())
            budget = self.limits.budget
            return {"device": device, "queries": usage.queries, "refused": usage.refused,
                    "budget_left": max(0, budget - usage.queries) if budget else -1}

    def queries(self) -> dict[str, int]:
        """Answered queries per device so far."""
        with self._lock:
            return {device: usage.queries for device, usage in sorted(self.usage.items())}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a device sends many small queries
    timeout = 30  # a client that stops sending mid-request is dropped
    server_version = "zowarmup-serve-model"

    def _serve(self) -> None:
        service: ScoringService = self.server.service  # type: ignore[attr-defined]
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, body, extra = service.handle(self.command, self.path.split("?")[0], headers,
                                             self.rfile.read)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra.items():
            self.send_header(name, value)
        if status >= 400:  # the body may be unread: it must not be parsed as a request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base's name
        log.debug("%s %s", self.address_string(), format % args)


class ModelServer:
    """The scoring service over HTTP in a background thread (``port=0``: a free port)."""

    def __init__(self, service: ScoringService, host: str = "127.0.0.1", port: int = 0) -> None:
        self.service = service
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.service = service  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                        name="serve-model")

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> ModelServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(10)
        self.service.model.close()
