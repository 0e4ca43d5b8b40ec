"""Cost models: fitted coefficients (JSON, calibration) and the roofline estimate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments.workloads import RequestSpec
from flashserve.core import SchedulerConfig
from flashserve.engine import LLMEngine
from flashserve.sampling_params import SamplingParams
from sim import FittedCostModel, StepShape, load_cost_model, load_hardware, simulate
from sim.cost_model import FEATURES, RooflineCostModel, available_hardware, model_shape
from sim.profiling import SMALL_GRID, ProfiledStep, calibrate, fit

MICRO_LLAMA = str(Path(__file__).parent / "data" / "micro-llama.yaml")
SHIPPED_MODELS = ("tiny-llama", "smollm2-135m", "qwen2.5-0.5b", "llama-3.2-1b")


def shape(**values) -> StepShape:
    fields = dict.fromkeys(StepShape.__slots__, 0)
    fields.update(values)
    return StepShape(**fields)


# fitted


def test_fitted_model_round_trips_through_json(tmp_path):
    coefficients = {"intercept": 0.003, "num_prefill_tokens": 1.5e-4, "num_decode_seqs": 2e-4, "num_padded_decode_keys": 3e-6}
    metadata = {"model": "tiny-llama", "hardware": "some CPU", "torch_threads": 2, "versions": {"torch": "2.13.0"}}
    model = FittedCostModel(coefficients, metadata)
    path = tmp_path / "cost.json"
    model.save(path)

    loaded = load_cost_model("fitted", path=path)
    assert loaded.coefficients == coefficients
    assert loaded.metadata == metadata
    probe = shape(num_prefill_tokens=300, num_prefill_seqs=2, num_decode_seqs=5, num_padded_decode_keys=900)
    assert loaded.shape_time(probe) == model.shape_time(probe)
    assert model.shape_time(probe) == pytest.approx(0.003 + 300 * 1.5e-4 + 5 * 2e-4 + 900 * 3e-6)


def test_fitted_model_rejects_bad_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_cost_model("fitted", path=tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_cost_model("fitted", path=bad)
    bad.write_text(json.dumps({"kind": "fitted", "coefficients": {"num_gpus": 1.0}}))
    with pytest.raises(ValueError, match="unknown cost-model features"):
        load_cost_model("fitted", path=bad)
    with pytest.raises(ValueError, match="needs a coefficient file"):
        load_cost_model("fitted")


def synthetic_steps(coefficients: dict[str, float], count: int = 60) -> list[ProfiledStep]:
    steps = []
    for i in range(count):
        prefill = (i % 5) * 37
        decode = (i * 7) % 13
        keys = decode * (50 + 11 * (i % 9))
        values = {"intercept": 1.0, "num_prefill_tokens": prefill, "num_decode_seqs": decode, "num_padded_decode_keys": keys}
        seconds = sum(coefficients.get(name, 0.0) * value for name, value in values.items())
        steps.append(ProfiledStep(
            step=i, start_time=float(i), duration=seconds, num_prefill_tokens=prefill, num_decode_seqs=decode,
            num_prefill_seqs=1 if prefill else 0, num_context_tokens=prefill + keys, sum_sq_prefill_tokens=prefill**2,
            num_sampled=decode + (1 if prefill else 0), num_running=decode, num_waiting=0, num_preempted=0,
            kv_blocks_used=1, kv_blocks_total=10, kv_tokens_used=1, kv_slots_allocated=16, kv_slots_reserved=0,
            num_padded_decode_keys=keys, elapsed=seconds,
        ))
    return [s for s in steps if s.num_prefill_seqs + s.num_decode_seqs > 0]


@pytest.mark.parametrize("loss", ["linear", "soft_l1"])
def test_fit_recovers_known_coefficients(loss):
    truth = {"intercept": 0.004, "num_prefill_tokens": 1e-4, "num_decode_seqs": 3e-4, "num_padded_decode_keys": 2e-6}
    features = ("intercept", "num_prefill_tokens", "num_decode_seqs", "num_padded_decode_keys")
    model = fit(synthetic_steps(truth), features=features, loss=loss)

    for name, value in truth.items():
        assert model.coefficients[name] == pytest.approx(value, rel=1e-4)
    assert model.metadata["median_abs_relative_error"] < 1e-4


def test_fit_keeps_coefficients_non_negative():
    # a feature that only adds noise would get a negative weight from plain least squares
    steps = synthetic_steps({"intercept": 0.004, "num_prefill_tokens": 1e-4})
    for index, step in enumerate(steps):
        step.num_context_tokens = 1000 + 997 * index % 31
        step.elapsed *= 1.0 + 0.05 * ((-1) ** index)
    model = fit(steps, features=FEATURES)
    assert all(value >= 0 for value in model.coefficients.values())


def test_fit_rejects_unknown_feature():
    with pytest.raises(ValueError, match="unknown features"):
        fit(synthetic_steps({"intercept": 0.01}), features=("intercept", "num_gpus"))


def test_tiny_calibration_gives_sensible_model(tmp_path):
    out = tmp_path / "tiny.json"
    model = calibrate(model="tiny-llama", out=out, grid=SMALL_GRID, num_threads=1, device="cpu", hardware="cpu")

    assert out.is_file()
    loaded = load_cost_model("fitted", path=out)
    assert loaded.coefficients == model.coefficients
    assert all(value >= 0 for value in model.coefficients.values())
    meta = loaded.metadata
    for key in ("model", "hardware", "device", "dtype", "torch_threads", "block_size", "versions", "num_steps"):
        assert key in meta, key
    assert meta["model"] == "tiny-llama"
    assert meta["torch_threads"] == 1
    assert meta["dtype"] == "float32"
    assert "torch" in meta["versions"]

    decode = model.shape_time(shape(num_decode_seqs=1, num_context_tokens=64, num_padded_decode_keys=64, num_sampled=1))
    big_prefill = model.shape_time(shape(num_prefill_tokens=512, num_prefill_seqs=1, num_context_tokens=512,
                                         sum_sq_prefill_tokens=512**2, num_padded_prefill_scores=512**2, num_sampled=1))
    assert 1e-5 < decode < 1.0
    assert big_prefill > decode


# the simulator schedules exactly as the engine


def test_simulator_schedules_like_engine():
    specs = [RequestSpec(f"r{i}", 0.0, 10 + 13 * i, 2 + (5 * i) % 9) for i in range(8)]
    options = dict(num_kv_blocks=16, block_size=8, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256)
    shape_fields = ("num_prefill_tokens", "num_decode_seqs", "num_prefill_seqs", "num_context_tokens",
                    "num_running", "num_waiting", "num_preempted", "kv_blocks_used", "kv_tokens_used")

    torch.set_num_threads(1)
    engine = LLMEngine(model=MICRO_LLAMA, device="cpu", **options)
    for spec in specs:
        engine.add_request(spec.request_id, [5] * spec.prompt_len,
                           SamplingParams(temperature=0.0, max_tokens=spec.output_len, ignore_eos=True), arrival_time=0.0)
    while engine.has_unfinished_requests():
        engine.step()
    simulated = simulate(specs, SchedulerConfig(**options), FittedCostModel({"intercept": 0.01}))

    measured = [tuple(getattr(s, f) for f in shape_fields) for s in engine.step_records()]
    predicted = [tuple(getattr(s, f) for f in shape_fields) for s in simulated.step_records]
    assert sum(s.num_preempted for s in engine.step_records()) > 0, "the case should exercise preemption"
    assert predicted == measured


# roofline


@pytest.mark.parametrize("name", SHIPPED_MODELS)
def test_parameter_count_matches_transformers(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    from flashserve.model.loader import resolve_model

    hf_config = dict(resolve_model(name).hf_config)
    config = AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert model_shape(name).num_params == sum(p.numel() for p in model.parameters())


def test_hardware_specs_load():
    assert {"a100", "h100", "h200", "cpu"} <= set(available_hardware())
    for name in available_hardware():
        spec = load_hardware(name)
        assert spec.peak_flops > 0
        assert spec.memory_bandwidth > 0
        assert spec.memory_capacity > 0
    with pytest.raises(ValueError, match="unknown hardware 'tpu-v9'"):
        load_hardware("tpu-v9")


def test_roofline_decode_is_memory_bound():
    model = load_cost_model("roofline", model="llama-3.2-1b", hardware="a100")
    assert isinstance(model, RooflineCostModel)
    assert model.is_estimate
    spec = model.hardware
    weights_read = model.model.weight_bytes / spec.memory_bandwidth

    one = model.shape_time(shape(num_decode_seqs=1, num_context_tokens=100, num_attention_pairs=100, num_sampled=1))
    assert one == pytest.approx(weights_read + spec.step_overhead, rel=0.01)

    prefill = shape(num_prefill_tokens=8192, num_prefill_seqs=1, num_context_tokens=8192,
                    num_attention_pairs=8192 * 8193 // 2, num_sampled=1)
    flops = 2 * model.model.num_linear_params * 8192
    assert model.shape_time(prefill) > flops / spec.peak_flops + spec.step_overhead
    assert model.shape_time(prefill) > one


def test_roofline_sizes_cache_from_memory(tmp_path):
    model = load_cost_model("roofline", model="llama-3.2-1b", hardware="h200")
    spec = model.hardware
    blocks = model.kv_cache_blocks(16)
    free_bytes = spec.memory_capacity * spec.memory_utilization - model.model.num_params * 2
    assert blocks == int(free_bytes // (model.model.kv_bytes_per_token * 16))

    small = tmp_path / "small.yaml"
    small.write_text("name: small\ndescription: tiny device\npeak_flops: 1.0e+12\nmemory_bandwidth: 1.0e+11\n"
                     "memory_capacity: 1.0e+9\n")
    with pytest.raises(ValueError, match="no room for a KV cache"):
        load_cost_model("roofline", model="llama-3.2-1b", hardware=small).kv_cache_blocks(16)
