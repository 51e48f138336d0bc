"""Serve a (target, drafter) pair in vLLM, measure acceptance, and set it beside the offline prediction.

Measured (vLLM with the vllm_lk plugin, each request's per-step (drafted, accepted) record):

    acceptance at position k = steps that accepted drafts 1..k / steps that drafted position k
    tau (mean acceptance length) = 1 + accepted draft tokens / verification steps

tau counts the bonus token: a step that accepts j drafts emits j + 1 tokens.

Predicted (no vLLM: transformers forward of the target and the drafter over the *same* prompt +
generated sequences, rows of generated tokens only, as in training):

    alpha_k = E_rows[ sum_v min(p_v, q_v) ]      at T > 0 (training.losses.draft_loss's alpha)
    alpha_k = E_rows[ 1[argmax q = argmax p] ]   at T = 0 (greedy agreement)
    predicted acceptance at position k = prod_{j<=k} alpha_j
    predicted tau = 1 + sum_{k=1..K} prod_{j<=k} alpha_j

The product assumes acceptances at successive positions are independent, each with its average
rate; in truth they correlate (an easy context makes every position easy, which makes the served
products larger), and a head's rows are teacher-forced on target tokens while serving conditions
position k > 1 on the drafts accepted before it. Position 1 has no such assumption: its prediction
differs from the measurement only by sampling noise and by which rows serving happens to verify.
An independent draft model has one head; its alpha is used for every position.

Predicted at the served steps (``offline["at_served_steps"]``, :func:`predict_at_steps`): each
request's per-step record says where every verification step's context ended; the prediction
averages prod_{j<=k} alpha_j(t) over those steps, each head's alpha taken at the step's own
context end t. Steps start right after rejections more often than a uniform position would, and
the independent-positions prediction ignores that; this one does not (at T = 0 it reproduces the
served accepted counts: an accepted greedy draft is the next token).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from training.generate import EngineFields, make_llm, prepare_prompts, record_seed, resolve_target
from training.prompts import record_id
from vllm_lk.errors import InvalidInput
from vllm_lk.hub import resolve_model_path

logger = logging.getLogger(__name__)

# drafter kind (training.drafters) -> speculative_config["method"]
INDEPENDENCE = "predicted acceptance at k = prod_{j<=k} alpha_j: positions assumed independent, each at its mean alpha"
AT_STEPS = ("predicted acceptance at k = mean over the served verification steps of prod_{j<=k} alpha_j(t), "
            "each head's alpha at the step's own context end t (teacher-forced on the served tokens)")


class EvalConfig(EngineFields):
    """`vllm-lk eval`: one served measurement and its offline prediction."""

    target: Path | None = Field(None, description="HF target directory, or a Hugging Face id ORG/NAME[@REVISION] in the "
                                "local HF cache (default: the toy target, built if missing)")
    drafter: Path | None = Field(None, description="exported drafter directory, or its Hugging Face id in the local HF cache "
                                 "(required)")
    method: Literal["eagle3", "medusa", "mlp_speculator", "draft_model"] | None = Field(
        None, description="vLLM speculative method (default: from the drafter's config.json architecture)"
    )
    prompts: str = Field("builtin:code:heldout:32", description="JSONL prompts file or builtin:KIND:SPLIT:COUNT[:SEED] (see generate)")
    temperature: float = Field(1.0, ge=0, description="sampling temperature of the served requests and of the offline alpha (0 = greedy)")
    num_speculative_tokens: int = Field(3, ge=1, le=16, description="K: drafts per verification step")
    max_tokens: int = Field(128, ge=2, description="tokens generated per prompt")
    seed: int = Field(0, description="run seed; each request samples with a seed derived from it and its id")
    offline_batch_size: int = Field(8, ge=1, description="sequences per transformers forward in the offline prediction")


def vllm_method(config: EvalConfig) -> tuple[str, str | None]:
    """(vLLM method, drafter kind or None when the config.json names no known architecture)."""
    from training.drafters import VLLM_METHODS, exported_kind

    try:
        kind = exported_kind(config.drafter)
    except ValueError:
        if config.method is None:
            raise
        kind = None
    return config.method or VLLM_METHODS[kind], kind


# ----------------------------------------------------------------------------------------------
# served


def acceptance_counts(outputs, k: int) -> tuple[list[int], list[int]]:
    """Per draft position: (steps that drafted it, steps that accepted it and every earlier one)."""
    from vllm_lk.request_metrics import position_counts

    drafted, accepted = [0] * k, [0] * k
    for out in outputs:
        metrics = out.outputs[0].spec_decode_metrics
        if metrics is not None:
            counts = position_counts(metrics.per_step_drafted, metrics.per_step_accepted, k)
            drafted = [a + b for a, b in zip(drafted, counts[0])]
            accepted = [a + b for a, b in zip(accepted, counts[1])]
    return drafted, accepted


def decode_rate(outputs) -> float | None:
    """Decode throughput of the batch: tokens after each request's first, over the span from the
    first first-token to the last token (prefill excluded); None without per-request stats."""
    stats = [out.metrics for out in outputs if getattr(out, "metrics", None) is not None]
    if len(stats) != len(outputs) or not stats:
        return None
    tokens = sum(len(out.outputs[0].token_ids) - 1 for out in outputs)
    span = max(s.last_token_ts for s in stats) - min(s.first_token_ts for s in stats)
    return tokens / span if span > 0 else None


def serve(config: EvalConfig, target: Path, method: str, records, token_ids) -> tuple[dict, list]:
    """Generate every prompt with speculation; returns (measured numbers, sequences as
    :func:`measure_generation` returns them)."""
    k = config.num_speculative_tokens
    llm = make_llm(
        target, config, seed=config.seed, disable_log_stats=False, per_request_spec_decode_metrics="detailed",
        speculative_config={"method": method, "model": str(config.drafter), "num_speculative_tokens": k},
    )
    try:
        return measure_generation(llm, records, token_ids, config.temperature, config.max_tokens, config.seed, k, progress=True)
    finally:
        llm.llm_engine.engine_core.shutdown()


def measure_generation(llm, records, token_ids, temperature: float, max_tokens: int, seed: int, k: int | None,
                       progress: bool = False) -> tuple[dict, list]:
    """Generate every prompt on a running engine (each request seeded from its record id);
    returns (measured numbers, [(sequence, prompt_len, accepted drafts per verification step)]).
    ``k``: the engine's speculative K, for the acceptance numbers (None: an engine without
    speculation; the step lists are None then)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=record_seed(seed, record_id(r))) for r in records]
    started = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in token_ids], params, use_tqdm=progress)
    seconds = time.perf_counter() - started
    output_tokens = sum(len(out.outputs[0].token_ids) for out in outputs)
    measured = {"requests": len(outputs), "output_tokens": output_tokens, "seconds": seconds,
                "output_tokens_per_s": output_tokens / seconds, "decode_tokens_per_s": decode_rate(outputs)}
    if k:
        drafted, accepted = acceptance_counts(outputs, k)
        steps = sum(len(out.outputs[0].spec_decode_metrics.per_step_drafted) for out in outputs if out.outputs[0].spec_decode_metrics)
        measured.update({
            "tau": 1 + sum(accepted) / steps if steps else math.nan,
            "per_position_acceptance": [a / d if d else math.nan for a, d in zip(accepted, drafted)],
            "drafted_per_position": drafted,
            "accepted_per_position": accepted,
            "verification_steps": steps,
            "accepted_tokens": sum(accepted),
            "draft_tokens": sum(drafted),
        })
    sequences = [(list(out.prompt_token_ids) + list(out.outputs[0].token_ids), len(out.prompt_token_ids),
                  list(out.outputs[0].spec_decode_metrics.per_step_accepted) if k and out.outputs[0].spec_decode_metrics else None)
                 for out in outputs]
    return measured, sequences


# ----------------------------------------------------------------------------------------------
# offline


def pad_batch(sequences: list[tuple], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids [B, T] and the loss mask [B, T] of rows whose next token was
    generated, built exactly as training builds its batches (training.data.collate)."""
    from training.data import Example, collate

    examples = [Example(line=0, token_ids=tuple(seq), response_start=prompt_len) for seq, prompt_len, *_ in sequences]
    return collate(examples, seq_len=max(len(seq) for seq, *_ in sequences), pad_id=pad_id)


def head_alpha(
    draft_logits,  # [N, Vd], or HeadRows (the head's input rows + the head)
    target_logits,  # [N, V], or HeadRows (hidden rows + lm_head)
    temperature: float,
    draft_ids: torch.Tensor | None,  # [Vd] target id of each draft id, or None (full vocabulary)
) -> torch.Tensor:  # [N] per-row acceptance probability
    """alpha per row: sum min(p, q) at T > 0 (the exact acceptance probability of one sampled
    draft), greedy agreement at T = 0 (a greedy draft is accepted iff it is the target's argmax)."""
    from training.drafters.base import HeadRows, as_logits
    from training.losses import draft_loss

    if temperature == 0:
        draft_top = as_logits(draft_logits).argmax(-1)
        if draft_ids is not None:
            draft_top = draft_ids[draft_top]
        return (draft_top == as_logits(target_logits).argmax(-1)).float()
    draft, target = (side if isinstance(side, HeadRows) else side.float() for side in (draft_logits, target_logits))  # HeadRows: chunked
    _, alpha, _ = draft_loss(draft, target, "tv", temperature=temperature, draft_ids=draft_ids)
    return alpha


@torch.no_grad()
def offline_alphas(config: EvalConfig, target: Path, sequences, k: int | None = None) -> tuple[list[float], list[int], dict | None]:
    """(mean alpha, rows) per drafter head over ``sequences`` [(token ids, prompt length, accepted
    per step or None)], and with ``k`` and step records the prediction at the served steps
    (:func:`predict_at_steps`; None otherwise)."""
    from training.drafters import load_drafter
    from training.target import load_target, run_target

    model, tokenizer = load_target(target)
    drafter = load_drafter(config.drafter, model).eval()
    draft_ids = drafter.draft_ids
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums: list[float] = []
    counts: list[int] = []
    step_sums = torch.zeros(k or 0, dtype=torch.float64)
    steps_used = 0
    ordered = sorted(sequences, key=lambda s: len(s[0]))  # similar lengths per batch: less padding
    for start in range(0, len(ordered), config.offline_batch_size):
        batch = ordered[start : start + config.offline_batch_size]
        input_ids, loss_mask = pad_batch(batch, pad_id)
        outputs = run_target(model, input_ids, loss_mask, hidden_layers=tuple(drafter.hidden_layers))
        per_head = []  # [B, T] alpha of head j at each context end t (nan where not trained)
        for head, (draft_logits, target_logits) in enumerate(drafter(outputs)):
            alpha = head_alpha(draft_logits, target_logits, config.temperature, draft_ids)
            if head == len(sums):
                sums.append(0.0)
                counts.append(0)
            sums[head] += float(alpha.sum())
            counts[head] += alpha.numel()
            per_head.append(alpha_grid(alpha.double(), loss_mask, head))
        if k and all(steps is not None for *_, steps in batch):
            position_sums, used = predict_at_steps(per_head, [(prompt_len, steps) for _, prompt_len, steps in batch], k)
            step_sums += position_sums
            steps_used += used
    at_steps = None
    if k and steps_used:
        per_position = (step_sums / steps_used).tolist()
        at_steps = {"tau": 1 + sum(per_position), "per_position_acceptance": per_position, "steps": steps_used, "assumption": AT_STEPS}
    return [s / c if c else math.nan for s, c in zip(sums, counts)], counts, at_steps


def alpha_grid(alpha: torch.Tensor, loss_mask: torch.Tensor, offset: int) -> torch.Tensor:  # [B, T]
    """Scatter a head's flat per-row alpha (training.drafters.base.select_rows order: draft row t
    paired with target row t + offset where the mask trains it) back to [B, T], nan elsewhere."""
    grid = torch.full(loss_mask.shape, math.nan, dtype=alpha.dtype)
    length = loss_mask.shape[1]
    if offset < length:
        view = grid[:, : length - offset]
        view[loss_mask[:, offset:]] = alpha
    return grid


def predict_at_steps(per_head: list[torch.Tensor], requests: list[tuple[int, list[int]]], k: int) -> tuple[torch.Tensor, int]:
    """Sum over the verification steps vLLM actually ran of the predicted acceptance at draft
    positions 1..k, and how many steps were used.

    Request b's first step verifies drafts after its first generated token (index prompt_len, from
    the prefill); a step that accepted j drafts moves the next step's context end by j + 1. At a
    step whose context ends at t, draft position i is accepted with prod_{j<=i} alpha_j(t), where
    alpha_j(t) is head j's acceptance at context end t (an independent draft model, one head,
    uses its alpha at t + j - 1). Steps whose positions run past the generated tokens are skipped.
    """
    sums, used = torch.zeros(k, dtype=torch.float64), 0
    one_head = len(per_head) == 1
    if not one_head and len(per_head) < k:
        return sums, used  # fewer heads than drafts: predict() says so
    grid = per_head[0] if one_head else torch.stack(per_head[:k], dim=-1)  # [B, T] or [B, T, k]
    length = grid.shape[1]
    for b, (prompt_len, accepted_per_step) in enumerate(requests):
        t = prompt_len
        for accepted in accepted_per_step:
            if one_head:
                alphas = grid[b, t : t + k] if t + k <= length else None
            else:
                alphas = grid[b, t] if t < length else None
            if alphas is not None and not bool(alphas.isnan().any()):
                sums += alphas.cumprod(0)
                used += 1
            t += accepted + 1
    return sums, used


def predict(alphas: list[float], k: int) -> dict:
    """Per-position acceptance prod_{j<=k} alpha_j and tau = 1 + their sum (module docstring)."""
    from vllm_lk.checkpoint import predicted_acceptance

    per_position = predicted_acceptance(alphas, k)
    if per_position is None:
        raise InvalidInput(f"the drafter has {len(alphas)} heads, fewer than num_speculative_tokens={k}")
    alphas = alphas * k if len(alphas) == 1 else alphas  # an independent draft model: one head, drafted k times
    return {"alpha_per_position": alphas[:k], "per_position_acceptance": per_position, "tau": 1 + sum(per_position)}


# ----------------------------------------------------------------------------------------------
# the whole evaluation


def evaluate_pair(config: EvalConfig) -> dict:
    """Serve the pair, then predict the same numbers offline on the generated sequences.

    Everything that can fail fast (drafter kind, prompts, prompt lengths) is checked before the
    engine starts. Returns a JSON-ready dict: "served", "offline", the resolved config.
    """
    if config.drafter is None:
        raise InvalidInput("--drafter is required (an exported drafter directory or Hugging Face id)")
    target = resolve_target(config.target)
    drafter = resolve_model_path(config.drafter, kind="drafter").resolve()
    config = config.model_copy(update={"target": target, "drafter": drafter})
    method, kind = vllm_method(config)
    records, token_ids = prepare_prompts(config.prompts, target, config, config.max_tokens)

    measured, sequences = serve(config, target, method, records, token_ids)
    started = time.perf_counter()
    alphas, rows, at_steps = offline_alphas(config, target, sequences, config.num_speculative_tokens)
    prediction = predict(alphas, config.num_speculative_tokens)
    prediction.update(alpha_per_head=alphas, rows_per_head=rows, seconds=time.perf_counter() - started, assumption=INDEPENDENCE,
                      at_served_steps=at_steps)
    return {
        "target": str(target),
        "drafter": str(config.drafter),
        "drafter_kind": kind,
        "method": method,
        "num_speculative_tokens": config.num_speculative_tokens,
        "temperature": config.temperature,
        "served": measured,
        "offline": prediction,
        "config": config.model_dump(mode="json"),
    }


def summary_line(result: dict) -> str:
    served, offline = result["served"], result["offline"]

    def fmt(values):
        return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"

    rate = served["decode_tokens_per_s"] or served["output_tokens_per_s"]
    return (
        f"{result['method']} K={result['num_speculative_tokens']} T={result['temperature']:g} on "
        f"{served['requests']} prompts: tau served {served['tau']:.3f} vs predicted {offline['tau']:.3f}; "
        f"acceptance per position served {fmt(served['per_position_acceptance'])} vs predicted "
        f"{fmt(offline['per_position_acceptance'])}; {served['verification_steps']} steps, {rate:.1f} decode tok/s"
    )


def save_result(result: dict, path: str | Path) -> None:
    """Write the JSON atomically (a temporary sibling renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
    os.replace(tmp, path)
