"""Randomly initialised draft heads in the checkpoint formats vLLM 0.32 loads, for tests where
any q will do (exactness must hold for every draft distribution). Trained heads come from
`training` (issue 4); these exist so the verification path of every drafter kind is exercised
before that. Weights are seeded; the heads start from the target's own lm_head so that q is a
plausible, imperfect guess of p."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from training.vocab import draft_maps


def _target(target_dir: Path) -> tuple[dict, dict]:
    config = json.loads((Path(target_dir) / "config.json").read_text())
    return config, load_file(str(Path(target_dir) / "model.safetensors"))


def _decoder_layer(prefix: str, config: dict, rand, attn_input: int) -> dict:
    """Random attention + MLP weights of one Llama decoder layer whose attention reads
    ``attn_input`` features (EAGLE-3's first layer reads [embed; hidden], twice the width)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    return {
        f"{prefix}.self_attn.q_proj.weight": rand(heads * head_dim, attn_input),
        f"{prefix}.self_attn.k_proj.weight": rand(kv_heads * head_dim, attn_input),
        f"{prefix}.self_attn.v_proj.weight": rand(kv_heads * head_dim, attn_input),
        f"{prefix}.self_attn.o_proj.weight": rand(hidden, heads * head_dim),
        f"{prefix}.mlp.gate_proj.weight": rand(inter, hidden),
        f"{prefix}.mlp.up_proj.weight": rand(inter, hidden),
        f"{prefix}.mlp.down_proj.weight": rand(hidden, inter),
        f"{prefix}.post_attention_layernorm.weight": torch.ones(hidden),
    }


def _seeded_normal(seed: int, scale: float = 0.02):
    gen = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=gen) * scale


def write_eagle3(target_dir: Path, out: Path, draft_vocab_ids: list[int], aux_layer_ids: list[int], seed: int = 0) -> Path:
    """An EAGLE-3 head (LlamaForCausalLMEagle3): one decoder layer over [embed; fc(aux states)],
    a truncated draft vocabulary ``draft_vocab_ids`` (sorted target ids) mapped by d2t offsets."""
    config, weights = _target(target_dir)
    rand = _seeded_normal(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    ids = torch.tensor(sorted(draft_vocab_ids), dtype=torch.long)
    d2t, t2d = draft_maps(ids, config["vocab_size"])
    tensors = {
        "fc.weight": rand(hidden, 3 * hidden),
        "midlayer.input_layernorm.weight": torch.ones(hidden),
        "midlayer.hidden_norm.weight": torch.ones(hidden),
        **_decoder_layer("midlayer", config, rand, attn_input=2 * hidden),
        "norm.weight": torch.ones(hidden),
        "lm_head.weight": weights["lm_head.weight"][ids].clone() * 3,
        "d2t": d2t,
        "t2d": t2d,
    }
    head_config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "num_hidden_layers": 1,
        "vocab_size": config["vocab_size"],
        "draft_vocab_size": len(ids),
        "max_position_embeddings": config["max_position_embeddings"],
        "rms_norm_eps": config["rms_norm_eps"],
        "rope_parameters": config.get("rope_parameters", {"rope_theta": 10000.0, "rope_type": "default"}),
        "tie_word_embeddings": False,
        "target_hidden_size": hidden,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": aux_layer_ids, "use_aux_hidden_state": True},
        "torch_dtype": "float32",
    }
    return _save(out, head_config, tensors)


def write_medusa(target_dir: Path, out: Path, num_heads: int, seed: int = 0) -> Path:
    """A MEDUSA head set (MedusaModel): ``num_heads`` residual blocks on the target's last hidden
    state, each with its own lm_head (initialised from the target's)."""
    config, weights = _target(target_dir)
    gen = torch.Generator().manual_seed(seed)
    hidden = config["hidden_size"]
    tensors = {}
    for i in range(num_heads):
        tensors[f"blocks.{i}.layers.0.weight"] = torch.randn(hidden, hidden, generator=gen) * 0.3
        tensors[f"lm_heads.{i}.weight"] = weights["lm_head.weight"].clone()
    head_config = {
        "architectures": ["MedusaModel"],
        "model_type": "medusa",
        "hidden_size": hidden,
        "vocab_size": config["vocab_size"],
        "num_heads": num_heads,
        "num_hidden_layers": 1,
        "truncated_vocab_size": config["vocab_size"],
        "torch_dtype": "float32",
    }
    return _save(out, head_config, tensors)


def _save(out: Path, config: dict, tensors: dict) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    return out


def write_mlp_speculator(
    target_dir: Path, out: Path, n_predict: int, tie_weights: bool = False, seed: int = 0, prefix: str = "speculator.",
    vocab_size: int | None = None,
) -> Path:
    """An MLP speculator (MLPSpeculatorPreTrainedModel, IBM fms-extras layout) with inner_dim =
    emb_dim = the target's hidden size; heads start from the target's lm_head. ``prefix=""``:
    the names of fms's own MLPSpeculator state dict; ``vocab_size``: a speculator for another
    vocabulary (random heads)."""
    config, weights = _target(target_dir)
    gen = torch.Generator().manual_seed(seed)
    hidden, vocab = config["hidden_size"], vocab_size or config["vocab_size"]
    stages = 1 if tie_weights else n_predict
    head = weights["lm_head.weight"] if vocab == config["vocab_size"] else torch.randn(vocab, hidden, generator=gen) * 0.02
    tensors = {}
    for i in range(stages):
        tensors[f"{prefix}emb.{i}.weight"] = torch.randn(vocab, hidden, generator=gen) * 0.5
        tensors[f"{prefix}ln.{i}.weight"] = torch.ones(hidden)
        tensors[f"{prefix}ln.{i}.bias"] = torch.zeros(hidden)
        tensors[f"{prefix}head.{i}.weight"] = head.clone()
    for i in range(2 if tie_weights else n_predict):
        tensors[f"{prefix}proj.{i}.weight"] = torch.randn(hidden, hidden, generator=gen) / hidden**0.5
    head_config = {
        "architectures": ["MLPSpeculatorPreTrainedModel"],
        "model_type": "mlp_speculator",
        "vocab_size": vocab,
        "emb_dim": hidden,
        "inner_dim": hidden,
        "n_predict": n_predict,
        "top_k_tokens_per_head": [1] * n_predict,
        "n_candidates": 1,
        "tie_weights": tie_weights,
        "scale_input": True,
        "torch_dtype": "float32",
    }
    return _save(out, head_config, tensors)


def write_eagle(target_dir: Path, out: Path, seed: int = 0) -> Path:
    """An EAGLE-1 head (vLLM's EagleLlamaForCausalLM): fc over [embed; target hidden state] and one
    decoder layer without input norm; embeddings and lm_head are shared with the target."""
    config, _ = _target(target_dir)
    rand = _seeded_normal(seed)
    hidden = config["hidden_size"]
    tensors = {
        "fc.weight": torch.cat([torch.zeros(hidden, hidden), torch.eye(hidden)], dim=1) + rand(hidden, 2 * hidden),
        **_decoder_layer("layers.0", config, rand, attn_input=hidden),
    }
    head_config = dict(config, num_hidden_layers=1, architectures=["LlamaForCausalLM"])
    return _save(out, head_config, tensors)



def write_gqa_target(target_dir: Path, out: Path, group: int = 2) -> Path:
    """The same function as the target, laid out with grouped-query attention: every query head
    is repeated ``group`` times (the copies read the original key/value head, which is kept) and
    o_proj's columns for the copies are divided by ``group``, so the attention output is unchanged
    exactly. With the tiny target's 2 heads: 4 query heads on 2 key/value heads, head i reading
    key/value head i // 2, the layout of Llama-3-style targets. Tokenizer files are copied."""
    import shutil

    config, weights = _target(target_dir)
    heads, head_dim = config["num_attention_heads"], config["head_dim"]
    assert config["num_key_value_heads"] == heads, "expects a full multi-head attention target"
    shutil.copytree(target_dir, out)
    for name, weight in list(weights.items()):
        if name.endswith("self_attn.q_proj.weight"):  # [heads * d, hidden] -> [group * heads * d, hidden]
            weights[name] = weight.reshape(heads, 1, head_dim, -1).expand(-1, group, -1, -1).reshape(group * heads * head_dim, -1).contiguous()
        elif name.endswith("self_attn.o_proj.weight"):  # [hidden, heads * d] -> [hidden, group * heads * d]
            columns = weight.reshape(-1, heads, 1, head_dim).expand(-1, -1, group, -1) / group
            weights[name] = columns.reshape(weight.shape[0], group * heads * head_dim).contiguous()
    save_file(weights, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(dict(config, num_attention_heads=group * heads), indent=2))
    return out


def write_rope_scaled_target(target_dir: Path, out: Path, rope_parameters: dict) -> Path:
    """A copy of a target whose config.json declares scaled rotary embeddings (Llama-3.1's
    "llama3", YaRN, ...): the same weights computing a different function, which transformers
    and vLLM both derive from ``rope_parameters`` alone."""
    import shutil

    config, _ = _target(target_dir)
    shutil.copytree(target_dir, out)
    (out / "config.json").write_text(json.dumps(dict(config, rope_parameters=rope_parameters), indent=2))
    return out


# ---- heads as other tools write them (public names and config fields, no code of ours) ----

EAGLE3_FLAVOURS = ("specforge", "eagle", "speculators")


def write_eagle3_public(
    target_dir: Path, out: Path, flavour: str, draft_vocab_ids: list[int] | None = None,
    aux_layer_ids: list[int] | None = None, seed: int = 0, sizes: dict | None = None,
) -> Path:
    """An EAGLE-3 head as another tool saves it, random weights from a seed:

    - "specforge": SpecForge's ``save_pretrained`` (its configs/llama3-70B-ealge3.json keys: flat
      Llama config, architectures LlamaForCausalLMEagle3, legacy rope_theta / rope_scaling,
      draft_vocab_size, no aux ids); bf16 model.safetensors with fc, midlayer.*, norm, lm_head,
      d2t, t2d (identity maps when untruncated) and no embed_tokens ("embed" is filtered out);
    - "eagle": the EAGLE authors' training output (eagle/traineagle3/config.json: architectures
      LlamaForCausalLM, draft_vocab_size), fp16 pytorch_model.bin that also holds the frozen
      copy of the target's embed_tokens.weight;
    - "speculators": vllm-project/speculators 0.9's Eagle3SpeculatorConfig (speculators_model_type,
      Eagle3Speculator, transformer_layer_config, speculators_config), bf16, layers.0.* names.

    ``sizes`` overrides the target's hidden_size / intermediate_size / vocab_size: a head made for
    another target (random lm_head)."""
    assert flavour in EAGLE3_FLAVOURS, flavour
    target, weights = _target(target_dir)
    config = dict(target, **(sizes or {}))
    rand = _seeded_normal(seed)
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    ids = torch.arange(vocab) if draft_vocab_ids is None else torch.tensor(sorted(draft_vocab_ids))
    lm_head = weights["lm_head.weight"] * 3 if not sizes else rand(vocab, hidden) * 50
    layer = "layers.0" if flavour == "speculators" else "midlayer"
    tensors = {
        "fc.weight": rand(hidden, 3 * hidden),
        f"{layer}.input_layernorm.weight": 1 + rand(hidden),
        f"{layer}.hidden_norm.weight": 1 + rand(hidden),
        **_decoder_layer(layer, config, rand, attn_input=2 * hidden),
        "norm.weight": 1 + rand(hidden),
        "lm_head.weight": lm_head[ids].clone(),
    }
    if flavour != "speculators" or draft_vocab_ids is not None:
        tensors["d2t"] = ids - torch.arange(len(ids))  # target id = draft id + d2t[draft id]
        tensors["t2d"] = torch.zeros(vocab, dtype=torch.bool).index_fill_(0, ids, True)
    if flavour == "eagle":
        tensors["embed_tokens.weight"] = weights["model.embed_tokens.weight"].clone()
    dtype = torch.float16 if flavour == "eagle" else torch.bfloat16
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    llama = {k: config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                                   "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "vocab_size")}
    theta = config["rope_parameters"]["rope_theta"]
    if flavour == "speculators":
        head_config = _speculators_eagle3_config(target_dir, llama, len(ids), aux_layer_ids)
    else:
        head_config = _flat_eagle3_config(flavour, llama, theta, len(ids))
    if flavour != "eagle":
        return _save(out, head_config, tensors)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(head_config, indent=2))
    torch.save(tensors, out / "pytorch_model.bin")
    return out


def _flat_eagle3_config(flavour: str, llama: dict, theta: float, draft_vocab: int) -> dict:
    """SpecForge's / the EAGLE authors' config.json: a transformers-4 LlamaConfig plus draft_vocab_size."""
    return {
        "architectures": ["LlamaForCausalLMEagle3" if flavour == "specforge" else "LlamaForCausalLM"],
        "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "initializer_range": 0.02, "model_type": "llama",
        **llama, "num_hidden_layers": 1, "rope_scaling": None, "rope_theta": theta, "tie_word_embeddings": False,
        "torch_dtype": "float16" if flavour == "eagle" else "bfloat16", "transformers_version": "4.28.1",
        "use_cache": True, "draft_vocab_size": draft_vocab,
    }


def _speculators_eagle3_config(target_dir: Path, llama: dict, draft_vocab: int, aux_layer_ids) -> dict:
    target, _ = _target(target_dir)
    return {
        "speculators_model_type": "eagle3",
        "architectures": ["Eagle3Speculator"],
        "transformer_layer_config": {"model_type": "llama", **llama, "num_hidden_layers": 1,
                                     "rope_parameters": target["rope_parameters"], "tie_word_embeddings": False},
        "draft_vocab_size": draft_vocab,
        "norm_before_residual": False,
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,
        "target_hidden_size": None,
        "eagle_aux_hidden_state_layer_ids": aux_layer_ids,
        "embed_requires_grad": False,
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3, "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": str(target_dir), "architectures": target["architectures"]},
        },
        "speculators_version": "0.9.0",
        "transformers_version": "5.19.0",
        "torch_dtype": "bfloat16",
    }


def write_medusa_original(target_dir: Path, out: Path, num_heads: int, num_layers: int = 1, seed: int = 0,
                          hidden_size: int | None = None) -> Path:
    """MEDUSA heads as the MEDUSA authors' train.py saves them: their MedusaConfig
    (medusa_num_heads, medusa_num_layers, base_model_name_or_path) and ``medusa_lm_head.pt`` =
    ``medusa_head.state_dict()``: ``{i}.{j}.linear.weight`` / ``.bias`` (ResBlock j of head i) and
    ``{i}.{L}.weight`` (head i's Linear(H, V)). ``hidden_size``: heads for another target."""
    config, weights = _target(target_dir)
    gen = torch.Generator().manual_seed(seed)
    hidden = hidden_size or config["hidden_size"]
    lm_head = weights["lm_head.weight"] if hidden_size is None else torch.randn(config["vocab_size"], hidden, generator=gen)
    state = {}
    for i in range(num_heads):
        for j in range(num_layers):
            state[f"{i}.{j}.linear.weight"] = torch.randn(hidden, hidden, generator=gen) * 0.3
            state[f"{i}.{j}.linear.bias"] = torch.randn(hidden, generator=gen) * 0.1
        state[f"{i}.{num_layers}.weight"] = lm_head.clone()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    head_config = {"medusa_num_heads": num_heads, "medusa_num_layers": num_layers,
                   "base_model_name_or_path": str(target_dir), "transformers_version": "4.33.3"}
    (out / "config.json").write_text(json.dumps(head_config, indent=2))
    torch.save(state, out / "medusa_lm_head.pt")
    return out
