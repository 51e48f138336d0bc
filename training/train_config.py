"""The one schema for `vllm-lk train`: defaults, YAML keys and command-line flags."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from training.config import FrozenConfig

DrafterKind = Literal["eagle3", "medusa", "mlp", "draft-model"]


class TrainConfig(FrozenConfig):
    drafter: DrafterKind = Field("medusa", description="draft architecture")
    loss: Literal["kl", "tv", "lk-hybrid", "lk-alpha"] = Field("lk-hybrid", description="training objective")
    num_heads: int = Field(3, ge=1, le=16, description="K: MEDUSA heads, MLP stages, EAGLE-3 TTT steps (draft-model: K served)")
    eta: float | None = Field(None, ge=0, description="LK-hybrid eta in lambda = exp(-eta * sg[alpha]) (default: 10 for MEDUSA, else 3)")
    gamma: float = Field(0.8, gt=0, le=1, description="head k is weighted gamma^(k-1)")
    temperatures: list[float] = Field([1.0], min_length=1, description="training temperatures (p and q at T; several average)")
    lambda_per_token: bool = Field(False, description="LK-hybrid lambda from each token's alpha instead of the batch mean")
    steps: int = Field(200, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="sequences per optimizer step (global, split across DDP ranks)")
    grad_accum: int = Field(
        1, ge=1, description="micro-batches per optimizer step: each rank runs its share of batch_size in this many "
        "forward/backward passes, so the same step fits in less memory (exact for KL, TV and LK-alpha; LK-hybrid's "
        "batch-mean lambda is then each micro-batch's, as it is each rank's under DDP)")
    seq_len: int = Field(256, ge=8, description="tokens per training sequence (longer examples are truncated)")
    lr: float = Field(1e-3, gt=0, description="peak AdamW learning rate")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up steps, then cosine decay to lr * min_lr_ratio")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate as a fraction of lr")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (matrices only)")
    grad_clip: float = Field(1.0, gt=0, description="gradient-norm clip")
    seed: int = Field(0, description="seed for initialisation and data order")
    precision: Literal["auto", "fp32", "bf16"] = Field("fp32", description="autocast dtype of the forward passes (losses are fp32 always); auto = bf16 where supported")
    materialise_target_logits: bool = Field(
        False, description="keep the target's [B, T, V] logits for the batch (faster when memory allows) instead of "
        "computing the trained rows' logits from its lm_head inside the losses, a chunk at a time")
    materialise_draft_logits: bool = Field(
        False, description="keep each head's [rows, Vd] draft logits (and their gradient) for the batch instead of "
        "computing them from the head's input rows inside the losses, a chunk at a time (the pre-chunking path)")
    activation_checkpointing: bool = Field(
        False, description="keep only each drafter step's inputs in the forward pass and recompute its layers in "
        "backward (EAGLE-3 TTT steps, MEDUSA blocks, MLP stages, draft-model layers): less memory, ~1 more drafter forward")
    target_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="dtype the frozen target is loaded in (auto: bf16 on CUDA, fp32 on CPU); its logits and "
        "hidden states reach the losses in fp32 either way")
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="how many recent checkpoints to keep")
    log_every: int = Field(10, ge=1, description="steps between metric log lines")
    fsdp: bool = Field(False, description="under torchrun: shard the drafter's parameters, gradients and optimizer state across ranks (FSDP2) instead of replicating them, for drafters too large for one device")
    fsdp_target: bool = Field(
        False, description="under torchrun: shard the frozen target's decoder layers across ranks (FSDP2, each layer "
        "all-gathered for its forward only; embeddings, final norm and lm_head stay whole), for targets that do not "
        "fit one device. Needs batch_size >= ranks x grad_accum; not with cache_target")
    cache_target: bool = Field(False, description="cache the hidden states the drafter reads and the target's lm_head input on disk (the logits are recomputed from it) after the first epoch's forward, for multi-epoch runs")
    eval_sequences: int = Field(16, ge=0, description="held-out sequences (taken from the data file, never trained on) for offline alpha")
    draft_vocab_size: int | None = Field(None, ge=1, description="EAGLE-3 and MEDUSA: truncated draft vocabulary size (most frequent response tokens; default: full)")
    aux_layers: list[int] | None = Field(None, description="EAGLE-3: the three target layers fused (default: vLLM's (2, L//2, L-3), spread if not distinct)")
    draft_num_layers: int = Field(1, ge=1, description="draft-model: decoder layers of the independent draft")
    draft_hidden_size: int | None = Field(None, description="draft-model: width (default: half the target's, head_dim kept)")
    mlp_inner_dim: int | None = Field(None, description="MLP speculator: inner width (default: the target's hidden size)")
    mlp_tie_weights: bool = Field(
        False,
        description="MLP speculator: one emb/ln/head shared by all stages and one proj by stages >= 2 "
        "(fms-extras tie_weights, the layout of IBM's Llama-3 speculators: ~K times fewer parameters)",
    )
    medusa_num_layers: int = Field(1, ge=1, description="MEDUSA: residual blocks per head")
    init_from: str | None = Field(
        None, description="start the drafter from this checkpoint directory (or a Hugging Face id ORG/NAME[@REVISION] in the "
        "local HF cache): an export of ours or a public layout "
        "(EAGLE-3 original/SpecForge/EAGLE or speculators, MEDUSA vLLM or FasterDecoding, IBM fms-extras MLP "
        "speculator, a causal LM as draft model; see training.formats). Its architecture wins: fields left unset "
        "take its values, contradicting ones are refused. A resumed run takes its weights from its own checkpoint")
    export_format: Literal["original", "speculators"] = Field(
        "original", description="EAGLE-3 export layout: original (LlamaForCausalLMEagle3, midlayer.*; loaded by vLLM, "
        "SGLang, SpecForge, EAGLE) or speculators (Eagle3Speculator; loaded by vLLM and vllm-project/speculators)")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if any(t <= 0 for t in self.temperatures):
            raise ValueError("temperatures must be > 0 (T=0 drafts are argmax; train at a small T instead)")
        if self.draft_vocab_size is not None and self.drafter not in ("eagle3", "medusa"):
            raise ValueError(f"draft_vocab_size applies to eagle3 and medusa drafters, not {self.drafter}")
        if self.aux_layers is not None and len(self.aux_layers) != 3:
            raise ValueError("aux_layers must name exactly three target layers")
        # with init_from the drafter is the checkpoint's, known once it is read (training.formats.resolve_init_from)
        if self.export_format == "speculators" and self.drafter != "eagle3" and self.init_from is None:
            raise ValueError(f"export_format speculators applies to eagle3 drafters, not {self.drafter}")
        return self

    def resolved_eta(self) -> float:
        if self.eta is not None:
            return self.eta
        return 10.0 if self.drafter == "medusa" else 3.0
