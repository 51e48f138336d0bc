import pytest
import torch

from training import vocab


def test_frequencies_and_selection_with_ties_and_specials():
    counts = vocab.token_frequencies([[5, 5, 5, 2, 2, 7], [7, 9]], vocab_size=10)
    assert counts.tolist() == [0, 0, 2, 0, 0, 3, 0, 2, 0, 1]
    # 5 (3 times), then 2 and 7 (twice: tie -> lower id first) ... plus special token 0
    assert vocab.select_draft_vocab(counts, 3, always=[0]).tolist() == [0, 2, 5]
    assert vocab.select_draft_vocab(counts, 4).tolist() == [2, 5, 7, 9]
    with pytest.raises(ValueError, match="out of range"):
        vocab.token_frequencies([[10]], vocab_size=10)
    with pytest.raises(ValueError, match="draft_vocab_size"):
        vocab.select_draft_vocab(counts, 11)


def test_maps_follow_vllms_eagle3_convention():
    ids = torch.tensor([0, 2, 5, 9])
    d2t, t2d = vocab.draft_maps(ids, vocab_size=10)
    # vLLM: target = arange(draft_vocab_size) + d2t
    assert torch.equal(torch.arange(4) + d2t, ids)
    assert t2d.nonzero()[:, 0].tolist() == [0, 2, 5, 9]
    with pytest.raises(ValueError, match="ascending"):
        vocab.draft_maps(torch.tensor([3, 1]), 10)
