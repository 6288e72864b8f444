"""Static MoE routing: how many token copies each expert receives.

Routing is data-dependent and fake tensors carry no data, so the per-expert token counts are an
input of the simulation (`training.routing`), not something the router computes:

- `balanced`: the `n_tokens * top_k` token copies split evenly, the remainder one each to the
  first experts;
- `zipf:<alpha>`: expert i gets a share proportional to 1 / (i + 1) ** alpha (expert 0 is the
  hottest);
- `file:<path>`: a JSON file with either one list of per-expert loads (counts or fractions, one
  number per expert, used for every layer) or a list of such lists, one per layer (indexed by the
  layer id, i.e. the key of `model.layers`).

Loads are relative: counts recorded on another batch size are rescaled to this one. Every result
is a list of `n_experts` integers summing exactly to `n_tokens * top_k`, each at most `n_tokens`
(top-k picks k *distinct* experts per token, so no expert can receive a token twice); an expert
whose proportional share would exceed that is capped and the excess is shared among the others
in proportion to their loads.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path


class RoutingError(ValueError):
    """A routing spec that cannot produce counts (bad form, bad file, impossible loads)."""


def expert_token_counts(routing: str, n_tokens: int, n_experts: int, top_k: int,
                        layer: int) -> list[int]:
    """Token copies per expert for one MoE layer that sees `n_tokens` tokens."""
    return list(_counts(routing.strip(), int(n_tokens), int(n_experts), int(top_k), int(layer)))


@functools.lru_cache(maxsize=4096)
def _counts(routing: str, n_tokens: int, n_experts: int, top_k: int, layer: int) -> tuple[int, ...]:
    if n_experts < 1 or not 1 <= top_k <= n_experts:
        raise RoutingError(f"need 1 <= top_k <= n_experts, got top_k={top_k}, "
                           f"n_experts={n_experts}")
    if n_tokens < 0:
        raise RoutingError(f"n_tokens must be >= 0, got {n_tokens}")
    total = n_tokens * top_k
    if routing == "balanced":
        q, r = divmod(total, n_experts)
        return tuple([q + 1] * r + [q] * (n_experts - r))
    kind, _, arg = routing.partition(":")
    if kind == "zipf" and arg:
        try:
            alpha = float(arg)
        except ValueError:
            alpha = math.nan
        if not alpha > 0:
            raise RoutingError(f"zipf needs a positive exponent, got {routing!r}")
        weights = [1.0 / (i + 1) ** alpha for i in range(n_experts)]
        return tuple(_capped_split(weights, total, n_tokens))
    if kind == "file" and arg:
        return tuple(_capped_split(_file_loads(arg, n_experts, layer), total, n_tokens))
    raise RoutingError(f"unknown routing {routing!r}; allowed: balanced, zipf:<alpha>, file:<path>")


def _capped_split(weights: list[float], total: int, cap: int) -> list[int]:
    """Integers proportional to `weights`, summing to `total`, each <= `cap` (water-filling:
    cap the experts whose share exceeds `cap`, re-share the rest among the others)."""
    n = len(weights)
    if total > cap * sum(1 for w in weights if w > 0):
        raise RoutingError(
            f"{total} token copies cannot be routed: only {sum(1 for w in weights if w > 0)} "
            f"experts have a non-zero load and each takes at most {cap} tokens")
    counts = [0] * n
    free = [i for i in range(n) if weights[i] > 0]
    remaining = total
    while True:
        wsum = sum(weights[i] for i in free)
        ideal = {i: remaining * weights[i] / wsum for i in free} if free else {}
        over = [i for i in free if ideal[i] > cap]
        if not over:
            break
        for i in over:
            counts[i] = cap
            remaining -= cap
        free = [i for i in free if i not in over]
    for i in free:
        counts[i] = min(cap, math.floor(ideal[i]))
    # Largest remainders get the leftover copies (ties: lower expert index first).
    left = total - sum(counts)
    order = sorted(free, key=lambda i: (-(ideal[i] - math.floor(ideal[i])), i))
    for i in order + free:  # the second pass only guards float rounding
        if left <= 0:
            break
        if counts[i] < cap:
            counts[i] += 1
            left -= 1
    assert sum(counts) == total and max(counts, default=0) <= cap, (counts, total, cap)
    return counts


@functools.lru_cache(maxsize=64)
def _read_json(path: str) -> object:
    try:
        return json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as e:
        raise RoutingError(f"cannot read routing file {path!r}: {e}") from None


def _file_loads(path: str, n_experts: int, layer: int) -> list[float]:
    data = _read_json(path)
    if isinstance(data, list) and data and all(isinstance(x, list) for x in data):
        if layer >= len(data):
            raise RoutingError(f"routing file {path!r} has loads for {len(data)} layers; "
                               f"layer {layer} is missing")
        data = data[layer]
    if not (isinstance(data, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                           for x in data)):
        raise RoutingError(f"routing file {path!r} must hold a list of per-expert loads or a list "
                           "of such lists (one per layer)")
    if len(data) != n_experts:
        raise RoutingError(f"routing file {path!r} gives {len(data)} loads; the model has "
                           f"{n_experts} experts")
    if any(x < 0 for x in data) or sum(data) <= 0:
        raise RoutingError(f"routing file {path!r}: loads must be >= 0 with a positive sum")
    return [float(x) for x in data]


def ep_split_sizes(counts: list[int], ep: int) -> list[int]:
    """Tokens a rank sends to each EP rank: the loads of that rank's contiguous expert block."""
    if len(counts) % ep:
        raise RoutingError(f"ep={ep} must divide n_experts={len(counts)}")
    per = len(counts) // ep
    return [sum(counts[j * per:(j + 1) * per]) for j in range(ep)]


def ep_received_tokens(routing: str, n_tokens: int, n_experts: int, top_k: int, layer: int,
                       ep: int, ep_rank: int) -> int:
    """Token copies EP rank `ep_rank` receives in one MoE layer when every rank of the group
    routes its `n_tokens` tokens the same way: ep x its experts' share."""
    return ep * ep_split_sizes(expert_token_counts(routing, n_tokens, n_experts, top_k, layer),
                               ep)[ep_rank]
