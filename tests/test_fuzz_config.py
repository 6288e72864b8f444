"""Random and mutated configs and `--set` overrides thrown at the loader and the planning check
(in-process; nothing is simulated): each example loads and plans, or raises ConfigError (the
exit-2 class). Any other exception, or an example past its deadline, is a bug.

Starts from configs/*.yaml; mutates keys, values and types; adds junk keys; huge, negative,
float, string and non-finite numbers. ~200 examples in the default suite (SIMDIST_FUZZ_EXAMPLES
raises it)."""

from __future__ import annotations

import math
import os
from datetime import timedelta
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simdist.config import ConfigError, SimdistConfig, load_config

from simdist.planner import plan_run

REPO = Path(__file__).resolve().parents[1]
BASES = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "configs").glob("*.yaml"))]
EXAMPLES = int(os.environ.get("SIMDIST_FUZZ_EXAMPLES", "100"))  # per test; two tests

SECTION_KEYS = {name: list(field.annotation.model_fields)  # every key of the schema
                for name, field in SimdistConfig.model_fields.items()}
MODEL_FIELDS = ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim",
                "moe_ffn_dim", "n_experts", "top_k", "n_shared_experts", "n_dense_layers",
                "max_seq_len", "norm_eps", "rope_theta", "dropout", "tie_embeddings",
                "route_norm", "score_func", "attention", "routing"]
SECTION_KEYS["model"] = ["preset", "hf", "kwargs", *MODEL_FIELDS]
PRESETS = ["llama3-debug", "gpt-debug", "moe-debug", "llama3-8b", "mixtral-8x7b", "nope"]

small_ints = st.integers(-4, 64)
huge_ints = st.sampled_from([0, -1, 2**31, 2**63, 10**12, 10**30, 1 << 20, (1 << 20) + 1, 4097])
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.5, 1e9, -0.0, 2.0])
words = st.sampled_from(["auto", "abc", "", "1e9", "bf16", "flash", "eager", "zipf:1.2",
                         "zipf:-1", "file:/nonexistent", "1f1b", "interleaved_1f1b", "h100-sxm",
                         "h900", "full", "none", "-1", "sigmoid", *PRESETS])
scalars = st.one_of(small_ints, huge_ints, floats, words, st.booleans(), st.none(),
                    st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
# Values a config could well hold: small powers of two, the schema's words. Most mutations use
# them, so that a good share of examples gets past the loader into the planning check.
plausible = st.one_of(st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128, 256, 2048, -1, 0, 3]),
                      st.sampled_from([True, False, None, "balanced", "selective", "op", "sgd",
                                       "zero_bubble", "gpipe", "gpt-debug", "moe-debug",
                                       "llama3-debug", "a100-80gb", "fp32", 1e-5, 0.1]))
mutation_value = st.one_of(plausible, plausible, values)
junk_key = st.text(min_size=1, max_size=8) | st.sampled_from(["trust_code", "_trust_code", "lr"])


@st.composite
def configs(draw) -> dict:
    raw = yaml.safe_load(yaml.safe_dump(draw(st.sampled_from(BASES))))
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from([*SECTION_KEYS, "junk"]))
        op = draw(st.sampled_from(["set"] * 6 + ["delete", "junk", "replace"]))
        if section == "junk":
            raw[draw(junk_key)] = draw(values)
            continue
        body = raw.setdefault(section, {})
        if op == "replace":
            raw[section] = draw(values)
            continue
        if not isinstance(body, dict):
            continue
        if op == "delete" and body:
            body.pop(draw(st.sampled_from(sorted(body, key=str))), None)
        elif op == "junk":
            body[draw(junk_key)] = draw(values)
        else:
            body[draw(st.sampled_from(SECTION_KEYS[section]))] = draw(mutation_value)
    return raw


@st.composite
def overrides(draw) -> list[str]:
    out = []
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from([*SECTION_KEYS] * 4 + ["paralel"]))
        key = draw(st.sampled_from(SECTION_KEYS.get(section, ["tp"])) if draw(st.integers(0, 5))
                   else junk_key)
        if draw(st.integers(0, 4)):
            text = yaml.safe_dump(draw(mutation_value), default_flow_style=True).strip()
            text = text.removesuffix("\n...").removesuffix("...").strip()
        else:
            text = draw(st.text(max_size=10))
        forms = [f"{section}.{key}={text}"] * 8 + [f"{section}.{key}", text, f"{section}.{key}.x={text}"]
        out.append(draw(st.sampled_from(forms)))
    return out


def check(raw: dict, sets: list[str]) -> str:
    """'planned', or the ConfigError's key; any other exception propagates (a failure)."""
    try:
        cfg = load_config(raw, sets)
        plan_run(cfg)
    except ConfigError as e:
        assert e.key and str(e) and "\n" not in str(e), repr(e)
        return e.key
    return "planned"


FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=20), derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                database=None)
OUTCOMES: dict[str, int] = {}


@FUZZ
@given(raw=configs())
def test_mutated_configs_load_and_plan_or_fail_as_bad_input(raw):
    outcome = check(raw, [])
    OUTCOMES[outcome] = OUTCOMES.get(outcome, 0) + 1


@FUZZ
@given(raw=st.sampled_from(BASES), sets=overrides())
def test_overrides_load_and_plan_or_fail_as_bad_input(raw, sets):
    outcome = check(raw, sets)
    OUTCOMES[outcome] = OUTCOMES.get(outcome, 0) + 1


def test_found_examples_stay_fixed():
    """Inputs the fuzzing found that used to raise something else than ConfigError."""
    for raw, sets in [
        ({"model": {"preset": "llama3-debug", "n_layers": "abc"}}, []),
        ({"model": {"preset": "llama3-debug", "dim": True}}, []),
        ({"model": {"preset": "moe-debug", "top_k": 100}}, []),
        ({"cluster": {"nodes": 10**9}}, []),
        ({"simulation": {"rank_timeout_s": math.inf}}, []),
        ({"cluster": {"gpu": {"bf16_tflops": 1e308, "hbm_gb": 1e308, "hbm_tb_s": 1,
                              "nvlink_gb_s": 1}}}, []),
    ]:
        assert check(raw, sets) != "planned", (raw, sets)
