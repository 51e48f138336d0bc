"""POST /tokenize and POST /detokenize, with the shapes vLLM's server gives them, so tools written
against `vllm serve` (its benchmark, token counters) work unchanged here."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

from server.auth import require_key
from server.generation import check_token_ids, encode
from server.routes.chat import render_chat
from server.routes.common import check_model, server_state
from server.schemas import (
    ERROR_RESPONSES,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from server.state import ServerState

router = APIRouter(dependencies=[Depends(require_key)])


def _ready_tokenizer(state: ServerState, model: str | None):
    state.require_ready()
    if model is not None:
        check_model(state, model)
    return state.tokenizer


_TOKENIZE = TypeAdapter(TokenizeRequest)


def _validated(payload: Any):
    """A prompt or a chat request, chosen by the presence of ``messages`` (FastAPI validates a
    union body against every member, so the errors would name fields of both)."""
    try:
        return _TOKENIZE.validate_python(payload)
    except ValidationError as err:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in err.errors()]) from err


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES,
             summary="Tokenize a prompt, or chat messages as the chat endpoint renders them",
             description="Body: {model?, prompt, add_special_tokens?, return_token_strs?} or {model?, messages, "
             "add_generation_prompt?, continue_final_message?, add_special_tokens?, chat_template_kwargs?, "
             "return_token_strs?}, as vLLM's server takes them.")
async def tokenize(request: Request, payload: Any = Body(...)) -> TokenizeResponse:
    body = _validated(payload)
    state = server_state(request)
    tokenizer = _ready_tokenizer(state, body.model)
    if isinstance(body, TokenizeChatRequest):
        tokens = (await render_chat(state, body)).token_ids
    else:
        tokens = await encode(state, body.prompt, add_special_tokens=body.add_special_tokens)
    strs = tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
    return TokenizeResponse(count=len(tokens), max_model_len=state.max_model_len, tokens=tokens, token_strs=strs)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES, summary="Token ids to text")
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = server_state(request)
    tokenizer = _ready_tokenizer(state, body.model)
    check_token_ids(state, body.tokens, "tokens")
    return DetokenizeResponse(prompt=tokenizer.decode(body.tokens))
