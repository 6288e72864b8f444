"""Hugging Face transformers models from their config alone (no download, no weights).

`model: {hf: {model_type: llama, hidden_size: 4096, ...}}` or `model: {hf: {config:
path/to/config.json, ...overrides}}` -> `AutoConfig.for_model` -> `AutoModelForCausalLM
.from_config` on meta, wrapped in `HFCausalLM`, a tiny adapter whose forward takes the token ids
and returns the logits (so the step stays model-agnostic). The planner resolves the config once
(`hf_spec`: layer count, blocks, TP plan, shapes for the plan checks) into `HFArgs`, which is
what the actors rebuild the model from. The layer memo applies where every decoder block is the
same (checked on meta, `identical_blocks`); its short steps rebuild the config with fewer
layers (`HFArgs.with_layers`). transformers is imported only here, and only when an
hf model is asked for (`pip install -e '.[hf]'`)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

INSTALL_HINT = "pip install -e '.[hf]'"
ADAPTER = "hf"  # HFCausalLM's attribute holding the transformers model
# Depths the layer memo executes (simdist/mode/layer_memo.py: a, a+1, a+2 blocks, a =
# BASE_LAYERS): their blocks must be the full model's for the memo to apply.
MEMO_DEPTHS = (2, 3, 4)
# Config fields with one entry per decoder layer (cut to the depth when the depth changes).
PER_LAYER_FIELDS = ("layer_types", "no_rope_layers")
# Block attributes that number the block (the memo renumbers blocks; they differ by design).
_BLOCK_INDEX_ATTRS = frozenset({"layer_idx", "layer_id", "layer_index"})


class HFError(ValueError):
    """Bad hf model config; `key` names the config key at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class HFArgs:
    """A resolved Hugging Face model: its config fields (`model_type` included) and what the
    planner and the plan checks read without building it."""

    config: dict = field(hash=False)
    n_layers: int
    vocab_size: int
    dim: int
    n_heads: int | None
    n_kv_heads: int | None
    ffn_dim: int | None
    max_seq_len: int | None
    blocks: str  # path of the block ModuleList inside the HF model (model.layers, transformer.h)
    tp_plan: tuple[tuple[str, str], ...]  # the model's own `_tp_plan`: (module glob, style)
    n_experts: int | None = None
    attn_implementation: str = "sdpa"
    # Every decoder block is the same module with the same attributes, at this depth and at the
    # layer memo's short depths (hf_spec_args checks it on meta): the memo may rebuild the depth.
    identical_blocks: bool = False

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
    def block_path(self) -> str:
        """The blocks' module path in the adapter (what module names in the streams carry)."""
        return f"{ADAPTER}.{self.blocks}"

    def with_layers(self, n_layers: int) -> HFArgs:
        """The same model with `n_layers` decoder blocks (the layer memo's short steps)."""
        return replace(self, n_layers=n_layers, config=config_with_layers(self.config, n_layers))


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise HFError("model.hf", "Hugging Face models need the `transformers` package, which "
                                  f"this installation lacks; install it with {INSTALL_HINT}, or "
                                  "use model.preset or model.entrypoint") from None
    return transformers


def _fields(hf: dict) -> dict:
    fields = dict(hf)
    path = fields.pop("config", None)
    if path is not None:
        if not isinstance(path, str):
            raise HFError("model.hf.config", f"got {path!r:.60}; expected the path of a "
                                             "config.json")
        p = Path(path).expanduser()
        try:
            loaded = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise HFError("model.hf.config", f"file not found: {p}") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise HFError("model.hf.config", f"cannot read {p} as JSON: {e}") from None
        if not isinstance(loaded, dict):
            raise HFError("model.hf.config", f"{p}: expected a JSON object")
        fields = {**loaded, **fields}  # keys next to `config:` override the file's
    if not isinstance(fields.get("model_type"), str):
        raise HFError("model.hf.model_type", "required (e.g. llama, mistral, qwen2, qwen3, "
                                             "mixtral, qwen3_moe, gpt2, gemma), in model.hf or "
                                             "in its config.json")
    return fields


def config_with_layers(fields: dict, n_layers: int) -> dict:
    """`fields` with `n_layers` decoder layers: the layer count under the name the config class
    stores it (GPT-2: `n_layer`; `num_hidden_layers` is its alias), per-layer lists cut."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[fields["model_type"]]
    name = getattr(cls, "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")
    out = dict(fields)
    if name != "num_hidden_layers":
        out.pop("num_hidden_layers", None)
    out[name] = n_layers
    for key in PER_LAYER_FIELDS:
        if isinstance(out.get(key), list):
            out[key] = out[key][:n_layers]
    return out


def hf_config(fields: dict, attn_implementation: str = "sdpa") -> Any:
    transformers = _transformers()
    fields = dict(fields)
    model_type = fields.pop("model_type")
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        some = ", ".join(["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "gpt2",
                          "gemma"])
        raise HFError("model.hf.model_type", f"unknown model_type {model_type!r} for transformers "
                                             f"{transformers.__version__}; allowed: a key of "
                                             f"transformers' CONFIG_MAPPING, e.g. {some}")
    for drop in ("architectures", "transformers_version", "torch_dtype", "dtype",
                 "auto_map", "_name_or_path"):
        fields.pop(drop, None)  # what a downloaded config.json carries besides the shape
    try:
        cfg = transformers.AutoConfig.for_model(model_type, **fields)
    except (TypeError, ValueError) as e:
        raise HFError("model.hf", f"transformers rejects the {model_type} config: "
                                  f"{' '.join(str(e).split())[:300]}") from None
    cfg._attn_implementation = attn_implementation
    cfg.use_cache = False
    return cfg


def _build_hf(cfg: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        cls = AutoModelForCausalLM._model_mapping[type(cfg)]
    except KeyError:
        raise HFError("model.hf.model_type", f"{cfg.model_type} has no causal language model "
                                             "in transformers (AutoModelForCausalLM)") from None
    # MoE experts: one grouped GEMM per projection, shapes static (the `eager` loop over the
    # experts a token picked cannot run on fake tensors: data-dependent shapes).
    kwargs = ({"experts_implementation": "grouped_mm"}
              if cls._can_set_experts_implementation() else {})
    try:
        return cls._from_config(cfg, **kwargs)
    except ValueError as e:  # transformers' own checks of the config (attention kernels first)
        text = " ".join(str(e).split())
        if "attention implementation" in text:
            raise HFError("training.attention", f"transformers has no {cfg._attn_implementation} "
                                                f"attention for {cfg.model_type}; allowed: "
                                                "training.attention=eager") from None
        raise HFError("model.hf", f"transformers rejects the {cfg.model_type} config: "
                                  f"{text[:300]}") from None


class HFCausalLM(nn.Module):
    """The adapter: forward(token ids) -> logits, blocks at `simdist_blocks`."""

    def __init__(self, model: nn.Module, blocks: str) -> None:
        super().__init__()
        self.hf = model  # the attribute is ADAPTER
        self.simdist_blocks = f"{ADAPTER}.{blocks}"

    def forward(self, tokens: Any) -> Any:
        with _unpacked_batch():
            return self.hf(input_ids=tokens, use_cache=False).logits


@contextlib.contextmanager
def _unpacked_batch() -> Iterator[None]:
    """transformers looks at the position ids for packed sequences (several documents in one
    row) and, as it cannot read a fake tensor's values, assumes packing: it then builds an
    explicit causal mask, which moves SDPA from the flash kernel to the mem-efficient one with an
    S x S mask. The simulated batch is one sequence per row (position ids 0..S-1), where a real
    run finds no packing and passes `is_causal=True` to the flash kernel: answer that here."""
    from transformers import masking_utils

    orig = getattr(masking_utils, "find_packed_sequence_indices", None)
    if orig is None:
        yield
        return
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = orig


def find_blocks(model: nn.Module, n_layers: int) -> str:
    """The path of the decoder blocks: the shortest ModuleList of `n_layers` modules of one
    class (model.layers, transformer.h, ...)."""
    found = [name for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n_layers and n_layers > 0
             and len({type(b) for b in m}) == 1]
    if not found:
        raise HFError("model.hf", f"cannot find the {n_layers} decoder blocks (a ModuleList) in "
                                  f"{type(model).__name__}")
    return min(found, key=lambda n: (n.count("."), n))


def block_signature(block: nn.Module) -> tuple:
    """What makes one decoder block execute as it does, its index aside: per submodule, its
    class, parameters and buffers (name, shape, dtype) and plain attributes (a sliding-window
    layer's `sliding_window`, `layer_type`, `is_sliding`: Gemma's and Qwen2's layers differ
    only there)."""
    plain = (bool, int, float, str, type(None))
    rows = []
    for name, m in block.named_modules():
        attrs = tuple(sorted((k, v) for k, v in vars(m).items()
                             if not k.startswith("_") and k not in _BLOCK_INDEX_ATTRS
                             and (isinstance(v, plain) or (isinstance(v, tuple)
                                                           and all(isinstance(x, plain)
                                                                   for x in v)))))
        tensors = tuple((n, tuple(t.shape), str(t.dtype), t.requires_grad)
                        for n, t in [*m.named_parameters(recurse=False),
                                     *m.named_buffers(recurse=False)])
        rows.append((name, type(m).__qualname__, attrs, tensors))
    return tuple(rows)


def _blocks_signature(model: nn.Module, blocks: str) -> tuple | None:
    """The blocks' common signature, or None where they differ."""
    signatures = {block_signature(b) for b in model.get_submodule(blocks)}
    return signatures.pop() if len(signatures) == 1 else None


def _identical_blocks(fields: dict, impl: str, model: nn.Module, blocks: str,
                      n_layers: int) -> bool:
    """The blocks of the model, and of the model rebuilt at the memo's depths, are one block
    (a config whose layers differ — Gemma's sliding and global layers, Qwen2's
    max_window_layers — has no memo; nor one whose per-layer fields do not follow the depth)."""
    import torch

    if n_layers <= max(MEMO_DEPTHS):  # the memo does not apply to so few blocks
        return False
    full = _blocks_signature(model, blocks)
    if full is None:
        return False
    for depth in MEMO_DEPTHS:
        try:
            with torch.device("meta"):
                short = _build_hf(hf_config(config_with_layers(fields, depth), impl))
            if _blocks_signature(short, blocks) != full:
                return False
        except (HFError, AttributeError, IndexError):  # no such container / list at that depth
            return False
    return True


def hf_spec_args(hf: dict, attention: str = "flash") -> HFArgs:
    """Resolve `model.hf` (planner side): the config, built once on meta for what the plan
    checks need. Raises HFError naming the key."""
    import torch

    fields = _fields(hf)
    impl = "eager" if attention == "eager" else "sdpa"
    cfg = hf_config(fields, impl)
    with torch.device("meta"):
        model = _build_hf(cfg)
    n_layers = int(getattr(cfg, "num_hidden_layers"))
    blocks = find_blocks(model, n_layers)
    tp_plan = tuple(sorted((getattr(model, "_tp_plan", None) or {}).items()))
    g = lambda *names: next((getattr(cfg, n) for n in names  # noqa: E731
                             if getattr(cfg, n, None) is not None), None)
    return HFArgs(config=fields, n_layers=n_layers, vocab_size=int(cfg.vocab_size),
                  dim=int(cfg.hidden_size), n_heads=g("num_attention_heads"),
                  n_kv_heads=g("num_key_value_heads", "num_attention_heads"),
                  ffn_dim=g("intermediate_size", "n_inner"),
                  max_seq_len=g("max_position_embeddings"), blocks=blocks, tp_plan=tp_plan,
                  n_experts=g("num_local_experts", "num_experts", "n_routed_experts"),
                  attn_implementation=impl,
                  identical_blocks=_identical_blocks(fields, impl, model, blocks, n_layers))


def build_hf(args: HFArgs) -> nn.Module:
    """The adapter around the HF model (on the current default device: meta when planning and
    before parallelising)."""
    model = _build_hf(hf_config(args.config, args.attn_implementation))
    model.train()
    return HFCausalLM(model, args.blocks)


__all__ = ["HFArgs", "HFCausalLM", "HFError", "INSTALL_HINT", "MEMO_DEPTHS", "block_signature",
           "build_hf", "config_with_layers", "find_blocks", "hf_config", "hf_spec_args"]
