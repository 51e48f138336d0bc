"""Pydantic shapes of the OpenAI completions and chat-completions API, plus our speculative stats.

Requests are validated here, so a bad field is a 400 naming the field before anything reaches the
engine. Bounds follow the OpenAI API where it states them (temperature 0-2, penalties -2..2,
top_p in (0, 1]) and vLLM where OpenAI has no such field (top_k, min_p, repetition_penalty,
ignore_eos, min_tokens, stop_token_ids, skip_special_tokens, ... — the extensions vLLM's own
server accepts, which its benchmark sends).

Strict: every field is either honoured end to end or refused. A field this server does not know is
a 400 that names it (vLLM's server logs and drops such fields, so a typo or a newer feature looks
like it worked). OpenAI fields that cannot be honoured here are declared, accepted at the values
that change nothing (``logit_bias: {}``, ``store: false``, ``tool_choice: "none"``) and otherwise
refused by :meth:`SamplingRequest.unsupported` with the reason.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

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

    model_config = ConfigDict(extra="forbid")

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
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0, le=INT64)]], Field(max_length=MAX_STOP)] | None = Field(
        None, description="vLLM extension: token ids that end the sequence (not included in the text)")
    skip_special_tokens: bool = Field(True, description="vLLM extension: leave special tokens out of the text")
    spaces_between_special_tokens: bool = Field(True, description="vLLM extension")
    include_stop_str_in_output: bool = Field(False, description="vLLM extension: keep the matched stop string")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="accepted; identifies the end user in the server log only")
    safety_identifier: str | None = Field(None, description="accepted, as user")
    prompt_cache_key: str | None = Field(None, description="accepted: vLLM caches prompt prefixes by content anyway")
    logit_bias: dict[str, float] | None = Field(None, description="refused unless empty (see unsupported)")
    service_tier: str | None = Field(None, description="only 'auto' or 'default'")
    store: bool | None = Field(None, description="only false: this server stores no completions")
    metadata: dict[str, str] | None = Field(None, description="refused unless empty (it belongs to stored completions)")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) for the first field set to a value this server cannot honour; None if all can."""
        if self.logit_bias:
            return "logit_bias", ("logit_bias is not supported with speculative decoding: vLLM 0.32 does not "
                                  "apply it when it verifies drafts, so the output would not follow the bias")
        if self.service_tier not in (None, "auto", "default"):
            return "service_tier", f"service_tier {self.service_tier!r} is not offered; use 'auto' or 'default'"
        if self.store:
            return "store", "this server does not store completions (store must be false)"
        if self.metadata:
            return "metadata", "metadata belongs to stored completions, which this server does not keep"
        return None


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
    add_special_tokens: bool = Field(True, description="vLLM extension: let the tokenizer add BOS etc. to text prompts")
    return_token_ids: bool = Field(
        False, description="vLLM extension: each choice carries prompt_token_ids and token_ids (streamed: the "
        "chunk's new tokens, prompt_token_ids on a choice's first chunk)")

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of other than n is not supported"
        if self.echo and self.logprobs is not None:
            return "echo", "echo together with logprobs is not supported"
        if self.stream and self.best_of is not None and self.best_of > 1:
            return "best_of", "best_of is not supported with stream"
        return super().unsupported()


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

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
    tool_choice: str | dict[str, Any] | None = Field(None, description="only 'none' (there are no tools)")
    parallel_tool_calls: bool | None = Field(None, description="accepted: without tools it changes nothing")
    functions: list[dict[str, Any]] | None = Field(None, description="deprecated; not supported (400 when non-empty)")
    function_call: str | dict[str, Any] | None = Field(None, description="deprecated; only 'none'")
    response_format: dict[str, Any] | None = Field(None, description="only {'type': 'text'} is supported")
    modalities: list[str] | None = Field(None, description="only ['text']")
    audio: dict[str, Any] | None = Field(None, description="not supported (400 when set)")
    prediction: dict[str, Any] | None = Field(None, description="not supported (400 when set)")
    reasoning_effort: str | None = Field(None, description="not supported (400 when set)")
    verbosity: str | None = Field(None, description="not supported (400 when set)")
    web_search_options: dict[str, Any] | None = Field(None, description="not supported (400 when set)")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="vLLM extension: extra variables for the chat template")
    add_generation_prompt: bool = Field(True, description="vLLM extension: end the prompt with the assistant's turn")
    continue_final_message: bool = Field(
        False, description="vLLM extension: continue the last (assistant) message instead of starting a new one")
    add_special_tokens: bool = Field(False, description="vLLM extension: the chat template already places them")

    def unsupported(self) -> tuple[str, str] | None:
        if self.tools:
            return "tools", "tools (function calling) are not supported"
        if self.functions:
            return "functions", "functions (function calling) are not supported"
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                return name, f"{name} must be 'none': this server has no tools"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "response_format", ("only response_format {'type': 'text'} is supported: vLLM 0.32 drops the "
                                       "drafts a grammar forbids before verifying them, which changes the law of "
                                       "sampled tokens, so structured outputs would not be exact")
        if self.modalities not in (None, ["text"]):
            return "modalities", "only the text modality is supported"
        for name in ("audio", "prediction", "reasoning_effort", "verbosity", "web_search_options"):
            if getattr(self, name) is not None:
                return name, f"{name} is not supported"
        if self.continue_final_message and self.add_generation_prompt:
            return "continue_final_message", "continue_final_message needs add_generation_prompt: false"
        if self.continue_final_message and self.messages[-1].role != "assistant":
            return "continue_final_message", "continue_final_message needs an assistant message last"
        return super().unsupported()

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self


class TokenizeCompletionRequest(BaseModel):
    """POST /tokenize with a prompt (vLLM's shape)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="the served model id; optional, as in vLLM")
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = Field(False, description="also return each token as text")


class TokenizeChatRequest(BaseModel):
    """POST /tokenize with chat messages, rendered as /v1/chat/completions renders them."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


def _tokenize_kind(value: Any) -> str:
    return "Chat" if isinstance(value, dict) and "messages" in value else "Completion"


TokenizeRequest = Annotated[
    Annotated[TokenizeCompletionRequest, Tag("Completion")] | Annotated[TokenizeChatRequest, Tag("Chat")],
    Discriminator(_tokenize_kind),
]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=INT64)]]


class DetokenizeResponse(BaseModel):
    prompt: str


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
    token_ids: list[int] | None = Field(None, description="with return_token_ids: the generated token ids")
    prompt_token_ids: list[int] | None = Field(None, description="with return_token_ids: the prompt's token ids")


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
    drafter_build: dict[str, Any] | None = Field(
        None, description="the background build of the default drafter (state, stage, fraction), when there is one")


class DrafterSwapRequest(BaseModel):
    """``POST /admin/drafter``: the drafter to serve from now on."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., min_length=1, description="drafter directory on the server's disk (an export of "
                      "`vllm-lk train`, a training run directory holding one in drafter/, or any vLLM draft)")
    mode: Literal["auto", "in_place", "new_engine"] = Field(
        "auto", description="auto: in place when the drafter has the served one's shape, else a new engine; "
        "in_place: refuse unless it can be loaded in place; new_engine: always a new engine")
    method: str | None = Field(None, description="vLLM speculative method (default: the drafter's LK metadata)")
    num_speculative_tokens: int | None = Field(
        None, ge=1, le=16, description="K (default: the drafter's trained K, else the served K)")


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
