"""EAGLE-3 head (Li et al. 2025) exactly as vLLM 0.32 serves ``LlamaForCausalLMEagle3`` (method
"eagle3"), trained with training-time test (TTT) unrolled over K draft steps.

What vLLM computes when serving this head (read from the installed 0.32 sources):

- ``Eagle3LlamaForCausalLM.combine_hidden_states`` (models/llama_eagle3.py): g_t = fc(cat(a_t^l for
  the three aux ids l, ascending)), no norm before fc. Aux id l is ``hidden + residual`` after l
  target layers (``_maybe_add_hidden_state`` in models/interfaces.py), i.e. HF hidden_states[l];
  vLLM collects them in layer order whatever order the config lists, so the ids are kept sorted.
- First draft pass (``SpecDecodeBaseProposer.set_inputs_first_pass``, v1/spec_decode/
  llm_base_proposer.py): every row t the target just ran gets input id x_{t+1} (ids shifted by
  one; the last row gets the token just sampled), position t, hidden g_t, and writes its K/V.
- The one decoder layer (``LlamaDecoderLayer.forward``, layer_idx 0, norm_before_residual unset):
      residual = h;  a = attn(cat(input_layernorm(embed(x)), hidden_norm(h)))
      residual = residual + a;  out = residual + mlp(post_attention_layernorm(residual))
  then ``LlamaModel.forward``'s final fused norm returns (norm(out), out): logits come from
  lm_head(norm(out)); the *pre-norm* ``out`` is the hidden state fed to the next draft step.
- Steps k > 1 (``propose``'s loop): input = the previous draft token, position + 1
  (``eagle_step_update_slot_mapping_and_metadata``), hidden = the previous pre-norm output; the
  single query attends to the KV cache: first-pass keys at positions <= t and the keys the
  earlier steps of this proposal wrote at t+1 .. t+k-1 (later first passes overwrite those).
- ``compute_logits``: lm_head over the draft vocabulary, scattered to target id d + d2t[d].
- Embeddings: the checkpoint has no ``embed_tokens``, so ``_maybe_share_embeddings`` gives the
  draft the target's; here they are a frozen buffer referencing the target's, never exported.

Training (TTT): anchor row t, step k (1-based) reads the data token x_{t+k} (teacher forcing:
when drafts 1..k-1 were accepted they equal the data tokens) at position t+k-1 and predicts
x_{t+k+1}, verified against target row t+k: ``select_rows(logits_k, target, offset=k)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from training.drafters import VLLM_METHODS
from training.drafters.base import Drafter, HeadRows, TargetOutputs, select_rows
from training.formats.eagle3 import rope_parameters as _rope_parameters  # shared with the checkpoint readers
from training.vocab import draft_maps, draft_vocab_for
from vllm_lk.errors import InvalidInput

logger = logging.getLogger(__name__)

ARCHITECTURE = "LlamaForCausalLMEagle3"


@dataclass(frozen=True)
class Eagle3Geometry:
    """Sizes of the head; the target's where vLLM requires it (embeddings are shared)."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope: dict  # the target's rope_parameters (rope_type, rope_theta, scaling fields)
    max_position_embeddings: int
    aux_layers: tuple[int, int, int]
    num_steps: int  # K: TTT steps (trained), also the K to serve with


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """vLLM's default (2, L//2, L-3) when distinct, else three ids spread evenly over 1..L-1."""
    ids = (2, num_layers // 2, num_layers - 3)
    if len(set(ids)) == 3 and all(0 < i < num_layers for i in ids):
        return ids
    if num_layers < 4:
        raise InvalidInput(f"EAGLE-3 needs three distinct aux layers in 1..L-1; the target has L={num_layers}")
    return tuple(round(1 + i * (num_layers - 2) / 2) for i in range(3))  # type: ignore[return-value]


def check_aux_layers(ids, num_layers: int) -> tuple[int, int, int]:
    ids = tuple(sorted(int(i) for i in ids))
    if len(set(ids)) != 3 or not all(0 <= i < num_layers for i in ids):
        raise InvalidInput(f"aux_layers {ids} must be three distinct ids in 0..{num_layers - 1}")
    return ids  # type: ignore[return-value]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., H], fp32 statistics as vLLM
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


# rope types whose frequencies are fixed (vLLM precomputes one cos/sin table, as transformers
# does for these); "dynamic" and "longrope" change with the sequence length in transformers but
# not in vLLM, so a head trained on one would not be the head served.
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_frequencies(g: Eagle3Geometry) -> tuple[torch.Tensor, float]:
    """(inv_freq [d/2], cos/sin scale) of the target's rotary embedding, which the head shares:
    its exported config carries the same rope_parameters, so vLLM builds the same one. Scaled
    types come from transformers' own tables (what the target's HF forward uses)."""
    kind = g.rope.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise InvalidInput(f"rope_type {kind!r} is not supported by the EAGLE-3 drafter (supported: {', '.join(ROPE_TYPES)})")
    if g.rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise InvalidInput("partial rotary embeddings are not supported by the EAGLE-3 drafter")
    if kind == "default":
        d = g.head_dim
        return 1.0 / float(g.rope["rope_theta"]) ** (torch.arange(0, d, 2, dtype=torch.float32) / d), 1.0
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=g.hidden_size, num_attention_heads=g.num_heads, num_key_value_heads=g.num_kv_heads,
        head_dim=g.head_dim, max_position_embeddings=g.max_position_embeddings, rope_parameters=dict(g.rope),
    )
    inv_freq, scale = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    return inv_freq.to(torch.float32), float(scale)


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Neox-style rotary embedding (vLLM's ``get_rope``, HF's rotate_half); ``scale`` multiplies
    cos and sin (YaRN's attention factor). x [B, h, T, d], positions [T], inv_freq [d/2] -> [B, h, T, d]."""
    d = x.shape[-1]
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(x.device)  # [T, d/2]
    cos, sin = angles.cos().repeat(1, 2) * scale, angles.sin().repeat(1, 2) * scale  # [T, d]
    half = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], dim=-1)
    return (x.float() * cos + half.float() * sin).to(x.dtype)


class Attention(nn.Module):
    """Llama attention whose projections read the 2H-wide [embed; hidden] input."""

    def __init__(self, g: Eagle3Geometry) -> None:
        super().__init__()
        self.g = g
        h, d = g.hidden_size, g.head_dim
        self.q_proj = nn.Linear(2 * h, g.num_heads * d, bias=False)
        self.k_proj = nn.Linear(2 * h, g.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(2 * h, g.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(g.num_heads * d, h, bias=False)
        inv_freq, self.rope_scale = rope_frequencies(g)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [d/2], not exported

    def _heads(self, x: torch.Tensor, count: int) -> torch.Tensor:  # [B, T, count*d] -> [B, num_heads, T, d]
        b, t, _ = x.shape
        x = x.view(b, t, count, self.g.head_dim).transpose(1, 2)
        return x.repeat_interleave(self.g.num_heads // count, dim=1)  # GQA: head i reads kv head i // rep

    def forward(self, x: torch.Tensor, positions: torch.Tensor, past: tuple[torch.Tensor, ...]):
        """x [B, T, 2H] at ``positions`` [T], ``past`` = (k, v) of the earlier TTT steps, flat
        ([B, h, T, d] each) -> (out [B, T, H], this step's k, v)."""
        g = self.g
        q = rotate(self._heads(self.q_proj(x), g.num_heads), positions, self.inv_freq, self.rope_scale)  # [B, h, T, d]
        k = rotate(self._heads(self.k_proj(x), g.num_kv_heads), positions, self.inv_freq, self.rope_scale)  # [B, h, T, d]
        v = self._heads(self.v_proj(x), g.num_kv_heads)  # [B, h, T, d]
        cache = [(past[i], past[i + 1]) for i in range(0, len(past), 2)] + [(k, v)]
        out = ttt_attention(q, cache, g.head_dim**-0.5)  # [B, h, T, d]
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, g.num_heads * g.head_dim)), k, v


def ttt_mask(t: int, steps: int, device) -> torch.Tensor:  # [T, steps * T] bool, True = attend
    """Which keys the queries of TTT step ``steps`` read, with step j's keys laid out as columns
    [j*T, (j+1)*T): step 1's causally (key row <= query row), later steps' only on the diagonal
    (the query's own anchor), as vLLM's KV cache holds them while drafting."""
    rows = torch.arange(t, device=device)
    causal = rows[:, None] >= rows[None, :]  # [T, T]
    diagonal = rows[:, None] == rows[None, :]
    return torch.cat([causal, *[diagonal] * (steps - 1)], dim=1)


def ttt_attention(q: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]], scale: float) -> torch.Tensor:
    """Attention of step k = len(cache) as vLLM's KV cache holds it. q [B, h, T, d] (row = anchor t);
    cache[0] = step-1 keys/values [B, h, T, d] read causally (key row <= anchor row); cache[j]
    (j >= 1) = step j+1's, read only at the query's own anchor (the diagonal). -> [B, h, T, d].

    One fused scaled_dot_product_attention over every step's keys with the mask of
    :func:`ttt_mask`: no [B, h, T, T] score matrix is kept for backward on kernels that support a
    mask (memory-efficient / flash on CUDA). :func:`ttt_attention_eager` is the plain version it
    is tested against."""
    keys = torch.cat([k for k, _ in cache], dim=2) if len(cache) > 1 else cache[0][0]  # [B, h, kT, d]
    values = torch.cat([v for _, v in cache], dim=2) if len(cache) > 1 else cache[0][1]
    mask = ttt_mask(q.shape[2], len(cache), q.device)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)


def ttt_attention_eager(q: torch.Tensor, cache: list[tuple[torch.Tensor, torch.Tensor]], scale: float) -> torch.Tensor:
    """:func:`ttt_attention` written out: causal scores over step 1's keys, one diagonal score per
    later step, one softmax over all of them (fp32). Materialises [B, h, T, T]."""
    k1, v1 = cache[0]
    t = q.shape[2]
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()  # [T, T] query row >= key row
    scores = (q @ k1.transpose(-1, -2)) * scale  # [B, h, T, T]
    scores = scores.masked_fill(~causal, float("-inf"))
    diagonal = [(q * k).sum(-1, keepdim=True) * scale for k, _ in cache[1:]]  # (k-1) x [B, h, T, 1]
    probs = torch.cat([scores, *diagonal], dim=-1).float().softmax(-1).to(q.dtype)  # [B, h, T, T+k-1]
    out = probs[..., :t] @ v1  # [B, h, T, d]
    for j, (_, v) in enumerate(cache[1:]):
        out = out + probs[..., t + j, None] * v
    return out


class MLP(nn.Module):
    def __init__(self, g: Eagle3Geometry) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(g.hidden_size, g.intermediate_size, bias=False)
        self.up_proj = nn.Linear(g.hidden_size, g.intermediate_size, bias=False)
        self.down_proj = nn.Linear(g.intermediate_size, g.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., H]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MidLayer(nn.Module):
    """The head's one decoder layer (checkpoint prefix ``midlayer.``)."""

    def __init__(self, g: Eagle3Geometry) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(g.hidden_size, g.rms_norm_eps)
        self.hidden_norm = RMSNorm(g.hidden_size, g.rms_norm_eps)
        self.self_attn = Attention(g)
        self.post_attention_layernorm = RMSNorm(g.hidden_size, g.rms_norm_eps)
        self.mlp = MLP(g)

    def forward(self, embeds, hidden, positions, *past):
        """embeds, hidden [B, T, H], past = the earlier steps' (k, v) flat -> (the pre-norm
        output [B, T, H] (what vLLM feeds back), this step's k, v). A pure function of its
        inputs, so activation checkpointing can rerun it in backward. input_layernorm normalises
        the embeddings, hidden_norm the hidden half; the residual is the un-normed hidden state
        (vLLM's ``_norm_after_residual``)."""
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)  # [B, T, 2H]
        attended, k, v = self.self_attn(x, positions, past)
        residual = hidden + attended  # [B, T, H]
        return residual + self.mlp(self.post_attention_layernorm(residual)), k, v


class Eagle3Drafter(Drafter):
    kind = "eagle3"
    vllm_method = VLLM_METHODS["eagle3"]
    default_eta = 3.0

    def __init__(self, g: Eagle3Geometry, embed_weight: torch.Tensor, draft_vocab: torch.Tensor | None) -> None:
        super().__init__()
        self.g = g
        self.hidden_layers = g.aux_layers
        h = g.hidden_size
        self.fc = nn.Linear(3 * h, h, bias=False)
        self.midlayer = MidLayer(g)
        self.norm = RMSNorm(h, g.rms_norm_eps)
        vd = g.vocab_size if draft_vocab is None else draft_vocab.shape[0]
        self.lm_head = nn.Linear(h, vd, bias=False)
        # the target's token embeddings (its tensor, in its dtype): shared in serving, so a frozen
        # reference, not a parameter
        self.register_buffer("embed_weight", embed_weight.detach(), persistent=False)  # [V, H]
        self.register_buffer("draft_vocab", draft_vocab, persistent=True)  # [Vd] target ids, or None
        # constant on every rank: DDP need not broadcast a [V, H] buffer each step
        self._ddp_params_and_buffers_to_ignore = ("embed_weight",)

    @property
    def draft_ids(self) -> torch.Tensor | None:
        return self.draft_vocab

    def unroll_hidden(self, input_ids: torch.Tensor, aux: torch.Tensor) -> list[torch.Tensor]:
        """input_ids [B, T], aux [B, T, 3H] (aux states of row t, ascending layer ids) ->
        K x [B, T, H]: what lm_head reads at step k, anchor row t (norm of the step's output; its
        logits predict x_{t+k+1}). Rows whose input token x_{t+k} lies past the end read token 0;
        select_rows never trains them."""
        t = input_ids.shape[1]
        hidden = self.fc(aux)  # [B, T, H] step 1's hidden: g_t
        positions = torch.arange(t, device=input_ids.device)  # [T]
        past: tuple[torch.Tensor, ...] = ()  # (k_1, v_1, ..., k_{s-1}, v_{s-1}) of the earlier steps
        heads = []
        for step in range(1, self.g.num_steps + 1):
            tokens = F.pad(input_ids[:, step:], (0, min(step, t)))  # [B, T] x_{t+step} at row t
            # the target's rows in the drafter's dtype (bf16 -> fp32 is exact: an fp32 copy of a
            # bf16 table would hold the same values in 2 more GB at V = 128k, H = 4096)
            embeds = F.embedding(tokens, self.embed_weight).to(self.fc.weight.dtype)  # [B, T, H]
            # vLLM advances the position by one per draft step and feeds back the *pre-norm* state
            run = self.midlayer
            if self.activation_checkpointing and torch.is_grad_enabled():
                run = partial(checkpoint, self.midlayer, use_reentrant=False)
            hidden, k, v = run(embeds, hidden, positions + (step - 1), *past)  # [B, T, H] pre-norm
            past = (*past, k, v)
            heads.append(self.norm(hidden))
        return heads

    def unroll(self, input_ids: torch.Tensor, aux: torch.Tensor) -> list[torch.Tensor]:
        """K x [B, T, Vd]: step k's logits at anchor row t (see :meth:`unroll_hidden`)."""
        return [self.lm_head(h) for h in self.unroll_hidden(input_ids, aux)]

    def forward(self, target: TargetOutputs) -> list[tuple[HeadRows, torch.Tensor | HeadRows]]:
        """K pairs (step k's rows at anchor rows t, target rows t+k)."""
        aux = torch.cat([target.hidden_states[i] for i in self.g.aux_layers], dim=-1)  # [B, T, 3H]
        assert aux.shape[-1] == 3 * self.g.hidden_size, (aux.shape, self.g.hidden_size)
        steps = self.unroll_hidden(target.input_ids, aux)
        return [select_rows(h, target, offset=k, head=self.lm_head) for k, h in enumerate(steps, start=1)]

    def hf_config(self) -> dict:
        """config.json in tests/heads.py::write_eagle3's layout, plus ``ttt_steps`` (vLLM ignores it)."""
        g = self.g
        return {
            "architectures": [ARCHITECTURE],
            "model_type": "llama",
            "hidden_size": g.hidden_size,
            "intermediate_size": g.intermediate_size,
            "num_attention_heads": g.num_heads,
            "num_key_value_heads": g.num_kv_heads,
            "head_dim": g.head_dim,
            "hidden_act": "silu",
            "num_hidden_layers": 1,
            "vocab_size": g.vocab_size,
            "draft_vocab_size": self.lm_head.out_features,
            "max_position_embeddings": g.max_position_embeddings,
            "rms_norm_eps": g.rms_norm_eps,
            "rope_parameters": dict(g.rope),
            "tie_word_embeddings": False,
            "target_hidden_size": g.hidden_size,
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(g.aux_layers), "use_aux_hidden_state": True},
            "ttt_steps": g.num_steps,
            "torch_dtype": "float32",
        }

    def export_tensors(self) -> dict[str, torch.Tensor]:
        # parameter names are the checkpoint's (fc., midlayer., norm., lm_head.); no embed_tokens
        tensors = super().export_tensors()
        if self.draft_vocab is not None:  # full vocabulary: vLLM has no d2t parameter to load into
            tensors["d2t"], tensors["t2d"] = draft_maps(self.draft_vocab.cpu(), self.g.vocab_size)
        return tensors


def build(target_model, config, token_counts: torch.Tensor | None = None) -> Eagle3Drafter:
    """A fresh head for ``target_model``: linears N(0, initializer_range), lm_head = the target's
    rows of the draft vocabulary, final norm = the target's (the scale its lm_head expects)."""
    tc = target_model.config
    num_layers, vocab = tc.num_hidden_layers, tc.vocab_size
    aux = check_aux_layers(config.aux_layers, num_layers) if config.aux_layers else default_aux_layers(num_layers)
    draft_vocab = draft_vocab_for(config.draft_vocab_size, vocab, token_counts)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    rope = _rope_parameters(getattr(tc, "rope_parameters", None), getattr(tc, "rope_theta", None))
    g = Eagle3Geometry(
        hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size, num_heads=tc.num_attention_heads,
        num_kv_heads=getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads, head_dim=head_dim,
        vocab_size=vocab, rms_norm_eps=float(tc.rms_norm_eps), rope=rope,
        max_position_embeddings=tc.max_position_embeddings, aux_layers=aux, num_steps=config.num_heads,
    )
    drafter = Eagle3Drafter(g, target_model.get_input_embeddings().weight, draft_vocab)
    std = getattr(tc, "initializer_range", 0.02)
    lm_head = target_model.get_output_embeddings().weight.detach().float()  # [V, H]
    with torch.no_grad():
        for module in drafter.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
        drafter.lm_head.weight.copy_(lm_head if draft_vocab is None else lm_head[draft_vocab])
        final_norm = getattr(getattr(target_model, "model", None), "norm", None)
        if final_norm is not None:
            drafter.norm.weight.copy_(final_norm.weight.detach().float())
    logger.info("eagle3 drafter: aux layers %s, draft vocab %d of %d, %d TTT steps",
                aux, drafter.lm_head.out_features, vocab, g.num_steps)
    return drafter


def load(path: str | Path, target_model, num_steps: int | None = None) -> Eagle3Drafter:
    """The EAGLE-3 head at ``path``, ours or any layout ``training.formats.eagle3`` reads (SpecForge,
    the EAGLE authors, speculators), checked against ``target_model`` before a weight is copied:
    tensor shapes, vocabulary, aux layers. ``num_steps``: TTT steps (default: the checkpoint's)."""
    from training.formats import eagle3 as layout
    from training.formats.files import check_shapes, check_value

    flat, tensors, source = layout.read(path)
    fields = layout.geometry_fields(flat, target_model.config, num_steps)
    aux, layers = fields.pop("aux_layers"), target_model.config.num_hidden_layers
    g = Eagle3Geometry(**fields, aux_layers=check_aux_layers(aux, layers) if aux else default_aux_layers(layers))
    embed = target_model.get_input_embeddings().weight  # [V, H] the target's tensor (its dtype), shared
    draft_vocab = layout.draft_vocab(flat, tensors, g.vocab_size, source)
    layout.drop_shared_embeddings(tensors, embed, source)
    drafter = Eagle3Drafter(g, embed, draft_vocab)
    check_shapes(tensors, {name: p.shape for name, p in drafter.named_parameters()}, source)
    check_value("vocab_size", flat.get("vocab_size", g.vocab_size), g.vocab_size, source)  # after the tensors: they name shapes
    drafter.load_state_dict(tensors, strict=False)  # draft_vocab is the buffer set above
    logger.info("read EAGLE-3 head %s: aux layers %s, draft vocab %d, %d TTT steps", source, g.aux_layers,
                drafter.lm_head.out_features, g.num_steps)
    return drafter
