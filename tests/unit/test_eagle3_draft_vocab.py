"""EAGLE-3 with a truncated draft vocabulary (vllm_lk.patch): the logits scattered into the target
vocabulary through an index computed once, against the definition (exact equality: the same float
operations, only where the index comes from differs)."""

from types import SimpleNamespace

import torch

from vllm_lk.patch import lk_eagle3_compute_logits


def test_eagle3_logits_scatter_into_the_target_vocabulary_and_follow_d2t():
    gen = torch.Generator().manual_seed(1)
    lm_head = torch.randn(5, 8, generator=gen)  # [V_draft, H]
    d2t = torch.tensor([0, 1, 3, 3, 6])  # draft ids 0..4 -> target ids 0, 2, 5, 6, 10
    model = SimpleNamespace(lm_head=lm_head, draft_id_to_target_id=d2t, config=SimpleNamespace(vocab_size=12),
                            logits_processor=lambda head, hidden: hidden @ head.t())
    hidden = torch.randn(3, 8, generator=gen)  # [B, H]

    def expected(target_ids):
        out = torch.full((3, 12), float("-inf"))
        out[:, target_ids] = hidden @ lm_head.t()
        return out

    assert torch.equal(lk_eagle3_compute_logits(model, hidden), expected([0, 2, 5, 6, 10]))
    assert torch.equal(lk_eagle3_compute_logits(model, hidden), expected([0, 2, 5, 6, 10]))  # from the cache
    d2t.copy_(torch.tensor([1, 1, 1, 2, 2]))  # an in-place weight load: the cached index must follow
    assert torch.equal(lk_eagle3_compute_logits(model, hidden), expected([1, 2, 3, 5, 6]))
    model.draft_id_to_target_id = None  # full draft vocabulary: the logits as they are
    assert torch.equal(lk_eagle3_compute_logits(model, hidden), hidden @ lm_head.t())

