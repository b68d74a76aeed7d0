"""Sharded training (the `fsdp` setting): the weights that train, their gradients and AdamW's
state split across the processes with torch's FSDP2 (`fully_shard`), for a full fine-tune too
large for one GPU (FLUX.1's 12 B parameters take about 180 GiB with AdamW in fp32).

    units = shard([transformer, text_encoder], device, param_dtype=torch.bfloat16)
    ...build the optimizer over the (new) parameters, train...
    plain = unsharded(transformer, units[0], device)   # every process calls; rank 0 gets it

Each repeated block (the items of a model's outermost ModuleLists: FLUX's double- and
single-stream blocks, SD 3's joint blocks, a UNet's down and up blocks, CLIP's layers) is one
FSDP unit, gathered just before it runs and freed after it; the rest of each model is one more
unit. Gradients are averaged across processes as DDP averages them, so N processes train as one
with N times the batch. Works over gloo on CPU as over NCCL on GPUs, which is how the tests run
it. The recipe calls shard() before the optimizer is built (FSDP replaces the parameters) and
unsharded() after training, so that rank 0 samples, evaluates and exports a plain model.
Checkpoints gather the shards (full_tensors, full_optimizer_state): they are the files an
unsharded run writes; a sharded run resuming takes its shard of each tensor (like,
sharded_optimizer_state).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


def units(model: nn.Module) -> list[nn.Module]:
    """The items of `model`'s outermost ModuleLists: its repeated blocks."""
    found = []
    for child in model.children():
        found += list(child) if isinstance(child, nn.ModuleList) else units(child)
    return found


def shard(models: list[nn.Module], device: torch.device,
          param_dtype: torch.dtype | None = None) -> list[type]:
    """Shard each model across every process (all must call, with the same models), in place;
    returns their classes as they were, for unsharded(). With `param_dtype` (bf16) the
    gathered weights are cast to it for the forward and backward passes; the shards, the
    gradients' averaging and AdamW stay in fp32."""
    # diffusers' blocks return slices of one tensor, which FSDP warns an in-place op could
    # spoil; nothing after them writes in place (a test compares a sharded run with one process).
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    classes = []
    for model in models:
        classes.append(type(model))
        for block in units(model):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
    return classes


def unsharded(model: nn.Module, cls: type, device: torch.device) -> nn.Module | None:
    """A plain `cls` with the sharded `model`'s full weights, on rank 0 (on `device`); None on
    the other ranks. Every process must call it: the weights are gathered from all of them."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    if dist.get_rank():
        return None
    # Built on the meta device (no memory), then given the gathered tensors as they are.
    with torch.device("meta"):
        plain = cls.from_config(model.config) if hasattr(cls, "from_config") else cls(model.config)
    plain.load_state_dict(state, assign=True)
    # Buffers outside the state dict (non-persistent: CLIP's position ids) were never sharded.
    for name, buffer in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        module = plain.get_submodule(owner)
        if module._buffers[leaf].is_meta:
            module._buffers[leaf] = buffer.detach().clone()
    return plain.requires_grad_(False).to(device)


def full_tensors(named: dict) -> dict:
    """`named` tensors with every sharded one (DTensor) gathered whole, on the CPU. Every process
    must call it, with the same tensors in the same order."""
    return {name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()
            for name, t in named.items()}


def full_optimizer_state(optimizer) -> dict:
    """The optimizer's state_dict with its sharded moments gathered whole: the same file an
    unsharded run writes. Every process must call it."""
    state = optimizer.state_dict()
    state["state"] = {pid: full_tensors(entry) for pid, entry in state["state"].items()}
    return state


def like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` as `param` holds it: this process's shard of it when `param` is sharded (every
    process holds `full`, read from the same checkpoint, so nothing is sent)."""
    if not isinstance(param, DTensor):
        return full
    return distribute_tensor(full.to(param.device, param.dtype), param.device_mesh,
                             param.placements, src_data_rank=None)


def sharded_optimizer_state(optimizer, state: dict) -> dict:
    """A full optimizer state_dict (full_optimizer_state's) made to fit `optimizer`'s sharded
    parameters: each moment cut as its parameter is."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = dict(state)
    state["state"] = {pid: {k: like(params[int(pid)], v) if v.shape == params[int(pid)].shape
                            else v for k, v in entry.items()}
                      for pid, entry in state["state"].items()}
    return state
