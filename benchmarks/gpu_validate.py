"""Ground truth on a real GPU: run the same model code, plan (FSDP2 on one GPU, bf16 params /
fp32 reduce, AdamW foreach) and step as simdist simulates, and record torch.cuda's peak.

    python benchmarks/gpu_validate.py OUT.json     # on a machine with a CUDA GPU
    python benchmarks/gpu_validate.py --simulate OUT.json   # the same cases through simdist (CPU)

Only torch and simdist.models are imported on the GPU side (the GPU image has neither Ray nor
pydantic)."""

from __future__ import annotations

import json
import os
import sys
import time

import torch

CASES = [
    # name, preset, overrides, seq, micro_batch, n_microbatches, attention, ac
    ("llama-1b-s4096-mb2", "llama3-8b", dict(dim=2048, n_layers=8, n_heads=16, n_kv_heads=8, ffn_dim=8192), 4096, 2, 2, "flash", "none"),
    ("llama-1b-s4096-mb2-fullac", "llama3-8b", dict(dim=2048, n_layers=8, n_heads=16, n_kv_heads=8, ffn_dim=8192), 4096, 2, 2, "flash", "full"),
    ("gpt-1.7b-eager-s2048-mb2", "gpt-1.7b", dict(n_layers=8), 2048, 2, 2, "eager", "none"),
    ("gpt-1.7b-flash-s2048-mb4", "gpt-1.7b", dict(n_layers=8), 2048, 4, 2, "flash", "none"),
]


def gpu_case(preset, overrides, seq, mb, n_mb, attention, ac):  # noqa: ANN001, ANN201
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from simdist.families import build_model, resolve_model

    spec = resolve_model(preset, overrides, seq_len=seq, attention=attention)
    mesh = init_device_mesh("cuda", (1,))
    model = build_model(spec, "meta")
    if ac == "full":
        for k, blk in list(model.layers.items()):
            model.layers[k] = checkpoint_wrapper(blk, preserve_rng_state=False)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = list(model.layers.values())
    for i, blk in enumerate(blocks):
        fully_shard(blk, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    model.to_empty(device="cuda")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    vocab = spec.args.vocab_size
    seq_first = getattr(model, "seq_first_output", False)

    def step() -> None:
        for _ in range(n_mb):
            tokens = torch.randint(0, vocab, (mb, seq), device="cuda")
            labels = torch.randint(0, vocab, (mb, seq), device="cuda")
            logits = model(tokens)
            lab = labels.t() if seq_first else labels
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), lab.flatten(0, 1))
            del logits  # as torchtitan's train step does before backward
            loss.backward()
            del loss
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # creates optimizer state, warms kernels
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    out = dict(peak_allocated=torch.cuda.max_memory_allocated(), peak_reserved=torch.cuda.max_memory_reserved(),
               baseline_allocated=base, step_s=wall)
    del model, opt
    torch.cuda.empty_cache()
    return out


def sim_case(preset, overrides, seq, mb, n_mb, attention, ac):  # noqa: ANN001, ANN201
    from simdist.config import load_config
    from simdist.memo import simulate_rank
    from simdist.planner import plan_run

    cfg = load_config(dict(model=dict(preset=preset, **overrides),
                           training=dict(seq_len=seq, micro_batch=mb, global_batch=mb * n_mb,
                                         attention=attention, activation_checkpointing=ac),
                           cluster=dict(gpus_per_node=1, nodes=1)))
    tr = simulate_rank(plan_run(cfg, use_cache=False).tasks[0])
    return dict(peak_bytes=tr.peak_bytes, param_bytes=tr.param_bytes, grad_bytes=tr.grad_bytes,
                optimizer_bytes=tr.optimizer_bytes, activation_bytes=tr.activation_bytes,
                other_bytes=tr.other_bytes, flops=tr.flops)


def main() -> None:
    simulate = "--simulate" in sys.argv
    path = [a for a in sys.argv[1:] if not a.startswith("--") and a not in {c[0] for c in CASES}][0]
    if not simulate and "--case" not in sys.argv:
        # One process per case: FSDP and the caching allocator keep state between cases.
        import subprocess
        results = {}
        for name, *_ in CASES:
            subprocess.run([sys.executable, __file__, "--case", name, path + "." + name], check=False)
            with open(path + "." + name) as f:
                results.update(json.load(f))
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        return
    only = sys.argv[sys.argv.index("--case") + 1] if "--case" in sys.argv else None
    results = {}
    if not simulate:
        import torch.distributed as dist
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        dist.init_process_group("nccl", rank=0, world_size=1)
        results["device"] = torch.cuda.get_device_name()
        results["torch"] = torch.__version__
    for name, *args in CASES:
        if only and name != only:
            continue
        try:
            results[name] = sim_case(*args) if simulate else gpu_case(*args)
        except Exception as e:  # keep the other cases
            results[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(name, results[name], flush=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
