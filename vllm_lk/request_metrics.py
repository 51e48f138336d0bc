"""Per-request speculative stats while a request runs (installed by :func:`vllm_lk.patch.apply`).

Stock vLLM 0.32 attaches a request's ``RequestSpecDecodeMetrics`` (``per_request_spec_decode_metrics``
= "summary" or "detailed") only to its final output. Here the engine core attaches it to every
output, carrying only the steps the front end has not seen (:func:`_delta`: O(new steps) per
output, where a full copy would cost O(steps^2) over a request), and the front end's
``RequestState`` adds them up (:func:`_merge_spec_metrics`) and passes the running record on with
every streamed output.
"""

from __future__ import annotations

import dataclasses
import functools


def position_counts(per_step_drafted, per_step_accepted, num_positions: int) -> tuple[list[int], list[int]]:
    """Per draft position i: (steps that drafted more than i tokens, steps that accepted more than
    i), vLLM's rule for ``vllm:spec_decode_num_accepted_tokens_per_pos``, from a request's per-step
    lists (``RequestSpecDecodeMetrics`` with "detailed"). The one place this is counted: the
    server's usage and metrics, and `vllm-lk eval`, agree with vLLM's counters by construction."""
    drafted, accepted = [0] * num_positions, [0] * num_positions
    for num_drafted, num_accepted in zip(per_step_drafted, per_step_accepted, strict=True):
        for i in range(min(num_drafted, num_positions)):
            drafted[i] += 1
        for i in range(min(num_accepted, num_positions)):
            accepted[i] += 1
    return drafted, accepted


def _wrap_update_from_output(original):
    """Engine core: attach each running request's speculative stats to every output, not only
    the final one, so the front end sees acceptance live (needs the engine argument
    ``per_request_spec_decode_metrics`` = "summary" or "detailed"). Each output carries only
    the steps the front end has not seen (:func:`_delta`); _merge_spec_metrics adds them up."""

    @functools.wraps(original)
    def update_from_output(self, *args, **kwargs):
        outputs_by_client = original(self, *args, **kwargs)
        for engine_outputs in outputs_by_client.values():
            for output in engine_outputs.outputs:
                if output.spec_decode_metrics is not None:
                    continue
                request = self.requests.get(output.request_id)
                metrics = getattr(request, "spec_decode_metrics", None)
                if metrics is not None:
                    output.spec_decode_metrics = _delta(request, metrics)
        return outputs_by_client

    return update_from_output


def _delta(request, metrics):
    """A RequestSpecDecodeMetrics with the cumulative histogram and draft count (K+2 ints) and
    the per-step lists from the first step not yet sent: O(new steps) per output, where a full
    copy costs O(steps) per output and O(steps^2) over a request."""
    sent = request.__dict__.get("_lk_sent_steps", 0)
    request._lk_sent_steps = len(metrics.per_step_drafted)
    return dataclasses.replace(
        metrics,
        histogram=list(metrics.histogram),
        per_step_accepted=metrics.per_step_accepted[sent:],
        per_step_drafted=metrics.per_step_drafted[sent:],
    )


def _merge_spec_metrics(current, new):
    """Front end: the request's cumulative record after an engine output's record ``new``.

    ``new`` starts at step sum(histogram) - len(per-step lists): 0 for a full record (vLLM's
    final one, or the first delta), which replaces ``current``; otherwise its steps extend
    ``current`` (the histogram and draft count are cumulative in every record)."""
    if new is None or current is None:
        return new if new is not None else current
    start = sum(new.histogram) - len(new.per_step_drafted)
    if start == 0:
        return new
    if len(current.per_step_drafted) == start:
        current.per_step_drafted.extend(new.per_step_drafted)
        current.per_step_accepted.extend(new.per_step_accepted)
    current.histogram = new.histogram
    current.num_draft_tokens = new.num_draft_tokens
    return current


def _spec_metrics_property():
    """RequestState.spec_decode_metrics, merging deltas on assignment (vLLM assigns each
    engine output's record to it)."""

    def get(self):
        return self.__dict__.get("_lk_spec_decode_metrics")

    def set_(self, value):
        self.__dict__["_lk_spec_decode_metrics"] = _merge_spec_metrics(self.__dict__.get("_lk_spec_decode_metrics"), value)

    return property(get, set_)


def _wrap_new_completion_output(original):
    """Front end: pass the latest speculative stats on with every streamed output (stock vLLM
    drops them until the request finishes)."""

    @functools.wraps(original)
    def _new_completion_output(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        if output.spec_decode_metrics is None and self.spec_decode_metrics is not None:
            output.spec_decode_metrics = self.spec_decode_metrics
        return output

    return _new_completion_output


def install() -> None:
    from vllm.v1.core.sched import scheduler
    from vllm.v1.engine import output_processor

    scheduler.Scheduler.update_from_output = _wrap_update_from_output(scheduler.Scheduler.update_from_output)
    state = output_processor.RequestState
    state._new_completion_output = _wrap_new_completion_output(state._new_completion_output)
    state.spec_decode_metrics = _spec_metrics_property()
