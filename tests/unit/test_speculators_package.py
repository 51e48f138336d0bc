"""Our speculators-format EAGLE-3 export loads in vllm-project/speculators itself: its config class
validates the config.json we write, its Eagle3DraftModel takes every tensor under our names, and
it attaches the target (the recorded verifier) as it would for its own checkpoints.

speculators 0.9 requires torchvision and torchaudio, whose PyPI wheels break transformers' model
imports in this project's venv (DESIGN.md section 3), so it is not a dependency: this module is
skipped unless speculators imports. To run it, use a second venv that sees this one's packages
and has speculators installed without its dependencies (see docs/training.md, "Checkpoint formats").
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip(
    "speculators.models.eagle3",
    reason="vllm-project/speculators is not installed here (its torchvision/torchaudio requirements break transformers; "
    "see docs/training.md for the side venv this test runs in)",
)

from tests.heads import write_eagle3_public  # noqa: E402
from tests.unit.drafter_data import target_model  # noqa: E402,F401
from training.formats import load_checkpoint, write  # noqa: E402

DRAFT_IDS = list(range(5, 300))


@pytest.mark.parametrize("truncated", [True, False], ids=["truncated-vocab", "full-vocab"])
def test_speculators_loads_our_export_with_our_weights(truncated, tiny_target, target_model, tmp_path):
    from speculators import SpeculatorModel, SpeculatorModelConfig
    from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig

    model, _ = target_model
    source = write_eagle3_public(tiny_target, tmp_path / "in", "specforge", DRAFT_IDS if truncated else None)
    drafter = load_checkpoint(source, model)
    write(drafter, tmp_path / "out", "speculators", tiny_target)

    config = SpeculatorModelConfig.from_pretrained(str(tmp_path / "out"))
    assert isinstance(config, Eagle3SpeculatorConfig)
    assert config.draft_vocab_size == (len(DRAFT_IDS) if truncated else 512) and config.norm_before_residual is False
    assert config.eagle_aux_hidden_state_layer_ids == list(drafter.g.aux_layers)
    assert config.speculators_config.proposal_methods[0].speculative_tokens == drafter.g.num_steps
    assert config.transformer_layer_config.hidden_size == 64

    theirs = SpeculatorModel.from_pretrained(str(tmp_path / "out"))
    assert isinstance(theirs, Eagle3DraftModel)
    state = theirs.state_dict()
    for name, tensor in drafter.export_tensors().items():
        if name in ("d2t", "t2d"):
            assert torch.equal(state[name].long(), tensor.long()), name
            continue
        theirs_name = "layers.0." + name.removeprefix("midlayer.") if name.startswith("midlayer.") else name
        assert torch.equal(state[theirs_name].float(), tensor), name
    # the verifier's embeddings, attached by speculators from the recorded target directory
    assert torch.equal(state["embed_tokens.weight"].float(), model.get_input_embeddings().weight.float())
