"""Config -> everything that can be decided without simulating: the model spec, the GPU, the
mesh layout, the exact rank classes and one task per class. Pure (no Ray, no execution), so
`run`, sweeps, the plan search and the fit solver can call it many times; raises ConfigError
on bad input."""

from __future__ import annotations

from dataclasses import dataclass, field

from simdist.cache.store import resolve_dir
from torch import nn

from simdist.config import ConfigError, ParallelConfig, SimdistConfig, require_trusted_code
from simdist.costmodel import GPUSpec, UnknownGPU, gpu_spec
from simdist.families import (ModelError, ModelSpec, build_model, count_params, entrypoint_spec,
                              flops_per_token, hf_spec, resolve_model)
from simdist.layout import MeshLayout
from simdist.parallel.classes import rank_classes
from simdist.parallel.pipeline import (STAGE_FIRST_ONLY, STAGE_LAST_ONLY, rank_stage_ids,
                                       split_layers)
from simdist.trace import RankTask
from simdist.validate import check_plan

# Reserved per GPU outside the PyTorch allocator: CUDA context, cuBLAS/NCCL workspaces.
# (PyTorch's caching allocator and NCCL reserve ~1 GiB together on H100 in torchtitan runs.)
RESERVED_BYTES = 1 << 30


@dataclass(frozen=True)
class RunPlan:
    """What one simulation will do: `classes[i]` are the ranks `tasks[i]` stands for."""
    cfg: SimdistConfig
    spec: ModelSpec
    gpu: GPUSpec
    layout: MeshLayout
    classes: list[list[int]]
    tasks: list[RankTask]
    exhaustive: bool = False  # every rank its own class (to check the classes)
    # From the one model the planner builds on meta (plan.json num_params, the MFU
    # conventions' FLOPs per token: families.flops_per_token).
    num_params: int = 0
    flops_per_token: dict[str, int] = field(default_factory=dict)

    @property
    def memory_limit_bytes(self) -> int:
        return self.gpu.hbm_bytes - RESERVED_BYTES


def resolve_spec(cfg: SimdistConfig) -> ModelSpec:
    m = cfg.model
    require_trusted_code(cfg)  # before anything of the entrypoint is imported
    try:
        if (m.entrypoint or m.hf is not None) and m.overrides():
            key = next(iter(m.overrides()))
            where = "model.hf" if m.hf is not None else "model.kwargs"
            raise ModelError(f"model.{key}", f"shape fields go inside {where} with "
                                             f"{'model.hf' if m.hf is not None else 'an entrypoint'}"
                                             f"; allowed next to it: {'blocks, inputs, kwargs' if m.entrypoint else 'nothing'}")
        if m.entrypoint:
            return entrypoint_spec(m.entrypoint, m.kwargs, m.blocks, m.inputs)
        if m.hf is not None:
            return hf_spec(m.hf, attention=cfg.training.attention)
        return resolve_model(m.preset, m.overrides(), seq_len=cfg.training.seq_len,
                             routing=cfg.training.routing,
                             attention=cfg.training.attention)
    except ModelError as e:
        raise ConfigError(e.key, str(e)) from None


def resolve_gpu(cfg: SimdistConfig) -> GPUSpec:
    gpu = cfg.cluster.gpu
    try:
        return gpu_spec(gpu if isinstance(gpu, str) else gpu.model_dump())
    except UnknownGPU as e:
        raise ConfigError("cluster.gpu", str(e)) from None


def layout_of(cfg: SimdistConfig) -> MeshLayout:
    p = cfg.parallel
    return MeshLayout.from_parallel(p.pp, p.dp_replicate, p.dp_shard, p.cp, p.tp, p.ep)


def plan_run(cfg: SimdistConfig, *, use_cache: bool = True, exhaustive: bool = False) -> RunPlan:
    """The rank classes and their tasks (`exhaustive`: every rank its own class)."""
    spec = resolve_spec(cfg)
    check_plan(cfg, spec)
    gpu = resolve_gpu(cfg)
    layout = layout_of(cfg)
    model = meta_model(spec)  # the classes, the parameter count, the MFU FLOPs
    classes = compute_classes(cfg, spec, layout, model)
    if exhaustive:
        classes = [[r] for r in range(layout.world_size)]
    cache_dir = str(resolve_dir(cfg.simulation.cache_dir)) if use_cache else None
    tasks = [RankTask(rank=ranks[0], layout=layout, model=spec, training=cfg.training,
                      parallel=cfg.parallel, num_microbatches=cfg.num_microbatches,
                      layer_memo=use_cache and cfg.simulation.layer_memo,
                      layer_cache_dir=cache_dir,
                      pipeline_memo=use_cache and cfg.simulation.pipeline_memo,
                      stage_sharing=use_cache and cfg.simulation.stage_sharing)
             for ranks in classes]
    return RunPlan(cfg, spec, gpu, layout, classes, tasks, exhaustive,
                   num_params=count_params(model),
                   flops_per_token=flops_per_token(spec, cfg.training.seq_len, model))


# Meta models the planner built in this process, by spec text (ModelSpec's repr is its full
# arguments, as the execution key uses it): a sweep or search plans one model many times,
# and a 70B build on meta is half a second of module construction. Bounded: a process plans few
# distinct models.
_META_MODELS: dict[str, nn.Module] = {}
META_MODELS_MAX = 8


def meta_model(spec: ModelSpec) -> nn.Module:
    """`spec` built on meta, read only (parameter shapes and counts). Built-in families are
    kept for the next plan of the same spec; a user entrypoint is built every time (its code
    may read state outside the spec)."""
    if spec.entrypoint:
        return build_model(spec, "meta")
    key = repr(spec)
    model = _META_MODELS.get(key)
    if model is None:
        if len(_META_MODELS) >= META_MODELS_MAX:
            _META_MODELS.pop(next(iter(_META_MODELS)))
        model = _META_MODELS[key] = build_model(spec, "meta")
    return model


def compute_classes(cfg: SimdistConfig, spec: ModelSpec, layout: MeshLayout,
                    model: nn.Module | None = None) -> list[list[int]]:
    """`model`: the spec built on meta, where the caller has it."""
    p = cfg.parallel
    dim0_by_stage = []
    for dim0 in stage_dim0(spec, p, model):  # each pipeline rank's own parameters
        if p.tp > 1:
            # FSDP shards the tensor-parallel shard: dims split by TP appear at dim0 / tp.
            # Adding both sizes can only split classes further, never merge ranks that differ.
            dim0 += [d // p.tp for d in dim0 if d % p.tp == 0]
        dim0_by_stage.append(dim0)
    ep_loads = expert_loads(spec, cfg, layout)
    # experts' local dim 0 under EP: their own FSDP unit over dp_shard_mod_ep
    expert_dim0 = [spec.args.n_experts // p.ep] if p.ep > 1 else []
    return list(rank_classes(layout, dim0_by_stage, ep_loads, expert_dim0).values())


def stage_dim0(spec: ModelSpec, p: ParallelConfig,
               model: nn.Module | None = None) -> list[list[int]]:
    """Dim-0 sizes of the parameters every pipeline rank holds, from one model built on meta
    (the stages keep what parallel/pipeline.py: prune_to_stage keeps)."""
    model = model if model is not None else build_model(spec, "meta")
    if p.pp == 1 or not hasattr(model, "layers"):
        return [[prm.shape[0] for prm in model.parameters() if prm.dim() > 0]]
    dim0 = lambda m: [prm.shape[0] for prm in m.parameters() if prm.dim() > 0]  # noqa: E731
    layer = {name: dim0(block) for name, block in model.layers.items()}
    first = dim0_of(model, STAGE_FIRST_ONLY)
    last = dim0_of(model, STAGE_LAST_ONLY)
    rest = dim0_of(model, None)
    split = split_layers(spec.n_layers or 0, p.stages, p.pp_layers)
    out = []
    for pp_rank in range(p.pp):
        sizes: list[int] = []
        for sid in rank_stage_ids(pp_rank, p.pp, p.stages_per_rank):
            sizes += rest + (first if sid == 0 else []) + (last if sid == p.stages - 1 else [])
            for i in split[sid]:
                sizes += layer[str(i)]
        out.append(sizes)
    return out


def dim0_of(model: nn.Module, names: tuple[str, ...] | None) -> list[int]:
    """Dim-0 sizes of the parameters of `model`'s top-level children in `names` (None: the
    children every stage keeps), each parameter once."""
    keep = (lambda n: n in names) if names is not None else (  # noqa: E731
        lambda n: n != "layers" and n not in STAGE_FIRST_ONLY + STAGE_LAST_ONLY)
    seen: set[int] = set()
    sizes = []
    for name, child in model.named_children():
        if child is None or not keep(name):
            continue
        for prm in child.parameters():
            if id(prm) not in seen and prm.dim() > 0:
                seen.add(id(prm))
                sizes.append(prm.shape[0])
    return sizes


def expert_loads(spec: ModelSpec, cfg: SimdistConfig, layout: MeshLayout) -> list[tuple] | None:
    """Tokens each EP rank's experts receive, per MoE layer: what makes EP ranks differ."""
    if layout.ep == 1:
        return None
    from simdist.parallel.expert_parallel import ep_received_counts

    n_tokens = cfg.training.micro_batch * cfg.training.seq_len // (
        cfg.parallel.tp if cfg.parallel.sequence_parallel else 1)
    try:
        return [tuple(map(tuple, ep_received_counts(spec.args, spec.args.routing, n_tokens,
                                                    layout.ep, r)))
                for r in range(layout.ep)]
    except (ValueError, OSError) as e:
        raise ConfigError("training.routing", str(e)) from None
