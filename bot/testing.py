"""Test doubles: a scripted chat model, hash embeddings, a fake OpenAI server, and a remote-network guard.

Importable by tests and benchmarks alike, so nothing here imports pytest.
"""

from __future__ import annotations

import base64
import hashlib
import http
import ipaddress
import json
import math
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from langchain_core.messages import BaseMessage
from pydantic import BaseModel, ValidationError

from bot.llm import LLMResponseError, parse_json_reply
from bot.roleplay import CallState
from bot.scenarios import Scenario

T = TypeVar("T", bound=BaseModel)

ReplyValue = str | dict[str, Any] | BaseModel
FakeChatReply = ReplyValue | BaseException | Callable[[Sequence[BaseMessage]], ReplyValue]


# --------------------------------------------------------------------------------------------------
# Deterministic embeddings


def hash_embedding(text: str, dim: int = 64) -> list[float]:
    """A unit vector from hashed character 1-3-grams: texts sharing n-grams land close together."""
    if dim < 1:
        raise ValueError(f"dim must be at least 1, got {dim}")
    vector = [0.0] * dim
    padded = " " + " ".join(text.lower().split()) + " "
    for n, weight in ((1, 0.5), (2, 1.0), (3, 1.0)):
        for i in range(len(padded) - n + 1):
            # blake2b, not hash(): str hashes are salted per process and would change between runs.
            value = int.from_bytes(
                hashlib.blake2b(padded[i : i + n].encode(), digest_size=8).digest(), "little"
            )
            vector[value % dim] += weight if (value >> 40) & 1 else -weight
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector] if norm else vector


class FakeEmbeddingModel:
    """Implements EmbeddingModel with hash_embedding; records every call in `.calls`."""

    def __init__(self, dim: int = 64, name: str = "fake-embed") -> None:
        self.dim = dim
        self.name = name
        self.calls: list[list[str]] = []
        self._lock = threading.Lock()

    def embed_documents(self, texts: Sequence[str]) -> list[list[float]]:
        with self._lock:
            self.calls.append(list(texts))
        return [hash_embedding(text, self.dim) for text in texts]

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


# --------------------------------------------------------------------------------------------------
# Scripted chat model


@dataclass(frozen=True)
class FakeCall:
    """One call made to a FakeChatModel."""

    method: str
    messages: list[BaseMessage]
    schema: type[BaseModel] | None = None
    temperature: float | None = None
    max_tokens: int | None = None


class FakeChatModel:
    """Implements ChatModel from a queue of scripted replies, consumed in order, one per call.

    A reply is a str, a dict or pydantic model (for complete_json; a str there is parsed as JSON),
    an exception instance (raised), or a callable `(messages) -> str | dict | BaseModel`.
    """

    def __init__(self, replies: Sequence[FakeChatReply] = (), name: str = "fake") -> None:
        self.name = name
        self.calls: list[FakeCall] = []
        self._replies: deque[FakeChatReply] = deque(replies)
        self._lock = threading.Lock()  # graders call concurrently

    def add(self, *replies: FakeChatReply) -> None:
        """Queue more replies."""
        with self._lock:
            self._replies.extend(replies)

    @property
    def remaining(self) -> int:
        with self._lock:
            return len(self._replies)

    def assert_complete(self) -> None:
        """Fail if some scripted replies were never used."""
        with self._lock:
            left = list(self._replies)
        if left:
            raise AssertionError(
                f"FakeChatModel {self.name!r}: {len(left)} scripted reply/replies never used: "
                + ", ".join(_short(item) for item in left[:5])
            )

    def complete(
        self,
        messages: Sequence[BaseMessage],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> str:
        value = self._next(FakeCall("complete", list(messages), None, temperature, max_tokens))
        return self._text(value)

    def stream(
        self,
        messages: Sequence[BaseMessage],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> Iterator[str]:
        # Consume the reply now, not on first next(), so call order matches the caller's code order.
        text = self._text(self._next(FakeCall("stream", list(messages), None, temperature, max_tokens)))
        return iter(_split(text, 3))

    def complete_json(
        self, messages: Sequence[BaseMessage], schema: type[T], *, temperature: float | None = None
    ) -> T:
        value = self._next(FakeCall("complete_json", list(messages), schema, temperature))
        if isinstance(value, str):
            return parse_json_reply(value, schema)
        if isinstance(value, schema):
            return value
        data = value.model_dump() if isinstance(value, BaseModel) else value
        try:
            return schema.model_validate(data)
        except ValidationError as exc:
            # Same contract as the real model: a reply that misses the schema is a response error.
            raise LLMResponseError(
                f"FakeChatModel {self.name!r}: scripted reply does not match {schema.__name__}: {exc}"
            ) from None

    def _next(self, call: FakeCall) -> ReplyValue:
        with self._lock:
            self.calls.append(call)
            number = len(self.calls)
            item = self._replies.popleft() if self._replies else None
        if item is None:
            last = call.messages[-1].text if call.messages else ""
            raise AssertionError(
                f"FakeChatModel {self.name!r}: unexpected call #{number} to {call.method}(): "
                f"no scripted replies left; last message: {_short(last)}"
            )
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, str | dict | BaseModel):
            return item
        return item(call.messages)

    def _text(self, value: ReplyValue) -> str:
        if isinstance(value, BaseModel):
            value = value.model_dump_json()
        elif isinstance(value, dict):
            value = json.dumps(value, ensure_ascii=False)
        if not value.strip():
            # Mirrors OpenAIChatModel, which never returns an empty reply.
            raise LLMResponseError(f"FakeChatModel {self.name!r}: scripted reply is empty")
        return value


def _split(text: str, parts: int) -> list[str]:
    size = max(1, math.ceil(len(text) / parts))
    return [text[i : i + size] for i in range(0, len(text), size)]


def _short(item: object, limit: int = 60) -> str:
    text = item if isinstance(item, str) else repr(item)
    return repr(text if len(text) <= limit else text[:limit] + "...")


# --------------------------------------------------------------------------------------------------
# Fake OpenAI-compatible server


@dataclass
class FakeReply:
    """One scripted answer from FakeOpenAIServer."""

    content: str = ""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (latency, timeouts)
    raw_body: str | None = None  # sent as is, for malformed replies
    cut_after_chunks: int | None = None  # streaming: send this many content chunks, then drop the connection
    error_message: str = ""  # for status >= 400; defaults to the HTTP reason phrase


@dataclass(frozen=True)
class RecordedRequest:
    """One request the fake server received; header names are lower-case."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


ChatHandler = Callable[[dict[str, Any]], str | FakeReply]


class FakeOpenAIServer:
    """An OpenAI-compatible HTTP server on 127.0.0.1 (random port) in a background thread.

    Chat replies come from `enqueue(...)`, then `chat_handler`; anything else answers 500
    "unexpected request" (marked not retryable) and is recorded in `.unexpected`.
    """

    def __init__(
        self, *, embedding_dim: int = 64, models: Sequence[str] = ("fake-model", "fake-embed")
    ) -> None:
        self.embedding_dim = embedding_dim
        self.models = list(models)
        self.chat_handler: ChatHandler | None = None
        self.latency = 0.0
        self._chat_queue: deque[str | FakeReply] = deque()
        self._embedding_queue: deque[FakeReply] = deque()
        self._requests: list[RecordedRequest] = []
        self._unexpected: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._counter = 0
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle
    def start(self) -> FakeOpenAIServer:
        if self._httpd is None:
            self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
            self._httpd.fake = self
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._httpd = None
            self._thread = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("FakeOpenAIServer is not started")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # scripting
    def enqueue(self, *replies: str | FakeReply) -> None:
        """Queue chat replies (assistant text or FakeReply), answered in order."""
        with self._lock:
            self._chat_queue.extend(replies)

    def enqueue_embeddings(self, *replies: FakeReply) -> None:
        """Queue scripted embedding answers (errors, delays, raw bodies); when empty, vectors are computed."""
        with self._lock:
            self._embedding_queue.extend(replies)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def unexpected(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._unexpected)

    def chat_requests(self) -> list[dict[str, Any]]:
        """The JSON bodies of every chat completion request, in order."""
        return [r.body for r in self.requests if r.path == "/v1/chat/completions"]

    def assert_complete(self) -> None:
        """Fail if queued replies remain or unexpected requests happened."""
        with self._lock:
            left = len(self._chat_queue) + len(self._embedding_queue)
            unexpected = list(self._unexpected)
        problems = []
        if left:
            problems.append(f"{left} queued repl{'y was' if left == 1 else 'ies were'} never requested")
        if unexpected:
            listed = ", ".join(f"{r.method} {r.path}" for r in unexpected[:5])
            problems.append(f"{len(unexpected)} unexpected request(s): {listed}")
        if problems:
            raise AssertionError("FakeOpenAIServer: " + "; ".join(problems))

    # request handling (runs on server threads)
    def _handle(self, handler: _Handler, method: str) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        body: Any
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", errors="replace")
        path = urlsplit(handler.path).path
        headers = {name.lower(): value for name, value in handler.headers.items()}
        request = RecordedRequest(method, path, headers, body)
        with self._lock:
            self._requests.append(request)
        try:
            if method == "POST" and path == "/v1/chat/completions" and isinstance(body, dict):
                self._chat(handler, request, body)
            elif method == "POST" and path == "/v1/embeddings" and isinstance(body, dict):
                self._embeddings(handler, body)
            elif method == "GET" and path == "/v1/models":
                data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models]
                _send_json(handler, 200, {"object": "list", "data": data})
            else:
                self._unexpected_request(handler, request, 404, f"no such endpoint: {method} {path}")
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            # The client gave up (e.g. its timeout fired while we were sleeping).
            handler.close_connection = True
        except Exception as exc:
            # A failing chat_handler is a test bug: report it in assert_complete(), answer a plain 500.
            self._unexpected_request(handler, request, 500, f"fake server error: {type(exc).__name__}: {exc}")

    def _unexpected_request(
        self, handler: _Handler, request: RecordedRequest, status: int, message: str
    ) -> None:
        with self._lock:
            self._unexpected.append(request)
        # x-should-retry stops the openai client from retrying into the same wall.
        _send_error(
            handler, FakeReply(status=status, error_message=message, headers={"x-should-retry": "false"})
        )

    def _chat(self, handler: _Handler, request: RecordedRequest, body: dict[str, Any]) -> None:
        with self._lock:
            item = self._chat_queue.popleft() if self._chat_queue else None
            self._counter += 1
            number = self._counter
        if item is None and self.chat_handler is not None:
            item = self.chat_handler(body)
        if item is None:
            self._unexpected_request(handler, request, 500, "unexpected request: no reply queued")
            return
        reply = FakeReply(content=item) if isinstance(item, str) else item
        _pause(self.latency + reply.delay)
        if reply.status >= 400:
            _send_error(handler, reply)
            return
        streaming = bool(body.get("stream"))
        if reply.raw_body is not None:
            content_type = "text/event-stream" if streaming else "application/json"
            _send(handler, reply.status, reply.raw_body.encode(), content_type, reply.headers)
            return
        model = str(body.get("model", "fake-model"))
        if streaming:
            options = body.get("stream_options") or {}
            usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
            _send_stream(handler, reply, model, f"chatcmpl-fake-{number}", usage)
            return
        completion_tokens = max(1, len(reply.content) // 4)
        payload = {
            "id": f"chatcmpl-fake-{number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.content},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 10,
                "completion_tokens": completion_tokens,
                "total_tokens": 10 + completion_tokens,
            },
        }
        _send_json(handler, reply.status, payload, reply.headers)

    def _embeddings(self, handler: _Handler, body: dict[str, Any]) -> None:
        with self._lock:
            reply = self._embedding_queue.popleft() if self._embedding_queue else FakeReply()
        _pause(self.latency + reply.delay)
        if reply.status >= 400:
            _send_error(handler, reply)
            return
        if reply.raw_body is not None:
            _send(handler, reply.status, reply.raw_body.encode(), "application/json", reply.headers)
            return
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            _send_error(
                handler, FakeReply(status=400, error_message="'input' must be a string or a list of strings")
            )
            return
        dim = int(body.get("dimensions") or self.embedding_dim)
        data: list[dict[str, Any]] = []
        for index, text in enumerate(texts):
            vector = hash_embedding(text, dim)
            embedding: list[float] | str = vector
            if body.get("encoding_format") == "base64":
                embedding = base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(max(1, len(t) // 4) for t in texts)
        payload = {
            "object": "list",
            "data": data,
            "model": body.get("model", "fake-embed"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        _send_json(handler, 200, payload, reply.headers)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a handler sleeping out a `delay` must not block stop()
    fake: FakeOpenAIServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients closing keep-alive or timed-out connections is normal, not worth a traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked streaming, like real servers
    server: _HTTPServer

    def do_GET(self) -> None:
        self.server.fake._handle(self, "GET")

    def do_POST(self) -> None:
        self.server.fake._handle(self, "POST")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean


def _pause(seconds: float) -> None:
    if seconds > 0:
        time.sleep(seconds)


def _send(
    handler: _Handler, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None
) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(data)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(data)
    handler.wfile.flush()


def _send_json(
    handler: _Handler, status: int, payload: object, headers: dict[str, str] | None = None
) -> None:
    _send(handler, status, json.dumps(payload, ensure_ascii=False).encode(), "application/json", headers)


def _send_error(handler: _Handler, reply: FakeReply) -> None:
    if reply.raw_body is not None:
        _send(handler, reply.status, reply.raw_body.encode(), "application/json", reply.headers)
        return
    try:
        phrase = http.HTTPStatus(reply.status).phrase
    except ValueError:
        phrase = "Error"
    kind = (
        "server_error"
        if reply.status >= 500
        else "rate_limit_error"
        if reply.status == 429
        else "invalid_request_error"
    )
    error = {"message": reply.error_message or phrase, "type": kind, "param": None, "code": None}
    _send_json(handler, reply.status, {"error": error}, reply.headers)


def _stream_pieces(text: str) -> list[str]:
    """Split a reply into word-sized deltas (at most 8 characters, so CJK text streams too)."""
    pieces: list[str] = []
    word = ""
    for char in text:
        word += char
        if char.isspace() or len(word) >= 8:
            pieces.append(word)
            word = ""
    if word:
        pieces.append(word)
    return pieces


def _send_stream(handler: _Handler, reply: FakeReply, model: str, completion_id: str, usage: bool) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.send_header("Cache-Control", "no-cache")
    handler.send_header("Transfer-Encoding", "chunked")
    for name, value in reply.headers.items():
        handler.send_header(name, value)
    handler.end_headers()
    created = int(time.time())

    def event(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> None:
        chunk = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            **extra,
        }
        _write_chunk(handler, f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())

    event({"role": "assistant", "content": ""})
    for count, piece in enumerate(_stream_pieces(reply.content)):
        if reply.cut_after_chunks is not None and count >= reply.cut_after_chunks:
            break
        event({"content": piece})
    if reply.cut_after_chunks is not None:
        # Drop the connection without the terminating chunk: the client sees an incomplete body.
        handler.close_connection = True
        handler.connection.shutdown(socket.SHUT_RDWR)
        return
    event({}, "stop")
    if usage:
        tokens = max(1, len(reply.content) // 4)
        usage_chunk = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": {"prompt_tokens": 10, "completion_tokens": tokens, "total_tokens": 10 + tokens},
        }
        _write_chunk(handler, f"data: {json.dumps(usage_chunk)}\n\n".encode())
    _write_chunk(handler, b"data: [DONE]\n\n")
    _write_chunk(handler, b"")


def _write_chunk(handler: _Handler, data: bytes) -> None:
    handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    handler.wfile.flush()


def closed_port() -> int:
    """A 127.0.0.1 port with nothing listening on it (for connection-refused tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------------
# Network guard


class RemoteNetworkBlocked(AssertionError):
    """A test tried to open a connection to a non-loopback address."""


class _MonkeyPatch(Protocol):
    def setattr(self, target: Any, name: str, value: Any) -> None: ...


_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def _is_local(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return False
    name = host.strip("[]").split("%")[0].lower()
    if name in _LOCAL_NAMES or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False  # a remote host name: refuse before any DNS lookup
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or address.is_unspecified or bool(mapped and mapped.is_loopback)


def _check_address(family: int, address: object) -> None:
    if family not in (socket.AF_INET, socket.AF_INET6):
        return  # AF_UNIX, netlink, ...: not the network
    host, port = (
        (address[0], address[1]) if isinstance(address, tuple) and len(address) >= 2 else (address, "?")
    )
    if not _is_local(host):
        raise RemoteNetworkBlocked(
            f"blocked a network connection to {host}:{port}: tests may only connect to 127.0.0.1 "
            "(use FakeOpenAIServer or FakeChatModel instead of a real service)"
        )


def forbid_remote_network(monkeypatch: _MonkeyPatch) -> None:
    """Make every connection to a non-loopback address raise RemoteNetworkBlocked, before it is sent."""
    original_connect = socket.socket.connect
    original_connect_ex = socket.socket.connect_ex
    original_create_connection = socket.create_connection

    def connect(self: socket.socket, address: Any) -> None:
        _check_address(self.family, address)
        original_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        _check_address(self.family, address)
        return original_connect_ex(self, address)

    def create_connection(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        # Checked here too so remote names fail before their DNS lookup.
        _check_address(socket.AF_INET, address)
        return original_create_connection(address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "create_connection", create_connection)


def locked_texts(card: Scenario, state: CallState) -> list[str]:
    """Every card text the buyer has not disclosed in `state`, in both languages: what must never leak."""
    texts = [f.reply for f in card.facts if f.id not in state.facts]
    for p in card.problems:
        if p.id not in state.implied:
            texts.append(p.implied)
        texts += [text for i, text in enumerate(p.implications) if i not in state.implications.get(p.id, ())]
        if p.id not in state.explicit:
            texts.append(p.need_payoff)
    return [t for text in texts for t in (text.zh, text.en)]
