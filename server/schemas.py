"""Pydantic shapes of the OpenAI completions and chat-completions API, plus our speculative stats.

Requests are validated here, so a bad field is a 400 naming the field before anything reaches the
engine. Bounds follow the OpenAI API where it states them (temperature 0-2, penalties -2..2,
top_p in (0, 1]) and vLLM where OpenAI has no such field (top_k, min_p, repetition_penalty,
ignore_eos, min_tokens — the extensions vLLM's own server accepts, which its benchmark sends).
Unknown fields are ignored, as vLLM's server does, so newer clients keep working.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_N = 16  # choices per request
MAX_PROMPTS = 64  # prompts per completions request
MAX_STOP = 16  # stop strings
MAX_LOGPROBS = 20  # vLLM's default max_logprobs
INT64 = 2**63 - 1

StopStrings = str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP)] | None


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="send a final chunk with usage (incl. speculative stats)")
    continuous_usage_stats: bool = Field(False, description="also put the running usage on every chunk")


class SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(..., description="the served model id (GET /v1/models)")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=1_000_000, description="vLLM extension; 0 or -1 disables")
    min_p: float | None = Field(None, ge=0, le=1, description="vLLM extension")
    n: int = Field(1, ge=1, le=MAX_N)
    stop: StopStrings = None
    seed: int | None = Field(None, ge=-(2**63), le=INT64)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=2, description="vLLM extension")
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past the end-of-sequence token")
    min_tokens: int = Field(0, ge=0, le=INT64, description="vLLM extension")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=INT64)]], Field(min_length=1)]


class CompletionRequest(SamplingRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds | Annotated[
        list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
        ..., description="a string, a list of strings, a list of token ids, or a list of such lists")
    max_tokens: int | None = Field(16, ge=1, le=INT64)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = Field(None, description="not supported (400 when set)")
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="only best_of == n is supported")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1, le=INT64, description="deprecated alias of max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = Field(None, description="not supported (400 when non-empty)")
    response_format: dict[str, Any] | None = Field(None, description="only {'type': 'text'} is supported")

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self


# ---- responses -------------------------------------------------------------------------------

class SpeculativeUsage(BaseModel):
    """Speculative-decoding stats of a response (all choices together)."""

    num_speculative_tokens: int = Field(..., description="K, drafts per verification step")
    verification_steps: int = Field(..., description="target forward passes that verified drafts")
    drafted_tokens: int
    accepted_tokens: int
    acceptance_length: float | None = Field(..., description="1 + accepted / verification steps (null before any step)")
    drafts_per_step: float | None = Field(
        None, description="drafted tokens / verification steps: K under fixed speculation, what the policy chose under adaptive")
    drafted_per_position: list[int]
    accepted_per_position: list[int]
    acceptance_rate_per_position: list[float | None]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    speculative: SpeculativeUsage | None = Field(None, description="null when the server runs without a drafter")


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vllm-lk"
    root: str = Field(..., description="the target's directory")
    max_model_len: int
    speculative: dict[str, Any] | None = Field(
        None, description="drafter, method, num_speculative_tokens and the drafter's LK metadata")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "invalid request (bad JSON or field, prompt too long, max_tokens over the limit)",
        401: "missing or wrong API key",
        404: "unknown model",
        429: "admission queue full (see Retry-After)",
        503: "engine not ready, shutting down, or dead",
        504: "request timed out",
    }.items()
}
