"""bot.llm over real HTTP: the real openai client against FakeOpenAIServer on 127.0.0.1."""

from __future__ import annotations

import time
import traceback
from typing import Literal

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from pydantic import BaseModel

from bot.config import Settings
from bot.llm import (
    ChatModel,
    EmbeddingModel,
    LLMConfigError,
    LLMConnectionError,
    LLMError,
    LLMRateLimitError,
    LLMResponseError,
    LLMServerError,
    LLMTimeoutError,
    OpenAIChatModel,
    OpenAIEmbeddingModel,
    chat_model_from_settings,
    embedding_model_from_settings,
    parse_json_reply,
)
from bot.testing import FakeOpenAIServer, FakeReply, closed_port, hash_embedding

KEY = "sk-test-SECRET-123"
MESSAGES = [SystemMessage("You are a buyer."), HumanMessage("What does your team do today?")]
# Tell the openai client to wait 10 ms before a retry, so retry tests stay fast.
FAST_RETRY = {"retry-after-ms": "10"}


class Grade(BaseModel):
    label: Literal["S", "P", "I", "N", "O"]
    reason: str


def chat(
    server: FakeOpenAIServer, *, timeout: float = 5.0, max_retries: int = 2, model: str = "fake-model"
) -> OpenAIChatModel:
    return OpenAIChatModel(
        model, api_key=KEY, base_url=server.base_url, timeout=timeout, max_retries=max_retries
    )


def assert_no_key(exc: BaseException) -> None:
    """Neither the message, the repr nor a printed traceback may show the key."""
    printed = "".join(traceback.format_exception(exc))
    for text in (str(exc), repr(exc), printed):
        assert KEY not in text
        assert "SECRET" not in text


# ---- plain completion and streaming ------------------------------------------------------------


def test_complete_sends_openai_shaped_request(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue("We run three plants.")
    model = chat(fake_server)
    history = [*MESSAGES, AIMessage("Hello."), HumanMessage("And the plants?")]

    assert model.complete(history, temperature=0.2, max_tokens=50) == "We run three plants."

    (request,) = fake_server.requests
    assert request.method == "POST" and request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.body["model"] == "fake-model"
    assert request.body["messages"] == [
        {"role": "system", "content": "You are a buyer."},
        {"role": "user", "content": "What does your team do today?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "And the plants?"},
    ]
    assert request.body["temperature"] == 0.2
    assert request.body["max_tokens"] == 50
    assert "response_format" not in request.body
    fake_server.assert_complete()


def test_models_satisfy_the_protocols(fake_server: FakeOpenAIServer) -> None:
    assert isinstance(chat(fake_server), ChatModel)
    embedder = OpenAIEmbeddingModel("fake-embed", api_key=KEY, base_url=fake_server.base_url)
    assert isinstance(embedder, EmbeddingModel)
    assert KEY not in repr(chat(fake_server)) + repr(embedder)


def test_stream_yields_deltas_that_reassemble(fake_server: FakeOpenAIServer) -> None:
    text = "Our downtime costs us about 40 hours a month. 我们每个月停机四十小时。"
    fake_server.enqueue(text)

    deltas = list(chat(fake_server).stream(MESSAGES))

    assert len(deltas) > 3
    assert "".join(deltas) == text
    assert fake_server.requests[0].body["stream"] is True


def test_empty_reply_is_a_response_error(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue("", "")
    model = chat(fake_server)
    with pytest.raises(LLMResponseError, match="empty reply"):
        model.complete(MESSAGES)
    with pytest.raises(LLMResponseError, match="empty reply"):
        list(model.stream(MESSAGES))


def test_non_json_body_is_a_response_error(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue(FakeReply(raw_body="<html>proxy error</html>"))
    with pytest.raises(LLMResponseError, match="malformed"):
        chat(fake_server).complete(MESSAGES)


# ---- JSON output --------------------------------------------------------------------------------


def test_complete_json_asks_for_json_schema(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue('{"label": "P", "reason": "asks about a difficulty"}')

    grade = chat(fake_server).complete_json(MESSAGES, Grade, temperature=0)

    assert grade == Grade(label="P", reason="asks about a difficulty")
    body = fake_server.requests[0].body
    assert body["temperature"] == 0
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "Grade", "schema": Grade.model_json_schema(), "strict": False},
    }


def test_complete_json_falls_back_to_json_object_and_remembers(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue(
        FakeReply(
            status=400, error_message="response_format type 'json_schema' is not supported by this model"
        ),
        '{"label": "S", "reason": "facts"}',
        '{"label": "N", "reason": "value"}',
    )
    model = chat(fake_server)

    assert model.complete_json(MESSAGES, Grade).label == "S"
    assert model.complete_json(MESSAGES, Grade).label == "N"

    formats = [body.get("response_format", {}).get("type") for body in fake_server.chat_requests()]
    assert formats == ["json_schema", "json_object", "json_object"]
    assert model.json_mode == "json_object"
    # Without json_schema the prompt itself must carry the word JSON and the schema.
    system = fake_server.chat_requests()[1]["messages"][0]
    assert system["role"] == "system" and "You are a buyer." in system["content"]
    assert "JSON" in system["content"] and '"label"' in system["content"]
    fake_server.assert_complete()


def test_complete_json_falls_back_to_no_response_format(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue(
        FakeReply(status=400, error_message="Unknown field json_schema"),
        FakeReply(status=400, error_message="response_format is not supported"),
        'Sure! {"label": "I", "reason": "consequence"}',
    )
    model = chat(fake_server)

    assert model.complete_json(MESSAGES, Grade).label == "I"

    assert ["response_format" in body for body in fake_server.chat_requests()] == [True, True, False]
    assert model.json_mode == "none"


def test_other_bad_requests_are_config_errors_without_fallback(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue(
        FakeReply(status=400, error_message="This model's maximum context length is 8192 tokens")
    )
    with pytest.raises(LLMConfigError, match="maximum context length"):
        chat(fake_server).complete_json(MESSAGES, Grade)
    assert len(fake_server.requests) == 1


def test_complete_json_parses_fenced_json(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue('Here you go:\n```json\n{"label": "N", "reason": "asks about value"}\n```\nDone.')
    assert chat(fake_server).complete_json(MESSAGES, Grade) == Grade(label="N", reason="asks about value")


@pytest.mark.parametrize(
    "reply",
    [
        '{"label": "O", "reason": "small talk"}',
        '```\n{"label": "O", "reason": "small talk"}\n```',
        'The answer is {"label": "O", "reason": "small talk"} as requested.',
        '<think>maybe {"label": "S"}?</think>{"label": "O", "reason": "small talk"}',
    ],
)
def test_parse_json_reply_is_tolerant(reply: str) -> None:
    assert parse_json_reply(reply, Grade) == Grade(label="O", reason="small talk")


def test_malformed_json_is_a_response_error(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue('{"label": "S", "reason": }')
    with pytest.raises(LLMResponseError, match="not valid JSON"):
        chat(fake_server).complete_json(MESSAGES, Grade)
    assert len(fake_server.requests) == 1  # no retry: callers decide


def test_schema_mismatch_is_a_response_error_naming_the_field(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue('{"label": "X", "reason": "?"}')
    with pytest.raises(LLMResponseError, match=r"does not match Grade: label"):
        chat(fake_server).complete_json(MESSAGES, Grade)


# ---- retries and failures -----------------------------------------------------------------------


def test_retries_429_honouring_retry_after(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue(FakeReply(status=429, headers={"Retry-After": "0.3"}), "ok")

    started = time.monotonic()
    assert chat(fake_server, max_retries=2).complete(MESSAGES) == "ok"

    assert time.monotonic() - started >= 0.3
    retry_counts = [r.headers["x-stainless-retry-count"] for r in fake_server.requests]
    assert retry_counts == ["0", "1"]
    fake_server.assert_complete()


def test_429_after_all_retries_is_a_rate_limit_error(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue(*[FakeReply(status=429, headers=FAST_RETRY)] * 2)
    with pytest.raises(LLMRateLimitError) as caught:
        chat(fake_server, max_retries=1).complete(MESSAGES)
    message = str(caught.value)
    assert fake_server.base_url in message and "429" in message and "after 1 retry" in message
    assert "SPINBOT_CONCURRENCY" in message


def test_retries_500_then_succeeds(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue(FakeReply(status=500, headers=FAST_RETRY), "recovered")
    assert chat(fake_server).complete(MESSAGES) == "recovered"
    assert len(fake_server.requests) == 2


def test_500_until_retries_run_out_is_a_server_error(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue(*[FakeReply(status=503, headers=FAST_RETRY, error_message="overloaded")] * 3)
    with pytest.raises(LLMServerError) as caught:
        chat(fake_server, max_retries=2).complete(MESSAGES)
    assert len(fake_server.requests) == 3
    assert caught.value.status_code == 503
    assert (
        "503" in str(caught.value) and "overloaded" in str(caught.value) and "2 retries" in str(caught.value)
    )
    fake_server.assert_complete()


def test_timeout_is_a_timeout_error_naming_the_setting(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue(FakeReply(content="too late", delay=2))

    started = time.monotonic()
    with pytest.raises(LLMTimeoutError) as caught:
        chat(fake_server, timeout=0.5, max_retries=0).complete(MESSAGES)

    assert time.monotonic() - started < 1.5
    message = str(caught.value)
    assert "0.5 s" in message and "SPINBOT_TIMEOUT" in message and fake_server.base_url in message


def test_connection_refused_is_a_connection_error() -> None:
    base_url = f"http://127.0.0.1:{closed_port()}/v1"
    model = OpenAIChatModel("fake-model", api_key=KEY, base_url=base_url, timeout=2, max_retries=0)
    with pytest.raises(LLMConnectionError) as caught:
        model.complete(MESSAGES)
    assert base_url in str(caught.value) and "OPENAI_BASE_URL" in str(caught.value)
    assert_no_key(caught.value)


def test_stream_cut_mid_reply_is_a_response_error(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue(FakeReply(content="We lose about forty hours every month.", cut_after_chunks=2))
    received: list[str] = []
    with pytest.raises(LLMResponseError, match="cut off"):
        for delta in chat(fake_server).stream(MESSAGES):
            received.append(delta)
    assert "".join(received) == "We lose "
    assert len(fake_server.requests) == 1  # text was shown, so no silent retry


def test_stream_failing_before_first_chunk_is_retried(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue(FakeReply(content="lost", cut_after_chunks=0), "second try works")
    assert "".join(chat(fake_server, max_retries=1).stream(MESSAGES)) == "second try works"
    assert len(fake_server.requests) == 2
    fake_server.assert_complete()


def test_stream_failing_before_first_chunk_without_retries_left(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue(FakeReply(content="lost", cut_after_chunks=0))
    with pytest.raises(LLMConnectionError):
        list(chat(fake_server, max_retries=0).stream(MESSAGES))


def test_401_is_a_config_error_without_the_key(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue(FakeReply(status=401, error_message=f"Incorrect API key provided: {KEY}."))
    with pytest.raises(LLMConfigError) as caught:
        chat(fake_server).complete(MESSAGES)
    assert "OPENAI_API_KEY" in str(caught.value) and "401" in str(caught.value)
    assert_no_key(caught.value)
    assert len(fake_server.requests) == 1  # a bad key is not retried


def test_404_is_a_config_error_naming_the_model(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue(FakeReply(status=404, error_message="The model `gpt-9` does not exist"))
    with pytest.raises(LLMConfigError, match=r"'gpt-9'.*SPINBOT_MODEL"):
        chat(fake_server, model="gpt-9").complete(MESSAGES)


@pytest.mark.parametrize(
    "reply",
    [
        FakeReply(status=401, error_message=f"Incorrect API key provided: {KEY}"),
        FakeReply(status=403, error_message=f"key {KEY} may not use this model"),
        FakeReply(status=400, error_message=f"bad header Authorization: Bearer {KEY}"),
        FakeReply(status=429, error_message=f"quota exceeded for {KEY}"),
        FakeReply(status=500, raw_body=f"upstream said: {KEY}"),
    ],
    ids=["401", "403", "400", "429", "500-raw"],
)
def test_key_never_appears_in_errors(fake_server: FakeOpenAIServer, reply: FakeReply) -> None:
    fake_server.enqueue(reply)
    with pytest.raises(LLMError) as caught:
        chat(fake_server, max_retries=0).complete(MESSAGES)
    assert_no_key(caught.value)
    assert "***" in str(caught.value)


# ---- embeddings and factories -------------------------------------------------------------------


def test_embeddings_keep_order_across_batches(fake_server: FakeOpenAIServer) -> None:
    texts = ["situation", "problem", "implication", "need-payoff", "暗示问题"]
    model = OpenAIEmbeddingModel("fake-embed", api_key=KEY, base_url=fake_server.base_url, batch_size=2)

    vectors = model.embed_documents(texts)

    assert len(vectors) == len(texts)
    for vector, text in zip(vectors, texts, strict=True):
        assert vector == pytest.approx(hash_embedding(text))
    assert [r.body["input"] for r in fake_server.requests] == [texts[0:2], texts[2:4], texts[4:]]
    assert model.embed_query("problem") == pytest.approx(vectors[1])
    assert model.embed_documents([]) == []


def test_embedding_errors_are_mapped(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue_embeddings(FakeReply(status=404, error_message="no such model"))
    model = OpenAIEmbeddingModel("nope-embed", api_key=KEY, base_url=fake_server.base_url, max_retries=0)
    with pytest.raises(LLMConfigError, match=r"'nope-embed'.*SPINBOT_EMBED_MODEL"):
        model.embed_query("hello")


def test_models_from_settings(fake_server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", fake_server.base_url)
    monkeypatch.setenv("SPINBOT_GRADER_MODEL", "grader-model")
    monkeypatch.setenv("SPINBOT_TIMEOUT", "7")
    monkeypatch.setenv("SPINBOT_MAX_RETRIES", "1")
    settings = Settings()
    fake_server.enqueue("graded")

    grader = chat_model_from_settings(settings, "grader")
    assert grader.name == "grader-model" and chat_model_from_settings(settings, "buyer").name == "gpt-4o-mini"
    assert grader.complete(MESSAGES) == "graded"
    assert fake_server.requests[0].body["model"] == "grader-model"
    assert fake_server.requests[0].headers["x-stainless-read-timeout"] == "7.0"
    assert embedding_model_from_settings(settings).name == "text-embedding-3-small"


def test_models_from_settings_need_a_key() -> None:
    with pytest.raises(LLMConfigError, match="OPENAI_API_KEY"):
        chat_model_from_settings(Settings(), "coach")


def test_unsupported_other_parameter_does_not_lower_the_json_mode(fake_server: FakeOpenAIServer) -> None:
    fake_server.enqueue(
        FakeReply(
            status=400,
            raw_body='{"error": {"message": "temperature is not supported", "param": "temperature"}}',
        )
    )
    model = chat(fake_server)
    with pytest.raises(LLMConfigError, match="temperature is not supported"):
        model.complete_json(MESSAGES, Grade, temperature=0.5)
    assert model.json_mode == "json_schema" and len(fake_server.requests) == 1
