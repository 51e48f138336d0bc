"""training.formats: every layout `--init-from` reads, built here as its own tool writes it
(tests/heads.py: that tool's tensor names and config fields, random weights from a seed, no
downloads), is detected, loads into a drafter holding exactly the checkpoint's weights, trains,
exports (EAGLE-3 in both export formats) and loads back to the trained weights. A checkpoint made
for another target is refused before any weight is copied, naming the tensor and both shapes;
layouts nothing here computes are refused by name."""

from __future__ import annotations

import inspect
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from tests.heads import write_eagle, write_eagle3, write_eagle3_public, write_medusa, write_medusa_original, write_mlp_speculator
from tests.unit.drafter_data import target_model, train  # noqa: F401
from training.formats import detect, load_checkpoint, write
from training.formats.files import read_tensors
from training.target import run_target
from vllm_lk.errors import InvalidInput, UserError

DRAFT_IDS = list(range(5, 300))  # a truncated draft vocabulary: 295 of the tiny target's 512 tokens


def _draft_model(target_dir, out):
    """A small Llama on the target's vocabulary, as transformers saves it (draft-model layout)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=32, max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(str(out))
    return out


# name -> (writer(target_dir, out), detected layout, drafter kind)
LAYOUTS = {
    "eagle3-ours": (lambda t, o: write_eagle3(t, o, DRAFT_IDS, [1, 3, 4]), "eagle3-original", "eagle3"),
    "eagle3-specforge": (lambda t, o: write_eagle3_public(t, o, "specforge", DRAFT_IDS), "eagle3-original", "eagle3"),
    "eagle3-specforge-full-vocab": (lambda t, o: write_eagle3_public(t, o, "specforge"), "eagle3-original", "eagle3"),
    "eagle3-eagle-authors": (lambda t, o: write_eagle3_public(t, o, "eagle", DRAFT_IDS), "eagle3-original", "eagle3"),
    "eagle3-speculators": (lambda t, o: write_eagle3_public(t, o, "speculators", DRAFT_IDS, [1, 3, 4]), "eagle3-speculators", "eagle3"),
    "medusa-vllm": (lambda t, o: write_medusa(t, o, num_heads=3), "medusa-vllm", "medusa"),
    "medusa-original": (lambda t, o: write_medusa_original(t, o, num_heads=3, num_layers=2), "medusa-original", "medusa"),
    "mlp-fms": (lambda t, o: write_mlp_speculator(t, o, n_predict=3), "mlp-fms", "mlp"),
    "mlp-fms-tied-unprefixed": (lambda t, o: write_mlp_speculator(t, o, n_predict=3, tie_weights=True, prefix=""), "mlp-fms", "mlp"),
    "draft-model": (_draft_model, "draft-model", "draft-model"),
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def checkpoint(request, tiny_target, tmp_path_factory):
    """(name, directory) of one public layout written for the tiny target."""
    writer, _, _ = LAYOUTS[request.param]
    return request.param, writer(tiny_target, tmp_path_factory.mktemp("public") / request.param)


def public_to_ours(name: str, path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the drafter's state_dict names: each layout's public names
    mapped by hand (the documented correspondence, restated here rather than imported)."""
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in read_tensors(path).items()}
    if name.startswith("eagle3"):
        tensors.pop("t2d", None)  # implied by d2t
        tensors.pop("embed_tokens.weight", None)  # the target's own: shared, not a parameter
        d2t = tensors.pop("d2t", None)
        if d2t is not None and d2t.any():  # identity maps (SpecForge, untruncated) mean the full vocabulary
            tensors["draft_vocab"] = torch.arange(d2t.shape[0]) + d2t
        return {re.sub(r"^layers\.0\.", "midlayer.", k): v for k, v in tensors.items()}
    if name == "medusa-original":  # {i}.{j}.linear.* = ResBlock j of head i; {i}.{L}.weight = head i's Linear
        renamed = {re.sub(r"^(\d+)\.(\d+)\.linear\.", r"blocks.\1.layers.\2.", k): v for k, v in tensors.items()}
        return {re.sub(r"^(\d+)\.2\.weight$", r"lm_heads.\1.weight", k): v for k, v in renamed.items()}
    if name.startswith("mlp"):
        return {"speculator." + k.removeprefix("speculator."): v for k, v in tensors.items()}
    if name == "draft-model":
        return {"model." + k: v for k, v in tensors.items()}
    return tensors


def tokens(target_model, batch: int = 4, length: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, T] ids of real Python source, [B, T] mask training all rows but the first 4)."""
    model, tokenizer = target_model
    ids = tokenizer(inspect.getsource(json.encoder)[:3000], add_special_tokens=False)["input_ids"]
    windows = torch.tensor([ids[i * length : (i + 1) * length] for i in range(batch)])
    mask = torch.ones_like(windows, dtype=torch.bool)
    mask[:, :4] = False
    return windows, mask


def test_the_layout_is_detected(checkpoint):
    name, path = checkpoint
    _, layout, kind = LAYOUTS[name]
    found = detect(path)
    assert (found.layout, found.kind) == (layout, kind)


def test_the_drafter_holds_exactly_the_checkpoints_weights(checkpoint, target_model):
    name, path = checkpoint
    model, _ = target_model
    drafter = load_checkpoint(path, model)
    state = drafter.state_dict()
    for key, tensor in public_to_ours(name, path).items():
        assert torch.equal(state[key], tensor), key
    if name.startswith("eagle3"):  # its embeddings are the target's tensor, frozen
        assert drafter.embed_weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
        assert drafter.g.aux_layers == ((1, 3, 4) if name in ("eagle3-ours", "eagle3-speculators") else (1, 3, 5))


def test_load_train_export_load_gives_the_trained_weights(checkpoint, target_model, tmp_path):
    """A few optimizer steps change the weights; every export format of the kind writes them,
    and reading the export back (the path `vllm-lk eval` and a second --init-from take) gives
    them unchanged, with the same forward."""
    name, path = checkpoint
    model, _ = target_model
    drafter = load_checkpoint(path, model).train()
    before = {k: v.clone() for k, v in drafter.state_dict().items()}
    ids, mask = tokens(target_model)
    batch = run_target(model, ids, mask, drafter.hidden_layers)
    train(drafter, batch, steps=3, lr=1e-2)
    assert any(not torch.equal(before[k], v) for k, v in drafter.state_dict().items())
    for export_format in ("original", "speculators") if name.startswith("eagle3") else ("original",):
        write(drafter, tmp_path / export_format, export_format, model.config.name_or_path)
        again = load_checkpoint(tmp_path / export_format, model)
        assert detect(tmp_path / export_format).kind == LAYOUTS[name][2]
        ours, theirs = drafter.state_dict(), again.state_dict()
        assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours), export_format
        with torch.no_grad():
            drafter.eval(), again.eval()
            assert torch.equal(_logits(drafter, batch), _logits(again, batch)), export_format
        drafter.train()


def _logits(drafter, batch) -> torch.Tensor:
    """Every head's draft logits on ``batch``, concatenated (materialising HeadRows if need be)."""
    from training.drafters.base import as_logits

    return torch.cat([as_logits(draft) for draft, _ in drafter(batch)])


def test_the_speculators_export_has_speculators_names_and_fields(target_model, tiny_target, tmp_path):
    """The schema fields vLLM's SpeculatorsConfig and speculators' Eagle3SpeculatorConfig read;
    every variant flag written out (vLLM defaults norm_before_residual to true when missing)."""
    model, _ = target_model
    drafter = load_checkpoint(write_eagle3_public(tiny_target, tmp_path / "in", "specforge", DRAFT_IDS), model)
    write(drafter, tmp_path / "out", "speculators", tiny_target)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3" and config["architectures"] == ["Eagle3Speculator"]
    assert "model_type" not in config  # vLLM recognises the format by speculators_config when model_type is absent
    assert config["transformer_layer_config"]["model_type"] == "llama" and config["draft_vocab_size"] == len(DRAFT_IDS)
    assert {config[k] for k in ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output")} == {False}
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 3, 5] and config["target_hidden_size"] == 64
    spec = config["speculators_config"]
    assert spec["algorithm"] == "eagle3" and spec["default_proposal_method"] == spec["proposal_methods"][0]["proposal_type"]
    assert spec["proposal_methods"][0]["speculative_tokens"] == 3
    assert spec["verifier"] == {"name_or_path": str(tiny_target.resolve()), "architectures": ["LlamaForCausalLM"]}
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert not any(k.startswith("midlayer.") for k in tensors) and "layers.0.self_attn.q_proj.weight" in tensors
    assert {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"} <= set(tensors)
    # the target's embeddings, as speculators saves its heads (vLLM finds them equal and shares the target's)
    assert torch.equal(tensors["embed_tokens.weight"], model.get_input_embeddings().weight)


MISMATCHES = {  # a checkpoint for another target -> the first offending tensor and both shapes
    "eagle3 hidden size": (lambda t, o: write_eagle3_public(t, o, "specforge", sizes={"hidden_size": 128, "intermediate_size": 256}),
                           "fc.weight: checkpoint [128, 384], target needs [64, 192]"),
    "eagle3 vocabulary (truncated)": (lambda t, o: write_eagle3_public(t, o, "speculators", DRAFT_IDS, [1, 3, 4], sizes={"vocab_size": 1000}),
                                      "t2d: checkpoint [1000], target needs [512]"),
    "eagle3 vocabulary (full)": (lambda t, o: write_eagle3_public(t, o, "speculators", None, [1, 3, 4], sizes={"vocab_size": 1000}),
                                 "lm_head.weight: checkpoint [1000, 64], target needs [512, 64]"),
    "medusa hidden size": (lambda t, o: write_medusa_original(t, o, num_heads=3, hidden_size=128),
                           "blocks.0.layers.0.weight: checkpoint [128, 128], target needs [64, 64]"),
    "mlp vocabulary": (lambda t, o: write_mlp_speculator(t, o, n_predict=3, vocab_size=1000),
                       "emb.0.weight: checkpoint [1000, 64], target needs [512, 64]"),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_a_checkpoint_for_another_target_is_refused_naming_the_tensor_and_both_shapes(case, tiny_target, target_model, tmp_path):
    writer, message = MISMATCHES[case]
    with pytest.raises(InvalidInput, match=re.escape(message)):
        load_checkpoint(writer(tiny_target, tmp_path / "head"), target_model[0])


def test_a_draft_model_on_another_vocabulary_is_refused(target_model, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=600, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2, head_dim=32)
    LlamaForCausalLM(config).save_pretrained(str(tmp_path))
    with pytest.raises(InvalidInput, match=re.escape("embed_tokens.weight: checkpoint [600, 64], target needs [512, 64]")):
        load_checkpoint(tmp_path, target_model[0])


def test_other_embeddings_and_unserved_variants_are_refused(tiny_target, target_model, tmp_path):
    model, _ = target_model
    head = write_eagle3_public(tiny_target, tmp_path / "eagle", "eagle", DRAFT_IDS)
    tensors = torch.load(head / "pytorch_model.bin", weights_only=True)
    tensors["embed_tokens.weight"] = tensors["embed_tokens.weight"] + 1  # trained for another target's embeddings
    torch.save(tensors, head / "pytorch_model.bin")
    with pytest.raises(InvalidInput, match="differs from the target's input embeddings"):
        load_checkpoint(head, model)
    spec = write_eagle3_public(tiny_target, tmp_path / "spec", "speculators", DRAFT_IDS, [1, 3, 4])
    config = json.loads((spec / "config.json").read_text())
    for change, match in [({"norm_before_residual": True}, "norm_before_residual=True"),
                          ({"norm_before_residual": None}, "norm_before_residual"),  # missing: vLLM serves true
                          ({"fc_norm": True}, "fc_norm=True")]:
        edited = {k: v for k, v in {**config, **change}.items() if v is not None}
        (spec / "config.json").write_text(json.dumps(edited))
        with pytest.raises(InvalidInput, match=match):
            load_checkpoint(spec, model)


@pytest.mark.parametrize("case", ["eagle-1", "bert", "speculators-dflash", "no-config"])
def test_unknown_layouts_are_refused_by_name(case, tiny_target, tmp_path):
    if case == "eagle-1":
        path, match = write_eagle(tiny_target, tmp_path / "eagle1"), "EAGLE-1/2 head"
    elif case == "no-config":
        path, match = tmp_path, "no config.json"
    else:
        config = {"architectures": ["BertModel"]} if case == "bert" else {"speculators_model_type": "dflash"}
        (tmp_path / "config.json").write_text(json.dumps(config))
        path, match = tmp_path, "unknown checkpoint layout" if case == "bert" else "only 'eagle3' is read"
    with pytest.raises(UserError, match=match):
        detect(path)


def test_a_medusa_head_set_sharing_one_lm_head_starts_each_head_from_it(tiny_target, target_model, tmp_path):
    """vLLM's ``original_lm_head`` variant (one lm_head for every head, stored as lm_heads.0):
    each of our heads starts from a copy (and may then diverge in training)."""
    from safetensors.torch import save_file

    head = write_medusa(tiny_target, tmp_path, num_heads=3)
    tensors = {k: v for k, v in load_file(str(head / "model.safetensors")).items() if not k.startswith(("lm_heads.1", "lm_heads.2"))}
    save_file(tensors, str(head / "model.safetensors"))
    config = json.loads((head / "config.json").read_text())
    (head / "config.json").write_text(json.dumps(dict(config, original_lm_head=True)))
    drafter = load_checkpoint(head, target_model[0])
    assert all(torch.equal(h.weight, tensors["lm_heads.0.weight"]) for h in drafter.lm_heads)
