"""Chat and embedding models over any OpenAI-compatible server; the only module that imports `openai`.

Retries (429 with Retry-After, 408/409, 5xx, timeouts, dropped connections) are the openai client's own
`max_retries` machinery; this module maps what is left to the `LLMError` tree with one-line messages
that say what happened and what to do, and never contain the API key.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import openai
from langchain_core.messages import AIMessage, BaseMessage, ChatMessage, HumanMessage, SystemMessage
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam
from pydantic import BaseModel, ValidationError

from bot.config import Role, Settings

log = logging.getLogger(__name__)

T = TypeVar("T", bound=BaseModel)

# Inputs per embeddings request: well under OpenAI's 2048 cap, and small enough for local servers.
EMBED_BATCH_SIZE = 128
# Backoff for our own stream retries, mirroring the openai client's constants (0.5 s doubling, cap 8 s).
_RETRY_BASE_DELAY = 0.5
_RETRY_MAX_DELAY = 8.0


class LLMError(Exception):
    """A model call failed; str(e) is one line saying what happened and what to do."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class LLMConfigError(LLMError):
    """The request can never succeed as configured: bad key, unknown model, wrong URL, bad request."""


class LLMRateLimitError(LLMError):
    """The server kept answering 429 after every retry."""


class LLMTimeoutError(LLMError):
    """No answer within the timeout, after every retry."""


class LLMConnectionError(LLMError):
    """Connection refused or dropped, after every retry."""


class LLMServerError(LLMError):
    """The server kept failing (5xx) after every retry."""


class LLMResponseError(LLMError):
    """The server answered, but the reply is unusable: empty, cut off, invalid JSON, wrong schema."""


@runtime_checkable
class ChatModel(Protocol):
    """What buyer, grader and coach receive."""

    name: str

    def complete(
        self,
        messages: Sequence[BaseMessage],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> str: ...

    def stream(
        self,
        messages: Sequence[BaseMessage],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> Iterator[str]: ...

    def complete_json(
        self, messages: Sequence[BaseMessage], schema: type[T], *, temperature: float | None = None
    ) -> T: ...


def checked_json(
    model: ChatModel, messages: Sequence[BaseMessage], schema: type[T], who: str,
    check: Callable[[T], str | None] = lambda reply: None,
) -> T | str:
    """A reply in the schema that `check` finds no fault with (retried once), else why not, as the
    reason an ungraded line shows: a grading call never guesses."""
    problem = ""
    for _attempt in range(2):
        try:
            reply = model.complete_json(messages, schema, temperature=0.0)
        except LLMResponseError as exc:
            problem = str(exc)
            continue
        except LLMError as exc:
            return f"ungraded: {exc}"
        problem = check(reply) or ""
        if not problem:
            return reply
    return f"ungraded: the {who}'s reply was invalid twice ({problem})"


@runtime_checkable
class EmbeddingModel(Protocol):
    """Turns texts into vectors for retrieval."""

    name: str

    def embed_documents(self, texts: Sequence[str]) -> list[list[float]]: ...

    def embed_query(self, text: str) -> list[float]: ...


# --------------------------------------------------------------------------------------------------
# Helpers shared with bot.testing


def to_openai_messages(messages: Sequence[BaseMessage]) -> list[ChatCompletionMessageParam]:
    """langchain-core messages -> OpenAI chat message dicts."""
    converted: list[ChatCompletionMessageParam] = []
    for message in messages:
        text = message.text
        if isinstance(message, SystemMessage):
            converted.append({"role": "system", "content": text})
        elif isinstance(message, HumanMessage):
            converted.append({"role": "user", "content": text})
        elif isinstance(message, AIMessage):
            converted.append({"role": "assistant", "content": text})
        elif isinstance(message, ChatMessage) and message.role in ("system", "developer"):
            converted.append({"role": "system", "content": text})
        elif isinstance(message, ChatMessage) and message.role == "user":
            converted.append({"role": "user", "content": text})
        elif isinstance(message, ChatMessage) and message.role == "assistant":
            converted.append({"role": "assistant", "content": text})
        else:
            raise TypeError(
                f"cannot send a {type(message).__name__} to a chat model; use System/Human/AIMessage"
            )
    return converted


_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_FENCE_RE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


def parse_json_reply(text: str, schema: type[T]) -> T:
    """Parse a model's JSON reply tolerantly (fences, prose around it) and validate it with `schema`."""
    # Reasoning models (DeepSeek-R1, Qwen) may think aloud, with braces, before answering.
    cleaned = _THINK_RE.sub("", text).strip()
    fenced = _FENCE_RE.search(cleaned)
    if fenced:
        cleaned = fenced.group(1).strip()
    start, end = cleaned.find("{"), cleaned.rfind("}")
    if start == -1 or end < start:
        raise LLMResponseError(
            f"The model's reply holds no JSON object (expected {schema.__name__}): {_snippet(text)}"
        )
    try:
        data = json.loads(cleaned[start : end + 1])
    except json.JSONDecodeError as exc:
        raise LLMResponseError(
            f"The model's reply is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): "
            f"{_snippet(text)}"
        ) from None
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '(root)'}: {error['msg']}"
            for error in exc.errors()[:5]
        )
        raise LLMResponseError(f"The model's JSON does not match {schema.__name__}: {problems}") from None


def _snippet(text: str, limit: int = 120) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= limit else flat[:limit] + "...")


def _backoff(attempt: int) -> float:
    """Seconds to wait before retry number `attempt` (0-based), with jitter like the openai client."""
    return min(_RETRY_BASE_DELAY * 2.0**attempt, _RETRY_MAX_DELAY) * (1 - 0.25 * random.random())


# --------------------------------------------------------------------------------------------------
# Error mapping

_BEARER_RE = re.compile(r"(Bearer\s+)\S+", re.IGNORECASE)
_KEYLIKE_RE = re.compile(r"\bsk-[A-Za-z0-9_\-*]{6,}")


class _Endpoint:
    """What error messages may say about a client: its base URL and settings, never its key."""

    def __init__(self, base_url: str, api_key: str, timeout: float, max_retries: int) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries

    def redact(self, text: str) -> str:
        """Remove the key (and anything key-like) in case an upstream error text echoes it."""
        if self._api_key:
            text = text.replace(self._api_key, "***")
        text = _BEARER_RE.sub(r"\1***", text)
        return _KEYLIKE_RE.sub("***", text)

    def error(self, cls: type[LLMError], message: str, status_code: int | None = None) -> LLMError:
        return cls(self.redact(message), status_code=status_code)

    def map(self, exc: Exception, model: str) -> LLMError:
        """Turn an openai exception (already retried by the client) into an LLMError."""
        where = f"The model server at {self.base_url}"
        retries = _retries_taken(exc)
        after = f" and still was after {_plural(retries, 'retry', 'retries')}" if retries else ""
        tried = f" (tried {retries + 1} times)" if retries else ""
        if isinstance(exc, openai.APITimeoutError):
            return self.error(
                LLMTimeoutError,
                f"{where} did not answer within the {self.timeout:g} s timeout{tried}; "
                f"raise SPINBOT_TIMEOUT (now {self.timeout:g}) or use a smaller or faster model",
            )
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__
            reason = f" ({type(cause).__name__}: {cause})" if cause else ""
            return self.error(
                LLMConnectionError,
                f"Could not reach the model server at {self.base_url}{reason}{tried}; "
                "check OPENAI_BASE_URL and that the server is running",
            )
        if isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            detail = _upstream_detail(exc)
            if status == 401:
                return self.error(
                    LLMConfigError,
                    f"{where} rejected the API key (401{detail}); check OPENAI_API_KEY",
                    status,
                )
            if status == 403:
                return self.error(
                    LLMConfigError,
                    f"{where} refused access to model '{model}' (403{detail}); "
                    "check OPENAI_API_KEY and that your account may use this model",
                    status,
                )
            if status == 404:
                return self.error(
                    LLMConfigError,
                    f"{where} answered 404 for model '{model}'{detail}; "
                    "check the model name (SPINBOT_MODEL, SPINBOT_*_MODEL, SPINBOT_EMBED_MODEL) and "
                    "that OPENAI_BASE_URL is right (most servers end it with /v1)",
                    status,
                )
            if status == 429:
                return self.error(
                    LLMRateLimitError,
                    f"{where} is rate-limiting requests (429{detail}){after}; "
                    "wait a minute or lower SPINBOT_CONCURRENCY",
                    status,
                )
            if status == 408:
                return self.error(
                    LLMTimeoutError,
                    f"{where} timed out the request (408){after}; raise SPINBOT_TIMEOUT "
                    f"(now {self.timeout:g}) or try again later",
                    status,
                )
            if status >= 500:
                return self.error(
                    LLMServerError,
                    f"{where} failed with {status}{detail}{after}; try again later or check the server's log",
                    status,
                )
            return self.error(
                LLMConfigError,
                f"{where} rejected the request to model '{model}' ({status}{detail}); "
                "check the model name and settings",
                status,
            )
        if isinstance(exc, openai.APIResponseValidationError | ValueError):
            return self.error(
                LLMResponseError, f"{where} sent a malformed response ({type(exc).__name__}: {exc})"
            )
        if isinstance(exc, openai.APIError):
            # e.g. an error event inside a stream
            return self.error(LLMServerError, f"{where} reported an error: {exc.message}")
        return self.error(LLMError, f"Calling the model server at {self.base_url} failed: {exc}")


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


def _retries_taken(exc: Exception) -> int:
    """How many retries the openai client made; it stamps the count on each request it sends."""
    request = getattr(exc, "request", None)
    try:
        return int(request.headers.get("x-stainless-retry-count", "0")) if request is not None else 0
    except (AttributeError, ValueError, RuntimeError):
        return 0


def _upstream_detail(exc: openai.APIStatusError) -> str:
    """The server's own error message, as ': message' (empty when there is none)."""
    body = exc.body
    message: object = None
    if isinstance(body, dict):
        error = body.get("error", body)
        message = error.get("message") if isinstance(error, dict) else error
    elif isinstance(body, str):
        message = body
    if not message:
        return ""
    text = " ".join(str(message).split())
    return ": " + (text if len(text) <= 300 else text[:300] + "...")


def _rejects_response_format(exc: openai.APIStatusError) -> bool:
    """Does this 4xx say the server does not support the response_format we sent?"""
    if exc.status_code not in (400, 422, 501):
        return False
    if exc.param and "response_format" not in exc.param:
        return False  # the server named another parameter (e.g. temperature) as the problem
    text = f"{exc.message} {exc.param or ''} {json.dumps(exc.body, default=str)}".lower()
    return any(
        marker in text
        for marker in ("response_format", "json_schema", "json_object", "not supported", "unsupported")
    )


# --------------------------------------------------------------------------------------------------
# Chat

JsonMode = Literal["json_schema", "json_object", "none"]
_JSON_MODES: tuple[JsonMode, ...] = ("json_schema", "json_object", "none")


class OpenAIChatModel:
    """A chat model on any OpenAI-compatible server; implements ChatModel; safe to share across threads."""

    def __init__(
        self,
        model: str,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
    ) -> None:
        self.name = model
        self._client, self._endpoint = _make_client(api_key, base_url, timeout, max_retries)
        self._json_mode_index = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAIChatModel({self.name!r}, base_url={self._endpoint.base_url!r})"

    @property
    def base_url(self) -> str:
        return self._endpoint.base_url

    @property
    def json_mode(self) -> JsonMode:
        """The response_format level this server accepted last (json_schema until told otherwise)."""
        return _JSON_MODES[self._json_mode_index]

    def close(self) -> None:
        self._client.close()

    def complete(
        self,
        messages: Sequence[BaseMessage],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> str:
        """One reply, as text."""
        return self._complete(to_openai_messages(messages), temperature, max_tokens, None)

    def stream(
        self,
        messages: Sequence[BaseMessage],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> Iterator[str]:
        """Yield the reply's text deltas as they arrive."""
        payload = to_openai_messages(messages)
        attempt = 0
        while True:
            try:
                chunks = self._client.chat.completions.create(
                    model=self.name, messages=payload, stream=True, **_options(temperature, max_tokens)
                )
            except openai.OpenAIError as exc:
                raise self._endpoint.map(exc, self.name) from _cause(exc)
            received = False
            failure: Exception | None = None
            try:
                finished = False
                for chunk in chunks:
                    for choice in chunk.choices or ():
                        if choice.delta is not None and choice.delta.content:
                            received = True
                            yield choice.delta.content
                        if choice.finish_reason:
                            finished = True
                if not finished:
                    # The connection closed cleanly but the server never said the reply was done.
                    failure = LLMResponseError("the stream ended without a finish_reason")
            except (openai.OpenAIError, ValueError, AttributeError, TypeError) as exc:
                failure = exc
            finally:
                chunks.close()
            if failure is None:
                if not received:
                    raise self._endpoint.error(
                        LLMResponseError, f"Model '{self.name}' at {self.base_url} sent an empty reply"
                    )
                return
            if received:
                raise self._endpoint.error(
                    LLMResponseError,
                    f"the reply was cut off: the stream from {self.base_url} broke after part of the "
                    f"answer had been shown ({_describe(failure)}); ask again",
                ) from None
            # Nothing shown yet, so the whole request can be retried; the client only retried the connect.
            if attempt >= self._endpoint.max_retries:
                if isinstance(failure, openai.OpenAIError):
                    raise self._endpoint.map(failure, self.name) from None
                raise self._endpoint.error(
                    LLMResponseError,
                    f"The stream from {self.base_url} failed before any text "
                    f"({_describe(failure)}) after {_plural(attempt, 'retry', 'retries')}; try again later",
                ) from None
            log.info("stream from %s broke before any text (%s); retrying", self.base_url, _describe(failure))
            time.sleep(_backoff(attempt))
            attempt += 1

    def complete_json(
        self, messages: Sequence[BaseMessage], schema: type[T], *, temperature: float | None = None
    ) -> T:
        """A reply parsed and validated as `schema`, using the strongest response_format the server takes."""
        while True:
            index = self._json_mode_index
            mode = _JSON_MODES[index]
            prompt = messages if mode == "json_schema" else _with_json_instruction(messages, schema)
            payload = to_openai_messages(prompt)
            try:
                text = self._complete(payload, temperature, None, _response_format(mode, schema), raw=True)
            except _RawStatusError as raw:
                exc = raw.exc
                if index + 1 < len(_JSON_MODES) and _rejects_response_format(exc):
                    with self._lock:
                        # Another thread may have stepped down already: never step back up.
                        self._json_mode_index = max(self._json_mode_index, index + 1)
                    log.info(
                        "%s at %s rejected response_format %s; falling back to %s",
                        self.name,
                        self.base_url,
                        mode,
                        _JSON_MODES[index + 1],
                    )
                    continue
                raise self._endpoint.map(exc, self.name) from None
            return parse_json_reply(text, schema)

    def _complete(
        self,
        payload: list[ChatCompletionMessageParam],
        temperature: float | None,
        max_tokens: int | None,
        response_format: dict[str, Any] | None,
        *,
        raw: bool = False,
    ) -> str:
        options = _options(temperature, max_tokens)
        if response_format is not None:
            options["response_format"] = response_format
        try:
            response = self._client.chat.completions.create(model=self.name, messages=payload, **options)
        except openai.APIStatusError as exc:
            if raw:
                raise _RawStatusError(exc) from None
            raise self._endpoint.map(exc, self.name) from None
        except (openai.OpenAIError, ValueError) as exc:
            raise self._endpoint.map(exc, self.name) from _cause(exc)
        return self._reply_text(response)

    def _reply_text(self, response: object) -> str:
        # A non-JSON content type makes the client hand back a plain str instead of a ChatCompletion.
        if not isinstance(response, ChatCompletion):
            raise self._endpoint.error(
                LLMResponseError,
                f"The model server at {self.base_url} sent something that is not a chat completion: "
                f"{_snippet(str(response))}",
            )
        try:
            choice = response.choices[0]
            content = choice.message.content
            finish_reason = choice.finish_reason
        except (IndexError, AttributeError, TypeError):
            raise self._endpoint.error(
                LLMResponseError, f"The model server at {self.base_url} sent a completion with no choices"
            ) from None
        if not isinstance(content, str) or not content.strip():
            hint = " (the token limit was reached before any text)" if finish_reason == "length" else ""
            raise self._endpoint.error(
                LLMResponseError, f"Model '{self.name}' at {self.base_url} sent an empty reply{hint}"
            )
        return content


class _RawStatusError(Exception):
    """Carries a status error out of _complete so complete_json can decide on a fallback."""

    def __init__(self, exc: openai.APIStatusError) -> None:
        super().__init__(str(exc))
        self.exc = exc


def _options(temperature: float | None, max_tokens: int | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if temperature is not None:
        options["temperature"] = temperature
    if max_tokens is not None:
        # max_tokens, not max_completion_tokens: it is what local and third-party servers understand.
        options["max_tokens"] = max_tokens
    return options


def _response_format(mode: JsonMode, schema: type[BaseModel]) -> dict[str, Any] | None:
    if mode == "json_schema":
        name = re.sub(r"[^A-Za-z0-9_-]", "_", schema.__name__)[:64] or "reply"
        return {
            "type": "json_schema",
            "json_schema": {"name": name, "schema": schema.model_json_schema(), "strict": False},
        }
    if mode == "json_object":
        return {"type": "json_object"}
    return None


def _with_json_instruction(messages: Sequence[BaseMessage], schema: type[BaseModel]) -> list[BaseMessage]:
    """Without json_schema the model knows the shape only if told (json_object also needs the word JSON)."""
    instruction = (
        "Reply with a single JSON object and nothing else. It must match this JSON Schema:\n"
        + json.dumps(schema.model_json_schema(), ensure_ascii=False)
    )
    result = list(messages)
    if result and isinstance(result[0], SystemMessage):
        result[0] = SystemMessage(content=f"{result[0].text}\n\n{instruction}")
    else:
        result.insert(0, SystemMessage(content=instruction))
    return result


def _describe(exc: BaseException) -> str:
    if isinstance(exc, openai.APITimeoutError):
        return "timed out"
    if isinstance(exc, openai.APIConnectionError):
        return "connection dropped"
    if isinstance(exc, LLMError):
        return str(exc)
    return type(exc).__name__


def _cause(exc: BaseException) -> BaseException | None:
    """Chain only transport causes (errno, DNS); API errors may echo request data, so they are not chained."""
    return exc.__cause__ if isinstance(exc, openai.APIConnectionError) else None


def _make_client(
    api_key: str, base_url: str | None, timeout: float, max_retries: int
) -> tuple[openai.OpenAI, _Endpoint]:
    if not api_key:
        raise LLMConfigError(
            "OPENAI_API_KEY is empty: set it to your provider's key, or use SPINBOT_ENGINE=offline"
        )
    if timeout <= 0:
        raise LLMConfigError(f"the timeout must be greater than 0 s, got {timeout:g}: fix SPINBOT_TIMEOUT")
    if max_retries < 0:
        raise LLMConfigError(f"max_retries must be 0 or more, got {max_retries}: fix SPINBOT_MAX_RETRIES")
    client = openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries)
    return client, _Endpoint(str(client.base_url), api_key, timeout, max_retries)


# --------------------------------------------------------------------------------------------------
# Embeddings


class OpenAIEmbeddingModel:
    """An embedding model on any OpenAI-compatible server; implements EmbeddingModel."""

    def __init__(
        self,
        model: str,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        batch_size: int = EMBED_BATCH_SIZE,
    ) -> None:
        self.name = model
        self.batch_size = max(1, batch_size)
        self._client, self._endpoint = _make_client(api_key, base_url, timeout, max_retries)

    def __repr__(self) -> str:
        return f"OpenAIEmbeddingModel({self.name!r}, base_url={self._endpoint.base_url!r})"

    def close(self) -> None:
        self._client.close()

    def embed_documents(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text, in order, sent in batches of `batch_size`."""
        vectors: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            vectors.extend(self._embed_batch(list(texts[start : start + self.batch_size])))
        return vectors

    def embed_query(self, text: str) -> list[float]:
        return self._embed_batch([text])[0]

    def _embed_batch(self, batch: list[str]) -> list[list[float]]:
        # The API rejects empty strings; a space embeds as "nothing" without failing the whole batch.
        inputs = [text if text.strip() else " " for text in batch]
        try:
            # "float" explicitly: the client's default base64 is not understood by every compatible server.
            response = self._client.embeddings.create(model=self.name, input=inputs, encoding_format="float")
            data = sorted(response.data, key=lambda item: item.index)
            vectors = [[float(x) for x in item.embedding] for item in data]
        except openai.APIStatusError as exc:
            raise self._endpoint.map(exc, self.name) from None
        except (openai.OpenAIError, ValueError) as exc:
            raise self._endpoint.map(exc, self.name) from _cause(exc)
        except (AttributeError, TypeError) as exc:
            raise self._endpoint.error(
                LLMResponseError,
                f"The model server at {self.base_url} sent malformed embeddings ({type(exc).__name__})",
            ) from None
        if len(vectors) != len(inputs):
            raise self._endpoint.error(
                LLMResponseError,
                f"The model server at {self.base_url} returned {len(vectors)} embeddings "
                f"for {len(inputs)} texts",
            )
        return vectors

    @property
    def base_url(self) -> str:
        return self._endpoint.base_url


# --------------------------------------------------------------------------------------------------
# Factories


def _api_key(settings: Settings) -> str:
    if settings.openai_api_key is None:
        raise LLMConfigError(
            "OPENAI_API_KEY is not set: set it to use the LLM engine, or use SPINBOT_ENGINE=offline"
        )
    return settings.openai_api_key.get_secret_value()


def chat_model_from_settings(settings: Settings, role: Role) -> OpenAIChatModel:
    """The chat model for one role (buyer, grader, coach), from SPINBOT_* and OPENAI_* settings."""
    return OpenAIChatModel(
        settings.model_for(role),
        api_key=_api_key(settings),
        base_url=settings.openai_base_url,
        timeout=settings.spinbot_timeout,
        max_retries=settings.spinbot_max_retries,
    )


def embedding_model_from_settings(settings: Settings) -> OpenAIEmbeddingModel:
    """The embedding model named by SPINBOT_EMBED_MODEL on the configured server."""
    return OpenAIEmbeddingModel(
        settings.spinbot_embed_model,
        api_key=_api_key(settings),
        base_url=settings.openai_base_url,
        timeout=settings.spinbot_timeout,
        max_retries=settings.spinbot_max_retries,
    )
