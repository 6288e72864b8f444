"""Checks that need both the plan and the model (the config alone cannot tell): raised as
ConfigError so the CLI exits 2 with the key at fault."""

from __future__ import annotations

from simdist.config import ConfigError, SimdistConfig
from simdist.models import ModelSpec

SUPPORTED_NOW = {"pp": 1, "cp": 1, "ep": 1}
TP_FAMILIES = ("llama3",)


def check_plan(cfg: SimdistConfig, spec: ModelSpec) -> None:
    par = cfg.parallel
    for key, allowed in SUPPORTED_NOW.items():
        if getattr(par, key) != allowed:
            raise ConfigError(f"parallel.{key}", f"{key}={getattr(par, key)} is not supported yet; "
                                                 f"allowed: {allowed} (data parallelism: dp_shard, "
                                                 "dp_replicate; tensor parallelism: tp)")
    tp = par.tp
    if tp > 1 and spec.family not in TP_FAMILIES:
        raise ConfigError("parallel.tp", f"tensor parallelism is implemented for "
                                         f"{', '.join(TP_FAMILIES)} models, not {spec.family}; "
                                         "allowed: tp=1")
    if cfg.parallel.zero_stage != 3:
        raise ConfigError("parallel.zero_stage", "only zero_stage 3 (FSDP2) is supported yet; allowed: 3")
    args = spec.args
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
        if par.sequence_parallel and cfg.training.seq_len % tp:
            raise ConfigError("parallel.tp", f"with sequence_parallel, tp={tp} must divide "
                                             f"training.seq_len={cfg.training.seq_len}")
    max_seq = getattr(args, "max_seq_len", None)
    if max_seq and cfg.training.seq_len > max_seq:
        raise ConfigError("training.seq_len", f"{cfg.training.seq_len} exceeds the model's "
                                              f"max_seq_len {max_seq}")
