"""In-process tests of the experiment pipeline's parts: system names, sweep expansion, config
checks, workloads from configs, the summary and the calibration cache key."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from experiments import calibration
from experiments.compare import find_runs, offered_rate, run_label
from experiments.config import DEFAULT_SYSTEMS, RunConfig, available_options
from experiments.metrics import requests_frame, steps_frame
from experiments.summary import build_summary
from experiments.systems import known_systems, parse_system
from experiments.validation import ConfigError, check_command_line, job_overrides
from experiments.workloads import from_config
from flashserve.core.records import RequestRecord, StepRecord

CONF = Path(__file__).resolve().parents[1] / "conf"


# systems


def test_parse_system_default_allocations():
    assert parse_system("measured/continuous").kv_allocation == "paged"
    assert parse_system("measured/static").kv_allocation == "contiguous"
    assert parse_system("measured/static").runner == "engine"


def test_parse_system_predicted_twin():
    system = parse_system("predicted/static-paged")
    assert system.runner == "sim"
    assert system.batching == "static"
    assert system.kv_allocation == "paged"
    assert system.twin == "measured/static-paged"


def test_parse_system_baseline_and_http():
    assert parse_system("baseline/hf-generate").kind == "baseline"
    http = parse_system("measured/http")
    assert http.runner == "http"
    assert http.batching is None


@pytest.mark.parametrize("name", ["measured/nope", "predicted/continuous-ragged", "simulated/static", "continuous"])
def test_parse_system_rejects_unknown(name):
    with pytest.raises(ValueError, match="unknown system") as error:
        parse_system(name)
    assert "measured/continuous" in str(error.value)


def test_known_systems_parse():
    for name in known_systems():
        assert parse_system(name).name == name
    assert set(DEFAULT_SYSTEMS) <= set(known_systems())


# command lines


def test_job_overrides_expands_sweeps():
    jobs = job_overrides(["+workload=poisson", "workload.rate=1,2", "seed=0,1", "hydra/launcher=joblib"])
    assert len(jobs) == 4
    assert ["+workload=poisson", "workload.rate=1", "seed=0", "hydra/launcher=joblib"] in jobs
    assert ["+workload=poisson", "workload.rate=2", "seed=1", "hydra/launcher=joblib"] in jobs


def test_job_overrides_range_sweep():
    jobs = job_overrides(["+workload=poisson", "workload.num_requests=range(1,4)"])
    assert [job[1] for job in jobs] == ["workload.num_requests=1", "workload.num_requests=2", "workload.num_requests=3"]


def test_check_command_line_accepts_defaults():
    check_command_line(["+workload=poisson"])


@pytest.mark.parametrize(("overrides", "message"), [
    (["+workload=poisson", "engine.max_model_len=4096"], "max_position_embeddings=2048"),
    (["+workload=poisson", "engine.num_kv_blocks=4"], "raise engine.num_kv_blocks"),
    (["+workload=poisson", "systems=[measured/continuous,measured/continuous]"], "more than once"),
    (["+workload=poisson", "systems=[measured/http]"], "http.base_url"),
    (["+workload=poisson", "sim.cost_model=exact"], "sim.cost_model"),
    (["+workload=poisson", "sim.cost_file=/nowhere/cost.json"], "/nowhere/cost.json"),
    (["+workload=poisson", "engine.threads=0"], "engine.threads"),
    (["+workload=gamma", "workload.burstiness=0"], "burstiness"),
    (["+workload=poisson", "model=nope"], "unknown model 'nope'"),
    (["+workload=poisson", "model.path=/nowhere/checkpoint"], "model.path=/nowhere/checkpoint"),
])
def test_check_command_line_rejects(overrides, message):
    with pytest.raises(ConfigError) as error:
        check_command_line(overrides)
    assert message in str(error.value)


def test_available_workloads_hide_schemas():
    assert available_options("workload") == ["azure_code", "azure_conv", "constant", "gamma", "poisson"]


# workloads


def synthetic_config(**changes):
    cfg = OmegaConf.load(CONF / "workload" / "poisson.yaml")
    cfg.pop("defaults")
    cfg.kind = "synthetic"
    for key, value in changes.items():
        cfg[key] = value
    return cfg


def test_from_config_same_seed_same_workload():
    first = from_config(synthetic_config(), seed=3, max_model_len=1024)
    second = from_config(synthetic_config(), seed=3, max_model_len=1024)
    other = from_config(synthetic_config(), seed=4, max_model_len=1024)
    assert first.requests == second.requests
    assert first.requests != other.requests


def test_from_config_clips_to_context():
    workload = from_config(synthetic_config(), seed=0, max_model_len=100)
    assert max(r.prompt_len + r.output_len for r in workload.requests) <= 100
    assert any("max_model_len" in t for t in workload.transformations)


# summary


def records(system_scale: float, num: int = 4):
    """Request and step records of `num` requests whose timings are scaled by `system_scale`."""
    requests = []
    for i in range(num):
        arrival = 0.1 * i
        first = arrival + 0.05 * system_scale
        finish = first + 0.3 * system_scale
        requests.append(RequestRecord(f"req-{i}", arrival, arrival, first, finish, 10, 4, 0, "length",
                                      [first, first + 0.1 * system_scale, first + 0.2 * system_scale, finish]))
    steps = [StepRecord(0, 0.0, 0.01 * system_scale, 40, 0, 4, 40, 400, 4, 4, 0, 0, 4, 8, 44, 64, 0)]
    return requests, steps


def tables(predicted_scale: float):
    measured_requests, measured_steps = records(1.0)
    predicted_requests, predicted_steps = records(predicted_scale)
    requests = pd.concat([requests_frame(measured_requests, "measured/continuous"),
                          requests_frame(predicted_requests, "predicted/continuous")], ignore_index=True)
    steps = pd.concat([steps_frame(measured_steps, "measured/continuous"),
                       steps_frame(predicted_steps, "predicted/continuous")], ignore_index=True)
    return requests, steps


def run_config(**changes) -> dict:
    config = OmegaConf.to_container(OmegaConf.structured(RunConfig), resolve=False)
    config.update({"workload": {"name": "poisson"}, "model": {"name": "micro"},
                   "systems": ["measured/continuous", "predicted/continuous"]})
    config["sim"]["cost_model"] = changes.pop("cost_model", "fitted")
    config.update(changes)
    return config


def test_build_summary_prediction_errors():
    requests, steps = tables(predicted_scale=2.0)
    summary = build_summary(requests, steps, run_config(), created="2026-01-01T00:00:00+00:00")
    predicted = summary["systems"]["predicted/continuous"]
    assert predicted["twin"] == "measured/continuous"
    assert predicted["estimate"] is False
    assert predicted["errors"]["e2e_mean"] == pytest.approx(1.0)
    assert predicted["errors"]["ttft_p50"] == pytest.approx(1.0)
    assert "errors" not in summary["systems"]["measured/continuous"]
    assert summary["run"] == {"workload": "poisson", "created": "2026-01-01T00:00:00+00:00", "model": "micro",
                              "seed": 0, "slo": {}}


def test_build_summary_roofline_is_estimate():
    requests, steps = tables(predicted_scale=1.0)
    summary = build_summary(requests, steps, run_config(cost_model="roofline"))
    assert summary["systems"]["predicted/continuous"]["estimate"] is True
    assert summary["systems"]["measured/continuous"]["estimate"] is False


def test_build_summary_goodput_from_slo():
    requests, steps = tables(predicted_scale=2.0)
    config = run_config(slo={"ttft": 0.07, "tpot": None, "e2e": None})
    summary = build_summary(requests, steps, config)
    assert summary["systems"]["measured/continuous"]["goodput"] > 0
    assert summary["systems"]["predicted/continuous"]["goodput"] == 0
    assert summary["run"]["slo"] == {"ttft": 0.07}


def test_build_summary_without_twin_has_empty_errors():
    requests, steps = tables(predicted_scale=2.0)
    keep = requests["system"] == "predicted/continuous"
    summary = build_summary(requests[keep], steps[steps["system"] == "predicted/continuous"], run_config())
    assert summary["systems"]["predicted/continuous"]["errors"] == {}


# compare and calibration


def test_offered_rate_from_config_or_arrivals():
    assert offered_rate({"workload": {"rate": 4}}, {}) == 4.0
    assert offered_rate({"workload": {"kind": "azure"}}, {"num_requests": 11, "duration_s": 5.0}) == 2.0
    assert offered_rate({"workload": {"rate": math.inf}}, {"num_requests": 1, "duration_s": 0.0}) is None


def test_find_runs_orders_sweep_jobs(tmp_path):
    sweep = tmp_path / "12-00-00-sweep"
    for name in ("10-poisson", "2-poisson", "0-gamma"):
        (sweep / name).mkdir(parents=True)
        (sweep / name / "summary.json").write_text("{}")
    (sweep / "notes").mkdir()
    runs = find_runs([sweep])
    assert [run.name for run in runs] == ["0-gamma", "2-poisson", "10-poisson"]
    assert run_label(runs[0]) == "12-00-00-sweep/0-gamma"


def test_find_runs_rejects_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="summary.json"):
        find_runs([tmp_path])


def test_cache_key_depends_on_threads_and_model():
    base = OmegaConf.create(run_config(model={"name": "tiny", "hf_config": {"hidden_size": 8}}, hardware={"name": "cpu"}))
    key = calibration.cache_key(base)
    assert key.startswith("tiny_cpu_2threads_")

    threads = base.copy()
    threads.engine.threads = 4
    assert calibration.cache_key(threads).startswith("tiny_cpu_4threads_")

    shape = base.copy()
    shape.model.hf_config.hidden_size = 16
    assert calibration.cache_key(shape) != key
