"""`simdist search`: the plan space of a model on a cluster, enumerated from the model's and the
cluster's divisibility rules, pruned by what is known before executing, ordered by an analytical
prior, and simulated (up to --max-plans, in one Ray session): the prior's first plans, then
neighbours of the best simulated so far (SearchWalk); written like a sweep (sweep.parquet,
sweep.json, plans/<n>/) plus search.json.

The prior (`prior()`) decides only WHICH plans are simulated and in what order; every figure
search reports (and the choice of the best plans) comes from simulation.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simdist.config import ConfigError, SimdistConfig, load_config
from simdist.sweep import (PLANS_DIR, PlanCase, SweepProgress, case_row, plan_case, print_ranked,
                           ranked, write_rows)

SEARCH_FILE = "search.json"
# The dimensions of the plan space, in the column order of sweep.parquet.
DIMS = ["gpus", "parallel.dp_replicate", "parallel.dp_shard", "parallel.tp", "parallel.pp",
        "parallel.pp_schedule", "parallel.cp", "parallel.ep", "parallel.zero_stage",
        "training.activation_checkpointing", "training.micro_batch"]
# Values tried along the dimensions that are not fixed by divisibility alone.
PP_SCHEDULES = ("1f1b", "interleaved_1f1b")
CP_DEGREES = (1, 2, 4, 8)
ZERO_STAGES = (1, 2, 3)
AC_MODES = ("none", "selective", "full")
MICRO_BATCHES = (1, 2, 4, 8)
KERNELS_PER_LAYER, LAUNCH_S = 60, 5e-6  # the prior's launch floor (small models)
ENUMERATED_MAX = 2_000_000  # leaves of the plan space walked (a bound on the search's own time)

# Bytes per parameter of the model states (mixed-precision AdamW; README "search"):
# ZeRO-3 (FSDP2): fp32 parameter, gradient, two moments, all sharded: 16 / dp_shard;
# ZeRO-2: bf16 parameters replicated (2) + bf16 gradient and fp32 master/moments sharded (14);
# ZeRO-1: bf16 parameters and gradients replicated (4) + fp32 master and moments sharded (12).
STATE_BYTES = {3: (0, 16), 2: (2, 14), 1: (4, 12)}

PRIOR_TEXT = (
    "analytical prior, used only to order the simulations: step = compute + pipeline bubble + "
    "TP and CP communication + FSDP/DP communication beyond compute; compute = (6 N_non-embedding "
    "+ 12 L d s) FLOPs per token x recompute (full AC 4/3, selective 1.1) / (GPUs x dense peak x "
    "matmul efficiency), at least 60 kernel launches of 5 us per layer per micro-batch; bubble = compute (pp-1) / (micro-batches x virtual stages); TP = 8 "
    "collectives (10 with full AC) of b s d bf16 per layer per micro-batch over NVLink; FSDP = 3 "
    "passes of the bf16 parameter shard per micro-batch (once per step with pp), HSDP/DP an "
    "all-reduce of the gradients, over NVLink when the group fits in a node else the NIC; memory "
    "= model states (STATE_BYTES) + unsharded bf16 parameters (ZeRO-3: two blocks; with pp the "
    "stage's parameters and gradients, 4 bytes/param / (tp pp)) + activations per layer per "
    "micro-batch in flight (pp, +1 interleaved): b s (6 d + 4 ffn) x 2 / tp bytes without AC, "
    "x 1.2 / tp selective, b s d x 2 / tp full (+ one block recomputed) + logits (b s V x 10 / "
    "tp); plans estimated to fit first, then by the objective (ties: lower memory first)")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class ModelFacts:
    """What the rules and the prior need of the model (from its args and one meta build)."""

    family: str
    n_params: int
    n_layers: int | None
    dim: int | None
    n_heads: int | None
    n_kv_heads: int | None
    ffn_dim: int | None
    vocab_size: int | None
    n_experts: int | None
    tensor_parallel: bool

    @classmethod
    def of(cls, spec: Any) -> ModelFacts:
        from simdist.families import build_model, count_params

        a = spec.args
        get = lambda k: getattr(a, k, None) if a is not None else None  # noqa: E731
        return cls(spec.family, count_params(build_model(spec, "meta")), spec.n_layers,
                   get("dim"), get("n_heads"), get("n_kv_heads"), get("ffn_dim"),
                   get("vocab_size"), get("n_experts"), spec.registration.tensor_parallel)

    @property
    def non_embedding(self) -> int:
        emb = (self.vocab_size or 0) * (self.dim or 0)
        return max(1, self.n_params - emb)


@dataclass
class Candidate:
    values: dict[str, Any]  # DIMS -> value
    nodes: int
    gpus_per_node: int
    global_batch: int
    prior: dict[str, Any]


def cluster_shape(n: int, gpus_per_node: int) -> tuple[int, int]:
    """(nodes, gpus_per_node) for n GPUs: whole nodes, or one partial node."""
    if n % gpus_per_node == 0:
        return n // gpus_per_node, gpus_per_node
    if n < gpus_per_node:
        return 1, n
    raise ConfigError("--gpus", f"{n} GPUs is not a whole number of nodes of cluster."
                                f"gpus_per_node={gpus_per_node}; allowed: multiples of "
                                f"{gpus_per_node} or fewer than one node")


def state_bound(n_params: int, zero: int, dp_shard: int, tp: int, pp: int) -> float:
    """A lower bound on one GPU's model-state bytes: STATE_BYTES by the ZeRO rule, / (tp x pp)."""
    whole, sharded = STATE_BYTES[zero]
    return n_params * (whole + sharded / dp_shard) / (tp * pp)


def reject(m: ModelFacts, base: SimdistConfig, v: dict[str, Any], gpus_per_node: int,
           gb: int, limit: int, v_stages: int) -> str | None:
    """The first rule the plan `v` breaks (its pruning reason), or None. The rules are those of
    simdist.config and simdist.validate, stated here so that the space is pruned before any
    plan is loaded; anything they miss is caught when the plan is planned (reason 'config')."""
    tp, pp, cp, ep = v["parallel.tp"], v["parallel.pp"], v["parallel.cp"], v["parallel.ep"]
    rep, shard, zero = v["parallel.dp_replicate"], v["parallel.dp_shard"], v["parallel.zero_stage"]
    mb, sched = v["training.micro_batch"], v["parallel.pp_schedule"]
    seq = base.training.seq_len
    if tp > 1 and not m.tensor_parallel:
        return f"tp: {m.family} models have no tensor parallelism"
    if tp > 1 and any(x and x % tp for x in (m.n_heads, m.n_kv_heads, m.ffn_dim, m.vocab_size)):
        return "tp: does not divide n_heads, n_kv_heads, ffn_dim and vocab_size"
    if tp > 1 and base.parallel.sequence_parallel and seq % tp:
        return "tp: does not divide seq_len (sequence parallel)"
    if pp > 1 and (m.n_layers is None or m.n_layers % pp):
        return "pp: does not divide n_layers"
    multi = pp > 1 and sched in ("interleaved_1f1b", "zero_bubble")
    if multi and m.n_layers % (pp * v_stages):
        return "pp: interleaved stages (pp x pp_virtual_stages) do not divide n_layers"
    if cp > 1 and seq % (2 * cp):
        return "cp: 2 x cp does not divide seq_len"
    if cp > 1 and (pp > 1 or rep > 1 or ep > 1 or zero != 3):
        return "cp: needs pp=1, dp_replicate=1, ep=1, zero_stage=3"
    if ep > 1 and (not m.n_experts or m.n_experts % ep or shard % ep):
        return "ep: does not divide n_experts and dp_shard"
    if zero in (1, 2) and rep > 1:
        return "zero_stage 1/2: needs dp_replicate=1"
    dp = rep * shard
    if gb % (dp * mb):
        return "global_batch: not a multiple of dp x micro_batch"
    n_mb = gb // (dp * mb)
    if pp > 1 and n_mb < pp:
        return "pp: fewer micro-batches than stages"
    if multi and n_mb % pp:
        return "pp: interleaved needs micro-batches a multiple of pp"
    if state_bound(m.n_params, zero, shard, tp, pp) > limit:
        return "memory: model states alone exceed the GPU memory"
    return None


def prior(m: ModelFacts, base: SimdistConfig, gpu: Any, v: dict[str, Any], gpus_per_node: int,
          gb: int, v_stages: int) -> dict[str, float]:
    """PRIOR_TEXT as code: estimated step time, tokens/s and peak bytes of plan `v`."""
    world = v["gpus"]
    tp, pp, cp = v["parallel.tp"], v["parallel.pp"], v["parallel.cp"]
    rep, shard, zero = v["parallel.dp_replicate"], v["parallel.dp_shard"], v["parallel.zero_stage"]
    mb, ac = v["training.micro_batch"], v["training.activation_checkpointing"]
    seq, L = base.training.seq_len, m.n_layers or 1
    d, vocab = m.dim or 1, m.vocab_size or 0
    n_mb = gb // (rep * shard * mb)
    tokens = gb * seq
    recompute = {"full": 4 / 3, "selective": 1.1}.get(ac, 1.0)
    flops = (6 * m.non_embedding + 12 * L * d * seq) * tokens * recompute
    compute = flops / (world * gpu.flops_for(base.training.dtype) * gpu.matmul_efficiency)
    # launch floor: a step launches about KERNELS_PER_LAYER kernels per layer per micro-batch
    compute = max(compute, (L / pp) * n_mb * KERNELS_PER_LAYER * recompute * LAUNCH_S)
    virtual = v_stages if v["parallel.pp_schedule"] in ("interleaved_1f1b", "zero_bubble") else 1
    bubble = compute * (pp - 1) / (n_mb * virtual) if pp > 1 else 0.0
    nvlink, nic = gpu.nvlink_bw * gpu.link_efficiency, gpu.internode_bw * gpu.link_efficiency
    act_bytes = mb * seq / cp * d * 2  # one micro-batch's hidden states on a rank, bf16
    tp_comm = ((10 if ac == "full" else 8) * act_bytes * (tp - 1) / tp / nvlink
               * (L / pp) * n_mb) if tp > 1 else 0.0
    cp_comm = (3 * 2 * act_bytes * (m.n_kv_heads or 1) / max(1, m.n_heads or 1) * (cp - 1)
               / nvlink * L * n_mb) if cp > 1 else 0.0
    shard_bw = nvlink if shard * cp * tp <= gpus_per_node else nic
    rep_bw = nvlink if rep * shard * cp * tp <= gpus_per_node else nic
    local = 2 * m.n_params / (tp * pp)  # bf16 parameters of one tp x pp shard
    if zero == 3:
        passes = n_mb if pp == 1 else 1
        dp_comm = 3 * local * (shard - 1) / shard / shard_bw * passes
    else:
        dp_comm = 2 * local * (shard - 1) / shard / shard_bw * (n_mb if zero == 2 else 1)
    if rep > 1:
        dp_comm += 2 * local / shard * (rep - 1) / rep / rep_bw
    step = compute + bubble + tp_comm + cp_comm + max(0.0, dp_comm - compute)
    # memory
    states = state_bound(m.n_params, zero, shard, tp, pp)
    if zero == 3 and pp > 1:  # unsharded bf16 parameters and gradients kept over micro-batches
        transient = 4 * m.n_params / (tp * pp)
    elif zero == 3:  # two unsharded bf16 blocks (FSDP prefetch)
        transient = 2 * 2 * m.non_embedding / L / tp
    else:
        transient = 0.0
    ffn = m.ffn_dim or 4 * d
    tokens_mb = mb * seq / cp
    per_layer = tokens_mb * {"none": 2 * (6 * d + 4 * ffn), "selective": 1.2 * (6 * d + 4 * ffn),
                             "full": 2 * d}.get(ac, 2 * (6 * d + 4 * ffn)) / tp
    in_flight = min(n_mb, pp + (1 if virtual > 1 else 0)) if pp > 1 else 1
    acts = per_layer * (L / pp) * in_flight
    if ac == "full":
        acts += tokens_mb * 2 * (6 * d + 4 * ffn) / tp  # one block while it is recomputed
    logits = tokens_mb * vocab * 10 / tp
    peak = states + transient + acts + logits
    return dict(prior_step_time_s=step, prior_tokens_per_s=tokens / step,
                prior_peak_bytes=int(peak))


def enumerate_space(m: ModelFacts, base: SimdistConfig, gpu: Any, gpus: list[int],
                    gb: int, limit: int) -> tuple[list[Candidate], Counter, int]:
    """Every plan of the space for each GPU count: (survivors with their prior, pruned count
    by reason, plans enumerated)."""
    v_stages = base.parallel.pp_virtual_stages
    experts = divisors(m.n_experts) if m.n_experts else [1]
    out, pruned, n = [], Counter(), 0
    for world in gpus:
        nodes, gpn = cluster_shape(world, base.cluster.gpus_per_node)
        for tp in [t for t in divisors(gpn) if world % t == 0]:
            for pp in divisors(world // tp):
                for cp in [c for c in CP_DEGREES if (world // (tp * pp)) % c == 0]:
                    dp = world // (tp * pp * cp)
                    for rep in divisors(dp):
                        for ep in experts:
                            for zero in ZERO_STAGES:
                                for sched in (PP_SCHEDULES if pp > 1 else PP_SCHEDULES[:1]):
                                    for ac in AC_MODES:
                                        for mb in MICRO_BATCHES:
                                            n += 1
                                            if n > ENUMERATED_MAX:
                                                raise ConfigError("--gpus", (
                                                    f"the plan space has more than "
                                                    f"{ENUMERATED_MAX:,} plans; search fewer "
                                                    "GPU counts"))
                                            v = {"gpus": world, "parallel.dp_replicate": rep,
                                                 "parallel.dp_shard": dp // rep,
                                                 "parallel.tp": tp, "parallel.pp": pp,
                                                 "parallel.pp_schedule": sched,
                                                 "parallel.cp": cp, "parallel.ep": ep,
                                                 "parallel.zero_stage": zero,
                                                 "training.activation_checkpointing": ac,
                                                 "training.micro_batch": mb}
                                            why = reject(m, base, v, gpn, gb, limit, v_stages)
                                            if why is not None:
                                                pruned[why] += 1
                                                continue
                                            out.append(Candidate(v, nodes, gpn, gb, prior(
                                                m, base, gpu, v, gpn, gb, v_stages)))
    return out, pruned, n


def prior_key(objective: str, limit: int):  # noqa: ANN201
    def key(c: Candidate) -> tuple:
        p = c.prior
        fits = p["prior_peak_bytes"] <= limit
        if objective == "peak":
            return (p["prior_peak_bytes"], -p["prior_tokens_per_s"])
        if objective == "cost":
            return (not fits, c.values["gpus"] / p["prior_tokens_per_s"], p["prior_peak_bytes"])
        return (not fits, -p["prior_tokens_per_s"], p["prior_peak_bytes"])
    return key


def objective_key(objective: str):  # noqa: ANN201
    """Ranks simulated rows by the objective, plans that fit first; skipped and failed last."""
    def key(r: dict) -> tuple:
        if r["status"] != "simulated":
            return (2, 0.0, r["plan_id"])
        fits = 0 if r["fits"] else 1
        if objective == "peak":
            return (0, r["peak_bytes_max"], r["plan_id"])
        if objective == "cost":
            cost = r.get("cost_per_million_tokens")
            if cost is None:  # GPU-hours per million tokens: the cost at 1 per GPU-hour
                cost = r["world_size"] / 3600.0 / r["tokens_per_s"] * 1e6
            return (fits, cost, r["plan_id"])
        return (fits, -r["tokens_per_s"], r["plan_id"])
    return key


def global_batch_of(config: str | Path | dict, overrides: list[str], base: SimdistConfig,
                    gpus: list[int]) -> int:
    """Every plan of a search trains on the same global batch: training.global_batch where the
    config (or --set) gives it, else the largest GPU count x training.micro_batch (one
    micro-batch per step for pure data parallelism on the most GPUs, as `run`'s default)."""
    from simdist.config import _read, apply_overrides

    raw = apply_overrides(_read(config) if not isinstance(config, dict) else config, overrides)
    if (raw.get("training") or {}).get("global_batch") is not None:
        return base.training.global_batch
    return max(gpus) * base.training.micro_batch


def case_overrides(c: Candidate) -> list[str]:
    v = c.values
    sets = [f"cluster.nodes={c.nodes}", f"cluster.gpus_per_node={c.gpus_per_node}",
            f"training.global_batch={c.global_batch}", "parallel.pp_layers=null"]
    return sets + [f"{k}={v[k]}" for k in DIMS if k != "gpus"]


@dataclass
class SearchResult:
    out: Path
    rows: list[dict]  # ranked by the objective
    keys: list[str]
    report: dict[str, Any]  # search.json


# The dimensions a plan's neighbour may change one at a time (dp_shard follows from the rest).
FREE_DIMS = [d for d in DIMS if d not in ("gpus", "parallel.dp_shard")]


def changed_dims(a: dict[str, Any], b: dict[str, Any]) -> int:
    """How many free dimensions two plans of one GPU count differ in (the schedule counts only
    where both pipeline); plans of different GPU counts are never neighbours."""
    if a["gpus"] != b["gpus"]:
        return len(FREE_DIMS) + 1
    n = 0
    for d in FREE_DIMS:
        if d == "parallel.pp_schedule" and (a["parallel.pp"] == 1 or b["parallel.pp"] == 1):
            continue
        n += a[d] != b[d]
    return n


class SearchWalk:
    """The order in which a search simulates: first the `seeds` plans the prior ranks best, then
    a local search: the next plan is the prior's best among the unsimulated neighbours (one
    free dimension changed) of the best plan simulated so far, so the walk follows what the
    simulation found, not the prior's errors (its step time is an estimate of the terms the
    simulation prices exactly: a dimension the prior misjudges, as the micro-batch, is still
    tried around the best). Where the best has no unsimulated neighbour left, the prior's next
    plan. Each case records how it was found (`found_by`: prior | neighbour of plan N).

    Planning a plan the planner refuses adds it to `pruned` ('config: <key>') and does not
    count against the budget."""

    def __init__(self, config: str | Path | dict, overrides: list[str], cands: list[Candidate],
                 pruned: Counter, *, trust_code: bool, use_cache: bool) -> None:
        self.config, self.overrides, self.cands, self.pruned = config, overrides, cands, pruned
        self.trust_code, self.use_cache = trust_code, use_cache
        self.cases: list[PlanCase] = []
        self._tried: set[int] = set()  # indices into cands

    def _take(self, pool: list[int], n: int, found_by: str, bar: SweepProgress) -> list[PlanCase]:
        out = []
        for i in pool:
            if len(out) >= n:
                break
            self._tried.add(i)
            c = self.cands[i]
            case = PlanCase(len(self.cases), dict(c.values),
                            [*self.overrides, *case_overrides(c)],
                            extra=dict(c.prior, found_by=found_by))
            plan_case(self.config, case, trust_code=self.trust_code, use_cache=self.use_cache)
            if case.run is None and not case.failed:
                self.pruned[f"config: {case.skip_reason.split(':', 1)[0]}"] += 1
                continue
            self.cases.append(case)  # planned, or failed in the planner (a row of its own)
            out.append(case)
            if case.run is None:
                bar.finished(case)
        return out

    def _best(self, objective: str) -> PlanCase | None:
        done = [c for c in self.cases if c.summary is not None]
        if not done:
            return None
        key = objective_key(objective)
        return min(done, key=lambda c: key(case_row(c)))

    def _next(self, n: int, objective: str, bar: SweepProgress) -> list[PlanCase]:
        best = self._best(objective)
        if best is not None:
            around = [i for i, c in enumerate(self.cands)
                      if i not in self._tried and changed_dims(c.values, best.values) == 1]
            got = self._take(around, n, f"neighbour of plan {best.plan_id}", bar)
            if got:
                return got
        rest = [i for i in range(len(self.cands)) if i not in self._tried]
        return self._take(rest, n, "prior", bar)

    async def run(self, plans_dir: Path, max_plans: int, seeds: int, objective: str,
                  bar: SweepProgress, *, address: str | None, workers: int | str | None,
                  concurrency: int) -> dict[str, Any]:
        """Simulate up to `max_plans` plans in one SimulationSession; what it started."""
        from simdist.sweep import SimulationSession

        session = SimulationSession(plans_dir, address=address, workers=workers,
                                    use_cache=self.use_cache, concurrency=concurrency,
                                    progress=bar)
        try:
            batch = self._take(list(range(len(self.cands))), min(seeds, max_plans), "prior", bar)
            while True:
                await session.simulate(batch)
                left = max_plans - len(self.cases)
                batch = self._next(min(max(1, concurrency), left), objective, bar) if left > 0 \
                    else []
                if not batch:
                    break
        finally:
            started = session.close()
        return started


def run_search(config: str | Path | dict, overrides: list[str], out: Path, *,
               gpus: list[int] | None = None, objective: str = "tokens_per_s", top: int = 5,
               max_plans: int = 16, address: str | None = None,
               workers: int | str | None = None, use_cache: bool = True,
               trust_code: bool = False, concurrency: int = 1,
               progress: bool = True, prior_plans: int | None = None) -> SearchResult:
    from simdist.planner import RESERVED_BYTES, resolve_gpu, resolve_spec
    from simdist.rundir import install, staging_dir

    t0 = time.perf_counter()
    base = load_config(config, overrides, trust_code=trust_code)
    spec, gpu = resolve_spec(base), resolve_gpu(base)
    facts = ModelFacts.of(spec)
    gpus = list(dict.fromkeys(gpus or [base.world_size]))
    gb = global_batch_of(config, overrides, base, gpus)
    limit = gpu.hbm_bytes - RESERVED_BYTES
    cands, pruned, enumerated = enumerate_space(facts, base, gpu, gpus, gb, limit)
    cands.sort(key=prior_key(objective, limit))
    seeds = max(1, (max_plans + 1) // 2) if prior_plans is None else prior_plans
    walk = SearchWalk(config, overrides, cands, pruned, trust_code=trust_code,
                      use_cache=use_cache)
    bar = SweepProgress(min(max_plans, len(cands)), 0, progress, what="search")
    bar.line(f"{enumerated:,} plans enumerated, {sum(pruned.values()):,} pruned, "
             f"{len(cands):,} candidates; simulating up to {max_plans}: {min(seeds, max_plans)} "
             "best-first by the prior, the rest around the best simulated")
    tmp = staging_dir(out)
    try:
        plans_dir = tmp / PLANS_DIR
        plans_dir.mkdir()
        session = asyncio.run(walk.run(plans_dir, max_plans, seeds, objective, bar,
                                       address=address, workers=workers,
                                       concurrency=concurrency))
        cases = walk.cases
        bar.close()
        rows = ranked([case_row(c) for c in cases], objective_key(objective))
        by_id = {c.plan_id: c for c in cases}
        best = []
        for r in rows[:top]:
            if r["status"] != "simulated":
                break
            c = by_id[r["plan_id"]]
            best.append(dict(order=r["order"], plan_id=r["plan_id"], run_dir=r["run_dir"],
                             values=c.values, overrides=c.overrides[len(overrides):],
                             **{k: r[k] for k in ("fits", "peak_bytes_max", "step_time_s", "mfu",
                                                  "tokens_per_s", "tokens_per_s_per_gpu",
                                                  "cost_per_million_tokens")},
                             found_by=c.extra["found_by"],
                             prior={k: r[k] for k in c.extra if k.startswith("prior_")},
                             config=c.cfg.to_dict()))
        report = dict(
            objective=objective, gpus=gpus, global_batch=gb, seq_len=base.training.seq_len,
            model=dict(family=facts.family, n_params=facts.n_params, n_layers=facts.n_layers),
            gpu=gpu.name, memory_limit_bytes=limit, enumerated=enumerated,
            pruned_total=sum(pruned.values()), pruned=dict(pruned.most_common()),
            candidates=len(cands), max_plans=max_plans, prior_plans=min(seeds, max_plans),
            found_by=dict(Counter(c.extra["found_by"].split(" ", 1)[0] for c in cases)),
            simulated=sum(r["status"] == "simulated" for r in rows),
            skipped=sum(r["status"] == "skipped" for r in rows),
            failed=sum(r["status"] == "failed" for r in rows),
            prior=PRIOR_TEXT, best=best, wall_s=time.perf_counter() - t0)
        write_rows(tmp, sorted(rows, key=lambda r: r["plan_id"]), DIMS, dict(
            kind="search", config=str(config) if not isinstance(config, dict) else None,
            overrides=list(overrides), plans=len(cases), simulated=report["simulated"],
            skipped=report["skipped"], failed=report["failed"], **session,
            wall_s=report["wall_s"]))
        (tmp / SEARCH_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")
        from simdist.report import write_report_or_warn

        write_report_or_warn(tmp)
        install(tmp, out)
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SearchResult(out, rows, DIMS, report)


def print_search(res: SearchResult) -> None:
    r = res.report
    top = len(r["best"]) or None
    print_ranked(res.rows, res.keys, limit=top,
                 title=f"simdist search: best {len(r['best'])} of {r['simulated']} simulated "
                       f"plans by {r['objective']}")
    reasons = "; ".join(f"{why}: {n:,}" for why, n in r["pruned"].items())
    print(f"{r['enumerated']:,} plans enumerated, {r['pruned_total']:,} pruned ({reasons}), "
          f"{r['candidates']:,} candidates, {r['simulated']} simulated")
