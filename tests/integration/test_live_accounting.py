"""Per-request speculative stats reach a streaming client with every output (stock vLLM only
attaches them to the final one), exactly: the per-step (drafted, accepted) record accounts for
every token the request emitted."""

import asyncio

import pytest

pytestmark = pytest.mark.integration

K = 3


def test_acceptance_is_visible_while_streaming(tiny_target, tiny_draft):
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(
        model=str(tiny_target), dtype="float32", enforce_eager=True, gpu_memory_utilization=0.1,
        max_model_len=512, per_request_spec_decode_metrics="detailed",
        speculative_config={"method": "draft_model", "model": str(tiny_draft), "num_speculative_tokens": K},
    )
    params = SamplingParams(max_tokens=40, temperature=1.0, ignore_eos=True, seed=5, output_kind=RequestOutputKind.DELTA)

    async def stream():
        engine = AsyncLLM.from_engine_args(args)
        try:
            return [(out.finished, len(out.outputs[0].token_ids), out.outputs[0].spec_decode_metrics)
                    async for out in engine.generate("def main(", params, request_id="live-1")]
        finally:
            engine.shutdown()

    seen = asyncio.run(stream())
    live = [metrics for finished, _, metrics in seen if not finished and metrics is not None]
    assert len(live) >= 3, "speculative stats did not arrive before the request finished"
    steps = [sum(m.histogram) for m in live]
    assert steps == sorted(steps) and steps[-1] > steps[0]
    final = seen[-1][2]
    assert seen[-1][0] and final is not None
    assert len(final.per_step_drafted) == len(final.per_step_accepted) == sum(final.histogram)
    assert all(0 <= a <= d <= K for a, d in zip(final.per_step_accepted, final.per_step_drafted))
    # every emitted token is the prefill token, an accepted draft, or one stop token per step
    # (the last step may be cut by max_tokens)
    emitted = sum(count for _, count, _ in seen)
    assert emitted == 40
    assert 1 + sum(a + 1 for a in final.per_step_accepted) >= emitted > sum(a + 1 for a in final.per_step_accepted[:-1])
