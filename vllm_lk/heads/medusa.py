"""MEDUSA with a truncated draft vocabulary, as vLLM 0.32 describes it but cannot load.

vLLM's ``Medusa`` (architecture ``MedusaModel``) reads a ``token_map`` tensor (draft id -> target
id) and ``truncated_vocab_size`` from the checkpoint, yet sizes every head's ``lm_head`` at the
full vocabulary; its weight loader then slices the checkpoint's rows down to the draft vocabulary
and ``VocabParallelEmbedding.weight_loader`` asserts they number the full vocabulary, so no
token_map checkpoint loads (AssertionError at start-up; only the single shared ``original_lm_head``
variant escapes it). Past that, the loader turns ``token_map`` into a parameter without reporting
it loaded, and the model loader refuses the model ("weights were not initialized from checkpoint:
{'token_map'}"). :class:`LKMedusa` sizes each head's lm_head at ``truncated_vocab_size`` and
reports token_map; loading, forward and ``compute_logits`` (draft logits scattered into the
target vocabulary, -inf elsewhere) are vLLM's own. Registered under ``MedusaModel`` by
``vllm_lk.patch``, lazily (this module imports vLLM).
"""

from __future__ import annotations

from torch import nn
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.medusa import Medusa, ResidualBlock
from vllm.model_executor.models.utils import maybe_prefix


class LKMedusa(Medusa):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        config = vllm_config.speculative_config.draft_model_config.hf_config
        truncated = config.truncated_vocab_size < config.vocab_size and not getattr(config, "original_lm_head", False)
        if not truncated:  # vLLM's own construction is right for these
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            return
        # vLLM's constructor would first allocate K full-vocabulary heads (K x V x H) to replace
        nn.Module.__init__(self)
        self.config = config
        self.blocks = nn.ModuleList(
            ResidualBlock(config=config, hidden_size=config.hidden_size, num_layers=config.num_hidden_layers)
            for _ in range(config.num_heads)
        )
        self.orig_vocab_size = config.vocab_size
        self.truncated_vocab_size = config.truncated_vocab_size
        self.lm_heads = nn.ModuleList(
            ParallelLMHead(self.truncated_vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, f"lm_heads.{i}"))
            for i in range(config.num_heads)
        )
        self.logits_processor = LogitsProcessor(
            config.vocab_size, self.truncated_vocab_size, getattr(config, "logit_scale", 1.0)
        )
        self.token_map = None  # set by load_weights from the checkpoint's token_map

    def load_weights(self, weights) -> set[str]:
        loaded = super().load_weights(weights)
        return loaded | {"token_map"} if self.token_map is not None else loaded
