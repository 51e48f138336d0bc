"""vllm_lk's replacements driven through vLLM's own ``RejectionSampler`` class, the way vLLM's unit
tests drive it (tests/v1/sample/test_rejection_sampler.py): the replaced functions must take every
input the functions they replace take — bonus ids shaped [B] (vLLM's tests) and [B, 1] (the
runner), empty drafts, requests without drafts beside requests with them.

The bonus-token sampler is a Mock returning fixed ids, as in vLLM's tests: the bonus token is
vLLM's own sampler's job (unpatched), and fixing it lets each case state its exact output.
"""

from __future__ import annotations

from unittest.mock import Mock

import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1.sample.logits_processor import LogitsProcessors  # noqa: E402
from vllm.v1.sample.metadata import SamplingMetadata  # noqa: E402
from vllm.v1.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID, RejectionSampler  # noqa: E402
from vllm.v1.sample.sampler import Sampler, SamplerOutput  # noqa: E402
from vllm.v1.spec_decode.metadata import SpecDecodeMetadata  # noqa: E402

from vllm_lk import patch  # noqa: E402

VOCAB = 100
P = PLACEHOLDER_TOKEN_ID


@pytest.fixture(scope="module", autouse=True)
def patched():
    assert patch.apply()


def sampler_with_bonus(bonus: torch.Tensor) -> RejectionSampler:
    mock = Mock(spec=Sampler)
    mock.logprobs_mode = "raw_logprobs"
    mock.return_value = SamplerOutput(sampled_token_ids=bonus, logprobs_tensors=None)
    return RejectionSampler(mock)


def metadata_for(drafts: list[list[int]], num_rows: int) -> SpecDecodeMetadata:
    meta = SpecDecodeMetadata.make_dummy(drafts, device=torch.device("cpu"))
    meta.target_logits_indices = torch.arange(num_rows)
    meta.bonus_logits_indices = torch.empty(0, dtype=torch.int32)  # the bonus comes from the mock
    return meta


def sampling(greedy: bool, batch: int, generators=None, top_k=None) -> SamplingMetadata:
    return SamplingMetadata(
        temperature=None if greedy else torch.ones(batch), all_greedy=greedy, all_random=not greedy,
        top_p=None, top_k=top_k, generators=generators or {}, max_num_logprobs=None, no_penalties=True,
        prompt_token_ids=None, frequency_penalties=torch.tensor([]), presence_penalties=torch.tensor([]),
        repetition_penalties=torch.tensor([]), output_token_ids=[[] for _ in range(batch)], spec_token_ids=[],
        allowed_token_ids_mask=None, bad_words_token_ids={}, logitsprocs=LogitsProcessors(),
    )


def argmax_logits(targets: list[list[int]]) -> torch.Tensor:
    """[N, V] logits whose argmax at each draft position is the given token."""
    rows = [t for request in targets for t in request]
    logits = torch.full((len(rows), VOCAB), -100.0)
    logits[torch.arange(len(rows)), torch.tensor(rows, dtype=torch.long)] = 100.0
    return logits


GREEDY_CASES = [  # (drafts, target argmax at each draft position, bonus, expected)
    ([[1, 2, 3]], [[1, 2, 3]], [4], [[1, 2, 3, 4]]),
    ([[1, 2, 3]], [[1, 5, 3]], [4], [[1, 5, P, P]]),
    ([[1, 2], [3]], [[1, 2], [3]], [5, 4], [[1, 2, 5], [3, 4, P]]),
    ([[1, 2, 3], [4, 5, 6]], [[1, 2, 7], [4, 8, 6]], [6, 9], [[1, 2, 7, P], [4, 8, P, P]]),
    ([[]], [[]], [5], [[5]]),
    ([[1, 2], []], [[1, 2], []], [7, 8], [[1, 2, 7], [8, P, P]]),
    ([[], [3]], [[], [9]], [7, 8], [[7, P], [9, P]]),
]


@pytest.mark.parametrize("bonus_shape", ["[B]", "[B, 1]"])
@pytest.mark.parametrize(("drafts", "targets", "bonus", "expected"), GREEDY_CASES)
def test_greedy_cases_like_vllms_tests(drafts, targets, bonus, expected, bonus_shape):
    bonus_ids = torch.tensor(bonus)
    if bonus_shape == "[B, 1]":
        bonus_ids = bonus_ids[:, None]
    logits = argmax_logits(targets)
    logits = logits if logits.numel() else torch.zeros(0, VOCAB)
    out = sampler_with_bonus(bonus_ids)(
        metadata_for(drafts, logits.shape[0]), draft_probs=None, logits=logits, sampling_metadata=sampling(True, len(drafts)))
    assert torch.equal(out.sampled_token_ids, torch.tensor(expected, dtype=torch.int32))


@pytest.mark.parametrize("bonus_shape", ["[B]", "[B, 1]"])
def test_seeded_requests_are_deterministic_and_outputs_well_formed(bonus_shape):
    """vLLM's ``test_deterministic_when_seeded`` shape, with q given and with one-hot q, and top-k."""
    batch, k = 4, 3
    gen = torch.Generator().manual_seed(0)
    q = torch.rand(batch * k, VOCAB, generator=gen).softmax(dim=-1)
    logits = torch.rand(batch * k, VOCAB, generator=gen)
    drafts = torch.randint(0, VOCAB, (batch, k), generator=gen)
    bonus = torch.randint(0, VOCAB, (batch, 1) if bonus_shape == "[B, 1]" else (batch,), generator=gen)
    for draft_probs, top_k in ((q, None), (None, None), (q, torch.full((batch,), 5))):
        runs = []
        for _ in range(3):
            generators = {i: torch.Generator().manual_seed(i) for i in (0, 2)}
            out = sampler_with_bonus(bonus)(metadata_for(drafts.tolist(), batch * k), draft_probs=draft_probs,
                                            logits=logits.clone(), sampling_metadata=sampling(False, batch, generators, top_k))
            runs.append(out.sampled_token_ids)
        for row in (0, 2):
            assert all(torch.equal(r[row], runs[0][row]) for r in runs)
        tokens = runs[0]
        assert tokens.shape == (batch, k + 1) and tokens.dtype == torch.int32
        for row in tokens.tolist():  # accepted prefix, one more token, then placeholders
            emitted = [t for t in row if t != P]
            assert emitted == row[: len(emitted)] and len(emitted) >= 1
            assert all(0 <= t < VOCAB for t in emitted)


def test_wrong_bonus_count_is_a_clear_error():
    with pytest.raises(ValueError, match="bonus token ids"):
        sampler_with_bonus(torch.tensor([1, 2, 3]))(
            metadata_for([[1], [2]], 2), draft_probs=None, logits=argmax_logits([[1], [2]]),
            sampling_metadata=sampling(True, 2))
