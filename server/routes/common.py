"""What the generation endpoints share: admission, non-streaming collection (with disconnect and
timeout), the SSE stream (with usage, running speculative stats and mid-stream errors)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from server.errors import APIError, sse_error_event
from server.generation import ChoiceDelta, EngineRun, engine_error
from server.schemas import SamplingRequest
from server.state import ServerState

logger = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's code for "client closed request": what the request counter records


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def check_supported(body: SamplingRequest) -> None:
    """400 naming the first field set to a value this server cannot honour."""
    refused = body.unsupported()
    if refused is not None:
        raise APIError(400, refused[1], param=refused[0], code="unsupported_parameter")


def check_model(state: ServerState, model: str) -> None:
    if model != state.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")


@dataclass
class ChoiceAccum:
    """A whole choice, gathered for a non-streaming response."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, delta: ChoiceDelta) -> None:
        self.text.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason


async def _client_gone(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(request: Request, run: EngineRun, timeout_s: float) -> dict[int, ChoiceAccum] | None:
    """Run to the end and gather every choice; None if the client went away first (then the engine
    requests are aborted: the run's stream is cancelled, and closing it aborts them)."""
    choices: dict[int, ChoiceAccum] = {}

    async def consume() -> None:
        async with asyncio.timeout(timeout_s):
            async for deltas in run.deltas():
                for delta in deltas:
                    choices.setdefault(delta.index, ChoiceAccum()).add(delta)

    work = asyncio.ensure_future(consume())
    watch = asyncio.ensure_future(_client_gone(request))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            try:
                await work
            except BaseException:  # noqa: BLE001 - the cancellation we asked for, or what it raised
                pass
    if work not in done:
        return None
    error = work.exception()
    if error is not None:
        raise engine_error(error, run.id) from error
    return dict(sorted(choices.items()))


def client_closed() -> Response:
    return Response(status_code=CLIENT_CLOSED)


class RunStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its run however the response ends — even when the body
    iterator never started (client gone before the first chunk), where a generator's own
    ``finally`` would not run."""

    def __init__(self, body, run: EngineRun):
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.close()


def event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def stream(run: EngineRun, request: SamplingRequest, timeout_s: float,
           render: Callable[[list[ChoiceDelta]], list[dict]], usage_chunk: Callable[[dict], dict]) -> StreamingResponse:
    """SSE: one event per rendered chunk (each with the request's running speculative stats), a
    usage chunk if asked, ``data: [DONE]``; on failure after the headers, an error event."""
    options = request.stream_options
    include_usage = bool(options and options.include_usage)
    continuous = bool(options and options.continuous_usage_stats)

    async def body() -> AsyncIterator[str]:
        try:
            async with asyncio.timeout(timeout_s):
                async for deltas in run.deltas():
                    chunks = render(deltas)
                    if not chunks:
                        continue
                    usage = run.usage() if continuous else None
                    speculative = usage["speculative"] if continuous else run.spec_usage()
                    for chunk in chunks:
                        chunk["speculative"] = speculative
                        if continuous:
                            chunk["usage"] = usage
                    # one write per engine output, not per choice: fewer socket sends under load
                    yield "".join(event(chunk) for chunk in chunks)
            if include_usage:
                yield event(usage_chunk(run.usage()))
        except Exception as err:  # noqa: BLE001 - headers are out; the client gets an error event
            yield sse_error_event(engine_error(err, run.id))
        yield "data: [DONE]\n\n"

    return RunStreamingResponse(body(), run)


async def respond(request: Request, state: ServerState, body, run: EngineRun, created: int, chunk_object: str, renderer, build):
    """The tail both generation endpoints share: stream ``run`` as SSE (the usage chunk shaped as
    ``chunk_object``), or collect every choice and return ``build(choices)``."""
    timeout = state.config.request_timeout_s
    if body.stream:
        def usage_chunk(usage: dict) -> dict:
            return {"id": run.id, "object": chunk_object, "created": created, "model": state.model_name,
                    "choices": [], "usage": usage}

        return stream(run, body, timeout, renderer, usage_chunk)
    try:
        choices = await collect(request, run, timeout)
    finally:
        run.close()
    if choices is None:
        return client_closed()
    return build(choices)
