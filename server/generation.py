"""From a validated request to engine outputs: prompt checks, sampling parameters, and the run of
one client request (one engine request per prompt), with metrics, admission and aborts.

Both endpoints share this, so streaming and non-streaming, completions and chat all count tokens,
acceptance and latency the same way. Limits are checked here, before the engine sees a request,
so a prompt that is too long is a 400 that names the numbers, not a failure mid-stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from server.errors import APIError, bad_request, internal_error
from server.schemas import SamplingRequest
from server.spec_stats import ChoiceTracker, SpecStats, combine
from server.state import ServerState, Ticket

logger = logging.getLogger(__name__)

SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                         "presence_penalty", "frequency_penalty")
_ids = itertools.count()


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}{next(_ids):x}"


@dataclass
class Prompt:
    token_ids: list[int]
    text: str | None = None


INLINE_TOKENIZE_CHARS = 4096  # shorter texts are tokenized on the event loop (a thread hop costs more)


async def encode(state: ServerState, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of ``text``; long texts off the event loop so one huge prompt cannot stall streams."""
    if len(text) <= INLINE_TOKENIZE_CHARS:
        return list(state.tokenizer.encode(text, add_special_tokens=add_special_tokens))
    ids = await asyncio.to_thread(state.tokenizer.encode, text, add_special_tokens=add_special_tokens)
    return list(ids)


def check_token_ids(state: ServerState, token_ids, param: str) -> None:
    """400 naming ``param`` for the first id outside the vocabulary."""
    bad = next((t for t in token_ids if t >= state.vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary (size {state.vocab_size})", param=param)


def check_prompt(state: ServerState, prompt: Prompt, param: str) -> None:
    """400 for an empty prompt, ids outside the vocabulary, or a prompt that leaves no room."""
    if not prompt.token_ids:
        raise bad_request("the prompt is empty (it encodes to no tokens)", param=param)
    check_token_ids(state, prompt.token_ids, param)
    if len(prompt.token_ids) >= state.max_model_len:
        raise bad_request(
            f"this model's maximum context length is {state.max_model_len} tokens; the prompt has "
            f"{len(prompt.token_ids)} tokens, which leaves no room to generate", param=param, code="context_length_exceeded")


def resolve_max_tokens(state: ServerState, prompts: list[Prompt], requested: int | None, param: str) -> int:
    """The requested max_tokens, or all the room the longest prompt leaves; 400 if it does not fit."""
    longest = max(len(p.token_ids) for p in prompts)
    room = state.max_model_len - longest
    if requested is None:
        return room
    if requested > room:
        raise bad_request(
            f"this model's maximum context length is {state.max_model_len} tokens; you requested "
            f"{longest + requested} tokens ({longest} in the prompt, {requested} to generate)",
            param=param, code="context_length_exceeded")
    return requested


def sampling_params(state: ServerState, request: SamplingRequest, max_tokens: int, logprobs: int | None):
    """vLLM SamplingParams: the request's values, else the model's generation_config, else OpenAI's
    defaults. DELTA outputs: each engine output carries only what is new."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import RequestOutputKind

    speculating = bool(state.spec.num_speculative_tokens)
    if speculating and request.min_p:
        raise bad_request("min_p is not supported with speculative decoding: vLLM 0.32 does not apply it when it "
                          "verifies drafts, so the output would not follow it", param="min_p")
    values = {key: getattr(request, key) for key in SAMPLING_DEFAULT_KEYS}
    for key, value in values.items():
        if value is None and key in state.default_sampling:
            values[key] = state.default_sampling[key]
    values = {key: value for key, value in values.items() if value is not None}
    values.setdefault("temperature", 1.0)
    check_token_ids(state, request.stop_token_ids or (), "stop_token_ids")
    try:
        return SamplingParams(
            n=request.n, max_tokens=max_tokens, stop=request.stop_list() or None, seed=request.seed,
            stop_token_ids=request.stop_token_ids, skip_special_tokens=request.skip_special_tokens,
            spaces_between_special_tokens=request.spaces_between_special_tokens,
            include_stop_str_in_output=request.include_stop_str_in_output,
            ignore_eos=request.ignore_eos, min_tokens=request.min_tokens, logprobs=logprobs,
            output_kind=RequestOutputKind.DELTA, **values,
        )
    except (ValueError, VLLMValidationError) as err:  # vLLM's own checks (e.g. min_tokens > max_tokens)
        raise bad_request(str(err)) from err


@dataclass
class ChoiceDelta:
    """What one engine output adds to one choice."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list | None  # per token: {token_id: vllm Logprob}, or None without logprobs
    finish_reason: str | None


@dataclass
class ChoiceState:
    spec: ChoiceTracker
    tokens: int = 0
    finished: bool = False
    # kept only when the request is captured (server.capture)
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    record: object = None  # vLLM's cumulative RequestSpecDecodeMetrics


@dataclass
class EngineRun:
    """One client request: its engine requests (one per prompt, each with ``n`` sequences)."""

    state: ServerState
    prompts: list[Prompt]
    params: object
    ticket: Ticket
    prefix: str
    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None
    choices: dict[int, ChoiceState] = field(default_factory=dict)
    _engine_ids: list[str] = field(default_factory=list)
    _finished_ids: set[str] = field(default_factory=set)
    _closed: bool = False

    def __post_init__(self) -> None:
        self.id = new_request_id(self.prefix)
        self.n = self.params.n
        # the engine and drafter serving now: a drafter swap during the request does not move it
        self.engine, self.spec_setup = self.state.engine, self.state.spec
        self.spec_drafter_id = self.state.drafter_identity
        self.state.hold(self.engine)
        self.captured = self.state.capture is not None and self.state.capture.sampled()
        self.state.metrics.waiting.inc()
        self.state.metrics.prompt_tokens.inc(sum(len(p.token_ids) for p in self.prompts))

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p.token_ids) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(choice.tokens for choice in self.choices.values())

    def spec(self) -> SpecStats | None:
        """All choices' speculative stats together (None without a drafter); not a copy when
        there is one choice, so treat it as read-only."""
        k = self.spec_setup.num_speculative_tokens
        if not k:
            return None
        if len(self.choices) == 1:
            return next(iter(self.choices.values())).spec.stats
        return combine([c.spec.stats for c in self.choices.values()], k)

    def spec_usage(self) -> dict | None:
        """The running ``usage.speculative`` object."""
        spec = self.spec()
        return spec.to_usage() if spec is not None else None

    def usage(self) -> dict:
        prompt, completion = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "speculative": self.spec_usage()}

    async def deltas(self) -> AsyncIterator[list[ChoiceDelta]]:
        """The changes of every engine output, in arrival order; closes (and aborts what is still
        running) however the caller stops: end, error, client gone, cancellation."""
        try:
            async for prompt_index, output in self._outputs():
                yield [self._observe(prompt_index, out) for out in output.outputs]
                if output.finished:
                    self._finished_ids.add(output.request_id)
        finally:
            self.close()

    async def _outputs(self):
        from vllm.inputs.engine import tokens_input

        engine = self.engine
        streams = []
        for i, prompt in enumerate(self.prompts):
            request_id = f"{self.id}-{i}"
            self._engine_ids.append(request_id)
            self.state.active_requests[request_id] = engine
            inputs = tokens_input(prompt.token_ids, prompt=prompt.text)
            streams.append(engine.generate(inputs, self.params, request_id))
        if len(streams) == 1:
            async with contextlib.aclosing(streams[0]) as stream:
                async for output in stream:
                    yield 0, output
            return
        async for item in _merge(streams):
            yield item

    def _observe(self, prompt_index: int, out) -> ChoiceDelta:
        now = time.monotonic()
        index = prompt_index * self.n + out.index
        choice = self.choices.get(index)
        if choice is None:
            choice = self.choices[index] = ChoiceState(ChoiceTracker(self.spec_setup.num_speculative_tokens))
        new_tokens = len(out.token_ids)
        if new_tokens:
            if self.first_token is None:
                self.first_token = now
                self.state.metrics.ttft.observe(now - self.arrival)
                self.state.metrics.waiting.dec()
                self.state.metrics.running.inc()
            self.last_token = now
            choice.tokens += new_tokens
        delta = choice.spec.update(out.spec_decode_metrics) if self.spec_setup.num_speculative_tokens else None
        if new_tokens or delta is not None:
            self.state.metrics.add_output(new_tokens, delta)
            self.state.window.add(new_tokens, delta)
        if out.finish_reason is not None:
            choice.finished = True
        if self.captured:
            choice.text.append(out.text)
            choice.token_ids.extend(out.token_ids)
            choice.finish_reason = out.finish_reason or choice.finish_reason
            choice.record = out.spec_decode_metrics or choice.record
        return ChoiceDelta(index, out.text, list(out.token_ids), out.logprobs, out.finish_reason)

    def close(self) -> None:
        """Release everything exactly once; abort engine requests that did not finish."""
        if self._closed:
            return
        self._closed = True
        metrics = self.state.metrics
        (metrics.running if self.first_token is not None else metrics.waiting).dec()
        unfinished = [rid for rid in self._engine_ids if rid not in self._finished_ids]
        for rid in self._engine_ids:
            self.state.active_requests.pop(rid, None)
        self.state.abort_soon(unfinished, self.engine)
        self.state.release(self.engine)
        self.ticket.release()
        spec = self.spec()
        length = spec.acceptance_length if spec is not None else None
        if not unfinished:
            if length is not None:
                metrics.acceptance_length.observe(length)
            longest = max((c.tokens for c in self.choices.values()), default=0)
            if longest > 1 and self.first_token is not None and self.last_token is not None:
                metrics.tpot.observe((self.last_token - self.first_token) / (longest - 1))
            self.state.window.add_finished(length)
            if self.captured:
                self.state.capture.offer(self._capture_records())

    def _capture_records(self) -> list[dict]:
        """One record per choice in `vllm-lk generate`'s format, plus what serving saw."""
        from server.capture import sampling_record

        sampling, created = sampling_record(self.params), time.time()
        records = []
        for index, choice in sorted(self.choices.items()):
            if not choice.token_ids:
                continue  # nothing to train on
            prompt = self.prompts[index // self.n]
            record = choice.record
            records.append({
                "id": f"{self.id}-{index}", "prompt": prompt.text, "completion": "".join(choice.text),
                "prompt_token_ids": prompt.token_ids, "completion_token_ids": choice.token_ids,
                "finish_reason": choice.finish_reason, "sampling": sampling, "created": created,
                "model": self.state.model_name, "drafter_id": self.spec_drafter_id,
                "speculative": None if record is None else {
                    "per_step_drafted": list(record.per_step_drafted), "per_step_accepted": list(record.per_step_accepted)},
            })
        return records


async def _merge(streams):
    """Interleave several engine streams as ``(index, output)``; closing the merge closes them all."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index, stream):
        try:
            async for output in stream:
                await queue.put((index, output))
            await queue.put((index, done))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, re-raised there
            await queue.put((index, err))
        finally:
            await stream.aclose()

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


def engine_error(err: BaseException, request_id: str) -> APIError:
    """Map an exception from the engine to what the client sees. Only vLLM's request validation
    (``VLLMValidationError``, which vLLM 0.32 raises for every client mistake it checks) is the
    client's error; anything else is ours: a 500 naming the request id, traceback in the log."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(err, APIError):
        return err
    if isinstance(err, VLLMValidationError):
        return bad_request(str(err), param=getattr(err, "parameter", None))
    if isinstance(err, EngineDeadError):
        return APIError(503, "the engine has failed", code="engine_dead")
    if isinstance(err, (TimeoutError, asyncio.TimeoutError)):
        return APIError(504, "the request timed out and was aborted", code="timeout")
    return internal_error(err, request_id)
