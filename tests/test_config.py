"""Config schema: defaults, YAML round trip, typed overrides, plan resolution, and one clear
ConfigError (right key, names what is allowed) for each way the input can be wrong."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import yaml

from simdist.config import (
    ConfigError,
    GPUSpecConfig,
    SimdistConfig,
    apply_overrides,
    load_config,
    parse_override,
    torch_dtype,
)

FULL = {
    "model": {"preset": "llama3-8b", "n_layers": 4, "dim": 512},
    "training": {
        "seq_len": 4096,
        "micro_batch": 2,
        "global_batch": 64,
        "dtype": "fp16",
        "optimizer": "sgd",
        "activation_checkpointing": "selective",
        "attention": "eager",
        "routing": "zipf:1.2",
        "grad_sync": "auto",  # pp 2 allows auto and per_step, ZeRO-2 auto and per_microbatch
    },
    "parallel": {
        "dp_replicate": 2,
        "dp_shard": 2,
        "tp": 4,
        "sequence_parallel": False,
        "pp": 2,
        "pp_layers": [1, 1, 1, 1],
        "pp_schedule": "interleaved_1f1b",
        "pp_virtual_stages": 2,
        "cp": 1,
        "ep": 2,
        "zero_stage": 2,
    },
    "cluster": {"gpu": "a100-80gb", "gpus_per_node": 8, "nodes": 4, "price_per_gpu_hour": 2.5},
    "simulation": {"workers": 4, "cache_dir": "/tmp/simdist-cache", "rank_timeout_s": 120.0},
}


def write(tmp_path: Path, data, name: str = "plan.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


# ----------------------------------------------------------------------------- valid input


def test_defaults_from_empty_dict():
    cfg = load_config({})
    assert cfg.model.preset == "llama3-debug" and cfg.model.overrides() == {}
    assert cfg.training.seq_len == 2048 and cfg.training.dtype == "bf16"
    assert cfg.cluster.gpu == "h100-sxm" and cfg.world_size == 8
    # dp_shard -1 fills the one node; global_batch defaults to one micro-batch per dp rank
    assert cfg.parallel.dp_shard == 8 and cfg.dp == 8
    assert cfg.training.global_batch == 8 and cfg.num_microbatches == 1
    assert cfg.simulation.workers == "auto"
    assert cfg.training.grad_sync == "auto"


def test_empty_file_and_empty_section_mean_defaults(tmp_path):
    assert load_config(write(tmp_path, "")).to_dict() == load_config({}).to_dict()
    cfg = load_config(write(tmp_path, "training:\nparallel: {tp: 2}\n"))
    assert cfg.training.seq_len == 2048 and cfg.parallel.tp == 2


def test_grad_sync_values_are_accepted_where_the_plan_can_run_them():
    for value in ("auto", "per_step", "per_microbatch"):
        assert load_config({}, [f"training.grad_sync={value}"]).training.grad_sync == value
    pp = {"training": {"global_batch": 16}, "parallel": {"pp": 2}}
    assert load_config(pp, ["training.grad_sync=per_step"]).training.grad_sync == "per_step"
    zero1 = {"parallel": {"zero_stage": 1}}
    assert load_config(zero1, ["training.grad_sync=per_step"]).training.grad_sync == "per_step"


def test_full_yaml_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, FULL))
    assert cfg.world_size == 32 and cfg.dp == 4
    assert cfg.num_microbatches == 64 // (4 * 2)
    assert cfg.model.overrides() == {"n_layers": 4, "dim": 512}
    out = cfg.to_dict()
    for section, values in FULL.items():
        for key, value in values.items():
            assert out[section][key] == value, f"{section}.{key}"
    # the resolved dict is itself a valid config that resolves to the same thing
    again = load_config(write(tmp_path, out, "again.yaml"))
    assert again.to_dict() == out
    assert SimdistConfig.model_validate(out).to_dict() == out


def test_explicit_gpu_spec(tmp_path):
    spec = {"name": "x1", "bf16_tflops": 500, "hbm_gb": 96, "hbm_tb_s": 4, "nvlink_gb_s": 450}
    cfg = load_config(write(tmp_path, {"cluster": {"gpu": spec}}))
    assert isinstance(cfg.cluster.gpu, GPUSpecConfig)
    assert cfg.cluster.gpu.hbm_gb == 96 and cfg.cluster.gpu.internode_gb_s == 50.0
    assert cfg.to_dict()["cluster"]["gpu"]["name"] == "x1"


def test_overrides_are_typed_by_the_schema(tmp_path):
    cfg = load_config(
        write(tmp_path, {"cluster": {"nodes": 2}}),
        [
            "parallel.tp=8",
            "training.attention=eager",
            "model.n_layers=2",
            "cluster.gpu=a100-80gb",
            "training.routing=zipf:1.5",
            "simulation.workers=3",
            "parallel.pp_layers=[1, 1]",
            "parallel.pp=2",
        ],
    )
    assert cfg.parallel.tp == 8 and isinstance(cfg.parallel.tp, int)
    assert cfg.training.attention == "eager"
    assert cfg.model.overrides() == {"n_layers": 2} and cfg.model.preset == "llama3-debug"
    assert cfg.cluster.gpu == "a100-80gb"
    assert cfg.training.routing == "zipf:1.5"
    assert cfg.simulation.workers == 3
    assert cfg.parallel.pp_layers == [1, 1]
    assert cfg.parallel.dp_shard == 1  # 16 GPUs / (tp 8 * pp 2)


def test_parse_override():
    assert parse_override("parallel.tp=8") == (["parallel", "tp"], 8)
    assert parse_override("training.global_batch=null") == (["training", "global_batch"], None)
    assert parse_override("model.entrypoint=pkg.mod:fn") == (["model", "entrypoint"], "pkg.mod:fn")
    assert parse_override("parallel.sequence_parallel=false") == (["parallel", "sequence_parallel"], False)


def test_apply_overrides_copies_and_nests():
    raw = {"parallel": {"tp": 2}}
    out = apply_overrides(raw, ["parallel.cp=2", "cluster.gpu.hbm_gb=80"])
    assert raw == {"parallel": {"tp": 2}}
    assert out == {"parallel": {"tp": 2, "cp": 2}, "cluster": {"gpu": {"hbm_gb": 80}}}


def test_override_of_model_source_replaces_the_files_source():
    cfg = load_config({"model": {"hf": {"model_type": "llama"}, "n_layers": 2}}, ["model.preset=gpt-small"])
    assert cfg.model.preset == "gpt-small" and cfg.model.hf is None
    assert cfg.model.overrides() == {"n_layers": 2}


def test_dp_shard_resolution_with_other_degrees():
    cfg = load_config({"cluster": {"nodes": 4}, "parallel": {"dp_replicate": 2, "tp": 2, "cp": 2}})
    assert cfg.parallel.dp_shard == 32 // 8 and cfg.dp == 8


def test_num_microbatches():
    cfg = load_config({"training": {"global_batch": 64, "micro_batch": 2}, "parallel": {"tp": 2}})
    assert cfg.dp == 4 and cfg.num_microbatches == 8


def test_torch_dtype_and_pickle():
    import torch

    from simdist.config import DTYPES

    assert torch_dtype("bf16") is torch.bfloat16 and DTYPES["fp32"] is torch.float32
    err = pickle.loads(pickle.dumps(ConfigError("parallel.tp", "bad")))
    assert (err.key, err.message, str(err)) == ("parallel.tp", "bad", "parallel.tp: bad")


# ----------------------------------------------------------------------------- bad input

# (raw config, overrides, expected key, words the message must contain)
BAD = {
    "unknown section": ({"trainig": {}}, [], "trainig", ["unknown section", "training", "parallel"]),
    "unknown key": ({"parallel": {"tpp": 2}}, [], "parallel.tpp", ["unknown key", "tp", "dp_shard", "zero_stage"]),
    "unknown gpu spec key": (
        {"cluster": {"gpu": {"bf16_tflops": 1, "hbm_gb": 1, "hbm_tb_s": 1, "nvlink_gb_s": 1, "tflops": 2}}},
        [], "cluster.gpu.tflops", ["unknown key", "bf16_tflops", "hbm_gb"],
    ),
    "gpu spec missing field": ({"cluster": {"gpu": {"bf16_tflops": 1}}}, [], "cluster.gpu.hbm_gb", ["required", "> 0"]),
    "dtype": ({"training": {"dtype": "bf17"}}, [], "training.dtype", ["'bf17'", "bf16", "fp16", "fp32"]),
    "attention": ({"training": {"attention": "sdpa"}}, [], "training.attention", ["'sdpa'", "flash", "eager"]),
    "pp_schedule": ({"parallel": {"pp_schedule": "1F1B"}}, [], "parallel.pp_schedule",
                    ["1f1b", "interleaved_1f1b", "gpipe", "zero_bubble"]),
    "activation_checkpointing": ({"training": {"activation_checkpointing": "yes"}}, [],
                                 "training.activation_checkpointing", ["none", "selective", "full", "op"]),
    "zero_stage": ({"parallel": {"zero_stage": 0}}, [], "parallel.zero_stage", ["1, 2, 3"]),
    "grad_sync": ({"training": {"grad_sync": "once"}}, [], "training.grad_sync",
                  ["'once'", "auto", "per_step", "per_microbatch"]),
    "grad_sync per_microbatch with pp": (
        {"training": {"grad_sync": "per_microbatch", "global_batch": 16}, "parallel": {"pp": 2}}, [],
        "training.grad_sync", ["pp > 1", "pipelining", "allowed: auto, per_step"],
    ),
    "grad_sync against zero 1": ({"training": {"grad_sync": "per_microbatch"}, "parallel": {"zero_stage": 1}},
                                 [], "training.grad_sync", ["zero_stage 1", "allowed: auto, per_step"]),
    "grad_sync against zero 2": ({"training": {"grad_sync": "per_step"}, "parallel": {"zero_stage": 2}},
                                 [], "training.grad_sync", ["zero_stage 2", "allowed: auto, per_microbatch"]),
    "zero overlap grad reduce with fsdp": ({"parallel": {"zero_overlap_grad_reduce": True}}, [],
                                           "parallel.zero_overlap_grad_reduce",
                                           ["zero_stage 1", "allowed: false"]),
    "zero overlap param gather with fsdp": ({"parallel": {"zero_overlap_param_gather": True}}, [],
                                            "parallel.zero_overlap_param_gather",
                                            ["zero_stage 1 or 2", "allowed: false"]),
    "zero fp32 grads with fsdp": ({"parallel": {"zero_grad_dtype": "fp32"}}, [],
                                  "parallel.zero_grad_dtype", ["zero_stage 1", "allowed: bf16"]),
    "zero overlap grad reduce with pp": (
        {"training": {"global_batch": 16},
         "parallel": {"zero_stage": 1, "pp": 2, "zero_overlap_grad_reduce": True}}, [],
        "parallel.zero_overlap_grad_reduce", ["pp > 1", "allowed: false"]),
    "zero degree": ({"parallel": {"tp": 0}}, [], "parallel.tp", ["got 0", ">= 1"]),
    "negative degree": ({"parallel": {"pp": -2}}, [], "parallel.pp", ["got -2", ">= 1"]),
    "bad dp_shard": ({"parallel": {"dp_shard": 0}}, [], "parallel.dp_shard", ["-1", ">= 1"]),
    "not an integer": ({"training": {"seq_len": "long"}}, [], "training.seq_len", ["'long'", "an integer"]),
    "section not a mapping": ({"parallel": [1, 2]}, [], "parallel", ["a mapping", "tp"]),
    "product mismatch": ({"parallel": {"dp_shard": 2, "tp": 2}}, [], "parallel",
                         ["product of degrees", "4 != world size 8", "nodes*gpus_per_node"]),
    "dp_shard does not fill": ({"parallel": {"tp": 3}}, [], "parallel.dp_shard", ["= 3 does not divide world size 8"]),
    "global batch": ({"training": {"global_batch": 12, "micro_batch": 2}, "parallel": {"tp": 2}}, [],
                     "training.global_batch", ["12 must be a multiple of dp (4) x micro_batch (2) = 8"]),
    "ep": ({"parallel": {"ep": 3}}, [], "parallel.ep", ["ep=3 must divide dp_shard*cp"]),
    "routing": ({"training": {"routing": "zipf:-1"}}, [], "training.routing", ["'zipf:-1'", "balanced", "zipf:", "file:"]),
    "routing unknown": ({"training": {"routing": "random"}}, [], "training.routing", ["balanced"]),
    "pp_layers length": ({"parallel": {"pp": 2, "pp_layers": [4, 4, 4]}}, [], "parallel.pp_layers",
                         ["3 entries", "pp (2)", "= 2"]),
    "pp_layers interleaved length": (
        {"parallel": {"pp": 2, "pp_schedule": "interleaved_1f1b", "pp_layers": [4, 4]}}, [],
        "parallel.pp_layers", ["pp_virtual_stages (2)", "= 4"],
    ),
    "pp_layers negative": ({"parallel": {"pp": 2, "pp_layers": [4, -1]}}, [], "parallel.pp_layers[1]", [">= 0"]),
    "cp does not divide seq_len": ({"training": {"seq_len": 1004}, "parallel": {"cp": 8, "dp_shard": 1}}, [],
                                   "parallel.cp", ["cp=8 must divide training.seq_len=1004"]),
    "cp load balancing": ({"training": {"seq_len": 12}, "parallel": {"cp": 4, "dp_shard": 2}}, [],
                          "parallel.cp", ["multiple of 2*cp = 8"]),
    "workers zero": ({"simulation": {"workers": 0}}, [], "simulation.workers", ["auto", ">= 1"]),
    "workers word": ({"simulation": {"workers": "many"}}, [], "simulation.workers", ["'many'", "auto"]),
    "rank timeout": ({"simulation": {"rank_timeout_s": 0}}, [], "simulation.rank_timeout_s", ["> 0"]),
    "two model sources": ({"model": {"preset": "llama3-8b", "hf": {}}}, [], "model", ["exactly one", "preset and hf"]),
    "bad entrypoint": ({"model": {"entrypoint": "mymodel"}}, [], "model.entrypoint", ["module:function"]),
    "override without =": ({}, ["foo"], "--set", ["KEY=VALUE", "'foo'"]),
    "override bad key": ({}, ["parallel..tp=2"], "--set", ["parallel..tp"]),
    "override bad value": ({}, ["parallel.pp_layers=[1,"], "--set", ["line 1"]),
    "override unknown section": ({}, ["paralel.tp=2"], "paralel", ["unknown config section", "parallel", "cluster"]),
    "override unknown key": ({}, ["parallel.tensor=2"], "parallel.tensor", ["unknown key", "tp"]),
    "override bad literal": ({}, ["training.dtype=int8"], "training.dtype", ["bf16"]),
    "override through a scalar": ({"cluster": {"gpu": "h100-sxm"}}, ["cluster.gpu.hbm_gb=80"], "cluster.gpu",
                                  ["not a mapping"]),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input(case):
    raw, overrides, key, words = BAD[case]
    with pytest.raises(ConfigError) as info:
        load_config(raw, overrides)
    err = info.value
    assert err.key == key, str(err)
    for word in words:
        assert word in err.message, f"{word!r} not in {err.message!r}"
    assert str(err) == f"{key}: {err.message}"
    assert "\n" not in str(err) and "http" not in str(err) and "pydantic" not in str(err)


def test_several_errors_report_the_first_and_list_the_rest():
    with pytest.raises(ConfigError) as info:
        load_config({"training": {"dtype": "x", "attention": "y"}})
    assert info.value.key == "training.dtype"
    assert "also invalid: training.attention" in info.value.message


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "training:\n  seq_len: 4096\n  dtype: [bf16\nparallel: {tp: 2}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "config"
    assert "YAML syntax error" in info.value.message and "line 4" in info.value.message
    assert str(path) in info.value.message and "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert info.value.key == "config" and "file not found" in info.value.message


def test_directory_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert info.value.key == "config" and "directory" in info.value.message


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_yaml(tmp_path, text):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.key == "config" and "expected a mapping" in info.value.message


def test_bad_file_with_override_reports_the_override(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, FULL), ["parallel.tp=3"])
    assert info.value.key == "parallel"
