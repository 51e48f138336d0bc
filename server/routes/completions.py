"""POST /v1/completions."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from server.auth import require_key
from server.generation import ChoiceDelta, EngineRun, Prompt, check_prompt, encode, resolve_max_tokens, sampling_params
from server.routes.common import ChoiceAccum, check_model, check_supported, respond, server_state
from server.schemas import ERROR_RESPONSES, CompletionRequest, CompletionResponse
from server.state import ServerState

router = APIRouter(dependencies=[Depends(require_key)])


async def _prompts(state: ServerState, body: CompletionRequest) -> list[Prompt]:
    """Token ids for each prompt (tokenized off the event loop: prompts may be long)."""
    raw = body.prompt
    if isinstance(raw, str):
        items = [raw]
    elif raw and isinstance(raw[0], int):
        items = [raw]
    else:
        items = list(raw)
    prompts = []
    for item in items:
        if isinstance(item, str):
            prompts.append(Prompt(await encode(state, item, add_special_tokens=body.add_special_tokens), item))
        else:
            prompts.append(Prompt(list(item)))
    for i, prompt in enumerate(prompts):
        check_prompt(state, prompt, "prompt" if len(prompts) == 1 else f"prompt.{i}")
    return prompts


class _Logprobs:
    """OpenAI completions logprobs (tokens, token_logprobs, top_logprobs, text_offset) for one choice,
    built incrementally so streamed chunks carry offsets that continue the previous ones."""

    def __init__(self, tokenizer, offset: int = 0):
        self.tokenizer = tokenizer
        self.offset = offset

    def render(self, token_ids: list[int], logprobs: list) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, top in zip(token_ids, logprobs or []):
            token = _token_text(self.tokenizer, token_id, top.get(token_id))
            out["tokens"].append(token)
            out["token_logprobs"].append(top[token_id].logprob if token_id in top else None)
            out["top_logprobs"].append({_token_text(self.tokenizer, t, lp): lp.logprob for t, lp in top.items()})
            out["text_offset"].append(self.offset)
            self.offset += len(token)
        return out


def _token_text(tokenizer, token_id: int, logprob) -> str:
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return tokenizer.decode([token_id])


def _renderer(state: ServerState, body: CompletionRequest, run: EngineRun, created: int):
    echoed: set[int] = set()
    ids_sent: set[int] = set()  # choices whose prompt_token_ids went out (return_token_ids)
    offsets: dict[int, _Logprobs] = {}

    def render(deltas: list[ChoiceDelta]) -> list[dict]:
        chunks = []
        for delta in deltas:
            if not delta.text and not delta.token_ids and delta.finish_reason is None:
                continue
            text = delta.text
            if body.echo and delta.index not in echoed:
                echoed.add(delta.index)
                text = (run.prompts[delta.index // body.n].text or "") + text
            logprobs = None
            if body.logprobs is not None:
                logprobs = offsets.setdefault(delta.index, _Logprobs(state.tokenizer)).render(delta.token_ids, delta.logprobs)
            choice = {"index": delta.index, "text": text, "logprobs": logprobs, "finish_reason": delta.finish_reason}
            if body.return_token_ids:
                choice["token_ids"] = list(delta.token_ids)
                if delta.index not in ids_sent:
                    ids_sent.add(delta.index)
                    choice["prompt_token_ids"] = run.prompts[delta.index // body.n].token_ids
            chunks.append({"id": run.id, "object": "text_completion", "created": created, "model": state.model_name,
                           "choices": [choice]})
        return chunks

    return render


def _response(state: ServerState, body: CompletionRequest, run: EngineRun, choices: dict[int, ChoiceAccum],
              created: int) -> CompletionResponse:
    out = []
    for index, choice in choices.items():
        text = "".join(choice.text)
        if body.echo:
            text = (run.prompts[index // body.n].text or "") + text
        logprobs = _Logprobs(state.tokenizer).render(choice.token_ids, choice.logprobs) if body.logprobs is not None else None
        out.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": choice.finish_reason})
        if body.return_token_ids:
            out[-1].update(token_ids=choice.token_ids, prompt_token_ids=run.prompts[index // body.n].token_ids)
    return CompletionResponse(id=run.id, created=created, model=state.model_name, choices=out, usage=run.usage())


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES,
             summary="Create a completion (streams as server-sent events with stream: true)")
async def create_completion(body: CompletionRequest, request: Request):
    state = server_state(request)
    await state.until_serving()
    check_model(state, body.model)
    check_supported(body)
    prompts = await _prompts(state, body)
    max_tokens = resolve_max_tokens(state, prompts, body.max_tokens, "max_tokens")
    params = sampling_params(state, body, max_tokens, body.logprobs)
    ticket = state.admission.admit()
    run = EngineRun(state, prompts, params, ticket, "cmpl")
    created = int(time.time())
    renderer = _renderer(state, body, run, created)
    return await respond(request, state, body, run, created, "text_completion", renderer,
                         lambda choices: _response(state, body, run, choices, created))
