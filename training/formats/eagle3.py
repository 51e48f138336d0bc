"""EAGLE-3 heads in the two layouts vLLM 0.32 serves: reading them for ``training.drafters.eagle3.load``
and writing an ``Eagle3Drafter`` in the speculators one (this module knows layouts, not drafter classes).

**Original** (``LlamaForCausalLMEagle3``: ours, SpecForge's, the EAGLE authors'): a flat HF Llama
config.json plus ``draft_vocab_size`` (and, in ours, ``eagle_config`` and ``ttt_steps``); tensors
``fc.weight``, ``midlayer.*``, ``norm.weight``, ``lm_head.weight``, ``d2t``/``t2d`` when the
vocabulary is truncated, and ``embed_tokens.weight`` in the EAGLE authors' releases (SpecForge
drops it: "embed" not in the saved names). The EAGLE authors' training config says
``LlamaForCausalLM``; detection also recognises it by the ``midlayer.`` tensors.

**Speculators** (vllm-project/speculators 0.9, ``Eagle3SpeculatorConfig``): ``speculators_model_type``
"eagle3", ``architectures`` ["Eagle3Speculator"], the decoder layer's HF config nested as
``transformer_layer_config``, the EAGLE-3 fields beside it (``draft_vocab_size``,
``norm_before_residual``, ``target_hidden_size``, ``eagle_aux_hidden_state_layer_ids``, ...) and
``speculators_config`` (algorithm, proposal_methods with ``speculative_tokens``,
default_proposal_method, verifier); tensors as above with ``layers.0.`` for ``midlayer.``, and
``embed_tokens.weight`` (speculators writes it; see :func:`speculators_tensors`).
vLLM reads it through ``SpeculatorsConfig`` (transformers_utils/configs/speculators/algos.py:
``update_eagle3``) and loads both prefixes (llama_eagle3.py maps ``midlayer.`` to ``layers.0.``).

Why ``original`` stays the default export format: vLLM 0.32 serves both identically (served
draft logits equal training's for either: tests/integration/test_drafter_eagle3_vllm.py), and
the original layout is also what SGLang, SpecForge and the EAGLE code load, carries no copy of
the embeddings, and is what every existing run wrote. ``speculators`` adds vllm-project/
speculators itself, and ``vllm serve EXPORT`` then finds the target from the recorded verifier.

Our head computes ``norm_before_residual`` false, no norm before fc, the pre-norm state fed back.
vLLM's speculators reader defaults ``norm_before_residual`` to *true* when the key is missing
(speculators itself defaults it to false and always writes it), so the export writes every such
flag explicitly, and a checkpoint that sets one (or, in the speculators layout, omits
norm_before_residual) is refused: training it here would not train the head vLLM serves.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from training.formats.detect import EAGLE3_SPECULATORS as SPECULATORS
from training.formats.detect import detect_kind
from training.formats.files import as_float32, check_shapes, read_tensors
from training.vocab import draft_maps
from vllm_lk.errors import InvalidInput

SPECULATORS_VERSION = "0.9.0"  # the speculators release whose config schema this writes
# flags of variants our head does not compute (value that our head computes)
VARIANT_FLAGS = {"norm_before_residual": False, "norm_before_fc": False, "fc_norm": False, "norm_output": False}
# the decoder layer's HF config: the keys of our flat config that transformer_layer_config holds
LAYER_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "tie_word_embeddings")
# sizes a config may leave out: then transformers' LlamaConfig defaults apply (as they do in vLLM)
SIZE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "max_position_embeddings", "rms_norm_eps")


def _with_size_defaults(flat: dict) -> dict:
    from transformers import LlamaConfig

    defaults = LlamaConfig().to_dict()
    return {**{k: defaults[k] for k in SIZE_KEYS if k not in flat}, **flat}


def flat_config(spec: dict, source: str) -> dict:
    """A speculators config as the original layout's flat config (what ``read`` consumes)."""
    layer = dict(spec.get("transformer_layer_config") or {})
    if layer.get("model_type", "llama") != "llama":
        raise InvalidInput(f"{source}: transformer_layer_config model_type {layer['model_type']!r}: only Llama decoder layers are read")
    spec = {"norm_before_residual": True, **spec}  # what vLLM serves when the key is missing
    methods = (spec.get("speculators_config") or {}).get("proposal_methods") or [{}]
    return {
        **layer, **{k: spec[k] for k in VARIANT_FLAGS if k in spec},
        "draft_vocab_size": spec.get("draft_vocab_size"), "target_hidden_size": spec.get("target_hidden_size"),
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": spec.get("eagle_aux_hidden_state_layer_ids")},
        "ttt_steps": methods[0].get("speculative_tokens"),
    }


def rope_parameters(rope: dict | None, legacy_theta: float | None = None) -> dict:
    """rope_parameters in transformers 5's form (rope_type and rope_theta always present), from
    either that form or the legacy ``rope_scaling`` + ``rope_theta`` (SpecForge, EAGLE)."""
    rope = dict(rope or {})
    rope.setdefault("rope_theta", legacy_theta or 10000.0)
    rope.setdefault("rope_type", rope.pop("type", "default"))
    rope["rope_theta"] = float(rope["rope_theta"])
    return rope


def geometry_fields(flat: dict, target_config, num_steps: int | None) -> dict:
    """``Eagle3Geometry``'s fields for the head: the target's hidden size and vocabulary (vLLM
    shares the target's embeddings and fuses its hidden states), everything else the checkpoint's;
    ``aux_layers`` as the checkpoint lists them (None: the drafter's default for the target)."""
    tc = target_config
    heads = int(flat["num_attention_heads"])
    aux = (flat.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids") or flat.get("eagle_aux_hidden_state_layer_ids")
    return dict(
        hidden_size=tc.hidden_size, intermediate_size=int(flat["intermediate_size"]), num_heads=heads,
        num_kv_heads=int(flat.get("num_key_value_heads") or heads),
        head_dim=int(flat.get("head_dim") or flat["hidden_size"] // heads), vocab_size=tc.vocab_size,
        rms_norm_eps=float(flat.get("rms_norm_eps", tc.rms_norm_eps)),
        rope=rope_parameters(flat.get("rope_parameters") or flat.get("rope_scaling"), flat.get("rope_theta")),
        max_position_embeddings=int(flat.get("max_position_embeddings") or tc.max_position_embeddings),
        aux_layers=aux or None, num_steps=int(num_steps or flat.get("ttt_steps") or 3),
    )


def _check_variant(flat: dict, source: str) -> None:
    """Refuse EAGLE-3 variants the drafter does not compute (see the module docstring)."""
    for flag, ours in VARIANT_FLAGS.items():
        if bool(flat.get(flag, ours)) != ours:
            raise InvalidInput(f"{source}: {flag}={flat.get(flag)} is an EAGLE-3 variant this trainer does not compute "
                               f"(it trains {flag}={str(ours).lower()})")
    if int(flat.get("num_hidden_layers", 1)) != 1:
        raise InvalidInput(f"{source}: num_hidden_layers={flat['num_hidden_layers']}: the EAGLE-3 drafter has one decoder layer")


def draft_vocab(flat: dict, tensors: dict, vocab: int, source: str) -> torch.Tensor | None:
    """[Vd] ascending target ids of the draft vocabulary (from d2t, checked against t2d), or None
    for the full vocabulary (also when d2t is the identity, as SpecForge writes it untruncated)."""
    d2t, t2d = tensors.pop("d2t", None), tensors.pop("t2d", None)
    own = flat.get("vocab_size", vocab)  # the checkpoint's vocabulary (the lm_head's shape check compares it)
    size = flat.get("draft_vocab_size") or own
    if d2t is None:
        if size != own:
            raise InvalidInput(f"{source}: draft_vocab_size {size} < vocab_size {own}, but there is no d2t tensor")
        return None
    ids = torch.arange(d2t.shape[0], dtype=torch.int64) + d2t.long()
    if d2t.shape[0] != size:
        raise InvalidInput(f"{source}: draft_vocab_size {size}, but d2t has {d2t.shape[0]} entries")
    if t2d is not None:
        check_shapes({"t2d": t2d}, {"t2d": torch.Size([vocab])}, source)
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise InvalidInput(f"{source} does not fit the target: d2t maps draft ids to target ids up to {int(ids.max())}, "
                           f"the target's vocabulary has {vocab} tokens")
    if not bool((ids[1:] > ids[:-1]).all()):
        raise InvalidInput(f"{source}: d2t must map draft ids to ascending, distinct target ids")
    if t2d is not None and not torch.equal(draft_maps(ids, vocab)[1], t2d.bool()):
        raise InvalidInput(f"{source}: t2d does not match d2t")
    return None if ids.shape[0] == vocab else ids


def drop_shared_embeddings(tensors: dict, target_embed: torch.Tensor, source: str) -> None:
    """An ``embed_tokens.weight`` equal to the target's (the EAGLE authors ship a frozen copy) is
    dropped: the drafter shares the target's, and vLLM does too when they are equal. Compared to
    1 % of the largest entry, so a bf16 copy of an fp32 target still matches."""
    embed = tensors.pop("embed_tokens.weight", None)
    if embed is None:
        return
    check_shapes({"embed_tokens.weight": embed}, {"embed_tokens.weight": target_embed.shape}, source)
    diff = float((embed.float() - target_embed.float()).abs().max())
    if diff > 0.01 * float(target_embed.abs().max()):
        raise InvalidInput(f"{source}: embed_tokens.weight differs from the target's input embeddings (max |diff| {diff:.3g}); "
                           "this trainer shares the target's embeddings, so the head was trained for another target")


def read(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], str]:
    """(flat config, fp32 tensors under the original layout's names, source for messages) of
    the EAGLE-3 checkpoint at ``path`` in either layout; variants the drafter does not compute
    are refused here, the fit to a target by the drafter module's ``load``."""
    checkpoint = detect_kind(path, "eagle3")
    source = checkpoint.source
    flat = checkpoint.config
    if checkpoint.layout == SPECULATORS:
        flat = flat_config(flat, source)
    flat = _with_size_defaults(flat)
    _check_variant(flat, source)
    tensors = read_tensors(checkpoint.path)
    if checkpoint.layout == SPECULATORS:
        tensors = {("midlayer." + k.removeprefix("layers.0.") if k.startswith("layers.0.") else k): v for k, v in tensors.items()}
    return flat, as_float32(tensors), source


def speculators_config(drafter, verifier: Path | None) -> dict:
    """config.json in speculators' Eagle3SpeculatorConfig schema for ``drafter`` (an
    ``Eagle3Drafter``); ``verifier`` is
    the target directory (vLLM serves ``vllm serve EXPORT`` as that target with this draft)."""
    flat, g = drafter.hf_config(), drafter.g
    layer = {"model_type": "llama", "num_hidden_layers": 1, **{k: flat[k] for k in LAYER_KEYS}, "torch_dtype": "float32"}
    architectures: list[str] = []
    if verifier is not None and (Path(verifier) / "config.json").is_file():
        architectures = json.loads((Path(verifier) / "config.json").read_text()).get("architectures") or []
    return {
        "speculators_model_type": "eagle3",
        "architectures": ["Eagle3Speculator"],
        "transformer_layer_config": layer,
        "draft_vocab_size": flat["draft_vocab_size"],
        **VARIANT_FLAGS,
        "target_hidden_size": g.hidden_size,
        "eagle_aux_hidden_state_layer_ids": list(g.aux_layers),
        "embed_requires_grad": False,
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": g.num_steps,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": None if verifier is None else str(Path(verifier).resolve()), "architectures": architectures},
        },
        "speculators_version": SPECULATORS_VERSION,
        "torch_dtype": "float32",
    }


def speculators_tensors(drafter) -> dict[str, torch.Tensor]:
    """The export's tensors under the speculators names (``layers.0.`` for ``midlayer.``), plus
    ``embed_tokens.weight``: the target's embeddings, in the dtype training used. speculators
    saves its own heads with it, and its loader needs it: with transformers 5 its from_pretrained
    leaves a missing embed_tokens uninitialised rather than NaN, so load_verifier_weights never
    fills it. vLLM finds it equal to the target's and shares the target's (llm_base_proposer.py
    ``_maybe_share_embeddings``); the original layout omits it, as SpecForge does."""
    tensors = {("layers.0." + k.removeprefix("midlayer.") if k.startswith("midlayer.") else k): v
               for k, v in drafter.export_tensors().items()}
    tensors["embed_tokens.weight"] = drafter.embed_weight.detach().cpu().contiguous().clone()  # [V, H]
    return tensors
