"""Adaptive speculation inside vLLM's model runner (the second module, after patch.py, that
touches vLLM internals; the decisions themselves are vllm_lk.adaptive's pure functions).

``VLLM_LK_SPECULATION=adaptive`` (our server's default) gives each model runner a
:class:`vllm_lk.adaptive.Policy`; ``fixed`` (the default under plain vLLM) leaves vLLM's fixed K.
At runtime :func:`set_speculation` switches a running engine (``LLM.collective_rpc``).

Per engine step, in the runner that owns the drafter:
1. the time since the previous step, with the batch it served, feeds the cost model, and each
   request's verification outcome (accepted drafts, with the confidences they were drafted at)
   feeds the acceptance model;
2. the plan caps this step's drafts at k* (0: no drafts);
3. drafting records each pass's confidence ``max_v q(v)`` and stops the draft loop when another
   pass does not pay (EAGLE / draft-model passes, MLP stages; MEDUSA computes only k* heads);
4. each request keeps the prefix of its drafts that still pays; the scheduler then schedules
   exactly those for verification (vLLM verifies a variable number per request).
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch

from vllm_lk.adaptive import SETTINGS, Policy, passes_for

logger = logging.getLogger("vllm.plugins.vllm_lk.speculation")

MODE_ENV = "VLLM_LK_SPECULATION"
MODES = ("fixed", "adaptive")
KINDS = {"eagle": "kv", "eagle3": "kv", "draft_model": "kv", "mtp": "kv", "medusa": "parallel", "mlp_speculator": "sequential"}


def mode_from_env() -> str:
    mode = os.environ.get(MODE_ENV, "fixed").strip().lower() or "fixed"
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV}={mode!r}: expected one of {', '.join(MODES)}")
    return mode


class StopDrafting(Exception):
    """Raised inside vLLM's draft loop when another pass does not pay; caught by our propose."""


def new_policy(runner) -> Policy | None:
    config = runner.speculative_config
    kind = KINDS.get(getattr(config, "method", None)) if config is not None else None
    if kind is None or not runner.num_spec_tokens:
        return None
    return Policy(max_k=runner.num_spec_tokens, kind=kind)


ASYNC_REFUSED = ("vllm_lk: adaptive speculation and a runtime K below the configured one need the engine "
                 "argument async_scheduling=False (with async scheduling vLLM's scheduler reserves the configured K "
                 "draft slots per request before the drafter runs)")


def install(runner) -> None:
    """Called at the end of the runner's __init__: attach a policy in adaptive mode."""
    adaptive = mode_from_env() == "adaptive"
    if adaptive and runner.use_async_scheduling:
        logger.warning("%s; serving fixed K", ASYNC_REFUSED)
        adaptive = False
    runner._lk_policy = new_policy(runner) if adaptive else None
    runner._lk_saved_policy = None  # a policy kept (with what it learned) while fixed K runs
    runner._lk_policy_label = "default"  # the label of the policy above (set_speculation's "label")
    runner._lk_other_policies = {}  # label -> a policy kept while another label's runs
    runner._lk_fixed_k = None  # fixed mode at a K below the configured one (set_speculation)
    runner._lk_last = None  # (req_ids, passes, drafted, time, k or None, all greedy, explored) of the previous step's plan
    runner._lk_conf = {}  # req_id -> [k] confidences of its drafts awaiting verification
    runner._lk_counts = np.zeros(runner.num_spec_tokens + 1, dtype=np.int64)  # request-steps by drafts made
    runner._lk_steps = np.zeros(2, dtype=np.int64)  # drafting steps, those of them with no draft at all
    if runner._lk_policy is not None:
        logger.info("vllm_lk: adaptive speculation (K <= %d, %s drafter)", runner.num_spec_tokens, runner._lk_policy.kind)


def set_speculation(worker, mode: str, k: int | None = None, policy: dict | None = None) -> str:
    """Switch a running engine (registered as the worker method ``lk_set_speculation``):
    ``llm.collective_rpc("lk_set_speculation", args=("adaptive",))``, or ``("fixed", 2)`` for a
    fixed K of 2 (at most the configured K; None: the configured K). A policy keeps what it
    learned across switches. ``policy`` (adaptive only) sets Policy fields (vllm_lk.adaptive.SETTINGS)
    and may pin the cost model: ``"cost": [step, per_request, per_pass,
    per_drafted_token]`` seconds, not updated online; ``"label"`` selects one of several policies,
    each learning only from its own steps (benchmarks compare policy variants this way)."""
    if mode not in MODES:
        raise ValueError(f"speculation mode {mode!r}: expected one of {', '.join(MODES)}")
    runner = worker.model_runner
    if runner.use_async_scheduling and (mode == "adaptive" or (k is not None and k != runner.num_spec_tokens)):
        raise ValueError(ASYNC_REFUSED)
    if k is not None and not 0 <= k <= runner.num_spec_tokens:
        raise ValueError(f"k={k}: the engine was started with num_speculative_tokens={runner.num_spec_tokens}")
    if mode == "adaptive":
        settings = dict(policy or {})
        label = str(settings.pop("label", runner._lk_policy_label))
        current = runner._lk_policy or runner._lk_saved_policy
        if label != runner._lk_policy_label:
            runner._lk_other_policies[runner._lk_policy_label] = current
            current, runner._lk_policy_label = runner._lk_other_policies.pop(label, None), label
        runner._lk_policy, runner._lk_saved_policy = current or new_policy(runner), None
        runner._lk_fixed_k = None
        if settings:
            _configure(runner._lk_policy, settings)
    else:
        runner._lk_saved_policy = runner._lk_policy or runner._lk_saved_policy
        runner._lk_policy, runner._lk_fixed_k = None, k
    runner._lk_last, runner._lk_conf = None, {}
    return mode


def _configure(policy: Policy, settings: dict) -> None:
    cost = settings.pop("cost", None)
    for name, value in settings.items():
        if name not in SETTINGS:
            raise ValueError(f"unknown policy setting {name!r}")
        setattr(policy, name, type(getattr(policy, name))(value))
    if cost is not None:
        if len(cost) != 4:
            raise ValueError("cost: expected [step, per_request, per_pass, per_drafted_token] seconds")
        policy.pin_cost(cost)


def count_drafts(runner, drafts) -> None:
    """Both modes: tally this step's drafts per request (``drafts`` as the runner takes them:
    a [B, k] tensor or one list per request)."""
    counts = runner.__dict__.get("_lk_counts")
    if counts is None or drafts is None:
        return
    if isinstance(drafts, torch.Tensor):
        width = min(drafts.shape[1] if drafts.dim() == 2 else 0, len(counts) - 1)
        counts[width] += drafts.shape[0]
        made = width * drafts.shape[0]
    else:
        lengths = np.minimum([len(row) for row in drafts], len(counts) - 1)
        np.add.at(counts, lengths, 1)
        made = int(lengths.sum())
    runner._lk_steps[0] += 1
    runner._lk_steps[1] += made == 0


def speculation_stats(worker) -> dict | None:
    """What the runner drafted and, in adaptive mode, what its policy estimates (worker method
    ``lk_speculation_stats``; the server polls it for /metrics). None without a drafter."""
    runner = worker.model_runner
    counts = runner.__dict__.get("_lk_counts")
    if counts is None or not runner.num_spec_tokens:
        return None
    policy = runner._lk_policy
    return {
        "mode": "adaptive" if policy is not None else "fixed",
        "max_k": int(runner.num_spec_tokens),
        "k": None if policy is not None else int(runner._lk_fixed_k if runner._lk_fixed_k is not None else runner.num_spec_tokens),
        "steps": int(runner._lk_steps[0]),
        "steps_without_drafts": int(runner._lk_steps[1]),
        "request_steps_by_drafts": counts.tolist(),
        "estimated_speedup": policy.estimated_speedup if policy is not None else None,
        "cost": policy.cost_constants() if policy is not None else None,
    }


def policy_snapshot(worker) -> dict | None:
    """The live policy's state (``LLM.collective_rpc(policy_snapshot)``), for benchmarks."""
    policy = getattr(worker.model_runner, "_lk_policy", None)
    if policy is None:
        return None
    return {"steps": policy.steps, "plans": policy.plans, "skipped": policy.skipped,
            "chosen": policy.chosen.tolist(), "arm_seconds": policy.arms.table(policy.paired_arms),
            "cost": policy.cost_constants(),
            "position_rates": policy.acceptance.position_rates().tolist(),
            "bucket_rates": policy.acceptance.bucket_rates().tolist()}


# ---------------------------------------------------------------------------------------------
# step bookkeeping (runner side)


def _accepted_counts(sampled_token_ids, batch: int) -> np.ndarray:
    """[B] accepted drafts per request (tokens sampled this step - 1; -1 for none)."""
    if isinstance(sampled_token_ids, torch.Tensor):
        if sampled_token_ids.device.type == "cpu":  # numpy: a third of torch's per-op overhead
            return (sampled_token_ids[:batch].numpy() >= 0).sum(axis=1) - 1
        return ((sampled_token_ids[:batch] >= 0).sum(dim=1) - 1).cpu().numpy()
    return np.array([len(tokens) - 1 for tokens in sampled_token_ids[:batch]], dtype=np.int64)


def greedy_flags(sampling_metadata, batch: int) -> np.ndarray:
    """[B] bool: requests at temperature 0."""
    if sampling_metadata.all_greedy or sampling_metadata.temperature is None:
        return np.ones(batch, dtype=bool)
    return (sampling_metadata.temperature[:batch] == 0).cpu().numpy()


def observe(runner, scheduler_output, sampled_token_ids, spec_decode_metadata, greedy: np.ndarray) -> None:
    """Feed the previous step's time and this step's verification outcomes to the policy."""
    policy = runner._lk_policy
    now = time.perf_counter()
    req_ids = runner.input_batch.req_ids
    last = runner._lk_last
    accepted = _accepted_counts(sampled_token_ids, len(req_ids))  # [B], -1 for a request without tokens
    if spec_decode_metadata is not None:
        confidence = np.full((len(req_ids), policy.max_k), np.nan)
        if runner._lk_conf:  # the drafts' confidences were read (trim)
            counts = np.zeros(len(req_ids), dtype=np.int64)
            for row, (req_id, n) in enumerate(zip(req_ids, spec_decode_metadata.num_draft_tokens)):
                conf = runner._lk_conf.pop(req_id, None)
                if n and conf is not None and len(conf) >= n:
                    confidence[row, :n], counts[row] = conf[:n], n
        else:  # confidences not read (the cap-only default): count the drafts the policy's last step made
            drafted_by = set(last[0]) if last is not None else ()
            counts = np.array([n if req_id in drafted_by else 0
                               for req_id, n in zip(req_ids, spec_decode_metadata.num_draft_tokens)], dtype=np.int64)
        if counts.any():
            policy.observe_verifications(req_ids, confidence, counts, np.maximum(accepted, 0), greedy[: len(req_ids)])
    drafted = sum(spec_decode_metadata.num_draft_tokens) if spec_decode_metadata is not None else 0
    steady = (
        last is not None and last[0] == tuple(req_ids) and last[2] == drafted
        and scheduler_output.total_num_scheduled_tokens == len(req_ids) + drafted
    )
    if steady:
        policy.observe_step(len(req_ids), last[1], last[2], now - last[3], int((accepted + 1).sum()), k=last[4], greedy=last[5],
                            explore=last[6])
    runner._lk_now = now
    policy.forget_requests(req_ids)


def record_pass(proposer, logits: torch.Tensor, probs: torch.Tensor | None, ids: torch.Tensor,
                stop: bool = False, decide: bool = True) -> bool:
    """After a draft pass: record its [B] confidences and return whether another pass pays
    (``decide=False``: record only, for heads computed together). ``stop``: raise StopDrafting
    instead of returning False (inside vLLM's own draft loop). No-op (True) unless the proposer
    drafts for an adaptive runner this step."""
    policy = proposer.__dict__.get("_lk_policy")
    if policy is None:
        return True
    proposer._lk_ids.append(ids)
    proposer._lk_probs.append(probs)
    confidence = None
    if policy.needs_confidence():
        source = probs if probs is not None else logits.float().softmax(dim=-1)
        confidence = source.max(dim=-1).values.cpu().numpy()
    keep = policy.add_pass(confidence, decide=decide)
    if not keep and stop:
        raise StopDrafting
    return keep


def begin_drafting(runner, proposer, k: int) -> None:
    proposer._lk_policy = runner._lk_policy if k > 0 else None
    proposer._lk_ids, proposer._lk_probs = [], []


def drafts_so_far(proposer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([B, j] ids, [B, j, V] q or None) of the passes run before a StopDrafting."""
    ids = torch.stack(proposer._lk_ids, dim=1)
    probs = proposer._lk_probs
    return ids, None if any(q is None for q in probs) else torch.stack(probs, dim=1).contiguous()


def finish(runner, proposer, drafts):
    """Trim each request's drafts to the prefix that pays; remember their confidences.
    Returns the drafts as vLLM's runner takes them (a list of lists when trimmed)."""
    policy = runner._lk_policy
    proposer._lk_policy = None
    req_ids = runner.input_batch.req_ids
    passes = policy.passes()
    width = drafts.shape[1] if isinstance(drafts, torch.Tensor) else 0
    greedy = policy.last_plan.greedy
    if width == 0 or passes < width:  # nothing drafted, or a drafter that records no confidences
        runner._lk_last = (tuple(req_ids), passes_for(policy.kind, width), width * len(req_ids), runner._lk_now, width, greedy,
                           policy.last_plan.explore)
        return drafts
    if not policy.trim and not policy.last_plan.random_lengths:  # the cap alone: every request drafted width
        runner._lk_last = (tuple(req_ids), passes_for(policy.kind, passes), width * len(req_ids), runner._lk_now,
                           width if passes == width else None, greedy, policy.last_plan.explore)
        return drafts
    lengths = policy.lengths()
    if policy.confidence_read():  # kept for the verification outcomes of the next step
        conf_rows = policy.confidences()[:, :width]
        for row, req_id in enumerate(req_ids):
            runner._lk_conf[req_id] = conf_rows[row, : lengths[row]]
    uniform = bool((lengths == width).all()) and passes == width
    runner._lk_last = (tuple(req_ids), passes_for(policy.kind, passes), int(lengths.sum()), runner._lk_now, width if uniform else None,
                       greedy, policy.last_plan.explore)
    if bool((lengths == width).all()):
        return drafts
    return [row[:n] for row, n in zip(drafts.tolist(), lengths.tolist())]

