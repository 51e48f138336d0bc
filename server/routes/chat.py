"""POST /v1/chat/completions: the conversation is rendered with the tokenizer's own chat template."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Request

from server.auth import require_key
from server.errors import bad_request
from server.generation import ChoiceDelta, EngineRun, Prompt, check_prompt, encode, resolve_max_tokens, sampling_params
from server.routes.common import ChoiceAccum, check_model, check_supported, respond, server_state
from server.schemas import ERROR_RESPONSES, ChatCompletionRequest, ChatCompletionResponse
from server.state import ServerState

router = APIRouter(dependencies=[Depends(require_key)])


async def render_chat(state: ServerState, body) -> Prompt:
    """The conversation through the tokenizer's chat template, then tokens (``body``: a chat
    completion or a chat /tokenize request)."""
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in body.messages]
    options = dict(body.chat_template_kwargs or {})
    reserved = sorted(set(options) & {"conversation", "messages", "tokenize", "add_generation_prompt", "continue_final_message"})
    if reserved:
        raise bad_request(f"chat_template_kwargs may not set {', '.join(reserved)}", param="chat_template_kwargs")
    try:
        text = await asyncio.to_thread(
            state.tokenizer.apply_chat_template, messages, tokenize=False,
            add_generation_prompt=body.add_generation_prompt, continue_final_message=body.continue_final_message,
            **options)
    except Exception as err:  # jinja errors, raise_exception() in templates, no template at all
        raise bad_request(f"the chat template cannot render these messages: {err}", param="messages") from err
    return Prompt(await encode(state, text, add_special_tokens=body.add_special_tokens), text)


def _token_entry(tokenizer, token_id: int, logprob) -> dict:
    token = logprob.decoded_token if logprob.decoded_token is not None else tokenizer.decode([token_id])
    return {"token": token, "logprob": logprob.logprob, "bytes": list(token.encode("utf-8"))}


def _logprobs(tokenizer, token_ids: list[int], logprobs: list, top_n: int) -> dict:
    """OpenAI chat logprobs: per token its own logprob and the top ``top_n`` alternatives."""
    content = []
    for token_id, top in zip(token_ids, logprobs or []):
        chosen = top.get(token_id)
        if chosen is None:
            continue
        ranked = sorted(top.items(), key=lambda item: item[1].logprob, reverse=True)[:top_n]
        content.append({**_token_entry(tokenizer, token_id, chosen),
                        "top_logprobs": [_token_entry(tokenizer, t, lp) for t, lp in ranked]})
    return {"content": content}


def _renderer(state: ServerState, body: ChatCompletionRequest, run: EngineRun, created: int):
    started: set[int] = set()

    def chunk(index: int, delta: dict, finish_reason, logprobs=None) -> dict:
        return {"id": run.id, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}

    def render(deltas: list[ChoiceDelta]) -> list[dict]:
        chunks = []
        for delta in deltas:
            if delta.index not in started:  # OpenAI opens every choice with the role alone
                started.add(delta.index)
                chunks.append(chunk(delta.index, {"role": "assistant", "content": ""}, None))
            if not delta.text and not delta.token_ids and delta.finish_reason is None:
                continue
            logprobs = None
            if body.logprobs:
                logprobs = _logprobs(state.tokenizer, delta.token_ids, delta.logprobs, body.top_logprobs or 0)
            chunks.append(chunk(delta.index, {"content": delta.text} if delta.text else {}, delta.finish_reason, logprobs))
        return chunks

    return render


def _response(state: ServerState, body: ChatCompletionRequest, run: EngineRun, choices: dict[int, ChoiceAccum],
              created: int) -> ChatCompletionResponse:
    out = []
    for index, choice in choices.items():
        logprobs = None
        if body.logprobs:
            logprobs = _logprobs(state.tokenizer, choice.token_ids, choice.logprobs, body.top_logprobs or 0)
        out.append({"index": index, "message": {"role": "assistant", "content": "".join(choice.text)},
                    "logprobs": logprobs, "finish_reason": choice.finish_reason})
    return ChatCompletionResponse(id=run.id, created=created, model=state.model_name, choices=out, usage=run.usage())


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES,
             summary="Create a chat completion (streams as server-sent events with stream: true)")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    state = server_state(request)
    await state.until_serving()
    check_model(state, body.model)
    check_supported(body)
    prompt = await render_chat(state, body)
    check_prompt(state, prompt, "messages")
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = resolve_max_tokens(state, [prompt], requested, "max_completion_tokens")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(state, body, max_tokens, logprobs)
    ticket = state.admission.admit()
    run = EngineRun(state, [prompt], params, ticket, "chatcmpl")
    created = int(time.time())
    renderer = _renderer(state, body, run, created)
    return await respond(request, state, body, run, created, "chat.completion.chunk", renderer,
                         lambda choices: _response(state, body, run, choices, created))
