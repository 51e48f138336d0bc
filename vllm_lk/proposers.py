"""Draft sampling shared by every drafter, and the proposers vLLM 0.32 lacks.

Every drafter samples its draft tokens with :func:`draft_sample`: q = softmax of the draft
logits after the request's temperature / top-k / top-p (the same transforms as the target), with
the request's generator when it has a seed, and that q goes to verification.
"""

from __future__ import annotations

import torch

from vllm_lk import sampling, speculation


def uniform_draws(
    generators: dict[int, torch.Generator],  # request row -> its generator (seeded requests)
    counts: list[int],  # [R] draws wanted per row
    k_max: int,
    device: torch.device,
) -> torch.Tensor:  # [R, k_max] float64 U[0, 1)
    """Acceptance draws: seeded rows from their own generator, the rest from the global one."""
    uniforms = torch.rand(len(counts), k_max, dtype=torch.float64, device=device)
    for row, gen in generators.items():
        if row < len(counts) and counts[row]:
            uniforms[row, : counts[row]] = torch.rand(counts[row], dtype=torch.float64, device=device, generator=gen)
    return uniforms


def batch_draws(
    generators: dict[int, torch.Generator],  # row -> its generator (seeded requests)
    rows: int,
    device: torch.device,
    needed: torch.Tensor | None = None,  # [rows] bool: the rows whose draw is used (None: all)
) -> torch.Tensor:  # [rows] float64 U[0, 1)
    """One uniform per row for an inverse-CDF draw (sampling.sample_from_uniform). A seeded row
    draws from its own generator, and only where its draw is used, so a seeded request's stream
    depends only on its own outcomes, not on its batch; reading ``needed`` is a host sync, made
    only when the batch has seeded requests."""
    uniforms = torch.rand(rows, dtype=torch.float64, device=device)
    if not generators:
        return uniforms
    used = range(rows) if needed is None else needed.nonzero()[:, 0].tolist()
    for row in used:
        gen = generators.get(row)
        if gen is not None:
            uniforms[row] = torch.rand(1, dtype=torch.float64, device=device, generator=gen)[0]
    return uniforms


def draft_sample(logits, sampling_metadata):
    """Draft tokens drawn from q = sampling_probs(draft logits), and q ([R, V] float32).

    ``logits`` has one row per request, or K rows per request (request-major) for parallel
    drafting. Greedy requests get the argmax (their q is never used by verification).
    """
    if sampling_metadata.all_greedy:
        return logits.argmax(dim=-1), None
    rows = logits.shape[0]
    factor = rows // sampling_metadata.temperature.shape[0]

    def expand(values):
        return values if values is None or factor == 1 else values.repeat_interleave(factor)

    temperature = expand(sampling_metadata.temperature)
    q = sampling.sampling_probs(logits, temperature, expand(sampling_metadata.top_k), expand(sampling_metadata.top_p))
    q = q.to(torch.float32)
    row_generators = {
        row: gen for req, gen in sampling_metadata.generators.items() for row in range(req * factor, (req + 1) * factor)
    }
    draft_ids = sampling.sample_from_uniform(q, batch_draws(row_generators, rows, q.device))
    # all_random: no greedy request in the batch (vLLM's flag), so no host sync to find one
    if not getattr(sampling_metadata, "all_random", False):
        greedy = temperature == 0
        if bool(greedy.any()):
            draft_ids = torch.where(greedy, logits.argmax(dim=-1), draft_ids)
    return draft_ids, q


def lk_medusa_propose(self, num_speculative_tokens, target_hidden_states, sampling_metadata, slot_mappings=None):
    """MEDUSA: head k's q is its own softmax (it sees the same hidden state as every head);
    stock vLLM drafts argmax and gives no q. Only the first ``num_speculative_tokens`` heads run
    (adaptive speculation may ask for fewer than the checkpoint has, or none)."""
    k = num_speculative_tokens
    assert 0 <= k <= self.num_speculative_tokens, (k, self.num_speculative_tokens)
    self._lk_last_draft_probs = None
    if k == 0:
        return torch.empty(target_hidden_states.shape[0], 0, dtype=torch.long, device=target_hidden_states.device)
    head_logits = self.model.compute_logits([block(target_hidden_states) for block in self.model.blocks[:k]])  # k x [B, V]
    drafts = [draft_sample(logits, sampling_metadata) for logits in head_logits]
    for logits, (ids, q) in zip(head_logits, drafts):  # one pass: the policy trims afterwards
        speculation.record_pass(self, logits, q, ids, decide=False)
    probs = [q for _, q in drafts]
    self._lk_last_draft_probs = None if any(q is None for q in probs) else torch.stack(probs, dim=1)  # [B, k, V]
    return torch.stack([ids for ids, _ in drafts], dim=1)


def take_last_draft_probs(self):
    return self.__dict__.get("_lk_last_draft_probs")


class LKMLPProposer:
    """Proposer for ``method="mlp_speculator"`` (vLLM 0.32 has none): K sequential stages of
    :class:`vllm_lk.heads.mlp_speculator.LKMLPSpeculator`, each sampling its token from q."""

    def __init__(self, vllm_config) -> None:
        self.vllm_config = vllm_config
        self.num_speculative_tokens = vllm_config.speculative_config.num_speculative_tokens
        self.model = None
        self._lk_last_draft_probs = None

    def load_model(self, target_model) -> None:
        from vllm.model_executor.model_loader import get_model

        self.model = get_model(
            vllm_config=self.vllm_config, model_config=self.vllm_config.speculative_config.draft_model_config
        )

    def propose(self, *args, **kwargs):
        raise RuntimeError("vllm_lk: MLP speculator drafts are proposed through propose_mlp (patched runner)")

    @torch.no_grad()
    def propose_mlp(
        self,
        hidden_states: torch.Tensor,  # [B, H] target's final hidden state at each request's last token
        last_token_ids: torch.Tensor,  # [B] that token
        sampling_metadata,
        num_speculative_tokens: int | None = None,  # this step's k (<= the stages; adaptive may stop sooner)
    ) -> torch.Tensor:  # [B, k] draft token ids
        k = self.num_speculative_tokens if num_speculative_tokens is None else num_speculative_tokens
        self._lk_last_draft_probs = None
        if k == 0:
            return torch.empty(hidden_states.shape[0], 0, dtype=torch.long, device=hidden_states.device)
        state = self.model.initial_state(hidden_states.to(self.model.proj[0].weight.dtype))
        tokens, ids, probs = last_token_ids, [], []
        for stage in range(k):
            state, logits = self.model.step(stage, state, tokens)
            tokens, q = draft_sample(logits.float(), sampling_metadata)
            ids.append(tokens)
            probs.append(q)
            if not speculation.record_pass(self, logits, q, tokens):
                break
        self._lk_last_draft_probs = None if any(q is None for q in probs) else torch.stack(probs, dim=1)
        return torch.stack(ids, dim=1)

    take_last_draft_probs = take_last_draft_probs
