"""The test doubles in bot.testing: scripted chat model, hash embeddings, fake server, network guard."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import pytest
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage
from pydantic import BaseModel

from bot.llm import ChatModel, EmbeddingModel, LLMResponseError, OpenAIChatModel
from bot.testing import (
    FakeChatModel,
    FakeEmbeddingModel,
    FakeOpenAIServer,
    FakeReply,
    RemoteNetworkBlocked,
    closed_port,
    hash_embedding,
)

MESSAGES = [SystemMessage("system"), HumanMessage("What keeps you up at night?")]


class Grade(BaseModel):
    label: str
    reason: str


# ---- FakeChatModel ------------------------------------------------------------------------------


def test_fake_chat_answers_in_order_and_records_calls() -> None:
    model = FakeChatModel(["first", "second reply", {"label": "S", "reason": "facts"}], name="buyer")
    assert isinstance(model, ChatModel)

    assert model.complete(MESSAGES, temperature=0.3) == "first"
    assert "".join(model.stream(MESSAGES)) == "second reply"
    assert model.complete_json(MESSAGES, Grade) == Grade(label="S", reason="facts")

    assert [call.method for call in model.calls] == ["complete", "stream", "complete_json"]
    assert model.calls[0].messages == MESSAGES and model.calls[0].temperature == 0.3
    assert model.calls[2].schema is Grade
    model.assert_complete()


def test_fake_chat_stream_yields_several_chunks() -> None:
    assert len(list(FakeChatModel(["a reply of some length"]).stream(MESSAGES))) > 1


def test_fake_chat_unexpected_call_fails_loudly() -> None:
    model = FakeChatModel(["only one"], name="grader")
    model.complete(MESSAGES)
    with pytest.raises(AssertionError, match=r"FakeChatModel 'grader': unexpected call #2 to complete\(\)"):
        model.complete(MESSAGES)


def test_fake_chat_assert_complete_reports_leftovers() -> None:
    model = FakeChatModel(["used", "left over"])
    model.complete(MESSAGES)
    with pytest.raises(AssertionError, match="left over"):
        model.assert_complete()


def test_fake_chat_callable_and_exception_replies() -> None:
    def echo(messages: Sequence[BaseMessage]) -> str:
        return f"you said: {messages[-1].text}"

    model = FakeChatModel([echo, LLMResponseError("boom"), lambda _: Grade(label="P", reason="pain")])

    assert model.complete(MESSAGES) == "you said: What keeps you up at night?"
    with pytest.raises(LLMResponseError, match="boom"):
        model.complete(MESSAGES)
    assert model.complete_json(MESSAGES, Grade).label == "P"


def test_fake_chat_complete_json_validates_like_the_real_model() -> None:
    model = FakeChatModel(
        ['```json\n{"label": "I", "reason": "impact"}\n```', "not json at all", {"label": "S"}],
    )
    assert model.complete_json(MESSAGES, Grade).label == "I"
    with pytest.raises(LLMResponseError, match="no JSON object"):
        model.complete_json(MESSAGES, Grade)
    with pytest.raises(LLMResponseError, match="does not match Grade"):
        model.complete_json(MESSAGES, Grade)


def test_fake_chat_is_thread_safe() -> None:
    replies = [f"reply {i}" for i in range(200)]
    model = FakeChatModel(replies)
    results: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(20):
            text = model.complete(MESSAGES)
            with lock:
                results.append(text)

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(results) == sorted(replies)
    assert len(model.calls) == 200
    model.assert_complete()


def test_fake_chat_fixture_factory(fake_chat: Callable[..., FakeChatModel]) -> None:
    model = fake_chat("hi", name="coach")
    assert model.name == "coach" and model.complete(MESSAGES) == "hi"


# ---- FakeEmbeddingModel -------------------------------------------------------------------------


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def test_fake_embeddings_are_deterministic_normalized_and_similarity_aware() -> None:
    model = FakeEmbeddingModel(dim=32)
    assert isinstance(model, EmbeddingModel)
    a, b, c = model.embed_documents(
        ["implication questions", "implication question", "the weather in Lisbon is mild"]
    )

    assert len(a) == 32 and math.isclose(math.sqrt(sum(x * x for x in a)), 1.0)
    assert a == hash_embedding("implication questions", 32) == model.embed_query("implication questions")
    assert _cosine(a, b) > _cosine(a, c)
    assert model.calls == [
        ["implication questions", "implication question", "the weather in Lisbon is mild"],
        ["implication questions"],
    ]


# ---- FakeOpenAIServer ---------------------------------------------------------------------------


def test_server_streams_the_exact_openai_wire_format(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue("Hello there")
    response = httpx.post(
        f"{fake_server.base_url}/chat/completions",
        json={"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": True}},
    )
    assert response.headers["content-type"] == "text/event-stream"
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Hello there"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


def test_server_unexpected_requests_are_recorded(fake_server: FakeOpenAIServer) -> None:
    response = httpx.post(f"{fake_server.base_url}/chat/completions", json={"model": "m", "messages": []})
    assert response.status_code == 500 and "unexpected request" in response.text
    assert response.headers["x-should-retry"] == "false"
    assert httpx.get(f"{fake_server.base_url}/nowhere").status_code == 404
    assert [r.path for r in fake_server.unexpected] == ["/v1/chat/completions", "/v1/nowhere"]
    with pytest.raises(AssertionError, match="2 unexpected request"):
        fake_server.assert_complete()


def test_server_assert_complete_reports_unused_replies(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue("never asked for")
    with pytest.raises(AssertionError, match="never requested"):
        fake_server.assert_complete()


def test_server_chat_handler_answers_when_queue_is_empty(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue("queued first")
    fake_server.chat_handler = lambda body: f"handled {len(body['messages'])} messages"
    model = OpenAIChatModel("fake-model", api_key="sk-fake", base_url=fake_server.base_url, max_retries=0)

    assert model.complete(MESSAGES) == "queued first"
    assert model.complete(MESSAGES) == "handled 2 messages"
    fake_server.assert_complete()


def test_server_latency_applies_to_every_reply(fake_server: FakeOpenAIServer) -> None:
    fake_server.latency = 0.2
    fake_server.enqueue("slow")
    started = time.monotonic()
    httpx.post(f"{fake_server.base_url}/chat/completions", json={"model": "m", "messages": []})
    assert time.monotonic() - started >= 0.2


def test_server_lists_models_and_embeds_in_both_encodings(fake_server: FakeOpenAIServer) -> None:
    models = httpx.get(f"{fake_server.base_url}/models").json()
    assert [m["id"] for m in models["data"]] == ["fake-model", "fake-embed"]

    floats = httpx.post(f"{fake_server.base_url}/embeddings", json={"model": "e", "input": ["a", "b"]}).json()
    assert [d["index"] for d in floats["data"]] == [0, 1]
    assert floats["data"][1]["embedding"] == pytest.approx(hash_embedding("b", 64))

    encoded = httpx.post(
        f"{fake_server.base_url}/embeddings",
        json={"model": "e", "input": "a", "encoding_format": "base64", "dimensions": 8},
    ).json()
    assert isinstance(encoded["data"][0]["embedding"], str)


def test_server_records_requests_and_stops() -> None:
    with FakeOpenAIServer() as server:
        server.enqueue(FakeReply(content="hi", headers={"x-extra": "1"}))
        response = httpx.post(
            f"{server.base_url}/chat/completions",
            json={"model": "m", "messages": []},
            headers={"X-Test": "yes"},
        )
        assert response.headers["x-extra"] == "1"
        (request,) = server.requests
        assert request.method == "POST" and request.body == {"model": "m", "messages": []}
        assert request.headers["x-test"] == "yes"
        port = server.port
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/v1/models")


def test_closed_port_refuses_connections() -> None:
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", closed_port()))


# ---- network guard (installed for every test by conftest) ---------------------------------------


@pytest.mark.parametrize("address", [("203.0.113.1", 443), ("10.255.255.1", 80)])
def test_guard_blocks_remote_connect_before_sending(address: tuple[str, int]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        started = time.monotonic()
        with pytest.raises(RemoteNetworkBlocked, match=address[0]):
            sock.connect(address)
        with pytest.raises(RemoteNetworkBlocked):
            sock.connect_ex(address)
        assert time.monotonic() - started < 0.5  # raised, never tried


def test_guard_blocks_remote_names_before_dns() -> None:
    with pytest.raises(RemoteNetworkBlocked, match=r"api\.openai\.com"):
        socket.create_connection(("api.openai.com", 443), timeout=5)


def test_guard_blocks_the_openai_client_on_a_remote_address() -> None:
    model = OpenAIChatModel("gpt-4o-mini", api_key="sk-fake", base_url="http://203.0.113.1/v1", max_retries=0)
    with pytest.raises(RemoteNetworkBlocked):
        model.complete(MESSAGES)


def test_guard_allows_loopback_and_unix_sockets(fake_server: FakeOpenAIServer, tmp_path: Path) -> None:
    assert httpx.get(f"http://localhost:{fake_server.port}/v1/models").status_code == 200
    with socket.create_connection(("127.0.0.1", fake_server.port), timeout=5):
        pass

    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as client:
        server.bind(path)
        server.listen()
        client.connect(path)
