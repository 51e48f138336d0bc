"""MLP speculator (IBM fms-extras style): its math as a plain module, and the vLLM 0.32 model class.

vLLM 0.32 ships ``MLPSpeculator`` without a forward pass and with its registry entry commented
out; :class:`LKMLPSpeculator` replaces it under the same architecture name,
``MLPSpeculatorPreTrainedModel``, with the same checkpoint layout
(``speculator.{emb,proj,ln,head}.{i}.weight``, ``ln.{i}.bias``).

Stage i (0-based) turns the previous state and the previous token into the next state:

    state_0 = target's final hidden state at the last accepted token (ln0(h) / sqrt(2) if scale_input)
    state_{i+1} = gelu(ln_i(proj_i(state_i) * state_weight + emb_i(token_i) * emb_weight))
    logits_i = head_i(state_{i+1}),  token_{i+1} ~ q_i = softmax(transforms(logits_i))

with state_weight = 0.5 ** (0.5 / n_predict) and emb_weight = sqrt((1 - state_weight**2) * inner/2).
With ``tie_weights`` all stages share emb, ln and head, and stages >= 1 share proj (fms-extras).

The math and the weight loading live in :class:`MLPSpeculatorCore`, built from plain arguments,
so that serving (this vLLM class) and training (``training.drafters.mlp``) run the very same code.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable

import torch
from torch import nn

ARCHITECTURE = "MLPSpeculatorPreTrainedModel"
BF16_HEADS_ENV = "VLLM_LK_CPU_BF16_HEADS"


class RMSLayerNorm(nn.Module):
    """fms ``LayerNormParameterized(use_mean=False)``: x / rms(x), then optional weight and bias."""

    def __init__(self, dim: int, affine: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x if self.weight is None else x * self.weight + self.bias


class MLPSpeculatorCore(nn.Module):
    """Parameters, stage math and checkpoint loading of the speculator, free of vLLM.

    Parameter names (``emb.{i}.weight``, ...) are the checkpoint's without the ``speculator.``
    prefix. Every method works on any leading shape ([B, *] when serving, [B, T, *] in training).
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        emb_dim: int,
        inner_dim: int = 0,  # 0 or None: emb_dim (fms-extras convention)
        n_predict: int,
        tie_weights: bool = False,
        scale_input: bool = False,
    ) -> None:
        super().__init__()
        self.n_predict = n_predict
        self.emb_dim = emb_dim
        self.inner_dim = inner_dim or emb_dim
        self.vocab_size = vocab_size
        self.tie_weights = bool(tie_weights)
        self.scale_input = bool(scale_input)
        n, inner = n_predict, self.inner_dim

        def stages(make, first=None):
            head = [first] if first is not None else []
            rest = n - len(head)
            if self.tie_weights:
                shared = make()
                return nn.ModuleList(head + [shared] * rest)
            return nn.ModuleList(head + [make() for _ in range(rest)])

        self.emb = stages(lambda: nn.Embedding(vocab_size, inner))
        self.proj = stages(lambda: nn.Linear(inner, inner, bias=False), first=nn.Linear(emb_dim, inner, bias=False))
        self.ln = stages(lambda: RMSLayerNorm(inner))
        self.head = stages(lambda: nn.Linear(inner, vocab_size, bias=False))
        self.ln0 = RMSLayerNorm(emb_dim, affine=False) if self.scale_input else None
        self.state_weight = 0.5 ** (0.5 / n)
        self.emb_weight = math.sqrt((1 - self.state_weight**2) * (inner / 2))

    def initial_state(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., emb_dim] -> [..., emb_dim]
        return self.ln0(hidden) / math.sqrt(2) if self.ln0 is not None else hidden

    def next_state(self, stage: int, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The state [..., inner] ``stage`` computes from state [..., *] and tokens [...]; its
        ``head`` reads it."""
        state = self.proj[stage](state) * self.state_weight + self.emb[stage](tokens) * self.emb_weight
        return nn.functional.gelu(self.ln[stage](state))

    def step(self, stage: int, state: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(next state [..., inner], logits [..., V]) of ``stage`` from state [..., *] and tokens [...]."""
        state = self.next_state(stage, state, tokens)
        return state, self.head[stage](state)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (names with or without ``speculator.``) into the parameters;
        returns the parameter names loaded. Tied checkpoints may name any stage's copy."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            name = name.removeprefix("speculator.")
            if self.tie_weights:  # every stage's copy of a tied module is the same parameter
                name = re.sub(r"^(emb|ln|head)\.\d+\.", r"\1.0.", name)
                name = re.sub(r"^proj\.([1-9]\d*)\.", "proj.1.", name)
            stage = re.match(r"^\w+\.(\d+)\.", name)
            if stage and int(stage.group(1)) >= self.n_predict:
                continue
            if name not in params:
                raise ValueError(f"unexpected MLP speculator weight {name!r}")
            param = params[name]
            if param.shape != tensor.shape:
                raise ValueError(f"MLP speculator weight {name}: checkpoint {tuple(tensor.shape)}, model {tuple(param.shape)}")
            # vLLM's loaders where it attached them: its layer-wise in-place reload (a live drafter
            # swap) puts parameters on the meta device and wraps their loaders to buffer the new
            # values; a plain copy_ there is lost and the old weights are put back
            loader = getattr(param, "weight_loader", None)
            with torch.no_grad():
                if loader is None:
                    param.copy_(tensor)
                else:
                    loader(param, tensor)
            loaded.add(name)
        return loaded


class LKMLPSpeculator(MLPSpeculatorCore):
    """The vLLM model class: :class:`MLPSpeculatorCore` configured from the draft's hf_config."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        # vLLM builds draft models with the *target's* VllmConfig; the draft's config is here.
        config = vllm_config.speculative_config.draft_model_config.hf_config
        num_spec = vllm_config.speculative_config.num_speculative_tokens
        if num_spec > config.n_predict:
            raise ValueError(
                f"num_speculative_tokens={num_spec} exceeds the MLP speculator's n_predict={config.n_predict}"
            )
        super().__init__(
            vocab_size=config.vocab_size,
            emb_dim=config.emb_dim,
            inner_dim=config.inner_dim,
            n_predict=config.n_predict,
            tie_weights=config.tie_weights,
            scale_input=config.scale_input,
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        self._use_platform_gemm()
        return loaded

    def _use_platform_gemm(self) -> None:
        """On CPU, run proj and head through vLLM's CPU GEMM dispatch (oneDNN with a prepacked
        weight), as vLLM's own linear layers do: ``torch.nn.functional.linear`` took 0.31 ms for
        one [1, 256] x [256, 4096] fp32 head in the engine, twice oneDNN's time per weight byte
        (cProfile of a K=3 step). On GPUs nn.Linear is already cuBLAS. The prepacked copy is made
        from the loaded weights, so this runs again after every load.

        On a CPU with AVX512-BF16 the heads' prepacked copies are bf16 (half the bytes a stage
        streams; the heads are most of them) and their logits come back in bf16: q is computed
        from exactly those logits, so verification stays exact; only the drafter's distribution
        moves by bf16 rounding (served tau 2.937 -> 2.920 at T=1 on the toy default). Measured
        with benchmarks/cpu_ab.py (docs/speed.md): the MLP engine's tokens/s +9-22 % (medians of
        4 processes per setting, T 0/1 x concurrency 1/8). ``VLLM_LK_CPU_BF16_HEADS=0`` keeps
        fp32 heads (the path the training-equality tests compare)."""
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return
        if any(p.is_meta for p in self.parameters()):  # inside a layer-wise reload: lk_after_reload packs
            return
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        bf16_heads = os.environ.get(BF16_HEADS_ENV, "1").strip() != "0" and torch.cpu._is_avx512_bf16_supported()
        heads = {id(m) for m in self.head}
        for layer in {id(m): m for m in [*self.proj, *self.head]}.values():  # tied stages: once
            if bf16_heads and id(layer) in heads:
                packed = nn.Module()  # holds only the bf16 GEMM handle (no init, no second fp32 copy)
                packed.weight = nn.Parameter(layer.weight.detach().to(torch.bfloat16), requires_grad=False)
                dispatch_cpu_unquantized_gemm(packed, remove_weight=True)
                layer.forward = lambda x, packed=packed: packed.cpu_linear(x.to(torch.bfloat16), None, None)
                continue
            dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
            layer.forward = lambda x, layer=layer: layer.cpu_linear(x, layer.weight, layer.bias)

    def lk_after_reload(self) -> None:
        """Called by vllm_lk.reload once vLLM's layer-wise reload has written the new weights
        into the engine's tensors: the GEMM copies are made again from them."""
        self._use_platform_gemm()

    # vLLM's model interface (checked when the class is registered); the proposer calls step().
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden_states: torch.Tensor) -> list[torch.Tensor]:
        """Greedy chain of all stages from the last tokens ``input_ids`` [B] and the target's
        hidden states [B, H] (``positions`` unused: the speculator has no attention)."""
        tokens, state, logits = input_ids, self.initial_state(hidden_states), []
        for stage in range(self.n_predict):
            state, stage_logits = self.step(stage, state, tokens)
            tokens = stage_logits.argmax(-1)
            logits.append(stage_logits)
        return logits

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.emb[0](input_ids)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.head[0](hidden_states)
