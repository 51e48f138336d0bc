"""MLP speculator (IBM fms-extras; Wertheimer et al. 2024) trained for vllm_lk's serving path.

The math is not restated here: the drafter holds a ``vllm_lk.heads.mlp_speculator.MLPSpeculatorCore``,
the module that vLLM serves (``LKMLPSpeculator`` subclasses it), so training and serving run the
same ``initial_state`` / ``step`` code and load checkpoints with the same ``load_weights``.

What each stage consumes is what ``vllm_lk.proposers.LKMLPProposer.propose_mlp`` feeds it, given
by ``vllm_lk.patch._propose_mlp``: at a verification step with anchor row t (the row that produced
the last sampled token x_{t+1}),

    state_0 = initial_state(h_t)                  h_t = target's final normed hidden state, row t
    state_k, logits_k = step(k-1, state_{k-1}, token_k)
    token_1 = x_{t+1} (the last sampled token);   token_k = draft k-1, for k >= 2

and draft k is verified against target row t+k. Draft k-1 matters only if it was accepted, and
then it equals x_{t+k}, so training teacher-forces token_k = x_{t+k} from the data (the target's
own text) and pairs stage k with ``select_rows(..., offset=k)``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from training.drafters import VLLM_METHODS
from training.drafters.base import Drafter, HeadRows, TargetOutputs, select_rows
from vllm_lk.heads.mlp_speculator import ARCHITECTURE, MLPSpeculatorCore


def shift_left(input_ids: torch.Tensor, k: int) -> torch.Tensor:  # [B, T] -> [B, T]
    """Column t holds x_{t+k}; the last k columns (no such token) hold 0 and are never trained."""
    shifted = torch.zeros_like(input_ids)
    shifted[:, : input_ids.shape[1] - k] = input_ids[:, k:]
    return shifted


class MLPDrafter(Drafter):
    kind = "mlp"
    vllm_method = VLLM_METHODS["mlp"]

    def __init__(
        self, vocab_size: int, emb_dim: int, inner_dim: int, n_predict: int, target_layers: int,
        scale_input: bool = True, tie_weights: bool = False,
    ) -> None:
        super().__init__()
        self.hidden_layers = (target_layers,)  # the final normed state, as vLLM hands it to the proposer
        # tied stages hold one module in several ModuleList slots: named_parameters() (optimizer,
        # export) sees each shared tensor once, under stage 0's name (proj: stage 1's)
        self.speculator = MLPSpeculatorCore(
            vocab_size=vocab_size, emb_dim=emb_dim, inner_dim=inner_dim, n_predict=n_predict,
            scale_input=scale_input, tie_weights=tie_weights,
        )

    @property
    def num_heads(self) -> int:
        return self.speculator.n_predict

    def stage_states(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """K x [B, T, inner]: what stage k's head reads at every anchor row t, teacher-forced with
        x_{t+1..t+k}. hidden [B, T, emb_dim] (target's final normed state), input_ids [B, T]."""
        state = self.speculator.initial_state(hidden)  # [B, T, emb_dim]
        states = []
        for k in range(1, self.num_heads + 1):
            tokens = shift_left(input_ids, k)
            if self.activation_checkpointing and torch.is_grad_enabled():
                state = checkpoint(self.speculator.next_state, k - 1, state, tokens, use_reentrant=False)
            else:
                state = self.speculator.next_state(k - 1, state, tokens)  # [B, T, inner]
            states.append(state)
        return states

    def stage_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """K x [B, T, V]: stage k's logits at every anchor row t (see :meth:`stage_states`)."""
        return [self.speculator.head[k](s) for k, s in enumerate(self.stage_states(hidden, input_ids))]

    def forward(self, target: TargetOutputs) -> list[tuple[HeadRows, torch.Tensor | HeadRows]]:
        """K pairs (stage k's rows at anchor rows t, target rows t+k)."""
        hidden = target.hidden_states[self.hidden_layers[0]]  # [B, T, H]
        assert hidden.shape[:2] == target.input_ids.shape, (hidden.shape, target.input_ids.shape)
        states = self.stage_states(hidden, target.input_ids)
        return [select_rows(s, target, offset=k, head=self.speculator.head[k - 1]) for k, s in enumerate(states, start=1)]

    def hf_config(self) -> dict:
        """config.json as vLLM's ``MLPSpeculatorConfig`` reads it (keys as
        tests/heads.py::write_mlp_speculator)."""
        core = self.speculator
        return {
            "architectures": [ARCHITECTURE],
            "model_type": "mlp_speculator",
            "vocab_size": core.vocab_size,
            "emb_dim": core.emb_dim,
            "inner_dim": core.inner_dim,
            "n_predict": core.n_predict,
            "top_k_tokens_per_head": [1] * core.n_predict,
            "n_candidates": 1,
            "tie_weights": core.tie_weights,
            "scale_input": core.scale_input,
            "torch_dtype": "float32",
        }




def _rescaled(weight: torch.Tensor, std: float) -> torch.Tensor:
    """``weight`` scaled to root-mean-square ``std`` (keeps its geometry, takes the init's scale)."""
    return weight * (std / weight.pow(2).mean().sqrt().clamp_min(1e-12))


def build(target_model, config, token_counts=None) -> MLPDrafter:
    """Fresh speculator for ``target_model``. fms-extras initialises every matrix N(0, 1/inner);
    where shapes allow we start closer to the target: heads = the target's lm_head (which reads
    a normed state, as the stage's gelu(ln(.)) output roughly is) and token embeddings = the
    target's input embeddings rescaled to the fms scale (similar tokens start similar).
    Parameters are fp32 whatever torch's default dtype (lower precision comes from autocast)."""
    tc = target_model.config
    inner = config.mlp_inner_dim or tc.hidden_size
    drafter = MLPDrafter(
        tc.vocab_size, tc.hidden_size, inner, config.num_heads, tc.num_hidden_layers, tie_weights=config.mlp_tie_weights
    ).float()
    core, std = drafter.speculator, 1 / math.sqrt(inner)
    lm_head = target_model.get_output_embeddings().weight.detach().float()  # [V, H]
    embed = target_model.get_input_embeddings().weight.detach().float()  # [V, H]
    with torch.no_grad():
        for stage in range(core.n_predict):
            core.proj[stage].weight.normal_(0.0, std)
            if inner == tc.hidden_size:
                core.emb[stage].weight.copy_(_rescaled(embed, std))
                core.head[stage].weight.copy_(lm_head)
            else:
                core.emb[stage].weight.normal_(0.0, std)
                core.head[stage].weight.normal_(0.0, std)
    return drafter


def load(path: str | Path, target_model) -> MLPDrafter:
    """The speculator at ``path`` (ours, or IBM fms-extras' layout: ``training.formats.mlp``),
    checked against ``target_model`` (it reads the target's final hidden state and predicts over
    its vocabulary), then loaded through the serving class's own ``load_weights``."""
    from training.formats import mlp as layout
    from training.formats.files import check_shapes, check_value

    config, tensors, source = layout.read(path)
    tc = target_model.config
    drafter = MLPDrafter(
        tc.vocab_size, tc.hidden_size, layout.inner_dim(config), int(config["n_predict"]), tc.num_hidden_layers,
        scale_input=bool(config.get("scale_input")), tie_weights=bool(config.get("tie_weights")),
    ).float()
    check_shapes(tensors, {name: p.shape for name, p in drafter.speculator.named_parameters()}, source)
    check_value("vocab_size", config.get("vocab_size", tc.vocab_size), tc.vocab_size, source)
    drafter.speculator.load_weights(tensors.items())
    return drafter
