"""The validating KServe v2 HTTP front: the only HTTP endpoint callers reach.

    caller --HTTP/1.1--> HttpFront (public host:port) --keep-alive--> tritonserver (127.0.0.1, private port)

Per request: route (an allow-list of KServe v2 paths), authenticate (when an
API key is set; health is always open), bound the body (``max_body_bytes``,
checked against Content-Length before the body is read, and again as it
arrives), decompress a gzip/deflate body within the same bound, check an infer
body with ``check_http_infer``, then forward the body unchanged over a pooled
connection and relay Triton's answer. Refusals are HTTP errors with a KServe
``{"error": ...}`` body and cost no allocation proportional to what a request
declares. Responses go back in request order on each connection.

Parsing is httptools (llhttp, the parser under uvicorn) on asyncio
Protocols, both toward callers and toward Triton: a full framework (aiohttp
server + client, or uvicorn + aiohttp) measured 0.35-0.4 ms added per request
on this machine, this path about 0.1 ms (``monolith-rt bench serving
--protocol http`` prints the comparison).

Concurrency: everything runs on one asyncio loop; a connection serves its
requests one at a time (reading pauses while one is in flight).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import zlib
from collections import Counter, deque
from dataclasses import dataclass, field
from http import HTTPStatus

import httptools
import orjson

from server.front.canonical import http_infer_body
from server.front.inflight import InFlight
from server.front.validate import FrontLimits, RequestRejected, check_http_infer

log = logging.getLogger(__name__)

_MODEL = r"/v2/models/[A-Za-z0-9_.\-]{1,128}(?:/versions/[0-9]{1,18})?"
# (method, path pattern, kind): kind "health" is open; every other kind needs the key when one is set
_ROUTES = [
    ("POST", re.compile(_MODEL + r"/infer"), "infer"),
    ("GET", re.compile(r"/v2/health/(?:live|ready)"), "health"),
    ("GET", re.compile(_MODEL + r"/ready"), "health"),
    ("GET", re.compile(r"/v2"), "metadata"),
    ("GET", re.compile(_MODEL), "metadata"),
    ("GET", re.compile(_MODEL + r"/config"), "metadata"),
    ("GET", re.compile(r"/v2/models(?:/[A-Za-z0-9_.\-]{1,128}(?:/versions/[0-9]{1,18})?)?/stats"), "statistics"),
    ("POST", re.compile(r"/v2/repository/index"), "repository"),
]
_ACCEPTED_ENCODINGS = (b"gzip", b"deflate")
_RELAYED_RESPONSE_HEADERS = (b"content-type", b"inference-header-content-length", b"content-encoding")
_PHRASES = {status.value: status.phrase.encode() for status in HTTPStatus}
_MAX_URL = 2048
_MAX_HEADERS = 64
_MAX_PIPELINED = 8


class _Upstream(bytes):
    """A request to forward to Triton, as opposed to an answer for the caller."""


class _Refusal(Exception):
    def __init__(self, status: HTTPStatus, message: str, reason: str):
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason


@dataclass
class FrontStats:
    """Counters the metrics endpoint exports: refusals by reason, forwarded requests."""

    refused: Counter = field(default_factory=Counter)
    forwarded: int = 0
    upstream_errors: int = 0
    open_connections: int = 0  # HTTP


def route(method: str, path: str) -> str:
    """The route's kind, or raises _Refusal (404/405)."""
    matched_path = False
    for route_method, pattern, kind in _ROUTES:
        if pattern.fullmatch(path):
            if route_method == method:
                return kind
            matched_path = True
    if matched_path:
        raise _Refusal(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed on {path}", "not_exposed")
    raise _Refusal(HTTPStatus.NOT_FOUND, f"{path} is not served here (the front exposes health, metadata, "
                   "model config, statistics, repository index and inference)", "not_exposed")


def response_bytes(status: int, body: bytes, headers: list[tuple[bytes, bytes]] = (), keep_alive: bool = True) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status, _PHRASES.get(status, b"Status")), b"content-length: %d" % len(body)]
    lines += [name + b": " + value for name, value in headers]
    if not keep_alive:
        lines.append(b"connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def error_bytes(status: HTTPStatus, message: str, keep_alive: bool = True) -> bytes:
    return response_bytes(status, orjson.dumps({"error": message}), [(b"content-type", b"application/json")],
                          keep_alive)


class _UpstreamConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to Triton, one request at a time.
    ``send(raw, done)`` calls ``done(result)`` exactly once, where result is
    (status, headers, body) or an exception."""

    def __init__(self, pool: "_UpstreamPool"):
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self._transport = None
        self._done = None
        self.sent_at = 0.0
        self._headers: list = []
        self._body: list = []
        self.usable = False

    def connection_made(self, transport):
        self._transport, self.usable = transport, True

    def connection_lost(self, exc):
        self.usable = False
        self._finish(ConnectionError("tritonserver closed the connection"))

    def data_received(self, data):
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.close()
            self._finish(ConnectionError(f"unparseable answer from tritonserver: {exc}"))

    def on_header(self, name: bytes, value: bytes):
        name = name.lower()
        if name in _RELAYED_RESPONSE_HEADERS:
            self._headers.append((name, value))

    def on_body(self, body: bytes):
        self._body.append(body)

    def on_message_complete(self):
        self.usable = self._parser.should_keep_alive()
        result = (self._parser.get_status_code(), self._headers, b"".join(self._body))
        self._headers, self._body = [], []
        self._finish(result)
        if self.usable:
            self._pool.release(self)

    def send(self, raw: bytes, done) -> None:
        self._done = done
        self.sent_at = time.monotonic()
        self._pool.busy.add(self)
        self._transport.write(raw)

    def time_out(self):
        self.close()
        self._finish(TimeoutError(f"tritonserver did not answer within {self._pool.timeout_s} s"))

    def _finish(self, result):
        done, self._done = self._done, None
        self._pool.busy.discard(self)
        if done is not None:
            done(result)

    def close(self):
        self.usable = False
        if self._transport is not None:
            self._transport.close()


class _UpstreamPool:
    """Idle keep-alive connections to Triton; a new one is opened when none is idle.
    One sweep a second times out requests in flight for longer than timeout_s
    (cheaper than a timer per request)."""

    def __init__(self, host: str, port: int, timeout_s: float):
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self._idle: list[_UpstreamConnection] = []
        self.busy: set[_UpstreamConnection] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    def _sweep(self) -> None:
        now = time.monotonic()
        for connection in [c for c in self.busy if now - c.sent_at > self.timeout_s]:
            connection.time_out()
        self._sweeper = asyncio.get_running_loop().call_later(1.0, self._sweep)

    def send(self, raw: bytes, done) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(1.0, self._sweep)
        while self._idle:
            connection = self._idle.pop()
            if connection.usable:
                connection.send(raw, done)
                return
        asyncio.get_running_loop().create_task(self._connect_and_send(raw, done))

    async def _connect_and_send(self, raw: bytes, done) -> None:
        try:
            _, connection = await asyncio.get_running_loop().create_connection(
                lambda: _UpstreamConnection(self), self.host, self.port)
        except OSError as exc:
            done(exc)
            return
        connection.send(raw, done)

    def release(self, connection: _UpstreamConnection) -> None:
        self._idle.append(connection)

    def close(self):
        if self._sweeper is not None:
            self._sweeper.cancel()
        for connection in self._idle:
            connection.close()
        self._idle.clear()


@dataclass
class _Request:
    method: str
    url: bytes
    headers: dict
    body: bytes
    keep_alive: bool
    caller: str = ""
    in_flight: int | None = None  # the InFlight token while Triton has it


class _CallerConnection(asyncio.Protocol):
    """One caller's connection: parses requests, answers them in order."""

    def __init__(self, front: "HttpFront"):
        self._front = front
        self._parser = httptools.HttpRequestParser(self)
        self._transport = None
        self._queue: deque[_Request] = deque()
        self._in_flight: _Request | None = None
        self._closing = False
        self._reset()

    def _reset(self):
        # one growing buffer, not a list of chunks: 4M chunks of 2 bytes as bytes objects cost ~30x their size
        self._url, self._headers, self._body, self._size = b"", {}, bytearray(), 0
        self._started_at: float | None = None  # the current request's first byte, until it is complete

    def connection_made(self, transport):
        self._transport = transport
        self._active_at = time.monotonic()
        peer = transport.get_extra_info("peername")
        self._caller = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else str(peer)
        connections = self._front.connections
        if len(connections) >= self._front.limits.max_connections:
            self._refuse_and_close(_Refusal(HTTPStatus.SERVICE_UNAVAILABLE, "too many open connections (the front "
                                            f"allows {self._front.limits.max_connections}); retry later",
                                            "too_many_connections"))
            return
        connections.add(self)
        self._front.stats.open_connections = len(connections)

    def connection_lost(self, exc):
        self._closing = True
        self._front.connections.discard(self)
        self._front.stats.open_connections = len(self._front.connections)

    def expire(self, now: float) -> None:
        """Closes the connection if its request is arriving too slowly, or if it has been idle too long."""
        limits = self._front.limits
        if self._closing:
            return
        if self._started_at is not None and now - self._started_at > limits.read_timeout_s:
            self._refuse_and_close(_Refusal(HTTPStatus.REQUEST_TIMEOUT, "the request did not arrive whole within "
                                            f"{limits.read_timeout_s:g} s", "slow_request"))
        elif self._in_flight is None and not self._queue and now - self._active_at > limits.idle_timeout_s:
            self._closing = True
            self._transport.close()

    def data_received(self, data):
        if self._closing:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse_and_close(_Refusal(HTTPStatus.BAD_REQUEST, "protocol upgrades are not supported", "malformed"))
        except httptools.HttpParserError as exc:
            # a _Refusal raised in a callback comes back as the parser error's context
            refusal = exc.__context__ if isinstance(exc.__context__, _Refusal) else \
                _Refusal(HTTPStatus.BAD_REQUEST, f"malformed HTTP request: {exc}", "malformed")
            self._refuse_and_close(refusal)

    def _refuse_and_close(self, refusal: _Refusal):
        self._front.stats.refused[refusal.reason] += 1
        self._closing = True
        if self._in_flight is None:
            self._transport.write(error_bytes(refusal.status, refusal.message, keep_alive=False))
        self._transport.close()

    # httptools callbacks
    def on_message_begin(self):
        self._started_at = time.monotonic()

    def on_url(self, url: bytes):
        self._url += url
        if len(self._url) > _MAX_URL:
            raise _Refusal(HTTPStatus.REQUEST_URI_TOO_LONG, f"the URL requires at most {_MAX_URL} bytes", "malformed")

    def on_header(self, name: bytes, value: bytes):
        if len(self._headers) >= _MAX_HEADERS:
            raise _Refusal(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                           f"a request requires at most {_MAX_HEADERS} headers", "malformed")
        self._headers[name.lower()] = value

    def on_headers_complete(self):
        length = self._headers.get(b"content-length")
        limit = self._front.limits.max_body_bytes
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise _Refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"the body requires at most {limit} bytes, Content-Length says {length[:32].decode('latin-1')}",
                           "too_large")
        if self._headers.get(b"expect", b"").lower() == b"100-continue":
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes):
        self._size += len(body)
        if self._size > self._front.limits.max_body_bytes:
            raise _Refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"the body requires at most {self._front.limits.max_body_bytes} bytes", "too_large")
        self._body += body

    def on_message_complete(self):
        self._queue.append(_Request(self._parser.get_method().decode("latin-1"), self._url, self._headers,
                                    bytes(self._body), self._parser.should_keep_alive(), self._caller))
        self._reset()
        if len(self._queue) >= _MAX_PIPELINED:
            self._transport.pause_reading()
        if self._in_flight is None:
            self._next()

    def _next(self):
        """Answers queued requests until one goes upstream (its answer comes back in _answered)."""
        while self._queue and not self._closing:
            request = self._queue.popleft()
            outcome = self._front.check(request)
            if not isinstance(outcome, _Upstream):
                self._write(request, outcome)
                continue
            self._in_flight = request
            self._front.forward(outcome, self._answered)
            return
        if not self._closing and len(self._queue) < _MAX_PIPELINED:
            self._transport.resume_reading()

    def _answered(self, result):
        request, self._in_flight = self._in_flight, None
        if request.in_flight is not None:
            self._front.in_flight.closed(request.in_flight, lost=isinstance(result, BaseException))
        if self._closing:
            return
        self._write(request, self._front.relay(request, result))
        self._next()

    def _write(self, request: _Request, answer: bytes):
        self._active_at = time.monotonic()
        self._transport.write(answer)
        if not request.keep_alive:
            self._closing = True
            self._transport.close()


class HttpFront:
    """Serves the public HTTP port; forwards accepted requests to Triton's private one."""

    def __init__(self, upstream_host: str, upstream_port: int, limits: FrontLimits = FrontLimits(),
                 api_key: bytes | None = None, upstream_timeout_s: float = 60.0):
        self.limits = limits
        self.stats = FrontStats()
        self.in_flight = InFlight()
        self.connections: set[_CallerConnection] = set()
        self._api_key = api_key
        self._pool = _UpstreamPool(upstream_host, upstream_port, upstream_timeout_s)
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _CallerConnection(self), host, port, reuse_address=True)
        self._sweep()
        return self._server.sockets[0].getsockname()[1]

    def _sweep(self) -> None:
        """Once a second: slow requests and idle connections (cheaper than a timer per connection)."""
        now = time.monotonic()
        for connection in list(self.connections):
            connection.expire(now)
        self._sweeper = asyncio.get_running_loop().call_later(1.0, self._sweep)

    async def close(self):
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        self._pool.close()

    def forward(self, raw: bytes, done) -> None:
        self._pool.send(raw, done)

    def relay(self, request: _Request, result) -> bytes:
        """The caller's answer from Triton's (status, headers, body), or from the exception raised instead."""
        if isinstance(result, BaseException):
            self.stats.upstream_errors += 1
            log.warning("tritonserver unreachable: %r", result)
            return error_bytes(HTTPStatus.SERVICE_UNAVAILABLE, "the inference server is unavailable (restarting?); "
                               "retry", request.keep_alive)
        self.stats.forwarded += 1
        status, headers, body = result
        return response_bytes(status, body, headers, request.keep_alive)

    def check(self, request: _Request) -> bytes:
        """The request to send upstream (_Upstream), or a refused request's error answer (plain bytes)."""
        try:
            return _Upstream(self._checked(request))
        except _Refusal as refusal:
            self.stats.refused[refusal.reason] += 1
            return error_bytes(refusal.status, refusal.message, request.keep_alive)

    def _checked(self, request: _Request) -> bytes:
        path = request.url.partition(b"?")[0].decode("latin-1")
        kind = route(request.method, path)
        if kind != "health" and self._api_key is not None:
            given = request.headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self._api_key):
                raise _Refusal(HTTPStatus.UNAUTHORIZED, "requires a valid API key in 'Authorization: Bearer <key>'",
                               "unauthorized")
        body = request.body if request.method == "POST" else b""
        headers = request.headers
        encoding = headers.get(b"content-encoding", b"identity").lower()
        if body and encoding != b"identity":
            body = self._decompress(encoding, body)
        lines = [f"{request.method} {path} HTTP/1.1".encode(), b"host: triton"]
        if kind == "infer":
            chunks, header_length = self._canonical_infer(headers.get(b"inference-header-content-length"), body)
            request.in_flight = self.in_flight.opened("http", path.split("/")[3], request.caller, request.body)
            lines += [b"content-type: application/octet-stream", b"inference-header-content-length: %d" % header_length]
        elif kind == "repository":
            chunks = [_canonical_index_body(body)]
            lines.append(b"content-type: application/json")
        else:
            chunks = []
        accepted = headers.get(b"accept-encoding", b"").lower()
        for name in _ACCEPTED_ENCODINGS:
            if name in accepted:
                lines.append(b"accept-encoding: " + name)
                break
        lines.append(b"content-length: %d" % sum(map(len, chunks)))
        return b"".join([b"\r\n".join(lines), b"\r\n\r\n", *chunks])

    def _canonical_infer(self, header_length: bytes | None, body: bytes) -> tuple[list, int]:
        """What Triton receives for an infer body: its canonical re-encoding (server.front.canonical)."""
        if header_length is not None and not (header_length.isdigit() and len(header_length) <= 18):
            raise _Refusal(HTTPStatus.BAD_REQUEST, "Inference-Header-Content-Length requires an integer, got "
                           f"{header_length[:32]!r}", "invalid")
        parsed_length = None if header_length is None else int(header_length)
        try:
            return http_infer_body(check_http_infer(body, parsed_length, self.limits))
        except RequestRejected as exc:
            raise _Refusal(HTTPStatus.BAD_REQUEST, str(exc), "invalid") from None

    def _decompress(self, encoding: bytes, body: bytes) -> bytes:
        wbits = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}.get(encoding)
        if wbits is None:
            raise _Refusal(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "Content-Encoding requires gzip, deflate or identity, "
                           f"got {encoding[:32].decode('latin-1')}", "invalid")
        limit = self.limits.max_body_bytes
        decompressor = zlib.decompressobj(wbits)
        try:
            out = decompressor.decompress(body, limit + 1)
        except zlib.error as exc:
            raise _Refusal(HTTPStatus.BAD_REQUEST, f"the {encoding.decode()} body does not decompress: {exc}",
                           "invalid") from None
        if len(out) > limit or decompressor.unconsumed_tail:
            raise _Refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"the decompressed body requires at most {limit} bytes", "too_large")
        return out


def _canonical_index_body(body: bytes) -> bytes:
    """The repository index request re-encoded: an empty body or {"ready": true|false}."""
    if not body.strip():
        return b""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _Refusal(HTTPStatus.BAD_REQUEST, f"the request body is not valid JSON: {exc}", "invalid") from None
    if not isinstance(document, dict) or not document.keys() <= {"ready"} or \
            type(document.get("ready", False)) is not bool:
        raise _Refusal(HTTPStatus.BAD_REQUEST, 'the repository index takes an empty body or {"ready": true|false}, '
                       f"got {body[:80]!r}", "invalid")
    return orjson.dumps(document)


class MetricsFront(HttpFront):
    """The public Prometheus endpoint: Triton's ``/metrics`` (the models'
    ``monolith_*`` metrics included) followed by ``extra()``, the front's and
    the supervisor's own. Open like health (scrapers carry no key); while
    Triton is down it still answers, with ``extra()`` alone."""

    def __init__(self, upstream_host: str, upstream_port: int, extra):
        super().__init__(upstream_host, upstream_port, upstream_timeout_s=5.0)
        self._extra = extra

    def _checked(self, request: _Request) -> bytes:
        path = request.url.partition(b"?")[0]
        if path != b"/metrics":
            raise _Refusal(HTTPStatus.NOT_FOUND, "only /metrics is served here", "not_exposed")
        if request.method != "GET":
            raise _Refusal(HTTPStatus.METHOD_NOT_ALLOWED, f"{request.method} is not allowed on /metrics",
                           "not_exposed")
        return b"GET /metrics HTTP/1.1\r\nhost: triton\r\ncontent-length: 0\r\n\r\n"

    def relay(self, request: _Request, result) -> bytes:
        body = result[2] if not isinstance(result, BaseException) and result[0] == 200 else b""
        if body and not body.endswith(b"\n"):
            body += b"\n"
        return response_bytes(200, body + self._extra(), [(b"content-type", b"text/plain; version=0.0.4")],
                              request.keep_alive)
