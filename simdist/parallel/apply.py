"""Plan -> torch.distributed: the device mesh and one `parallelize_<family>` per model family,
each built from small apply_* steps (torchtitan's structure); simdist/families.py registers
which family uses which (imported by the ranks that execute, not by the planner)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from simdist.parallel.checkpointing import apply_ac
from simdist.parallel.data_parallel import apply_ddp, apply_fsdp
from simdist.parallel.expert_parallel import apply_ep
from simdist.layout import DP_SHARD_CP, EP_DIMS, MESH_ORDER, MeshLayout
from simdist.parallel.zero import apply_zero_params
from simdist.parallel.tensor_parallel import apply_tp_gpt, apply_tp_llama3, apply_tp_plan


@dataclass(frozen=True)
class ParallelPlan:
    """What a worker needs to parallelise one rank's model."""

    layout: MeshLayout
    param_dtype: torch.dtype
    activation_checkpointing: str = "none"
    sequence_parallel: bool = True
    zero_stage: int = 3

    @property
    def loss_parallel(self) -> bool:
        # The output head stays vocab-sharded and the loss runs under `loss_parallel`.
        # (Not with pipelining: stage outputs cross ranks as plain tensors.)
        return self.layout.degree("tp") > 1 and self.layout.degree("pp") == 1


def build_device_mesh(layout: MeshLayout) -> DeviceMesh:
    if layout.ep == 1:
        return init_device_mesh("cpu", layout.degrees, mesh_dim_names=MESH_ORDER)
    # torchtitan's EP mesh: dp_shard split into (dp_shard_mod_ep, ep), ep innermost, and
    # flattened back into dp_shard for the non-expert parameters.
    pp, rep, shard, cp, tp = layout.degrees
    mesh = init_device_mesh("cpu", (pp, rep, shard // layout.ep, layout.ep, cp, tp),
                            mesh_dim_names=("pp", "dp_replicate", *EP_DIMS, "cp", "tp"))
    mesh[EP_DIMS]._flatten("dp_shard")
    return mesh


def mesh_group_dims(mesh: DeviceMesh) -> dict[str, str]:
    """process-group name -> mesh dim name, to label recorded collectives."""
    names = MESH_ORDER + (EP_DIMS if "ep" in (mesh.mesh_dim_names or ()) else ())
    dims = {mesh.get_group(name).group_name: name for name in names}
    if mesh["cp"].size() > 1:
        dims[mesh["dp_shard", "cp"]._flatten(DP_SHARD_CP).get_group().group_name] = DP_SHARD_CP
    return dims


def apply_data_parallel(model: nn.Module, mesh: DeviceMesh, plan: ParallelPlan) -> None:
    rep, shard = plan.layout.degree("dp_replicate"), plan.layout.degree("dp_shard")
    if plan.zero_stage in (1, 2):
        # ZeRO-1/2: replicated low-precision parameters; the sharding lives in the optimizer
        # (simdist.parallel.zero.ZeroOptimizer, built by the worker).
        apply_zero_params(model, plan.param_dtype)
        return
    reshard = plan.layout.degree("pp") == 1
    # Experts sharded by EP are replicated only over the ranks that hold the same experts.
    expert_dims = ("dp_shard_mod_ep",) if plan.layout.ep > 1 else None
    if shard == 1 and rep > 1:
        apply_ddp(model, mesh["dp_replicate"], plan.param_dtype)
    elif rep > 1:
        apply_fsdp(model, mesh["dp_replicate", "dp_shard"], plan.param_dtype,
                   reshard_after_forward=reshard,
                   expert_mesh=mesh[("dp_replicate", *expert_dims)] if expert_dims else None)
    else:
        # Also for a single GPU: FSDP over one rank gives the same mixed-precision training.
        # With context parallelism the cp ranks hold the same parameters: FSDP shards over
        # dp_shard x cp (torchtitan's dp_shard_cp).
        dp_mesh = (mesh["dp_shard", "cp"]._flatten(DP_SHARD_CP)
                   if plan.layout.degree("cp") > 1 else mesh["dp_shard"])
        apply_fsdp(model, dp_mesh, plan.param_dtype, reshard_after_forward=reshard,
                   expert_mesh=mesh[expert_dims] if expert_dims else None)


def parallelize_llama3(model: nn.Module, mesh: DeviceMesh, plan: ParallelPlan) -> None:
    if plan.layout.degree("tp") > 1:
        apply_tp_llama3(model, mesh["tp"], plan.sequence_parallel, plan.loss_parallel)
    apply_ac(model, plan.activation_checkpointing)
    apply_data_parallel(model, mesh, plan)


def parallelize_gpt(model: nn.Module, mesh: DeviceMesh, plan: ParallelPlan) -> None:
    if plan.layout.degree("tp") > 1:
        apply_tp_gpt(model, mesh["tp"], plan.sequence_parallel, plan.loss_parallel)
    apply_ac(model, plan.activation_checkpointing)
    apply_data_parallel(model, mesh, plan)


def parallelize_moe(model: nn.Module, mesh: DeviceMesh, plan: ParallelPlan) -> None:
    if plan.layout.ep > 1:
        apply_ep(model, mesh["ep"])
    apply_ac(model, plan.activation_checkpointing)
    apply_data_parallel(model, mesh, plan)


def parallelize_hf(model: nn.Module, mesh: DeviceMesh, plan: ParallelPlan) -> None:
    """A Hugging Face model in simdist's adapter (simdist/models/hf.py): TP from the model's own
    `_tp_plan` (checked by the planner: colwise, rowwise, embedding_rowwise,
    colwise_gather_output, replicated_with_grad_allreduce, moe_tp_experts), checkpointing and
    FSDP2 per decoder block (`simdist_blocks`)."""
    if plan.layout.degree("tp") > 1:
        apply_tp_plan(model.hf, mesh["tp"], tuple((model.hf._tp_plan or {}).items()),
                      plan.loss_parallel)
    apply_ac(model, plan.activation_checkpointing)
    apply_data_parallel(model, mesh, plan)


def parallelize_custom(model: nn.Module, mesh: DeviceMesh, plan: ParallelPlan) -> None:
    """A user entrypoint's model: checkpointing and data parallelism per block (`model.blocks`
    in the config, else `layers`); no TP plan."""
    apply_ac(model, plan.activation_checkpointing)
    apply_data_parallel(model, mesh, plan)
