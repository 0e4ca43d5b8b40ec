"""summary.json of a run, computed from its request and step tables and its config alone.

Schema (the report reads it):
{"run": {"workload", "created", "model", "seed", ...},
 "systems": {NAME: {"kind", "batching", "kv_allocation", "estimate", "twin" (predicted only),
                    every key of experiments.metrics.summarize,
                    "errors" (predicted only): {metric: relative error against the twin}}}}
"""

from __future__ import annotations

import math
from datetime import datetime, timezone

import pandas as pd

from experiments.metrics import SLO, prediction_errors, summarize
from experiments.systems import parse_system


def build_summary(requests: pd.DataFrame, steps: pd.DataFrame, config: dict, created: str | None = None) -> dict:
    """Summarize every system of the tables, in the order of `config["systems"]`.

    `config` is the run's resolved config as a plain dict; `created` is the ISO 8601 time the
    run started (now when None).
    """
    configured = list(config.get("systems") or [])
    present = set(requests["system"]) | set(steps["system"])
    names = [name for name in configured if name in present] + sorted(present - set(configured))
    slo = SLO(**{k: v for k, v in (config.get("slo") or {}).items() if k in ("ttft", "tpot", "e2e")})
    estimate = (config.get("sim") or {}).get("cost_model") == "roofline"

    systems = {}
    for name in names:
        system = parse_system(name)
        entry = {
            "kind": system.kind,
            "batching": system.batching,
            "kv_allocation": system.kv_allocation,
            "estimate": system.kind == "predicted" and estimate,
        }
        if system.kind == "predicted":
            entry["twin"] = system.twin
            entry["cost_model"] = config["sim"]["cost_model"]
        entry.update(summarize(requests[requests["system"] == name], steps[steps["system"] == name], slo))
        systems[name] = entry

    for name, entry in systems.items():
        twin = entry.get("twin")
        if twin is not None and twin in systems:
            entry["errors"] = prediction_errors(entry, systems[twin])
        elif entry["kind"] == "predicted":
            entry["errors"] = {}

    workload = config.get("workload") or {}
    model = config.get("model") or {}
    run = {
        "workload": workload.get("name"),
        "created": created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model.get("name"),
        "seed": config.get("seed"),
        "slo": {k: v for k, v in slo.__dict__.items() if v is not None},
    }
    return _finite({"run": run, "systems": systems})


def _finite(value):
    """Replace NaN and infinities by None so that summary.json is strict JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
