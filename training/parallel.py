"""Data parallel training: the process group, and replicated (DDP-style) or sharded (FSDP2) drafters.

Replicated: every rank holds the whole drafter; gradients are all-reduced and divided by the world
size after backward. Sharded (``--fsdp true``): ``torch.distributed.fsdp.fully_shard`` splits
parameters, gradients and optimizer state across ranks and reduce-scatters gradients with the same
averaging, so both modes take the same step. Checkpoints always hold the full (unsharded) model
state, gathered to rank 0, so exports need no conversion; the optimizer state is saved in each
mode's own layout, so a run resumes in the mode it started with (``fsdp`` is part of the config
a resume must match).
"""

from __future__ import annotations

import copy
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vllm_lk.errors import InvalidInput


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    sharded: bool = False
    owns_group: bool = False  # init_distributed created the process group (close_distributed ends it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device, fsdp: bool = False) -> Dist:
    """Join the torchrun process group when launched by torchrun, else a single process."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Dist()
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), sharded=fsdp, owns_group=owns)


def close_distributed(ctx: Dist, finished: bool) -> None:
    """End the process group ``init_distributed`` created, on every rank together.

    A rank that leaves while rank 0 still evaluates and exports, or that reaches interpreter exit
    with gloo work objects still alive, can abort ("terminate called without an active
    exception", exit -6; seen on CI twice for the rank that finished first, the second time with
    the group destroyed), failing the whole run. So a run that finished waits for every rank
    (``finished``; a failed rank skips it, and torchrun stops the others), frees FSDP2's state
    (its hooks keep gloo work objects in reference cycles) and only then destroys the group."""
    if not (ctx.owns_group and dist.is_initialized()):
        return
    if finished:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def all_reduce(tensor: torch.Tensor, ctx: Dist) -> torch.Tensor:
    if ctx.world > 1:
        dist.all_reduce(tensor)
    return tensor


def shard(drafter, ctx: Dist, device: torch.device):
    """Shard ``drafter`` in place when ``ctx.sharded``; returns an unsharded copy for rank 0's
    held-out evaluation and export (None otherwise)."""
    if not ctx.sharded:
        return None
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    plain = copy.deepcopy(drafter) if ctx.main else None
    fully_shard(drafter, mesh=init_device_mesh(device.type, (ctx.world,)))
    return plain


def shard_target(model, ctx: Dist, device: torch.device) -> bool:
    """Shard the frozen target's decoder layers across the ranks (``--fsdp-target true``): FSDP2
    ``fully_shard`` per layer, so each rank keeps 1/world of every layer and a layer's weights are
    all-gathered for its forward only, then freed. Embeddings, final norm and lm_head stay whole
    on every rank (drafters share the embeddings; the losses read lm_head row chunks), which at
    Llama-3.1-70B shapes is 2 of 70 B parameters. Every target forward is then a collective: the
    trainer runs the same number on every rank. Returns whether it sharded (not in one process)."""
    if ctx.world == 1:
        return False
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise InvalidInput("--fsdp-target: the target has no decoder layer list (model.layers) to shard")
    mesh = init_device_mesh(device.type, (ctx.world,))
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    return True


def check_target_sharding(config, ctx: Dist) -> None:
    """A sharded target needs every rank to run the same target forwards each step."""
    if not config.fsdp_target or ctx.world == 1:
        return
    shares = [len(range(rank, config.batch_size, ctx.world)) for rank in range(ctx.world)]
    micro_batches = {min(config.grad_accum, share) for share in shares}
    if min(shares) == 0 or len(micro_batches) > 1:
        raise InvalidInput(
            f"--fsdp-target: batch_size {config.batch_size} over {ctx.world} ranks with grad_accum {config.grad_accum} gives the "
            "ranks different numbers of target forwards per step; use a batch_size of at least world x grad_accum")
    if config.cache_target:
        raise InvalidInput("--fsdp-target and --cache-target cannot be combined (each rank would fill its cache on its own)")


def sync_gradients(params: list[torch.Tensor], ctx: Dist) -> None:
    """Average gradients over ranks (FSDP has already reduce-scattered them)."""
    if ctx.world > 1 and not ctx.sharded:
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= ctx.world


def norm_value(norm) -> float:
    """clip_grad_norm_'s result as a float (a DTensor under FSDP)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def full_state(drafter, optimizer, ctx: Dist) -> tuple[dict, dict]:
    """(model, optimizer) state of the whole drafter; a collective under FSDP (call on every rank;
    only rank 0 receives the tensors)."""
    if not ctx.sharded:
        return drafter.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(drafter, options=options), get_optimizer_state_dict(drafter, optimizer, options=options)


def load_full_state(drafter, optimizer, model_state: dict, optimizer_state: dict, ctx: Dist) -> None:
    if not ctx.sharded:
        drafter.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(drafter, model_state, options=options)
    set_optimizer_state_dict(drafter, optimizer, optimizer_state, options=options)
