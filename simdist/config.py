"""The YAML schema of a simdist run: pydantic models with defaults, `--set a.b=c` overrides, plan
resolution (dp_shard=-1, global_batch default) and the checks that need several keys at once.

Every way a config can be wrong ends in one `ConfigError(key, message)`: the dotted key at fault
and one short paragraph naming the bad value and what is allowed. The CLI prints it and exits 2;
pydantic's own error text (multi-line, with URLs) never reaches the user.
"""

from __future__ import annotations

import copy
import re
import types
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

if TYPE_CHECKING:  # torch is heavy; the config is loaded (and bad input reported) without it
    import torch

__all__ = [
    "ConfigError",
    "ModelConfig",
    "TrainingConfig",
    "ParallelConfig",
    "GPUSpecConfig",
    "ClusterConfig",
    "SimulationConfig",
    "SimdistConfig",
    "DTYPES",
    "torch_dtype",
    "parse_override",
    "apply_overrides",
    "load_config",
    "trusting",
    "require_trusted_code",
]


class ConfigError(ValueError):
    """Invalid input. `key` is the dotted config key at fault ("parallel.tp"), or "config" for the
    file itself, or "--set" for a malformed override."""

    def __init__(self, key: str, message: str):
        # One line whatever the input held (a --set value or a key may contain line breaks).
        key = key if key.isprintable() else repr(key)[1:-1]
        message = " ".join(message.split())
        # args=(key, message) so the exception pickles (it crosses Ray actor boundaries)
        super().__init__(key, message)
        self.key = key
        self.message = message

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


# ---------------------------------------------------------------------------------------------
# Schema

# Upper bounds on every number that sizes the simulation's memory or time: generous real-world
# maxima (README "Config reference" states them). Past one the run would exhaust memory or never
# end (a world of 10^9 ranks is a MemoryError, not a plan); the key and the limit are reported.
WORLD_MAX = 1 << 20  # nodes x gpus_per_node: 1,048,576 GPUs
NODES_MAX = WORLD_MAX
GPUS_PER_NODE_MAX = 64
SEQ_LEN_MAX = 1 << 24  # 16,777,216 tokens
MICRO_BATCH_MAX = 1 << 16  # 65,536 sequences per micro-batch
GLOBAL_BATCH_MAX = 1 << 24  # 16,777,216 sequences per step
MICROBATCHES_MAX = 1 << 16  # micro-batches per step (a pipeline executes each one)
LAYERS_MAX = 4096  # also: pipeline stages, layers per stage
WORKERS_MAX = 1 << 16
RANK_TIMEOUT_MAX_S = 7 * 24 * 3600.0
GPU_FIGURE_MAX = 1e7  # TFLOP/s, GB, TB/s, GB/s of an explicit GPU spec
PRICE_MAX = 1e6


def _bounded(lo: int, hi: int) -> Any:
    return Annotated[int, annotated_types.Ge(lo), annotated_types.Le(hi)]


Positive = Annotated[int, annotated_types.Ge(1)]
PositiveFloat = Annotated[float, annotated_types.Gt(0), annotated_types.Le(GPU_FIGURE_MAX)]
Degree = _bounded(1, WORLD_MAX)

_MODEL_SOURCES = ("preset", "hf", "entrypoint")
_DEFAULT_PRESET = "llama3-debug"


class ModelConfig(BaseModel):
    """Which model: a zoo preset, a Hugging Face config dict, or a user `module:function`.
    Any other key is a shape override (n_layers, dim, ...) checked later by the model zoo, which
    knows the fields of the chosen family."""

    model_config = ConfigDict(extra="allow")

    preset: str | None = None
    hf: dict | None = None
    entrypoint: str | None = None
    kwargs: dict = {}
    # With an entrypoint: the path of the model's block container (a ModuleList or ModuleDict,
    # e.g. `model.layers`), what FSDP and checkpointing wrap one unit each; default `layers`.
    blocks: str | None = None
    # With an entrypoint: `module:function` called as fn(model, batch, seq_len) once per
    # micro-batch inside the simulation, returning the forward's keyword arguments besides the
    # tokens (torchtitan's positions and attention masks: simdist.models.titan:trainer_inputs).
    inputs: str | None = None

    def overrides(self) -> dict:
        """The shape overrides: every key that is not a schema field."""
        return dict(self.model_extra or {})

    @field_validator("entrypoint", "inputs")
    @classmethod
    def _entrypoint_form(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[\w.]+:[\w.]+", v):
            raise ValueError(f"got {v!r}; expected 'package.module:function'")
        return v

    @field_validator("blocks")
    @classmethod
    def _blocks_form(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_]\w*(\.\w+)*", v):
            raise ValueError(f"got {v!r:.60}; expected a dotted module path like model.layers")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        given = [k for k in _MODEL_SOURCES if getattr(self, k) is not None]
        if not given:
            self.preset = _DEFAULT_PRESET
        elif len(given) > 1:
            raise ValueError(f"set exactly one of preset, hf, entrypoint; got {' and '.join(given)}")
        if self.inputs is not None and self.entrypoint is None:
            raise ConfigError("model.inputs", "applies to model.entrypoint only (presets and hf "
                                              "models take the tokens alone)")
        if self.blocks is not None and self.entrypoint is None:
            raise ConfigError("model.blocks", "applies to model.entrypoint only (presets and hf "
                                              "models know their blocks)")
        return self


_ROUTING = re.compile(r"balanced|zipf:(?P<alpha>.+)|file:(?P<path>.+)")


class TrainingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seq_len: _bounded(1, SEQ_LEN_MAX) = 2048
    micro_batch: _bounded(1, MICRO_BATCH_MAX) = 1
    global_batch: _bounded(1, GLOBAL_BATCH_MAX) | None = None  # None => dp * micro_batch (one micro-batch per step)
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    activation_checkpointing: Literal["none", "selective", "full", "op", "layer"] = "none"
    attention: Literal["flash", "eager"] = "flash"
    routing: str = "balanced"  # MoE token routing: balanced | zipf:<alpha> | file:<path>
    # Time pointwise chains as torch.compile fuses them (costmodel/kernels.py); torchtitan
    # users compile. Memory and FLOPs are those of eager execution either way.
    compile: bool = False
    # When data parallelism reduces gradients over a step's micro-batches: once per step (all
    # but the last micro-batch accumulate without communication), after every micro-batch, or
    # as real code does for the plan (simdist.parallel.data_parallel.grad_sync_rule).
    grad_sync: Literal["auto", "per_step", "per_microbatch"] = "auto"

    @field_validator("routing")
    @classmethod
    def _routing_form(cls, v: str) -> str:
        m = _ROUTING.fullmatch(v.strip())
        ok = m is not None
        if ok and m.group("alpha") is not None:
            try:
                ok = float(m.group("alpha")) > 0
            except ValueError:
                ok = False
        if not ok:
            raise ValueError(
                f"got {v!r}; allowed: balanced, zipf:<positive number> (e.g. zipf:1.2), file:<path>"
            )
        return v.strip()


MULTI_STAGE_SCHEDULES = ("interleaved_1f1b", "zero_bubble")  # several stages per pp rank


class ParallelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dp_replicate: Degree = 1
    dp_shard: _bounded(-1, WORLD_MAX) = -1  # -1: whatever is left of the world after the other degrees
    tp: Degree = 1
    sequence_parallel: bool = True
    pp: _bounded(1, LAYERS_MAX) = 1
    pp_layers: list[_bounded(0, LAYERS_MAX)] | None = None  # layers per stage
    pp_schedule: Literal["1f1b", "interleaved_1f1b", "gpipe", "zero_bubble"] = "1f1b"
    pp_virtual_stages: _bounded(1, LAYERS_MAX) = 2  # stages per pp rank, multi-stage schedules
    cp: Degree = 1
    ep: Degree = 1
    zero_stage: Literal[1, 2, 3] = 3
    # Megatron-LM's distributed optimizer flags (off there by default): ZeRO-1's reduce-scatter
    # in the last micro-batch's backward; ZeRO-1/2's parameter all-gather in the next forward.
    zero_overlap_grad_reduce: bool = False
    zero_overlap_param_gather: bool = False
    # ZeRO-1's gradient buffer: the ZeRO paper's bf16 gradients, or Megatron's fp32 main_grad
    # (what Megatron-LM runs with bf16: --accumulate-allreduce-grads-in-fp32 is forced on)
    zero_grad_dtype: Literal["bf16", "fp32"] = "bf16"

    @field_validator("dp_shard")
    @classmethod
    def _dp_shard_range(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError(f"got {v}; expected -1 (fill the rest of the world) or an integer >= 1")
        return v

    @property
    def stages_per_rank(self) -> int:
        """Pipeline stages each pp rank holds: pp_virtual_stages for the multi-stage schedules."""
        multi = self.pp > 1 and self.pp_schedule in MULTI_STAGE_SCHEDULES
        return self.pp_virtual_stages if multi else 1

    @property
    def stages(self) -> int:
        """Pipeline stages in total (pp ranks x stages per rank)."""
        return self.pp * self.stages_per_rank


class GPUSpecConfig(BaseModel):
    """An explicit GPU, for hardware without a preset."""

    model_config = ConfigDict(extra="forbid")

    name: str = "custom"
    bf16_tflops: PositiveFloat
    hbm_gb: PositiveFloat
    hbm_tb_s: PositiveFloat
    nvlink_gb_s: PositiveFloat
    internode_gb_s: PositiveFloat = 50.0
    fp8_tflops: PositiveFloat | None = None


def _gpu_branch(v: Any) -> str:
    # Discriminate by input type so a bad spec mapping reports only the spec's own errors
    # (an undiscriminated union would also report "not a string").
    return "spec" if isinstance(v, (dict, GPUSpecConfig)) else "preset"


def _workers_branch(v: Any) -> str:
    return "auto" if v == "auto" else "count"


class ClusterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gpu: Annotated[
        Union[Annotated[str, Tag("preset")], Annotated[GPUSpecConfig, Tag("spec")]],
        Discriminator(_gpu_branch),
    ] = "h100-sxm"
    gpus_per_node: _bounded(1, GPUS_PER_NODE_MAX) = 8
    nodes: _bounded(1, NODES_MAX) = 1
    price_per_gpu_hour: Annotated[float, annotated_types.Ge(0), annotated_types.Le(PRICE_MAX)] | None = None
    # A table written by `simdist calibrate` (load_calibration), over the defaults; null: the
    # defaults alone. simdist.calibrate.calibration_for(cfg) gives the table a run uses.
    calibration: str | None = None

    @model_validator(mode="after")
    def _calibration_table(self) -> ClusterConfig:
        if self.calibration is not None:
            from simdist.calibrate import check_calibration_file

            gpu = self.gpu if isinstance(self.gpu, str) else self.gpu.name
            try:
                self.calibration = str(check_calibration_file(self.calibration, gpu))
            except ValueError as e:
                raise ConfigError("cluster.calibration", str(e)) from None
        return self


class SimulationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    workers: Annotated[
        Union[Annotated[Literal["auto"], Tag("auto")], Annotated[_bounded(1, WORKERS_MAX), Tag("count")]],
        Discriminator(_workers_branch),
    ] = "auto"
    cache_dir: str = "~/.cache/simdist"
    rank_timeout_s: Annotated[float, annotated_types.Gt(0), annotated_types.Le(RANK_TIMEOUT_MAX_S)] = 600.0
    # Rebuild deep pipeline stages from 2-, 3- and 4-block executions (exact; see
    # simdist/mode/layer_memo.py). false: execute every block.
    layer_memo: bool = True
    # Rebuild a pipeline step of many micro-batches from steps of a few, verified on a longer
    # one (exact; see simdist/mode/pipeline_memo.py). false: execute every micro-batch.
    pipeline_memo: bool = True
    # Rebuild the middle ranks of a pipeline (neither first nor last stage) from one of them:
    # they run one program in another order (exact; see simdist/mode/stage_share.py). false:
    # every middle rank's class is simulated on its own.
    stage_sharing: bool = True

    @field_validator("cache_dir")
    @classmethod
    def _cache_dir_form(cls, v: str) -> str:
        if not v.strip() or "\0" in v:
            raise ValueError(f"got {v[:60]!r}; expected a directory path")
        return v


class SimdistConfig(BaseModel):
    """A validated, resolved plan: dp_shard and global_batch are concrete after validation."""

    model_config = ConfigDict(extra="forbid")

    # Whether `model.entrypoint` may be imported and called: granted by the caller (--trust-code,
    # load_config(trust_code=True), simulate(trust_code=True)), never by the config's own data.
    _trust_code: bool = PrivateAttr(default=False)

    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    simulation: SimulationConfig = Field(default_factory=SimulationConfig)

    @property
    def world_size(self) -> int:
        return self.cluster.nodes * self.cluster.gpus_per_node

    @property
    def dp(self) -> int:
        return self.parallel.dp_replicate * self.parallel.dp_shard

    @property
    def num_microbatches(self) -> int:
        return self.training.global_batch // (self.dp * self.training.micro_batch)

    def to_dict(self) -> dict:
        """The resolved config as JSON-able data (what plan.json records)."""
        return self.model_dump(mode="json")

    @model_validator(mode="after")
    def _resolve_plan(self) -> SimdistConfig:
        # Raised as ConfigError so the key survives pydantic's wrapping (see _from_validation).
        _resolve(self)
        return self


def _resolve(cfg: SimdistConfig) -> None:
    """Fill dp_shard=-1 and global_batch=None, then check what spans several keys."""
    p, t, c = cfg.parallel, cfg.training, cfg.cluster
    world = cfg.world_size
    world_txt = f"world size {world} (nodes*gpus_per_node = {c.nodes}*{c.gpus_per_node})"
    if world > WORLD_MAX:
        raise ConfigError("cluster.nodes", f"{world_txt} exceeds the limit of {WORLD_MAX:,} GPUs")

    if p.dp_shard == -1:
        rest = p.dp_replicate * p.tp * p.pp * p.cp
        if world % rest:
            raise ConfigError(
                "parallel.dp_shard",
                f"-1 cannot fill the world: dp_replicate*tp*pp*cp = {p.dp_replicate}*{p.tp}*{p.pp}*"
                f"{p.cp} = {rest} does not divide {world_txt}",
            )
        p.dp_shard = world // rest

    product = p.dp_replicate * p.dp_shard * p.cp * p.tp * p.pp
    if product != world:
        raise ConfigError(
            "parallel",
            f"product of degrees dp_replicate*dp_shard*cp*tp*pp = {p.dp_replicate}*{p.dp_shard}*"
            f"{p.cp}*{p.tp}*{p.pp} = {product} != {world_txt}",
        )

    # Experts are sharded over the dp_shard x cp ranks (as torchtitan does), not a mesh factor.
    if (p.dp_shard * p.cp) % p.ep:
        raise ConfigError(
            "parallel.ep",
            f"ep={p.ep} must divide dp_shard*cp = {p.dp_shard}*{p.cp} = {p.dp_shard * p.cp}",
        )

    if p.pp_layers is not None and len(p.pp_layers) != p.stages:
        per_rank = (
            f" x pp_virtual_stages ({p.pp_virtual_stages}) for {p.pp_schedule}"
            if p.stages_per_rank > 1
            else ""
        )
        raise ConfigError(
            "parallel.pp_layers",
            f"has {len(p.pp_layers)} entries; expected one per pipeline stage: pp ({p.pp}){per_rank}"
            f" = {p.stages}",
        )

    if t.seq_len % p.cp:
        raise ConfigError("parallel.cp", f"cp={p.cp} must divide training.seq_len={t.seq_len}")
    if p.cp > 1 and t.seq_len % (2 * p.cp):
        raise ConfigError(
            "parallel.cp",
            f"training.seq_len={t.seq_len} must be a multiple of 2*cp = {2 * p.cp} (context "
            "parallel load balancing splits the sequence into 2*cp chunks)",
        )

    _check_grad_sync(cfg)

    per_step = cfg.dp * t.micro_batch
    if t.global_batch is None:
        t.global_batch = per_step
    elif t.global_batch % per_step:
        raise ConfigError(
            "training.global_batch",
            f"{t.global_batch} must be a multiple of dp ({cfg.dp}) x micro_batch ({t.micro_batch})"
            f" = {per_step}",
        )
    if t.global_batch // per_step > MICROBATCHES_MAX:
        raise ConfigError(
            "training.global_batch",
            f"{t.global_batch} is {t.global_batch // per_step:,} micro-batches per step (dp "
            f"{cfg.dp} x micro_batch {t.micro_batch} each); the limit is {MICROBATCHES_MAX:,}",
        )


def _check_grad_sync(cfg: SimdistConfig) -> None:
    """Plans whose gradient reduction is fixed by the code that runs them."""
    p, sync = cfg.parallel, cfg.training.grad_sync
    if p.pp > 1 and sync == "per_microbatch":
        raise ConfigError(
            "training.grad_sync",
            "per_microbatch is not possible with pp > 1: torch.distributed.pipelining reduces "
            "gradients once per step (its stages turn FSDP's gradient sync off for every "
            "micro-batch and reduce after the last); allowed: auto, per_step",
        )
    if p.zero_overlap_grad_reduce and p.zero_stage != 1:
        raise ConfigError("parallel.zero_overlap_grad_reduce",
                          f"is for zero_stage 1 (ZeRO-2 reduces during every backward already, "
                          f"FSDP2 overlaps its own), not {p.zero_stage}; allowed: false")
    if p.zero_overlap_param_gather and p.zero_stage == 3:
        raise ConfigError("parallel.zero_overlap_param_gather",
                          "is for zero_stage 1 or 2 (FSDP2 prefetches its own all-gathers); "
                          "allowed: false")
    if p.zero_grad_dtype == "fp32" and p.zero_stage != 1:
        raise ConfigError("parallel.zero_grad_dtype",
                          f"fp32 (Megatron's main_grad buffer) is for zero_stage 1, not "
                          f"{p.zero_stage}; allowed: bf16")
    for flag in ("zero_overlap_grad_reduce", "zero_overlap_param_gather"):
        if getattr(p, flag) and p.pp > 1:
            raise ConfigError(f"parallel.{flag}", "is not implemented with pp > 1 (ZeRO then "
                                                  "runs its collectives at the optimizer step); "
                                                  "allowed: false")
    own = {1: "per_step", 2: "per_microbatch"}.get(p.zero_stage)
    if own is not None and sync not in ("auto", own):
        raise ConfigError(
            "training.grad_sync",
            f"{sync} is not possible with zero_stage {p.zero_stage}: ZeRO-1 reduce-scatters the "
            "accumulated gradients at the optimizer step (once per step), ZeRO-2 after every "
            f"micro-batch; allowed: auto, {own}",
        )


# ---------------------------------------------------------------------------------------------
# dtypes

_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a config dtype name ("bf16" -> torch.bfloat16)."""
    import torch

    if name not in _DTYPE_NAMES:
        raise ConfigError("training.dtype", f"{name!r} is not allowed; allowed: bf16, fp16, fp32")
    return getattr(torch, _DTYPE_NAMES[name])


def __getattr__(name: str) -> Any:
    # DTYPES is built on first access so importing the config does not import torch.
    if name == "DTYPES":
        return {k: torch_dtype(k) for k in _DTYPE_NAMES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# Overrides

_KEY_PART = re.compile(r"[A-Za-z_][\w-]*")


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=c' -> (['a', 'b'], yaml value of 'c'), so values are typed as in the YAML file."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError("--set", f"expected KEY=VALUE (e.g. parallel.tp=8), got {text!r}")
    path = key.strip().split(".")
    if not all(_KEY_PART.fullmatch(p) for p in path):
        raise ConfigError("--set", f"bad key {key.strip()!r} in {text!r}; expected dotted names like parallel.tp")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError("--set", f"cannot parse the value in {text!r}: {_yaml_problem(e)}") from None
    return path, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """A copy of `raw` with each 'a.b=c' applied, creating intermediate mappings as needed."""
    out = copy.deepcopy(raw)
    sections = list(SimdistConfig.model_fields)
    for text in overrides:
        path, value = parse_override(text)
        if path[0] not in sections:
            raise ConfigError(
                path[0],
                f"unknown config section in --set {text}; allowed sections: {', '.join(sections)}",
            )
        node = out
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise ConfigError(
                    where, f"cannot set {'.'.join(path)}: {where} is {child!r}, not a mapping"
                )
            node = child
        # Choosing a model source on the command line replaces the file's source, rather than
        # failing with "set exactly one of preset, hf, entrypoint".
        if len(path) == 2 and path[0] == "model" and path[1] in _MODEL_SOURCES and value is not None:
            for other in _MODEL_SOURCES:
                node.pop(other, None)
        node[path[-1]] = value
    return out


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(source: str | Path | dict, overrides: list[str] = (), *,
                trust_code: bool = False) -> SimdistConfig:
    """Read (YAML path) or take (dict) a config, apply overrides, validate and resolve it.
    `trust_code=True` allows `model.entrypoint` (which imports and runs that code) to be used;
    without it such a config loads but is refused (ConfigError) before anything is imported."""
    raw = raw_config(source, overrides)
    try:
        cfg = SimdistConfig.model_validate(raw)
    except ValidationError as e:
        raise _from_validation(e) from None
    cfg._trust_code = bool(trust_code)
    return cfg


def raw_config(source: str | Path | dict, overrides: list[str] = ()) -> dict:
    """The config as data, before validation: read (YAML path) or copied (dict), overrides
    applied (what the user wrote, e.g. whether `training.global_batch` is given at all)."""
    raw = _read(source) if not isinstance(source, dict) else copy.deepcopy(source)
    # An empty section ("training:" with every line commented out) means its defaults.
    raw = {k: ({} if v is None else v) for k, v in raw.items()}
    return apply_overrides(raw, list(overrides))


def trusting(cfg: SimdistConfig, trust_code: bool = True) -> SimdistConfig:
    """`cfg` with leave to run its `model.entrypoint` (a copy; `cfg` itself is unchanged)."""
    if not trust_code or cfg._trust_code:
        return cfg
    out = cfg.model_copy()
    out._trust_code = True
    return out


def require_trusted_code(cfg: SimdistConfig) -> None:
    """Raise ConfigError unless the caller allowed `model.entrypoint` to run: it imports a module
    and calls a function named by the config (`os:system` would run a shell command)."""
    if cfg.model.entrypoint and not cfg._trust_code:
        raise ConfigError(
            "model.entrypoint",
            f"{cfg.model.entrypoint!r} imports and runs code named by the config; refused unless "
            "you pass --trust-code on the command line (Python: load_config(..., "
            "trust_code=True) or simulate(..., trust_code=True)); a config cannot allow it itself",
        )


def _read(source: str | Path) -> dict:
    path = Path(source).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("config", f"file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError("config", f"cannot read {path}: it is a directory") from None
    except UnicodeDecodeError:
        raise ConfigError("config", f"cannot read {path}: not UTF-8 text") from None
    except OSError as e:
        raise ConfigError("config", f"cannot read {path}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError("config", f"{path}: YAML syntax error {_yaml_problem(e)}") from None
    if data is None:  # an empty file: all defaults
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            "config", f"{path}: expected a mapping of sections at the top, got {type(data).__name__}"
        )
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError("config", f"{path}: section names must be strings, got {bad[0]!r}")
    return data


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = " ".join(str(getattr(e, "problem", None) or e).split())
    if mark is None:
        return problem
    return f"at line {mark.line + 1}, column {mark.column + 1}: {problem}"


# ---------------------------------------------------------------------------------------------
# pydantic errors -> ConfigError


def _from_validation(exc: ValidationError) -> ConfigError:
    """The first error as a ConfigError; the keys of any others are listed after it."""
    errors = exc.errors(include_url=False)
    converted = [_convert(err) for err in errors]
    first = converted[0]
    others = [e.key for e in converted[1:] if e.key != first.key]
    if others:
        return ConfigError(first.key, f"{first.message} (also invalid: {', '.join(dict.fromkeys(others))})")
    return first


def _convert(err: dict) -> ConfigError:
    ctx = err.get("ctx") or {}
    inner = ctx.get("error")
    if isinstance(inner, ConfigError):  # raised by _resolve inside the model validator
        return inner
    key, parent, ann, meta = _locate(err["loc"])
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        allowed = ", ".join(parent.model_fields) if parent is not None else ""
        if parent is SimdistConfig:
            return ConfigError(key, f"unknown section; allowed sections: {allowed}")
        return ConfigError(key, f"unknown key; allowed: {allowed}")
    if kind in ("value_error", "assertion_error") and inner is not None:
        return ConfigError(key or "config", str(inner))
    expected = _describe(ann, meta) if ann is not None else ""
    if kind == "missing":
        return ConfigError(key, f"required{'; expected ' + expected if expected else ''}")
    if kind == "literal_error":
        return ConfigError(key, f"{_show(value)} is not allowed; allowed: {expected}")
    if expected:
        return ConfigError(key, f"got {_show(value)}; expected {expected}")
    return ConfigError(key or "config", f"got {_show(value)}: {err['msg']}")


def _locate(loc: tuple) -> tuple[str, type[BaseModel] | None, Any, list]:
    """Walk an error location through the schema: the dotted key (union tags dropped), the model
    holding the last key, and the annotation and constraints of the field it names."""
    model: type[BaseModel] | None = SimdistConfig
    parent: type[BaseModel] | None = SimdistConfig
    ann: Any = None
    meta: list = []
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):  # a list index
            if parts:
                parts[-1] += f"[{item}]"
            else:
                parts.append(f"[{item}]")
            ann, meta = _list_item(ann)
            model = None
            continue
        branches = _tagged_branches(ann)
        if item in branches:  # a discriminated-union tag: not a config key; keep `ann` for text
            model = _as_model(branches[item])
            continue
        parts.append(str(item))
        parent = model
        if model is not None and item in model.model_fields:
            field = model.model_fields[item]
            ann, meta = field.annotation, list(field.metadata)
            model = _as_model(ann)
        else:  # an extra key (model overrides) or inside a free-form dict
            ann, meta, model = None, [], None
    return ".".join(parts), parent, ann, meta


def _strip(ann: Any, meta: list) -> tuple[Any, list]:
    """Unwrap Annotated[...] and FieldInfo metadata into (type, [constraints])."""
    while get_origin(ann) is Annotated:
        args = get_args(ann)
        ann, meta = args[0], [*meta, *args[1:]]
    flat = []
    for m in meta:
        flat.extend(m.metadata if isinstance(m, FieldInfo) else [m])
    return ann, flat


def _is_union(ann: Any) -> bool:
    return get_origin(ann) in (Union, types.UnionType)


def _tagged_branches(ann: Any) -> dict[str, Any]:
    ann, _ = _strip(ann, [])
    if not _is_union(ann):
        return {}
    out = {}
    for arg in get_args(ann):
        if get_origin(arg) is Annotated:
            for m in get_args(arg)[1:]:
                if isinstance(m, Tag):
                    out[m.tag] = arg
    return out


def _as_model(ann: Any) -> type[BaseModel] | None:
    ann, _ = _strip(ann, [])
    if _is_union(ann):
        models = [m for m in map(_as_model, get_args(ann)) if m is not None]
        return models[0] if len(models) == 1 else None
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _list_item(ann: Any) -> tuple[Any, list]:
    ann, _ = _strip(ann, [])
    if _is_union(ann):
        lists = [a for a in get_args(ann) if get_origin(a) is list]
        ann = lists[0] if lists else None
    if get_origin(ann) is list and get_args(ann):
        return get_args(ann)[0], []
    return None, []


_CONSTRAINTS = (
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Le, "le", "<="),
    (annotated_types.Lt, "lt", "<"),
)


def _describe(ann: Any, meta: list) -> str:
    """Plain words for what a field accepts: 'bf16, fp16, fp32', 'an integer >= 1', ..."""
    ann, meta = _strip(ann, meta)
    origin = get_origin(ann)
    if origin is Literal:
        return ", ".join(str(v) for v in get_args(ann))
    if _is_union(ann):
        args = get_args(ann)
        words = " or ".join(_describe(a, []) for a in args if a is not type(None))
        return words + (" or null" if type(None) in args else "")
    bounds = [
        f"{op} {getattr(m, attr)}"
        for m in meta
        for cls, attr, op in _CONSTRAINTS
        if isinstance(m, cls)
    ]
    suffix = (" " + " and ".join(bounds)) if bounds else ""
    if origin is list:
        item = get_args(ann)[0] if get_args(ann) else None
        return "a list" + (f" of {_describe(item, [])}" if item is not None else "")
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return f"a mapping with keys: {', '.join(ann.model_fields)}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}
    return names.get(ann, getattr(ann, "__name__", str(ann))) + suffix


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_workers(value: Any, key: str = "--workers") -> int | str:
    """`simulation.workers`' rule for a value given elsewhere (--workers, simulate(workers=)):
    'auto' or an integer in 1..WORKERS_MAX; a string is read as YAML, like --set."""
    if isinstance(value, str):
        _, value = parse_override(f"simulation.workers={value}")
    try:
        return SimulationConfig.model_validate({"workers": value}).workers
    except ValidationError as e:
        err = _from_validation_at(e, ("simulation",))
        raise ConfigError(key, err.message) from None


def _from_validation_at(exc: ValidationError, prefix: tuple) -> ConfigError:
    """_from_validation for a section validated on its own (its errors' locations lack the
    section's name)."""
    err = exc.errors(include_url=False)[0]
    return _convert({**err, "loc": (*prefix, *err["loc"])})
