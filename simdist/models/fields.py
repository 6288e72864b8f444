"""Types and bounds of the model shape fields a config may override (`model.n_layers: 8`).

The family dataclasses (Llama3Args, GPTArgs, MoEArgs) take whatever they are given; a string
`n_layers` or a `dim` of 10^12 would otherwise fail deep inside the model build (or exhaust
memory). Each bound is a generous real-world maximum; README "Config reference" states them.
"""

from __future__ import annotations

import math
from typing import Any

LAYERS_MAX = 4096
DIM_MAX = 1 << 20  # 1,048,576
HEADS_MAX = 1 << 16
VOCAB_MAX = 1 << 24  # 16,777,216
FFN_MAX = 1 << 22  # 4,194,304
EXPERTS_MAX = 1 << 16
SEQ_MAX = 1 << 24

# field: (kind, low, high); kind int | float | bool | a tuple of allowed strings | "routing"
FIELDS: dict[str, tuple[Any, Any, Any]] = {
    "dim": (int, 1, DIM_MAX),
    "n_layers": (int, 1, LAYERS_MAX),
    "n_heads": (int, 1, HEADS_MAX),
    "n_kv_heads": (int, 1, HEADS_MAX),
    "vocab_size": (int, 1, VOCAB_MAX),
    "ffn_dim": (int, 0, FFN_MAX),  # GPT: 0 = 4 * dim
    "moe_ffn_dim": (int, 1, FFN_MAX),
    "n_experts": (int, 1, EXPERTS_MAX),
    "top_k": (int, 1, EXPERTS_MAX),
    "n_shared_experts": (int, 0, 1024),
    "n_dense_layers": (int, 0, LAYERS_MAX),
    "max_seq_len": (int, 1, SEQ_MAX),
    "norm_eps": (float, 0.0, 1.0),  # exclusive low
    "rope_theta": (float, 0.0, 1e12),  # exclusive low
    "dropout": (float, -1.0, 1.0),  # checked as 0 <= p < 1 below
    "tie_embeddings": (bool, None, None),
    "route_norm": (bool, None, None),
    "score_func": (("softmax", "sigmoid"), None, None),
    "attention": (("flash", "eager"), None, None),
    "routing": ("routing", None, None),
}


def check_field(name: str, value: Any, family: str) -> str | None:
    """None if `value` is allowed for shape field `name`, else what is allowed (for the
    message). Fields without a rule are accepted as they are."""
    if name not in FIELDS:
        return None
    kind, lo, hi = FIELDS[name]
    if name == "ffn_dim" and family != "gpt":
        lo = 1
    if kind is bool:
        return None if isinstance(value, bool) else "true or false"
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
        return None if ok else f"an integer >= {lo} and <= {hi}"
    if kind is float:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value))
        if name == "dropout":
            return None if ok and 0 <= value < 1 else "a number >= 0 and < 1"
        return None if ok and lo < value <= hi else f"a number > {lo:g} and <= {hi:g}"
    if kind == "routing":
        from simdist.config import TrainingConfig

        try:
            TrainingConfig(routing=value)
        except Exception:  # noqa: BLE001 - the message says what is allowed
            return "balanced, zipf:<positive number> or file:<path>"
        return None
    return None if value in kind else ", ".join(kind)


def check_fields(family: str, fields: dict[str, Any], *, overridden: set[str]) -> tuple[str, str] | None:
    """The first overridden field whose value is not allowed, as (field, message), then the
    checks across fields (top_k <= n_experts, n_dense_layers <= n_layers); None if all pass."""
    for name in sorted(overridden):
        allowed = check_field(name, fields.get(name), family)
        if allowed is not None:
            return name, f"got {fields.get(name)!r:.60}; allowed: {allowed}"
    for small, big in (("top_k", "n_experts"), ("n_dense_layers", "n_layers")):
        if small in fields and big in fields and fields[small] > fields[big]:
            key = small if small in overridden else big
            return key, (f"{small} {fields[small]} exceeds {big} {fields[big]}; allowed: "
                         f"{small} <= {big}")
    return None
