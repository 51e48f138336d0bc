"""EAGLE-3 with a truncated draft vocabulary (vllm_lk.patch): the logits scattered into the target
vocabulary through an index computed once, and greedy drafts taken in the draft vocabulary; both
against the definition (exact equality: the same float operations, only the indexing differs)."""

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


def test_eagle3_greedy_drafts_are_the_argmax_over_the_scattered_logits():
    """The greedy draft from the draft vocabulary (argmax, then d2t) equals the argmax over the
    logits scattered into the target vocabulary, ties included (d2t keeps the target order)."""
    from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM

    from vllm_lk.patch import _wrap_greedy_sample

    gen = torch.Generator().manual_seed(2)
    lm_head = torch.randn(6, 8, generator=gen)
    lm_head[4] = lm_head[1]  # draft ids 1 and 4 tie on every row
    d2t = torch.tensor([0, 2, 2, 4, 5, 5])  # -> target ids 0, 3, 4, 7, 9, 10
    model = Eagle3LlamaForCausalLM.__new__(Eagle3LlamaForCausalLM)  # no vLLM config needed: only these fields are read
    model.__dict__.update(lm_head=lm_head, draft_id_to_target_id=d2t, config=SimpleNamespace(vocab_size=11),
                          logits_processor=lambda head, hidden: hidden @ head.t())
    proposer = SimpleNamespace(model=model, use_local_argmax_reduction=False, use_heterogeneous_vocab=False)
    greedy = _wrap_greedy_sample(lambda self, hidden: lk_eagle3_compute_logits(self.model, hidden).argmax(dim=-1),
                                 Eagle3LlamaForCausalLM)
    hidden = torch.randn(64, 8, generator=gen)
    hidden[:8] = lm_head[1] * 5  # rows where the tied pair wins
    expected = lk_eagle3_compute_logits(model, hidden).argmax(dim=-1)
    assert torch.equal(greedy(proposer, hidden), expected)
    assert (expected[:8] == 3).all()  # the tie resolves to the lower target id, as the scattered argmax
