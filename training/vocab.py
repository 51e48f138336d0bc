"""Truncated draft vocabularies (EAGLE-3 and MEDUSA): the most frequent target tokens, and the
d2t/t2d maps vLLM reads for EAGLE-3 (MEDUSA's token_map is the draft ids themselves).

vLLM 0.32 (``Eagle3LlamaForCausalLM.compute_logits``) scatters draft logits into the target
vocabulary with ``target_id = draft_id + d2t[draft_id]``; ``t2d`` is a boolean mask over the target
vocabulary (True where a target token has a draft id). Draft ids are the selected target ids in
ascending order, so d2t is non-decreasing and every draft id maps to a distinct target id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from vllm_lk.errors import InvalidInput

SPECIAL_IDS = range(5)  # always in a truncated draft vocabulary (the toy tokenizer's specials)


def token_frequencies(sequences: Iterable[Sequence[int]], vocab_size: int) -> torch.Tensor:  # [V] int64
    """How often each target token id occurs in ``sequences``."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for ids in sequences:
        ids = torch.as_tensor(ids, dtype=torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"token id out of range [0, {vocab_size}) in a training sequence")
        counts += torch.bincount(ids, minlength=vocab_size)
    return counts


def select_draft_vocab(counts: torch.Tensor, draft_vocab_size: int, always: Sequence[int] = ()) -> torch.Tensor:
    """[Vd] ascending target ids: ``always`` (e.g. special tokens) plus the most frequent others;
    ties go to the lower id, so the choice is deterministic."""
    vocab = counts.shape[0]
    if not 0 < draft_vocab_size <= vocab:
        raise InvalidInput(f"draft_vocab_size {draft_vocab_size} must be in 1..{vocab}")
    always = sorted(set(int(i) for i in always))
    if len(always) > draft_vocab_size:
        raise InvalidInput(f"{len(always)} always-included tokens do not fit a draft vocabulary of {draft_vocab_size}")
    # sort by (-count, id): stable sort on ids already ascending
    order = torch.sort(-counts, stable=True).indices
    chosen = list(always)
    taken = set(always)
    for token in order.tolist():
        if len(chosen) == draft_vocab_size:
            break
        if token not in taken:
            chosen.append(token)
            taken.add(token)
    return torch.tensor(sorted(chosen), dtype=torch.int64)


def draft_vocab_for(draft_vocab_size: int | None, vocab_size: int, token_counts: torch.Tensor | None) -> torch.Tensor | None:
    """A drafter's draft vocabulary ([Vd] ascending target ids), or None when ``draft_vocab_size``
    leaves the full vocabulary: the special tokens plus the most frequent ones in ``token_counts``."""
    if draft_vocab_size is None or draft_vocab_size >= vocab_size:
        return None
    if token_counts is None:
        raise ValueError("a truncated draft vocabulary needs the training data's token counts")
    return select_draft_vocab(token_counts.cpu(), draft_vocab_size, always=[i for i in SPECIAL_IDS if i < vocab_size])


def draft_maps(draft_ids: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t [Vd] int64 offsets, t2d [V] bool) for ascending, distinct ``draft_ids``."""
    if draft_ids.dim() != 1 or not bool((draft_ids[1:] > draft_ids[:-1]).all()):
        raise ValueError("draft_ids must be strictly ascending target ids")
    d2t = draft_ids - torch.arange(draft_ids.shape[0], dtype=torch.int64)
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[draft_ids] = True
    return d2t, t2d
