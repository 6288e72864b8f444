"""The calibration set of ../shared/VALIDATION.md as simdist configs: each published run, what
it reports, and the assumptions made for what the publication does not state. One set of
constants (the built-in calibration table) for every row; nothing here is fitted to a row.
`tests/test_published_runs.py` checks the rows that are cheap to simulate;
`benchmarks/published_runs.py` prints the whole table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

A100_SELENE = {"gpu": "a100-80gb", "gpus_per_node": 8}  # 8 x 200 Gb/s HDR per node


@dataclass(frozen=True)
class PublishedRun:
    name: str
    source: str
    config: dict
    metric: str  # tflops_per_gpu | tokens_per_s_per_gpu | mfu | step_time_s
    published: float
    assumptions: str = ""
    fully_specified: bool = True
    slow: bool = False  # too costly for the default test suite (pipelines of many micro-batches)
    extra: dict = field(default_factory=dict)


def _narayanan(name: str, preset: str, tp: int, pp: int, gpus: int, batch: int, tflops: float,
               layers: int, hidden: int, v: int = 2, slow: bool = False) -> PublishedRun:
    dp = gpus // (tp * pp)
    par: dict[str, Any] = {"tp": tp, "pp": pp, "dp_replicate": dp, "dp_shard": 1,
                           "sequence_parallel": False}  # (2021: before sequence parallelism)
    if pp > 1:
        par.update(pp_schedule="interleaved_1f1b", pp_virtual_stages=v)
    return PublishedRun(
        name=f"Narayanan 2021 {name}", source="Narayanan et al. 2021, Table 1 (Selene, A100 80GB)",
        config={"model": {"preset": preset},
                "training": {"seq_len": 2048, "micro_batch": 1, "global_batch": batch,
                             "activation_checkpointing": "full", "attention": "eager",
                             "grad_sync": "per_step", "compile": True},
                "parallel": par, "cluster": {**A100_SELENE, "nodes": gpus // 8}},
        metric="tflops_per_gpu", published=tflops,
        assumptions="micro-batch 1; Megatron 2021 attention (no flash: softmax over s x s); "
                    "its fused kernels (scale-mask-softmax, bias-GeLU, bias-dropout-add, "
                    "LayerNorm) as fused pointwise chains (training.compile)"
                    + (f"; interleaved with {v} virtual stages" if pp > 1 else ""),
        slow=slow, extra={"layers": layers, "hidden": hidden, "vocab": 51200, "seq": 2048})


NARAYANAN = [
    _narayanan("1.7B", "gpt-1.7b", 1, 1, 32, 512, 137, 24, 2304),
    _narayanan("7.5B", "gpt-7.5b", 4, 1, 128, 512, 142, 36, 4096),
    _narayanan("39.1B", "gpt-39b", 8, 2, 512, 1536, 138, 48, 8192, slow=True),
    _narayanan("145.6B", "gpt-146b", 8, 8, 1536, 2304, 148, 80, 12288, slow=True),
    _narayanan("529.6B", "gpt-530b", 8, 35, 2520, 2520, 163, 105, 20480, v=3, slow=True),
]


def _torchtitan(name: str, preset: str, ac: str, tokens: float) -> PublishedRun:
    return PublishedRun(
        name=f"torchtitan {name}", source="torchtitan docs/performance.md, 64x A100 80GB, FSDP2",
        config={"model": {"preset": preset},
                "training": {"seq_len": 8192, "micro_batch": 1, "activation_checkpointing": ac},
                "parallel": {"dp_shard": -1}, "cluster": {**A100_SELENE, "nodes": 8}},
        metric="tokens_per_s_per_gpu", published=tokens,
        assumptions="eager (no torch.compile); 200 Gb/s per GPU between nodes")


TORCHTITAN = [
    _torchtitan("Llama 3 8B, selective layer AC", "llama3-8b", "layer", 2904),
    _torchtitan("Llama 3 8B, selective op AC", "llama3-8b", "op", 2973),
    _torchtitan("Llama 3 70B, full AC", "llama3-70b", "full", 331),
]



def _megatron_core(size: str, layers: int, hidden: int, heads: int, tp: int, gpus: int,
                   batch: int, mfu: float) -> PublishedRun:
    dp = gpus // tp
    return PublishedRun(
        name=f"Megatron-Core r0.8 {size}", source="NVIDIA/Megatron-LM README, weak scaling on H100",
        config={"model": {"preset": "gpt", "n_layers": layers, "dim": hidden, "n_heads": heads,
                          "vocab_size": 131072},
                "training": {"seq_len": 4096, "micro_batch": 1, "global_batch": batch,
                             "compile": True},
                # --overlap-param-gather needs --use-distributed-optimizer: ZeRO-1 over dp
                "parallel": {"tp": tp, "dp_shard": dp, "zero_stage": 1,
                             "zero_overlap_grad_reduce": True, "zero_overlap_param_gather": True,
                             "zero_grad_dtype": "fp32",
                             "sequence_parallel": tp > 1},
                "cluster": {"gpu": "h100-sxm", "gpus_per_node": 8, "nodes": gpus // 8}},
        metric="mfu_megatron", published=mfu, fully_specified=False, slow=True,
        assumptions="unstated micro-batch 1, no recompute; the distributed optimizer (which "
                    "--overlap-param-gather requires) as ZeRO-1 with both overlaps and fp32 "
                    "main_grad (bf16 forces --accumulate-allreduce-grads-in-fp32); no "
                    "--tp-comm-overlap; Transformer Engine's fused kernels as "
                    "training.compile, flash attention, sequence parallel with TP",
        extra={"layers": layers, "hidden": hidden, "vocab": 131072, "seq": 4096})


MEGATRON_CORE = [
    _megatron_core("1.7B", 24, 2048, 16, 1, 48, 192, 0.41),
    _megatron_core("7.1B", 30, 4096, 32, 2, 96, 192, 0.47),
    _megatron_core("16B", 32, 6144, 48, 4, 192, 192, 0.49),
    _megatron_core("32B", 48, 7168, 56, 8, 384, 192, 0.46),
]

ROWS = NARAYANAN + TORCHTITAN + MEGATRON_CORE


def narayanan_tflops(run: PublishedRun, step_s: float) -> float:
    """TF/s per GPU by the paper's Eq. 3: 96 B s l h^2 (1 + s/6h + V/16lh) per step."""
    e = run.extra
    b, s, l, h, v = run.config["training"]["global_batch"], e["seq"], e["layers"], e["hidden"], e["vocab"]
    flops = 96 * b * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))
    gpus = run.config["cluster"]["nodes"] * run.config["cluster"]["gpus_per_node"]
    return flops / step_s / gpus / 1e12


def predicted(run: PublishedRun, summary: dict) -> float:
    if run.metric == "tflops_per_gpu":
        return narayanan_tflops(run, summary["step_time_s"])
    if run.metric == "tokens_per_s_per_gpu":
        return summary["tokens_per_s_per_gpu"]
    if run.metric == "mfu_megatron":  # 72 B s L h^2 (1 + s/6h + V/12Lh) over 989 TF/s
        e = run.extra
        b, s, l, h, v = (run.config["training"]["global_batch"], e["seq"], e["layers"],
                         e["hidden"], e["vocab"])
        flops = 72 * b * s * l * h * h * (1 + s / (6 * h) + v / (12 * l * h))
        gpus = run.config["cluster"]["nodes"] * run.config["cluster"]["gpus_per_node"]
        return flops / summary["step_time_s"] / gpus / 989e12
    raise ValueError(run.metric)
