"""Where a speculative step's time goes: one engine in this process, timers around its parts.

Run as its own process (``python -m training.bench.speed_profile ...``; `vllm-lk bench speed` starts
it per drafter) because it needs vLLM's engine core in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
to reach the scheduler and model runner. Sections of an engine step, in milliseconds per step:

- ``target_forward``: the target model's forward, also split by the number of query tokens;
- ``drafting``: the drafter's proposal (its forward passes, ``draft_forward``, and sampling), with
  its parts in ``drafting_ms_per_step`` (draft logits; logits and sampling; vLLM's per-pass
  metadata updates; input preparation);
- ``verification``: the rejection sampler (vllm_lk.sampling via vLLM's RejectionSampler);
- ``sampling``: the rest of the runner's sampling (bonus tokens, penalties, logprobs);
- ``scheduler``: scheduling and turning the runner's output into request updates;
- ``other_engine``: everything else in the engine step (input preparation, bookkeeping);
- ``front_end``: output processing and detokenization outside the engine step.

Timing adds a few microseconds per section per step; the speeds quoted by `bench speed` come
from its own runs without these timers.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from collections import defaultdict
from pathlib import Path


class Timers:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.enabled = False

    def wrap(self, owner, name: str, section: str, key=None) -> None:
        """Time ``owner.name`` (a class or an instance attribute) into ``section``; ``key(args,
        kwargs)`` adds a sub-section name (e.g. the number of query tokens)."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            if not self.enabled:
                return original(*args, **kwargs)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                self.seconds[section] += spent
                self.calls[section] += 1
                if key is not None:
                    sub = f"{section}[{key(args, kwargs)}]"
                    self.seconds[sub] += spent
                    self.calls[sub] += 1

        setattr(owner, name, timed)


def _query_tokens(args, kwargs) -> int:
    positions = kwargs.get("positions")
    if positions is None and len(args) > 2:
        positions = args[2]
    return int(positions.shape[-1]) if positions is not None else -1


def instrument(llm) -> Timers:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    timers = Timers()
    timers.wrap(LLMEngine, "step", "total")
    core = llm.llm_engine.engine_core.engine_core  # in-process EngineCore; step_fn is bound at init
    timers.wrap(core, "step_fn", "engine_step")
    timers.wrap(Scheduler, "schedule", "scheduler")
    timers.wrap(Scheduler, "update_from_output", "scheduler")
    timers.wrap(GPUModelRunner, "_model_forward", "target_forward", key=_query_tokens)
    timers.wrap(GPUModelRunner, "propose_draft_token_ids", "drafting")
    timers.wrap(GPUModelRunner, "_sample", "sampling_all")
    timers.wrap(RejectionSampler, "forward", "verification")
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    drafter = getattr(runner, "drafter", None)
    model = getattr(drafter, "model", None)
    if model is not None:
        for name in ("forward", "step"):  # EAGLE / draft model / MEDUSA forward; MLP stage
            if hasattr(model, name):
                timers.wrap(model, name, "draft_forward")
        if hasattr(model, "compute_logits"):
            timers.wrap(model, "compute_logits", "draft.logits")
    for name, section in DRAFT_LOOP_PARTS.items():  # vLLM's draft loop (EAGLE / draft model)
        if hasattr(drafter, name):
            timers.wrap(drafter, name, section)
    return timers


# drafting's parts inside vLLM's EAGLE / draft-model loop (llm_base_proposer.py): method -> section
DRAFT_LOOP_PARTS = {
    "_sample_draft_tokens": "draft.logits_and_sampling",  # draft logits, q, the sampled drafts
    "_update_positions_dependent_metadata": "draft.metadata",  # per pass: positions, slot mapping
    "build_per_group_and_layer_attn_metadata": "draft.metadata",  # per pass: attention metadata
    "set_inputs_first_pass": "draft.inputs",
    "prepare_next_token_ids_padded": "draft.inputs",
    "prepare_inputs_padded": "draft.inputs",
}


def breakdown(timers: Timers) -> dict:
    steps = max(timers.calls["engine_step"], 1)
    ms = {name: 1000 * value / steps for name, value in timers.seconds.items()}
    sections = {
        "target_forward": ms.get("target_forward", 0.0),
        "drafting": ms.get("drafting", 0.0),
        "draft_forward": ms.get("draft_forward", 0.0),
        "verification": ms.get("verification", 0.0),
        "sampling": ms.get("sampling_all", 0.0) - ms.get("verification", 0.0),
        "scheduler": ms.get("scheduler", 0.0),
    }
    accounted = sum(v for k, v in sections.items() if k != "draft_forward")
    sections["other_engine"] = ms.get("engine_step", 0.0) - accounted
    sections["front_end"] = ms.get("total", 0.0) - ms.get("engine_step", 0.0)
    sections["step"] = ms.get("total", 0.0)
    forward_by_tokens = {
        name[len("target_forward["):-1]: 1000 * timers.seconds[name] / timers.calls[name]
        for name in timers.seconds if name.startswith("target_forward[")
    }
    drafting = {name[len("draft."):]: value for name, value in ms.items() if name.startswith("draft.")}
    return {"ms_per_step": sections, "target_forward_ms_by_query_tokens": forward_by_tokens,
            "drafting_ms_per_step": drafting, "engine_steps": steps}


def profile(target: str, method: str | None, drafter: str | None, k: int, runs: list[tuple[str, float]],
            prompts: list[list[int]], max_tokens: int, gpu_memory_utilization: float, max_model_len: int) -> list[dict]:
    """One engine, one breakdown per (mode, temperature) in ``runs``: the mode is switched at
    runtime (lk_set_speculation, as `bench speed` does), so settings share an engine start."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from training.generate import EngineFields, make_llm

    extra = {}
    if method is not None:
        extra = {"speculative_config": {"method": method, "model": drafter, "num_speculative_tokens": k}}
    engine = EngineFields(gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len)
    llm = make_llm(Path(target), engine, seed=0, async_scheduling=False, **extra)
    timers = instrument(llm)

    def generate(items, temperature):
        tokens = 0
        for i, ids in enumerate(items):
            params = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True, seed=i)
            out = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
            tokens += len(out[0].outputs[0].token_ids)
        return tokens

    results = []
    for mode, temperature in runs:
        if method is not None:
            llm.collective_rpc("lk_set_speculation", args=(mode, k))
        generate(prompts[:2], temperature)  # warm-up (and the adaptive policy's first steps)
        timers.seconds.clear()
        timers.calls.clear()
        timers.enabled = True
        started = time.perf_counter()
        tokens = generate(prompts, temperature)
        seconds = time.perf_counter() - started
        timers.enabled = False
        result = breakdown(timers)
        result.update({"tokens_per_s": tokens / seconds, "tokens_per_step": tokens / result["engine_steps"]})
        results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, required=True, help="JSON: target, method, drafter, k, runs [[mode, temperature], ...], prompts, max_tokens, ...")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    spec = json.loads(args.spec.read_text())
    args.out.write_text(json.dumps(profile(**spec), indent=2) + "\n")


if __name__ == "__main__":
    main()
