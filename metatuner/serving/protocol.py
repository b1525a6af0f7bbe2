"""The OpenAI-compatible wire format: request and response models (pydantic), and the error body.

Only what a client of a greedy, single-choice model needs is modelled. Unknown request fields are accepted and
ignored (clients send ``user``, ``seed``, ``stop`` ...); parameters that ask for what this server cannot do
(``n`` > 1, ``logprobs``, ``echo``) are rejected with a 400 error. Answers are greedy: a ``temperature`` or
``top_p`` in range is accepted and has no effect. Responses carry the usual fields plus ``metatuner``: the
prompt the model was given (MetaTuner's generated prompt, else p~ or the system message), the answer extracted
from the output by the task's rule, and how many requests shared the batched generate.

``stream: true`` answers with server-sent events, as OpenAI streams: chunks (``chat.completion.chunk`` or
``text_completion``) whose pieces of text join to the answer, a last chunk with the ``finish_reason`` and
``metatuner``, the usage in a chunk of its own when ``stream_options.include_usage`` is true, then
``data: [DONE]``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool | None = None


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    logprobs: Any = None

    @model_validator(mode="after")
    def _supported(self):
        if self.n not in (None, 1):
            raise ValueError(f"n must be 1 (one greedy answer per request), got {self.n}")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        if self.logprobs not in (None, False, 0):
            raise ValueError("logprobs are not supported")
        return self

    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @field_validator("messages")
    @classmethod
    def _has_user_turn(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role == "user" for m in messages):
            raise ValueError("messages hold no user message; the last user message is the query")
        return messages

    def query(self) -> str:
        """The last user message."""
        return next(m for m in reversed(self.messages) if m.role == "user").text()

    def instruction(self) -> str | None:
        """The system (or developer) messages, joined: they replace the task's p~; None when there are none."""
        parts = [m.text() for m in self.messages if m.role in ("system", "developer") and m.text().strip()]
        return "\n".join(parts) or None

    def budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _one_prompt(self):
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError(f"prompt must be one string (or a list of one), got a list of {len(self.prompt)}")
        if self.echo or self.suffix:
            raise ValueError("echo and suffix are not supported")
        return self

    def query(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def budget(self) -> int | None:
        return self.max_tokens


# ---- responses ---------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Extra(BaseModel):
    """What this server adds to an OpenAI response."""

    prompt: str = Field(description="the instruction the model answered with: MetaTuner's generated prompt, else p~")
    answer: str | None = Field(description="the answer extracted from the output by the task's rule")
    batch_size: float = Field(description="the mean number of requests in the decode steps that answered this one")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    metatuner: Extra


class TextChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Completion(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[TextChoice]
    usage: Usage
    metatuner: Extra


# ---- streamed responses (server-sent events) ------------------------------------------------------------
class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: dict[str, str] = Field(description="the role (first chunk), a piece of content, or nothing (last)")
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    metatuner: Extra | None = None


class TextChunkChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChunkChoice]
    usage: Usage | None = None
    metatuner: Extra | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "metatuner"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """The body of every error response, as OpenAI writes it."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
