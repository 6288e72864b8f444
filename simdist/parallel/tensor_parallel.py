"""Tensor + sequence parallelism through DTensor (`parallelize_module`), with torchtitan's llama3
plan: colwise wq/wk/wv and w1/w3, rowwise wo and w2, sequence-parallel norms, a rowwise embedding
and a colwise output head kept sharded on the vocabulary for `loss_parallel`; and Megatron's plan
for GPT in its [seq, batch, hidden] layout (`apply_tp_gpt`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from simdist.models.kernels import _fused_rms_norm
from simdist.parallel.checkpointing import regather_in_backward


@register_sharding(_fused_rms_norm._opoverload)
def _rms_norm_sharding(x, weight, eps):  # noqa: ANN001, ANN202
    """RMSNorm normalises the last dim: any other dim may stay sharded; the weight is replicated
    (torch registers the same rule for aten._fused_rms_norm, which a CPU build cannot run)."""
    strategies = [([Replicate(), Replicate()], [Replicate(), Replicate(), None])]
    for d in range(x.ndim - 1):
        strategies.append(([Shard(d), Shard(d)], [Shard(d), Replicate(), None]))
    return strategies


def apply_tp_llama3(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool,
                    loss_parallel: bool = True) -> None:
    seq = Shard(1) if sequence_parallel else Replicate()
    norm_style = SequenceParallel() if sequence_parallel else None
    top: dict[str, object] = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
        "output": ColwiseParallel(input_layouts=seq,
                                  output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                  use_local_output=not loss_parallel),
    }
    if norm_style is not None:
        top["norm"] = norm_style
    parallelize_module(model, tp_mesh, top)
    for block in model.layers.values():
        plan: dict[str, object] = {
            "attention": PrepareModuleInput(input_layouts=(seq, None, None),
                                            desired_input_layouts=(Replicate(), None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=seq),
            "feed_forward": PrepareModuleInput(input_layouts=(seq,),
                                               desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=seq),
            "feed_forward.w3": ColwiseParallel(),
        }
        if norm_style is not None:
            plan["attention_norm"] = norm_style
            plan["ffn_norm"] = norm_style
        parallelize_module(block, tp_mesh, plan)


def apply_tp_gpt(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool,
                 loss_parallel: bool = True) -> None:
    """Megatron's tensor (+ sequence) parallel GPT (Shoeybi et al. 2019, Korthikanti et al. 2022).

    Blocks run in [seq, batch, hidden]: the sequence shard is dim 0 there, dim 1 in the embedding
    output ([batch, seq, hidden], before the model's transpose). The residual stream stays a local
    tensor between modules (as in the llama3 plan): with sequence parallelism it is the rank's
    [s/t, b, h] slice, so the dropouts after proj/fc2 and the residual adds run on sequence shards.
    - qkv colwise: the fused output is laid out per head as (heads, 3, head_dim), so a dim-0 shard
      of the weight holds whole heads and the attention core runs on heads/t heads unchanged;
    - proj, fc2 rowwise (all-reduce, or reduce-scatter to the sequence shard with SP);
    - ln_1, ln_2, norm: SequenceParallel on dim 0 with SP (replicated weights, their gradients
      all-reduced); attn and mlp gather their input to Replicate first;
    - tok_embeddings rowwise (vocab-sharded), output reduce-scattered to the sequence shard with
      SP; pos_embeddings: a replicated table; with SP the positions are split like the sequence
      (a local slice of `arange`, no communication) and the lookup runs on the rank's slice, as
      SequenceParallel (its weight gradient is all-reduced). Without SP it stays a plain module;
    - output colwise, logits kept vocab-sharded for `loss_parallel` (not with pipelining);
    - a later pipeline stage's input (a sequence shard with SP) is made a Shard(0) DTensor for the
      model's forward and a local tensor again at the first block.
    Tied embeddings: the rowwise embedding and the colwise head both shard the same [V, h] weight
    on dim 0 (vocab), but `parallelize_module` swaps each module's parameter for its own new
    DTensor parameter, which unties them; they are re-tied to one DTensor parameter afterwards.
    """
    seq = Shard(0) if sequence_parallel else Replicate()
    emb_seq = Shard(1) if sequence_parallel else Replicate()
    norm_style = SequenceParallel(sequence_dim=0) if sequence_parallel else None
    # A pipeline stage may hold neither embeddings nor head.
    tok, pos, head = (getattr(model, name, None)
                      for name in ("tok_embeddings", "pos_embeddings", "output"))
    tied = tok is not None and head is not None and head.weight is tok.weight
    top: dict[str, object] = {}
    if tok is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=emb_seq)
    if head is not None:
        top["output"] = ColwiseParallel(input_layouts=seq,
                                        output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                        use_local_output=not loss_parallel)
        if norm_style is not None and getattr(model, "norm", None) is not None:
            top["norm"] = norm_style
    parallelize_module(model, tp_mesh, top)
    if tied:
        assert head.weight.placements == tok.weight.placements  # both Shard(0): vocab rows
        head.weight = tok.weight
    if sequence_parallel and pos is not None:
        # positions (replicated arange) -> this rank's slice; then a replicated-weight lookup on
        # sequence shards, output back to a local [s/t, h] slice.
        parallelize_module(pos, tp_mesh, PrepareModuleInput(input_layouts=Replicate(),
                                                            desired_input_layouts=Shard(0)))
        parallelize_module(pos, tp_mesh, SequenceParallel(sequence_dim=0, use_local_output=True))
    if sequence_parallel and tok is None and len(model.layers):
        # A later pipeline stage receives the rank's [s/t, b, h] sequence shard. As a Shard(0)
        # DTensor it shows the model the full sequence length (the causal mask's size); the
        # stage's first block takes it back to the local shard that the residual stream is.
        parallelize_module(model, tp_mesh, PrepareModuleInput(input_layouts=seq,
                                                              desired_input_layouts=seq))
        parallelize_module(next(iter(model.layers.values())), tp_mesh,
                           PrepareModuleInput(input_layouts=(seq, None),
                                              desired_input_layouts=(seq, None),
                                              use_local_output=True))
    for block in model.layers.values():
        # qkv and fc1 gather the sequence themselves (input Shard(0) -> Replicate), so that with
        # SP the gather can be redone in backward instead of keeping its output (Megatron).
        plan: dict[str, object] = {
            "attn.qkv": ColwiseParallel(input_layouts=seq),
            "attn.proj": RowwiseParallel(output_layouts=seq),
            "mlp.fc1": ColwiseParallel(input_layouts=seq),
            "mlp.fc2": RowwiseParallel(output_layouts=seq),
        }
        if norm_style is not None:
            plan["ln_1"] = norm_style
            plan["ln_2"] = norm_style
        parallelize_module(block, tp_mesh, plan)
        if sequence_parallel:
            block.attn.qkv = regather_in_backward(block.attn.qkv)
            block.mlp.fc1 = regather_in_backward(block.mlp.fc1)


# A model's own TP plan (Hugging Face `_tp_plan`: module glob -> style name) in DTensor styles.
def tp_style(style: str, loss_parallel: bool) -> object | None:
    """The DTensor style for a Hugging Face TP style name; None where there is none here."""
    if style == "colwise":
        return ColwiseParallel()
    if style == "rowwise":
        return RowwiseParallel()
    if style == "embedding_rowwise":  # vocab-sharded embedding, output all-reduced
        return RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if style == "colwise_gather_output":  # the head: logits kept vocab-sharded for loss_parallel
        return ColwiseParallel(output_layouts=Shard(-1) if loss_parallel else Replicate(),
                               use_local_output=not loss_parallel)
    if style == "replicated_with_grad_allreduce":
        # A norm between a colwise and a rowwise layer (Qwen3's per-head q_norm / k_norm): it
        # normalises head_dim of a [..., heads, head_dim] view holding this rank's heads, so
        # its replicated weight's gradient covers only those heads and is summed over the TP
        # ranks (transformers all-reduces it). As DTensor: the input is a Shard(-2) (heads)
        # DTensor, the weight Replicate; its Partial gradient is all-reduced; no forward
        # collective (SequenceParallel's mechanics, on the head dim).
        return SequenceParallel(sequence_dim=-2, use_local_output=True)
    return None


# Parameter entries of a `moe_tp_experts` module ([E, out, in] expert weights): the dim of the
# local slice, as transformers shards them (packed_colwise, colwise: ndim - 2; rowwise: the
# input features, the last dim).
_EXPERT_PARAM_DIM = {"packed_colwise": -2, "colwise": -2, "rowwise": -1}


def _expert_param_dims(plan: tuple[tuple[str, str], ...]) -> dict[str, dict[str, int]]:
    """moe_tp_experts module glob -> {parameter name: dim sharded over TP}."""
    experts = {glob for glob, style in plan if style == "moe_tp_experts"}
    dims: dict[str, dict[str, int]] = {glob: {} for glob in experts}
    for glob, style in plan:
        owner, _, leaf = glob.rpartition(".")
        if owner in experts and style in _EXPERT_PARAM_DIM:
            dims[owner][leaf] = _EXPERT_PARAM_DIM[style]
    return dims


class ExpertsTensorParallel(ParallelStyle):
    """transformers' `moe_tp_experts`: every TP rank holds a slice of every expert (the
    packed gate/up projection and the down projection sliced on the intermediate dim, per the
    plan's parameter entries) and runs the module on local tensors; the experts' output is a
    partial sum, all-reduced in forward; the replicated inputs' gradients (the hidden states
    and the routing weights) are partial, all-reduced in backward. The router stays replicated.

    The slice of a packed [E, 2I, h] gate/up weight is rows of both halves (I/t of gate, I/t of
    up); as a local [E, 2I/t, h] parameter its shape, bytes and FLOPs are those of any 2I/t rows
    (the values are fake), so it is made as a plain tensor of that shape."""

    def __init__(self, param_dims: dict[str, int]) -> None:
        super().__init__()
        self.param_dims = param_dims

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        t = device_mesh.size()
        for name, dim in self.param_dims.items():
            p = module._parameters[name]
            shape = list(p.shape)
            if shape[dim] % t:
                raise ValueError(f"{name} {tuple(p.shape)}: dim {dim} does not divide by tp={t}")
            shape[dim] //= t
            module._parameters[name] = nn.Parameter(
                torch.empty(shape, dtype=p.dtype, device=p.device), requires_grad=p.requires_grad)

        def inputs(_module: nn.Module, args: tuple) -> tuple:
            hidden, top_k_index, top_k_weights, *rest = args
            return (_grad_all_reduced(hidden, device_mesh), top_k_index,
                    _grad_all_reduced(top_k_weights, device_mesh), *rest)

        module.register_forward_pre_hook(inputs)
        module.register_forward_hook(lambda _m, _a, out: _all_reduced(out, device_mesh))
        return module


def _grad_all_reduced(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Identity forward; backward all-reduces the (partial) gradient: a replicated input of
    a computation each rank does on its shard of the weights (Megatron's f)."""
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(
        grad_placements=[Partial()])


def _all_reduced(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Forward all-reduces a partial sum; backward passes the gradient through (Megatron's g:
    DTensor keeps a Replicate gradient of a Partial input as it is)."""
    return DTensor.from_local(x, mesh, [Partial()], run_check=False).redistribute(
        mesh, [Replicate()]).to_local()


def unsupported_tp_styles(plan: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    expert_params = {f"{owner}.{leaf}" for owner, dims in _expert_param_dims(plan).items()
                     for leaf in dims}
    return [(glob, style) for glob, style in plan
            if glob not in expert_params and tp_style(style, True) is None
            and style != "moe_tp_experts"]


def _glob_match(glob: str, name: str) -> bool:
    parts, names = glob.split("."), name.split(".")
    return len(parts) == len(names) and all(p in ("*", n) for p, n in zip(parts, names))


def apply_tp_plan(model: nn.Module, tp_mesh: DeviceMesh, plan: tuple[tuple[str, str], ...],
                  loss_parallel: bool = True) -> None:
    """Apply a model's own TP plan (`*` matches one path segment, a block index). Weights tied
    before (embedding and head) are tied again when both got the same placement."""
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(name)
    expert_dims = _expert_param_dims(plan)
    styles: dict[str, object] = {}
    for name, _ in model.named_modules():
        for glob, style in plan:
            if _glob_match(glob, name):
                styles[name] = (ExpertsTensorParallel(expert_dims[glob])
                                if style == "moe_tp_experts" else tp_style(style, loss_parallel))
                break
    parallelize_module(model, tp_mesh, styles)
    for names in tied.values():
        if len(names) < 2:
            continue
        first = model.get_parameter(names[0])
        for other in names[1:]:
            owner, _, attr = other.rpartition(".")
            module = model.get_submodule(owner)
            if getattr(getattr(module, attr), "placements", None) == getattr(first, "placements",
                                                                            None):
                setattr(module, attr, first)


__all__ = ["ExpertsTensorParallel", "apply_tp_gpt", "apply_tp_llama3", "apply_tp_plan", "tp_style",
           "unsupported_tp_styles", "torch"]
