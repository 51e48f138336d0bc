"""Load new drafter weights into a running engine (worker method ``lk_load_drafter_weights``).

The server's in-place swap (``POST /admin/drafter`` with a drafter of the same shape) calls it
through ``AsyncLLM.collective_rpc``. vLLM's engine core runs utility calls between engine steps,
so no step sees two sets of weights. Drafts proposed before the load are verified after it
against the q they were sampled from (kept by the proposer with the drafts), so exactness holds
across the swap; the draft's KV cache of running requests was written by the old weights, which
changes how good later drafts are, never the law of what is emitted.

vLLM's own runtime path (``start_draft_weight_update`` / ``update_weights``) needs a weight
transfer engine configured at start-up for a trainer pushing tensors (NCCL, IPC); a drafter on
disk needs its layer-wise reload (``vllm.model_executor.model_loader.reload``) and the draft
model's ``load_weights``, the method vLLM loaded it with.

Drafters can share tensors with the target (EAGLE/EAGLE-3 reuse its embeddings, MEDUSA can reuse
its lm_head). Loading a new value into a shared tensor would change the *target*, so shared
tensors are copied before the load and compared after: any change is rolled back and refused.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger("vllm.plugins.vllm_lk.reload")


def _checkpoint_tensors(path: Path):
    """(name, tensor) of every safetensors file of a drafter directory, in file order."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    for file in files:
        yield from load_file(str(file)).items()


def _shared_with_target(draft: torch.nn.Module, target: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The draft's (non-empty) tensors whose storage the target also uses, by draft name."""
    target_ptrs = {t.untyped_storage().data_ptr() for t in list(target.parameters()) + list(target.buffers()) if t.numel()}
    return {name: tensor for name, tensor in list(draft.named_parameters()) + list(draft.named_buffers())
            if tensor.numel() and tensor.untyped_storage().data_ptr() in target_ptrs}


def _reload(draft: torch.nn.Module, model_config, path: Path) -> None:
    """vLLM's layer-wise in-place reload: each layer goes back to its checkpoint layout, takes
    the new tensors, and is processed again as at start-up (on CPU that re-packs the GEMM
    weights, which start-up replaced by packed copies; a plain ``load_weights`` would meet
    empty parameters), its results copied into the storage the engine already uses."""
    from vllm.model_executor.model_loader.reload.layerwise import (
        finalize_layerwise_reload,
        initialize_layerwise_reload,
    )

    initialize_layerwise_reload(draft)
    try:
        draft.load_weights(_checkpoint_tensors(path))
    finally:
        finalize_layerwise_reload(draft, model_config)
    after = getattr(draft, "lk_after_reload", None)  # our model classes' work on the final tensors
    if after is not None:
        after()


def load_drafter_weights(worker, path: str, previous: str | None = None) -> str:
    """Load the drafter directory ``path`` into this worker's draft model.

    The server checked that ``path`` has the served drafter's architecture and tensor shapes;
    should the load still fail, or touch a tensor the draft shares with the target, the served
    drafter ``previous`` is loaded back and the error raised (a failed swap leaves the served
    drafter as it was). Returns ``path``."""
    runner = worker.model_runner
    draft = runner.get_draft_model()
    if draft is None:
        raise RuntimeError("this engine runs no drafter: an in-place drafter update needs one")
    model_config = runner.vllm_config.speculative_config.draft_model_config
    shared = _shared_with_target(draft, runner.get_model())
    shared_before = {name: tensor.detach().clone() for name, tensor in shared.items()}
    try:
        with torch.no_grad():
            _reload(draft, model_config, Path(path))
        changed = [name for name, value in shared_before.items() if not torch.equal(value, shared[name])]
        if changed:
            with torch.no_grad():
                for name in changed:
                    shared[name].copy_(shared_before[name])
            raise ValueError(f"{path}: its weights for {', '.join(changed)} differ from the target's, which the served "
                             "drafter shares; an in-place update would change the target. Swap with a new engine instead")
    except BaseException:
        if previous is not None:
            logger.warning("vllm_lk: loading %s failed; loading the served drafter %s back", path, previous)
            with torch.no_grad():
                _reload(draft, model_config, Path(previous))
        raise
    _reset_acceptance(runner)
    logger.info("vllm_lk: drafter weights loaded in place from %s", path)
    return path


def _reset_acceptance(runner) -> None:
    """The adaptive policy's acceptance estimates describe the old weights: start them afresh
    (the cost model is about compute, which the same shapes keep)."""
    from vllm_lk.adaptive import AcceptanceModel

    kept = getattr(runner, "_lk_other_policies", {}).values()
    for policy in (getattr(runner, "_lk_policy", None), getattr(runner, "_lk_saved_policy", None), *kept):
        if policy is not None:
            policy.acceptance = AcceptanceModel(policy.max_k)
