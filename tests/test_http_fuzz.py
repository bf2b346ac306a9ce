"""Raw bytes against a running worker: whatever a client sends, the HTTP edge holds.

A real `python -m service` process (embedded Redis, a publish token, JSON logs at DEBUG)
gets hypothesis-made requests over raw sockets, on every route and with every method:
request lines, header names and values (CR, LF, NUL, 8 KiB and more, repeated), bodies and
their encodings (chunked, Content-Length mismatches, gzip and deflate, good and garbage),
HTTP/1.0 and keep-alive. After each request the rule is checked:

- no 5xx, and no hang: every request the server can read gets an answer;
- nothing logged at ERROR or above, no traceback at all (a client's mistake is not the
  service's error), and never the bearer token the client sent (nor in any response);
- a response to HEAD has no body (but see below);
- when the server keeps the connection open, a known-good request sent next on it gets its
  own, well-formed answer: no leftover bytes, no desync.

Requests whose framing the client itself made ambiguous (bare CR or LF inside a line, a
Content-Length that disagrees with the body, a malformed chunk) are sent with the known-good
request right behind them and the client's side then shut: everything the server answers
must still parse as whole HTTP responses, none 5xx, and the connection must end.

One exception to the HEAD rule: a request the parser cannot read (an over-long header, a
missing Host) is refused before its method is known, so the JSON error body follows even a
HEAD. The connection always closes right after, so no later response is displaced; the
fuzzer checks that nothing but that error object follows.
"""

from __future__ import annotations

import functools
import gzip
import json
import socket
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from redis_process import free_port
from stack_processes import Worker, service_env

# Processes or fuzzing for seconds: left out of the quick loop (README, "Test it").
pytestmark = pytest.mark.slow

TOKEN = "fuzz-bearer-7Qx2LmW9pZr4TnB6"
READ_TIMEOUT_S = 5.0
LOG_TIMEOUT_S = 5.0
MAX_HEAD_BYTES = 256 * 1024
SESSION = "fuzzsession01"
# Small limits, so that the "too large" paths are cheap to reach.
MAX_BODY_BYTES = 16 * 1024
MAX_EVENT_BYTES = 4 * 1024

TALLY: Counter[str] = Counter()


# The worker, and what it logged.


@dataclass
class LiveWorker:
    worker: Worker
    log_offset: int = 0
    marks: int = 0

    @property
    def port(self) -> int:
        return self.worker.port

    def log_lines_since_last_check(self) -> list[str]:
        """Log lines written since the previous call, once a marker request shows up in them.

        The marker is a request on a new connection, logged after everything the worker did
        for the requests before it, so the lines returned are all of theirs.
        """
        self.marks += 1
        mark = f"fuzz-mark-{self.marks}"
        with socket.create_connection(("127.0.0.1", self.port), timeout=READ_TIMEOUT_S) as sock:
            sock.sendall(good_request(mark))
            response = Reader(sock).response("GET")
            assert response is not None
            assert response.status == 200, response
        deadline = time.monotonic() + LOG_TIMEOUT_S
        while True:
            text = self.worker.log_path.read_bytes()[self.log_offset :]
            end = text.rfind(b"\n") + 1
            lines = text[:end].decode(errors="replace").splitlines()
            if any(f'"request_id": "{mark}"' in line for line in lines):
                self.log_offset += end
                return lines
            if time.monotonic() > deadline:
                pytest.fail(f"the marker request {mark} was never logged")
            time.sleep(0.002)


@pytest.fixture(scope="module")
def live_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveWorker]:
    """`python -m service` on a free port: embedded Redis, a publish token, JSON logs at DEBUG."""
    port = free_port()
    env = service_env(
        host="127.0.0.1",
        port=port,
        log_format="json",
        log_level="DEBUG",
        publish_tokens=TOKEN,
        max_body_bytes=MAX_BODY_BYTES,
        max_event_bytes=MAX_EVENT_BYTES,
        session_ttl_s=5,
        producer_interval_ms=20,
        heartbeat_interval_s=1,
    )
    workdir = tmp_path_factory.mktemp("fuzz")
    worker = Worker(
        "worker", [sys.executable, "-m", "service", "serve"], env, workdir / "worker.log", port=port
    )
    worker.start()
    try:
        deadline = time.monotonic() + 15
        while not _listening(port):
            if not worker.running or time.monotonic() > deadline:
                pytest.fail(f"the worker did not start:\n{worker.log_text()}")
            time.sleep(0.05)
        yield LiveWorker(worker)
        assert worker.running, worker.log_text()
        log_text = worker.log_text()
        assert TOKEN not in log_text
    finally:
        worker.stop()
        if TALLY:
            print("\nHTTP fuzz tally:", dict(sorted(TALLY.items())), file=sys.stderr)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def check_log(lines: list[str]) -> None:
    """One JSON object per line, none at ERROR, none with a traceback, never the token."""
    for line in lines:
        assert TOKEN not in line, f"the bearer token was logged: {line[:300]}"
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"a log line that is not the service's JSON: {line[:300]}")
        assert entry.get("level") not in ("ERROR", "CRITICAL"), f"logged at ERROR: {line[:600]}"
        assert "exception" not in entry, f"a traceback was logged: {line[:600]}"


# Responses, read by hand.


class ProtocolViolation(AssertionError):
    """The server sent bytes that are not a well-formed HTTP/1.x response."""


@dataclass
class Response:
    status: int
    head: bytes
    headers: dict[str, list[str]]
    body: bytes = b""
    streaming: bool = False

    def header(self, name: str) -> str | None:
        values = self.headers.get(name)
        return None if values is None else ",".join(values)

    def keeps_connection(self, request_version: bytes) -> bool:
        """Whether the server said it keeps the connection open after this response."""
        connection = (self.header("connection") or "").lower()
        if self.head.startswith(b"HTTP/1.0") or request_version == b"HTTP/1.0":
            return "keep-alive" in connection
        return "close" not in connection


class Reader:
    """Responses from one socket, parsed as RFC 9112 frames them."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.eof = False

    def _fill(self) -> None:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        except TimeoutError:
            raise AssertionError("the server neither answered nor closed in time") from None
        if not data:
            self.eof = True
        self.buffer += data

    def _take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if self.eof:
                raise ProtocolViolation(f"the body ended early: {self.buffer[:200]!r}")
            self._fill()
        taken, self.buffer = self.buffer[:size], self.buffer[size:]
        return taken

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if self.eof or len(self.buffer) > MAX_HEAD_BYTES:
                raise ProtocolViolation(f"no line end: {self.buffer[:200]!r}")
            self._fill()
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def closed(self) -> bool:
        """The server closed the connection and sent nothing more (waiting for it if need be)."""
        while not self.eof:
            self._fill()
        return self.buffer == b""

    def response(self, method: str) -> Response | None:
        """The next response (after any 1xx), or None if the connection ended before it."""
        while True:
            while not self.buffer and not self.eof:
                self._fill()
            if not self.buffer:
                return None
            response = self._head()
            if not 100 <= response.status < 200:
                break
        if method == "HEAD" and _refuses_unparsed(response):
            response.body = self._unparsed_refusal_body(response)
            return response
        if method == "HEAD" or response.status in (204, 304):
            return response
        if (response.header("content-type") or "").startswith("text/event-stream"):
            response.streaming = True  # never ends by itself; the caller hangs up
            return response
        response.body = self._body(response)
        return response

    def _unparsed_refusal_body(self, response: Response) -> bytes:
        """The JSON error that may follow even a HEAD request the server could not parse.

        The parser refused the request before its method was known, so the refusal carries
        the JSON error body; the connection then closes, so no later response is displaced.
        """
        while not self.eof:
            self._fill()
        body, self.buffer = self.buffer, b""
        if body:
            TALLY["HEAD requests refused unparsed, with the error body"] += 1
            assert response.header("content-length") == str(len(body)), response
            assert json.loads(body)["error"] in UNPARSED_CODES, body
        return body

    def _body(self, response: Response) -> bytes:
        encoding = (response.header("transfer-encoding") or "").lower()
        if encoding:
            if encoding != "chunked":
                raise ProtocolViolation(f"unexpected transfer coding {encoding!r}")
            return self._chunked_body()
        if (length := response.header("content-length")) is not None:
            if not length.isdigit():
                raise ProtocolViolation(f"bad Content-Length {length!r}")
            return self._take(int(length))
        while not self.eof:  # the body ends with the connection
            self._fill()
        body, self.buffer = self.buffer, b""
        return body

    def _head(self) -> Response:
        while b"\r\n\r\n" not in self.buffer:
            if self.eof or len(self.buffer) > MAX_HEAD_BYTES:
                raise ProtocolViolation(f"not a response head: {self.buffer[:200]!r}")
            self._fill()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.split(b"\r\n")
        parts = status_line.split(b" ", 2)
        if (
            len(parts) < 2
            or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0")
            or not (len(parts[1]) == 3 and parts[1].isdigit())
        ):
            raise ProtocolViolation(f"not a status line: {status_line[:200]!r}")
        headers: dict[str, list[str]] = {}
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise ProtocolViolation(f"not a header line: {line[:200]!r}")
            headers.setdefault(name.decode("latin-1").lower(), []).append(
                value.strip().decode("latin-1")
            )
        return Response(int(parts[1]), head, headers)

    def _chunked_body(self) -> bytes:
        body = b""
        while True:
            size_text = self._line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ProtocolViolation(f"bad chunk size {size_text[:50]!r}") from None
            if size == 0:
                while self._line():  # trailers, up to the empty line
                    pass
                return body
            body += self._take(size)
            if self._take(2) != b"\r\n":
                raise ProtocolViolation("a chunk without its CRLF")


# What the server answers to a request it could not parse: always on a closing connection.
UNPARSED_CODES = frozenset({"malformed_request", "headers_too_large"})


def _refuses_unparsed(response: Response) -> bool:
    return response.status in (400, 431) and not response.keeps_connection(b"HTTP/1.1")


def good_request(request_id: str) -> bytes:
    return (
        f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-Id: {request_id}\r\n\r\n"
    ).encode()


def check_good_answer(response: Response | None, request_id: str) -> None:
    assert response is not None, "the connection ended instead of answering the next request"
    assert response.status == 200, response
    assert response.header("x-request-id") == request_id, response
    assert json.loads(response.body) == {"status": "ok"}, response


def check_response(response: Response) -> None:
    TALLY[f"status {response.status // 100}xx"] += 1
    assert response.status < 500, response
    assert TOKEN.encode() not in response.head + response.body, "the token was echoed"


# Requests.


@dataclass
class Request:
    method: bytes
    target: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    # How the body is framed: "length" (exact Content-Length), "chunked", "none", or one of
    # the ambiguous ways: "short-length", "long-length", "bad-chunk", "length-and-chunked".
    framing: str = "none"
    chunk_sizes: list[int] = field(default_factory=list)

    def __repr__(self) -> str:
        data = self.encode()
        shown = data if len(data) <= 600 else data[:400] + b"..." + data[-100:]
        return f"Request({len(data)} bytes: {shown!r})"

    def encode(self) -> bytes:
        headers = list(self.headers)
        body = self.body
        if self.framing in ("length", "short-length", "long-length"):
            length = len(body) + {"length": 0, "short-length": -1, "long-length": 7}[self.framing]
            headers.append((b"Content-Length", b"%d" % max(length, 0)))
        if self.framing in ("chunked", "bad-chunk", "length-and-chunked"):
            headers.append((b"Transfer-Encoding", b"chunked"))
            body = chunked(body, self.chunk_sizes, bad=self.framing == "bad-chunk")
        if self.framing == "length-and-chunked":
            headers.append((b"Content-Length", b"%d" % len(body)))
        head = b"%b %b %b\r\n" % (self.method, self.target, self.version)
        head += b"".join(b"%b: %b\r\n" % pair for pair in headers)
        return head + b"\r\n" + body

    @property
    def method_name(self) -> str:
        return self.method.decode("latin-1")

    @property
    def ambiguous(self) -> bool:
        """The client itself made the request's end unclear: the server may read it otherwise.

        A CONNECT request has no content (RFC 9110, 9.3.6): bytes sent after its head are
        the next request, whatever its headers say.
        """
        if self.framing not in ("length", "chunked", "none"):
            return True
        if self.version not in (b"HTTP/1.1", b"HTTP/1.0"):
            return True
        line_parts = [self.method, self.target, self.version]
        header_parts = [part for pair in self.headers for part in pair]
        if any(b"\r" in part or b"\n" in part for part in line_parts + header_parts):
            return True
        if any(b" " in part or not part for part in (self.method, self.target)):
            return True
        names = [name.lower() for name, _ in self.headers]
        return any(
            name in (b"content-length", b"transfer-encoding")
            or name != name.strip()
            or b":" in name
            or not name
            for name in names
        ) or (self.method_name in ("HEAD", "CONNECT") and self.framing != "none")


def chunked(body: bytes, sizes: list[int], *, bad: bool) -> bytes:
    out, rest = b"", body
    for size in sizes:
        if not rest:
            break
        piece, rest = rest[:size], rest[size:]
        out += b"%x\r\n%b\r\n" % (len(piece), piece)
    if rest:
        out += b"%x\r\n%b\r\n" % (len(rest), rest)
    if bad:
        return out + b"zz\r\nnot a chunk\r\n0\r\n\r\n"
    return out + b"0\r\n\r\n"


LONG = 9 * 1024  # above aiohttp's 8 KiB line and field limits

METHODS = st.sampled_from(
    [
        b"GET",
        b"HEAD",
        b"POST",
        b"PUT",
        b"DELETE",
        b"OPTIONS",
        b"PATCH",
        b"TRACE",
        b"CONNECT",
        b"PRI",
        b"get",
        b"Get",
        b"G\x00T",
        b"GET\x7f",
        b"\xff\xfe",
    ]
) | st.binary(min_size=1, max_size=12)

SESSION_IDS = st.sampled_from(
    [SESSION, "x" * 64, "x" * 65, "bad id", "bad%20id", "", "..", "a/b", "%00", "\u00e9t\u00e9"]
)
EVENT_IDS = st.sampled_from(["1-0", "0-0", "99999999999999999999-0", "abc", "", "1-0\x00"])
PATHS = st.sampled_from(
    [
        "/",
        "/app.js",
        "/style.css",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/docs",
        "/sse/getSessionId",
        "/sse/connect",
        "/sse/sessions/{sid}/events",
        "/sse/sessions/{sid}",
        "/sse/connect?sessionId={sid}",
        "/sse/connect?sessionId={sid}&lastEventId={eid}",
        "/sse/connect?sessionId={sid}&sessionId={sid}",
        "/nope",
        "/sse/../healthz",
        "//healthz",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/app.js/..",
        "/sse/sessions//events",
    ]
)


@st.composite
def targets(draw: st.DrawFn) -> bytes:
    choice = draw(st.integers(0, 9))
    if choice == 0:
        return b"/" + b"a" * draw(st.integers(LONG, LONG + 4096))
    if choice == 1:
        return draw(
            st.sampled_from(
                [
                    b"*",
                    b"",
                    b"http://127.0.0.1/healthz",
                    b"healthz",
                    b"/healthz#frag",
                    b"/ healthz",
                    b"/\x00",
                    b"/\xff",
                ]
            )
        )
    path = draw(PATHS).format(sid=draw(SESSION_IDS), eid=draw(EVENT_IDS))
    if choice == 2:
        path += "?" + draw(st.text(max_size=40))
    target = path.encode("utf-8", errors="surrogatepass")
    if choice == 3:
        target += draw(st.binary(max_size=20))
    return target


VERSIONS = st.sampled_from(
    [b"HTTP/1.1"] * 6
    + [b"HTTP/1.0"] * 3
    + [
        b"HTTP/1.2",
        b"HTTP/2.0",
        b"HTTP/0.9",
        b"http/1.1",
        b"HTTP/11",
        b"HTTP/1.1 ",
        b"",
        b"HTTP/1.1\x00",
        b"HTTP/1.\xff",
    ]
)

HEADER_BYTES = st.binary(max_size=30) | st.sampled_from(
    [b"\r", b"\n", b"\x00", b"\r\n", b"\r\n ", b"\t", b"\x7f", b"\xff", b"a\r\nX-Injected: 1"]
)


@st.composite
def long_values(draw: st.DrawFn) -> bytes:
    unit = draw(st.sampled_from([b"a", b"\xff", b"%", b" ", b"Bearer "]))
    return unit * (LONG // len(unit) + draw(st.integers(0, 4096)))


def bearer(value: bytes) -> tuple[bytes, bytes]:
    return (b"Authorization", b"Bearer " + value)


KNOWN_HEADERS = st.sampled_from(
    [
        bearer(TOKEN.encode()),
        bearer(b"wrong-token-wrong-token"),
        bearer(b""),
        (b"Authorization", b"Basic " + TOKEN.encode()),
        (b"Authorization", b"Bearer " + TOKEN.encode() + b"x" * LONG),  # over-long, with the secret
        (b"Authorization", b"Bearer " + TOKEN.encode() + b"\x00\xff"),
        (b"Content-Type", b"application/json"),
        (b"Content-Type", b"application/json; charset=utf-8"),
        (b"Content-Type", b"text/plain"),
        (b"Content-Type", b"application/json; charset=latin-1"),
        (b"Content-Type", b"multipart/form-data; boundary=x"),
        (b"Content-Type", b";;;"),
        (b"Content-Encoding", b"gzip"),
        (b"Content-Encoding", b"deflate"),
        (b"Content-Encoding", b"br"),
        (b"Content-Encoding", b"identity"),
        (b"Content-Encoding", b"x-unknown"),
        (b"Content-Encoding", b"gzip, deflate"),
        (b"Accept-Encoding", b"gzip, br"),
        (b"Last-Event-ID", b"1-0"),
        (b"Last-Event-ID", b"garbage"),
        (b"Last-Event-ID", b"0-0"),
        (b"Origin", b"https://elsewhere.example"),
        (b"Origin", b"null"),
        (b"Access-Control-Request-Method", b"POST"),
        (b"Access-Control-Request-Headers", b"x, y"),
        (b"X-Request-Id", b"fuzz\x00id"),
        (b"X-Request-Id", b"r" * 80),
        (b"Expect", b"100-continue"),
        (b"Expect", b"nothing"),
        (b"Connection", b"keep-alive"),
        (b"Connection", b"close"),
        (b"Connection", b"Upgrade"),
        (b"Upgrade", b"websocket"),
        (b"Upgrade", b"h2c"),
        (b"Range", b"bytes=0-10"),
        (b"Range", b"bytes=99999-"),
        (b"If-Modified-Since", b"Thu, 01 Jan 2099 00:00:00 GMT"),
        (b"If-None-Match", b"*"),
        (b"Cookie", b"a=b; " * 10),
        (b"Accept", b"text/event-stream"),
        (b"Cache-Control", b"no-cache"),
        (b"X-Forwarded-For", b"1.2.3.4, ::1"),
        (b"Host", b"127.0.0.1"),
        (b"Host", b""),
        (b"Host", b"a b"),
    ]
)


@st.composite
def header_lists(draw: st.DrawFn, *, clean: bool) -> list[tuple[bytes, bytes]]:
    headers = [(b"Host", b"127.0.0.1")] if draw(st.integers(0, 9)) else []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 5 if not clean else 3))
        if kind <= 1:
            headers.append(draw(KNOWN_HEADERS))
        elif kind == 2:
            name = draw(
                st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_0123456789", min_size=1, max_size=20)
            ).encode()
            headers.append((b"X-" + name, draw(st.binary(max_size=30).filter(_clean_value))))
        elif kind == 3:
            headers.append(
                (
                    draw(st.sampled_from([b"X-Long", b"Authorization", b"Cookie"])),
                    draw(long_values()),
                )
            )
        elif kind == 4:
            headers.append((draw(HEADER_BYTES), draw(HEADER_BYTES)))
        else:
            repeated = draw(KNOWN_HEADERS)
            headers.extend([repeated] * draw(st.integers(2, 50)))
    if not clean:
        headers = [h for h in headers if not h[0].lower().startswith(b"content-length")]
    return headers


def _clean_value(value: bytes) -> bool:
    return not any(c in value for c in b"\r\n\x00")


JSON_BODIES = st.sampled_from(
    [
        b'{"data": "hello"}',
        b'{"event": "note", "data": {"a": [1, 2]}}',
        b'[{"data": "a"}]',
        b'{"data": 1e999}',
        b'{"data": [-1e999]}',
        b'{"data": {"x": [1e400]}}',
        b'{"data": NaN}',
        b'{"data": Infinity}',
        b'{"data": ' + b"9" * 5000 + b"}",
        b'{"data": "\\ud800"}',
        b'{"event": "x\\n", "data": "y"}',
        b'{"event": "finish", "data": "z"}',
        b'{"event": "gap", "data": "z"}',
        b'{"id": "1-0", "data": "z"}',
        b'{"data": "a", "data": "b"}',
        b"[" * 5000 + b"]" * 5000,
        b'{"data": ' + b"[" * 100_000 + b"}",
        b"\xef\xbb\xbf{}",
        b"\xff\xfe{}",
        b"null",
        b"[]",
        b'"text"',
        b"",
        b"{",
        b'{"data": "' + b"x" * 5000 + b'"}',
        b"[" + b'{"data": "a"},' * 101 + b'{"data": "a"}]',
    ]
)


ENCODINGS = {b"gzip": lambda data: gzip.compress(data, mtime=0), b"deflate": zlib.compress}
# Decompression bombs: 4 MiB of zeros in a few KiB, far above the body limit once inflated.
BOMB = b"0" * (4 << 20)
GARBAGE_BODIES = st.sampled_from(
    [
        b"\x1f\x8b\x08\x00garbage",
        b"x\x9cgarbage",
        b"\x00" * 64,
        b"x" * (MAX_BODY_BYTES + 1),
        gzip.compress(b'{"data": "a"}', mtime=0)[:-6],
        zlib.compress(b'{"data": "a"}')[:-3],
    ]
)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """A body and the Content-Encoding header it claims, if any (sometimes a lie)."""
    kind = draw(st.integers(0, 5))
    if kind <= 1:
        return draw(JSON_BODIES), []
    if kind == 2:
        return draw(st.binary(max_size=200)), []
    encoding = draw(st.sampled_from(sorted(ENCODINGS)))
    if kind == 3:
        body = ENCODINGS[encoding](draw(JSON_BODIES))
    elif kind == 4:
        body = ENCODINGS[encoding](BOMB)
    else:
        body = draw(GARBAGE_BODIES)
    claimed = draw(st.sampled_from([encoding, encoding, b"gzip", b"deflate", b"br", b""]))
    return body, [(b"Content-Encoding", claimed)] if claimed else []


@st.composite
def requests(draw: st.DrawFn, *, clean: bool) -> Request:
    """A request on any route; `clean` ones frame themselves unambiguously, others need not."""
    if clean:
        method = draw(st.sampled_from(CLEAN_METHODS))
        path = draw(PATHS).format(
            sid=draw(SESSION_IDS.filter(_url_safe)), eid=draw(EVENT_IDS.filter(_url_safe))
        )
        target = path.encode()
        version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    else:
        method, target, version = draw(METHODS), draw(targets()), draw(VERSIONS)
    headers = draw(header_lists(clean=clean))
    body, encoding = draw(bodies()) if draw(st.booleans()) else (b"", [])
    framings = CLEAN_FRAMINGS if clean else CLEAN_FRAMINGS + AMBIGUOUS_FRAMINGS
    framing = draw(st.sampled_from(framings))
    if framing == "none" or (clean and method == b"HEAD"):
        body, encoding, framing = b"", [], "none"
    sizes = draw(st.lists(st.integers(1, 4096), max_size=4))
    return Request(method, target, version, headers + encoding, body, framing, sizes)


@st.composite
def publish_requests(draw: st.DrawFn) -> Request:
    """A publish call that gets past the route and, mostly, past authorization and media type."""
    session_id = draw(st.sampled_from([SESSION, SESSION, "x" * 65, "bad%20id"]))
    headers = [(b"Host", b"127.0.0.1")]
    headers.append(
        draw(
            st.sampled_from(
                [bearer(TOKEN.encode())] * 4
                + [
                    bearer(b"wrong-token-wrong-token"),
                    (b"Authorization", b"Bearer " + TOKEN.encode() * 600),
                ]
            )
        )
    )
    headers.append(
        draw(
            st.sampled_from(
                [(b"Content-Type", b"application/json")] * 4
                + [
                    (b"Content-Type", b"application/json; charset=utf-8"),
                    (b"Content-Type", b"text/plain"),
                ]
            )
        )
    )
    headers += draw(header_lists(clean=True))[1:]
    body, encoding = draw(bodies())
    framing = draw(st.sampled_from(CLEAN_FRAMINGS[:2]))
    sizes = draw(st.lists(st.integers(1, 4096), max_size=4))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    target = f"/sse/sessions/{session_id}/events".encode()
    return Request(b"POST", target, version, headers + encoding, body, framing, sizes)


CLEAN_METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE"]
CLEAN_FRAMINGS = ["length", "chunked", "none"]
AMBIGUOUS_FRAMINGS = ["short-length", "long-length", "bad-chunk", "length-and-chunked"]


def _url_safe(text: str) -> bool:
    return all(c.isascii() and c.isprintable() and c not in " %" for c in text)


# The properties.


def exchange_clean(worker: LiveWorker, batch: list[Request]) -> None:
    """Each request, then a known-good one on the same connection while the server keeps it."""
    with socket.create_connection(("127.0.0.1", worker.port), timeout=READ_TIMEOUT_S) as sock:
        reader = Reader(sock)
        for n, request in enumerate(batch):
            TALLY["requests"] += 1
            TALLY[f"method {_method_label(request.method)}"] += 1
            sock.sendall(request.encode())
            response = reader.response(request.method_name)
            assert response is not None, "the connection ended without an answer"
            check_response(response)
            if response.streaming:
                TALLY["streams opened"] += 1
                return  # a live stream holds the connection; hang up
            if not response.keeps_connection(request.version):
                TALLY["connections closed by the server"] += 1
                assert reader.closed(), f"bytes after the response: {reader.buffer[:200]!r}"
                return
            good_id = f"good-{n}"
            sock.sendall(good_request(good_id))
            TALLY["known-good follow-ups"] += 1
            check_good_answer(reader.response("GET"), good_id)


def _method_label(method: bytes) -> str:
    return method.decode() if method in CLEAN_METHODS else "(other bytes)"


def exchange_ambiguous(worker: LiveWorker, request: Request) -> None:
    """The request, a known-good one right behind it, then EOF: every answer must be whole."""
    with socket.create_connection(("127.0.0.1", worker.port), timeout=READ_TIMEOUT_S) as sock:
        TALLY["requests"] += 1
        TALLY["ambiguous requests"] += 1
        try:
            sock.sendall(request.encode() + good_request("good-after-ambiguous"))
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            TALLY["connections reset while sending"] += 1
            return
        reader = Reader(sock)
        method = request.method_name  # the first answer is to it, if the server read it whole
        while (response := reader.response(method)) is not None:
            check_response(response)
            if response.streaming:
                TALLY["streams opened"] += 1
                return
            method = "GET"


FUZZ = settings(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)

ROUTES = [
    "/",
    "/app.js",
    "/style.css",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
    "/docs",
    "/sse/getSessionId",
    f"/sse/connect?sessionId={SESSION}",
    "/sse/connect",
    f"/sse/sessions/{SESSION}/events",
    f"/sse/sessions/{SESSION}",
    "/nope",
]


def checked(worker: LiveWorker, exchange: Callable[[], None]) -> None:
    """Run `exchange`, then check what the worker logged meanwhile (also when it failed)."""
    try:
        exchange()
    finally:
        lines = worker.log_lines_since_last_check()
    check_log(lines)


@pytest.mark.parametrize("method", CLEAN_METHODS)
def test_every_route_answers_every_method_and_keeps_the_connection_in_step(
    live_worker: LiveWorker, method: bytes
) -> None:
    headers = [(b"Host", b"127.0.0.1"), bearer(TOKEN.encode())]
    for route in ROUTES:
        request = Request(method, route.encode(), b"HTTP/1.1", headers)
        checked(live_worker, functools.partial(exchange_clean, live_worker, [request]))


@settings(FUZZ, max_examples=200)
@given(batch=st.lists(requests(clean=True), min_size=1, max_size=3))
def test_well_framed_requests_get_whole_answers_and_the_connection_stays_in_step(
    live_worker: LiveWorker, batch: list[Request]
) -> None:
    note(repr(batch))
    checked(live_worker, lambda: exchange_clean(live_worker, batch))


@settings(FUZZ, max_examples=150)
@given(batch=st.lists(publish_requests(), min_size=1, max_size=2))
def test_publish_bodies_and_encodings_never_break_the_service(
    live_worker: LiveWorker, batch: list[Request]
) -> None:
    note(repr(batch))
    checked(live_worker, lambda: exchange_clean(live_worker, batch))


@settings(FUZZ, max_examples=200)
@given(request=requests(clean=False))
def test_any_bytes_get_whole_answers_or_a_closed_connection(
    live_worker: LiveWorker, request: Request
) -> None:
    note(repr(request))
    if request.ambiguous:
        checked(live_worker, lambda: exchange_ambiguous(live_worker, request))
    else:
        checked(live_worker, lambda: exchange_clean(live_worker, [request]))
