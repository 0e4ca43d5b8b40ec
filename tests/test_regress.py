"""The regression check: its verdicts, its command line, and that deliberate slowdowns fail it."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest

from experiments import regress
from experiments.regress import Metric, RegressConfig, compare, verdict
from flashserve import LLMEngine
from sim import FittedCostModel


@pytest.fixture
def tiny_config(micro_llama) -> RegressConfig:
    return RegressConfig(model=micro_llama, threads=1, num_requests=12, batch_size=4, max_model_len=128, repeats=1,
                         profile_grid="small", poisson_requests=12, poisson_rate=20.0, speed_requests=200,
                         greedy_prompts=2, greedy_tokens=4)


@pytest.mark.parametrize("direction,tolerance,baseline,now,expected", [
    ("higher", 0.3, 2.0, 1.5, "ok"),
    ("higher", 0.3, 2.0, 1.3, "REGRESSED"),
    ("higher", 0.3, 2.0, 5.0, "ok"),
    ("lower", 0.1, 0.05, -0.12, "ok"),
    ("lower", 0.1, 0.05, 0.2, "REGRESSED"),
    ("lower", 0.1, -0.05, -0.2, "REGRESSED"),
    ("equal", 0.0, 1.0, 1.0, "ok"),
    ("equal", 0.0, 1.0, 0.0, "REGRESSED"),
    ("higher", 0.3, None, 1.0, "new"),
])
def test_verdict(direction, tolerance, baseline, now, expected):
    assert verdict(Metric("m", now, direction, tolerance, ""), baseline) == expected


def test_step_sleep_regresses_engine_throughput(tiny_config, monkeypatch):
    before = regress.measure_engine_throughput(tiny_config)
    original_step = LLMEngine.step

    def slow_step(self):
        time.sleep(0.02)
        return original_step(self)

    monkeypatch.setattr(LLMEngine, "step", slow_step)
    after = regress.measure_engine_throughput(tiny_config)
    rows = compare(
        [Metric(name, after[name], *regress.TOLERANCES[name]) for name in after],
        {"metrics": {name: {"value": value} for name, value in before.items()}},
    )
    verdicts = {row["metric"]: row["verdict"] for row in rows}
    assert verdicts["continuous_vs_hf"] == "REGRESSED"
    assert verdicts["static_vs_hf"] == "REGRESSED"


def test_wrong_cost_coefficient_regresses_fidelity(tiny_config, tmp_path):
    errors = regress.measure_sim_fidelity(tiny_config, tmp_path)
    fitted = FittedCostModel.load(tmp_path / "cost_model.json")
    wrong = FittedCostModel({name: value * 3 for name, value in fitted.coefficients.items()}, fitted.metadata)
    wrong_errors = regress.measure_sim_fidelity(tiny_config, tmp_path, cost_model=wrong)
    rows = compare(
        [Metric(name, wrong_errors[name], *regress.TOLERANCES[name]) for name in wrong_errors],
        {"metrics": {name: {"value": value} for name, value in errors.items()}},
    )
    verdicts = {row["metric"]: row["verdict"] for row in rows}
    assert verdicts["sim_error_e2e_mean"] == "REGRESSED"
    assert verdicts["sim_error_output_throughput"] == "REGRESSED"


def test_command_writes_baseline_and_tables(tiny_config, tmp_path, capsys):
    baseline = tmp_path / "baseline.json"
    out = tmp_path / "out"
    assert regress.main(["--baseline", str(baseline), "--out", str(out), "--update-baseline"], config=tiny_config) == 0
    saved = json.loads(baseline.read_text())
    assert set(saved["metrics"]) == set(regress.TOLERANCES)
    assert saved["metrics"]["greedy_equal"]["value"] == 1.0
    table = (out / "regress.md").read_text()
    assert table.startswith("| metric | baseline | now | tolerance | verdict |")
    assert "REGRESSED" not in table
    rows = json.loads((out / "regress.json").read_text())["rows"]
    assert [row["metric"] for row in rows] == list(regress.TOLERANCES)
    assert "greedy_equal" in capsys.readouterr().out


def test_regression_exits_nonzero_naming_metric(tiny_config, tmp_path, capsys, monkeypatch):
    baseline = tmp_path / "baseline.json"
    payload = {"metrics": {name: {"value": 1.0} for name in regress.TOLERANCES}}
    payload["metrics"]["sim_speed_vs_reference"] = {"value": 1e12}
    baseline.write_text(json.dumps(payload))
    monkeypatch.setattr(regress, "collect", lambda cfg, work_dir: [
        Metric(name, 0.0 if name.startswith("sim_error") else 1.0, *regress.TOLERANCES[name])
        for name in regress.TOLERANCES
    ])
    assert regress.main(["--baseline", str(baseline), "--out", str(tmp_path / "out")], config=tiny_config) == 1
    assert "REGRESSION in sim_speed_vs_reference" in capsys.readouterr().err


def test_missing_baseline_is_an_error(tiny_config, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(regress, "collect", lambda cfg, work_dir: [])
    assert regress.main(["--baseline", str(tmp_path / "none.json"), "--out", str(tmp_path)], config=tiny_config) == 2
    assert "--update-baseline" in capsys.readouterr().err


def test_default_config_matches_committed_baseline():
    saved = json.loads(regress.BASELINE_PATH.read_text())
    assert saved["config"] == replace(RegressConfig()).__dict__
