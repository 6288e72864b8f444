"""Checks that need both the plan and the model (the config alone cannot tell): raised as
ConfigError so the CLI exits 2 with the key at fault."""

from __future__ import annotations

from simdist.config import ConfigError, SimdistConfig
from simdist.families import FAMILIES, ModelSpec


def check_plan(cfg: SimdistConfig, spec: ModelSpec) -> None:
    par = cfg.parallel
    tp = par.tp
    if spec.family == "hf":
        _check_hf(cfg, spec)
    if spec.entrypoint:
        _check_blocks(spec, cfg.training.activation_checkpointing)
    if spec.inputs and (par.pp > 1 or par.cp > 1):
        raise ConfigError("model.inputs", "the forward's extra inputs are passed without "
                                          "pipeline or context parallelism; allowed with pp=1, "
                                          "cp=1")
    if tp > 1 and not spec.registration.tensor_parallel:
        with_tp = [f.name for f in FAMILIES.values() if f.tensor_parallel]
        raise ConfigError("parallel.tp", f"tensor parallelism is implemented for "
                                         f"{', '.join(with_tp)} models, not {spec.family}; "
                                         "allowed: tp=1")
    if par.zero_stage in (1, 2) and par.dp_replicate > 1:
        raise ConfigError("parallel.zero_stage", f"zero_stage {par.zero_stage} shards over dp_shard "
                                                 "with replicated bf16 parameters; allowed with "
                                                 "dp_replicate=1 (use zero_stage 3 = FSDP2 for "
                                                 "HSDP)")
    args = spec.args
    if par.ep > 1:
        n_experts = getattr(args, "n_experts", None)
        if n_experts is None:
            raise ConfigError("parallel.ep", f"expert parallelism needs a MoE model (moe-debug, "
                                             f"mixtral-8x7b, deepseek-moe-16b), not {spec.family}")
        if n_experts % par.ep or par.dp_shard % par.ep:
            raise ConfigError("parallel.ep", f"ep={par.ep} must divide n_experts ({n_experts}) "
                                             f"and dp_shard ({par.dp_shard})")
    if par.cp > 1:
        if par.pp > 1 or par.dp_replicate > 1 or par.ep > 1 or par.zero_stage != 3:
            raise ConfigError("parallel.cp", "context parallelism is implemented with FSDP "
                                             "(dp_shard) and tp; allowed with pp=1, ep=1, "
                                             "dp_replicate=1, zero_stage=3")
        if spec.family == "gpt" and cfg.training.attention == "eager":
            raise ConfigError("parallel.cp", "ring attention needs the flash attention kernel; "
                                             "allowed: training.attention=flash")
    if par.pp > 1:
        _check_pipeline(cfg, spec)
    if args is None:
        return
    heads = getattr(args, "n_heads", None)
    dim = getattr(args, "dim", None)
    if heads and dim and dim % heads:
        raise ConfigError("model.n_heads", f"dim {dim} is not divisible by n_heads {heads}")
    kv = getattr(args, "n_kv_heads", None)
    if kv and heads and heads % kv:
        raise ConfigError("model.n_kv_heads", f"n_heads {heads} is not divisible by n_kv_heads {kv}")
    if tp > 1:
        for field in ("n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
            value = getattr(args, field, None)
            if value and value % tp:
                raise ConfigError("parallel.tp", f"tp={tp} must divide model.{field}={value}")
        # GPT: the fused qkv is sharded by whole heads (n_heads above); its MLP width is ffn_dim,
        # or 4 * dim = 4 * n_heads * head_dim when ffn_dim is 0, which n_heads % tp covers.
        if par.sequence_parallel and cfg.training.seq_len % tp:
            raise ConfigError("parallel.tp", f"with sequence_parallel, tp={tp} must divide "
                                             f"training.seq_len={cfg.training.seq_len}")
    max_seq = getattr(args, "max_seq_len", None)
    if max_seq and cfg.training.seq_len > max_seq:
        raise ConfigError("training.seq_len", f"{cfg.training.seq_len} exceeds the model's "
                                              f"max_seq_len {max_seq}")


def _check_pipeline(cfg: SimdistConfig, spec: ModelSpec) -> None:
    par = cfg.parallel
    if spec.n_layers is None:
        raise ConfigError("parallel.pp", "pipelining needs a model with `layers` (a preset family)")
    stages = par.stages
    if par.pp_layers is not None:
        if sum(par.pp_layers) != spec.n_layers:
            raise ConfigError("parallel.pp_layers", f"sums to {sum(par.pp_layers)}, but the model "
                                                    f"has {spec.n_layers} layers")
    elif spec.n_layers < stages:
        raise ConfigError("parallel.pp", f"{stages} pipeline stages for {spec.n_layers} layers; "
                                         "allowed: at most one stage per layer")
    n_mb = cfg.num_microbatches
    if n_mb < par.pp:
        raise ConfigError("training.global_batch",
                          f"{n_mb} micro-batch(es) per step cannot fill {par.pp} pipeline stages; "
                          f"allowed: global_batch >= dp ({cfg.dp}) x micro_batch "
                          f"({cfg.training.micro_batch}) x pp ({par.pp})")
    if par.stages_per_rank > 1 and n_mb % par.pp:
        raise ConfigError("training.global_batch",
                          f"{par.pp_schedule} needs the micro-batch count ({n_mb}) to be a multiple "
                          f"of pp ({par.pp})")


def _check_hf(cfg: SimdistConfig, spec: ModelSpec) -> None:
    """What the hf family implements: FSDP/HSDP/DDP/ZeRO, TP from the model's own plan,
    full and op checkpointing."""
    from simdist.parallel.tensor_parallel import unsupported_tp_styles

    par, args = cfg.parallel, spec.args
    for key, degree in (("pp", par.pp), ("cp", par.cp), ("ep", par.ep)):
        if degree > 1:
            raise ConfigError(f"parallel.{key}", f"{key}={degree} is not implemented for hf models "
                                                 f"({args.model_type}); allowed: {key}=1 (presets "
                                                 "have pipeline, context and expert parallelism)")
    if cfg.training.activation_checkpointing == "selective":
        raise ConfigError("training.activation_checkpointing",
                          "selective recomputes simdist's attention core, which hf models do not "
                          "have; allowed for hf: none, full, op")
    if par.tp > 1:
        if not args.tp_plan:
            raise ConfigError("parallel.tp", f"{args.model_type} declares no tensor-parallel plan "
                                             "(`_tp_plan`); allowed: tp=1")
        bad = unsupported_tp_styles(args.tp_plan)
        if bad:
            listed = ", ".join(f"{glob}: {style}" for glob, style in bad[:4])
            raise ConfigError("parallel.tp", f"{args.model_type}'s tensor-parallel plan uses "
                                             f"styles simdist does not map to DTensor ({listed}); "
                                             "supported: colwise, rowwise, embedding_rowwise, "
                                             "colwise_gather_output, "
                                             "replicated_with_grad_allreduce, moe_tp_experts "
                                             "(with packed_colwise / colwise / rowwise expert "
                                             "weights); allowed: tp=1")


def _check_blocks(spec: ModelSpec, checkpointing: str) -> None:
    from simdist.families import build_model
    from simdist.parallel.blocks import BlocksNotFound, block_container

    model = build_model(spec, "meta")
    try:
        block_container(model)
    except BlocksNotFound as e:
        raise ConfigError("model.blocks", f"{spec.entrypoint}: {e}; set model.blocks to the path "
                                          "of its blocks (e.g. model.layers)") from None
    # selective recomputes a `core_attention` method (parallel/checkpointing.py: apply_ac)
    if checkpointing == "selective" and not any(hasattr(m, "core_attention")
                                                for m in model.modules()):
        raise ConfigError("training.activation_checkpointing",
                          f"selective recomputes a block's `core_attention`, which "
                          f"{spec.entrypoint}'s model does not have; allowed: none, full, op")
