"""Hydra structured configs of the experiment pipeline, registered in Hydra's ConfigStore.

The YAML files under conf/ select and fill these schemas. Every field states its meaning, unit
and default where it is declared; `conf/run.yaml` and `conf/calibrate.yaml` are the primary
configs of `python -m experiments run` and `python -m experiments calibrate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

DEFAULT_SYSTEMS = [
    "measured/continuous",
    "measured/static",
    "predicted/continuous",
    "predicted/static",
    "baseline/hf-generate",
]


# workload


@dataclass
class LengthConfig:
    """A token-length distribution (see experiments.workloads.LengthDist)."""

    kind: str = "lognormal"  # "fixed", "uniform", "lognormal" or "trace" (resampled from an Azure CSV)
    mean: float = 128  # tokens: the value of "fixed", the median of "lognormal" and "trace"
    sigma: float = 0.6  # log-space standard deviation of "lognormal"
    low: int = 1  # tokens: samples are clipped to [low, high]
    high: int = 1024
    trace_path: str | None = None  # Azure trace CSV for kind "trace"


@dataclass
class SyntheticWorkloadConfig:
    """Arrivals from a renewal process, with sampled prompt and output lengths."""

    name: str = MISSING  # names the run folder and the report
    kind: str = "synthetic"
    process: str = "poisson"  # "poisson", "gamma" or "constant"
    rate: float = 10.0  # requests per second; inf sends every request at time 0
    num_requests: int = 160
    burstiness: float = 1.0  # gamma shape: 1 is Poisson, below 1 burstier, above 1 smoother
    prompt_len: LengthConfig = field(default_factory=LengthConfig)
    output_len: LengthConfig = field(default_factory=LengthConfig)


@dataclass
class TraceWorkloadConfig:
    """Replay of an Azure LLM inference trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens)."""

    name: str = MISSING
    kind: str = "azure"
    trace_path: str = MISSING  # the CSV file
    start_s: float = 0.0  # seconds after the first request where the time window starts
    duration_s: float | None = None  # length of the time window in seconds; None keeps the rest
    max_requests: int | None = None  # keep at most this many requests of the window
    time_scale: float = 1.0  # multiplies arrival times: 0.5 replays at twice the original rate
    length_scale: float = 1.0  # multiplies prompt and output lengths before clipping
    max_prompt_len: int | None = None  # tokens; longer prompts are clipped
    max_output_len: int | None = None  # tokens; longer outputs are clipped


# engine, simulator, systems


@dataclass
class EngineSettings:
    """Engine options shared by every measured system (batching and KV allocation come from the system)."""

    block_size: int = 16  # token slots per KV block
    num_kv_blocks: int = 256  # KV blocks; small enough that KV capacity limits the batch
    max_num_seqs: int = 32  # maximum requests running in one step
    max_num_batched_tokens: int = 1024  # token budget of one step; longer prefills are chunked
    max_model_len: int = 1024  # maximum prompt + output tokens; workloads are clipped to it
    dtype: str = "auto"  # "auto" (float32 on the CPU, bfloat16 on CUDA), "float32", "bfloat16", "float16"
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    threads: int | None = 2  # torch intra-op threads for every system; None keeps torch's default
    warmup_requests: int = 8  # requests served and discarded before each measured replay


@dataclass
class SimSettings:
    """The simulator's cost model: how long one scheduler step takes."""

    cost_model: str = "fitted"  # "fitted" (regression on engine profiles) or "roofline" (hardware estimate)
    cost_file: str | None = None  # fitted cost model file; None uses the calibration cache
    calibrate_if_missing: bool = True  # fit and cache a cost model when the cache has none
    calibration_grid: str = "default"  # profiling grid: "default" or "small" (a few seconds, for tests)


@dataclass
class BaselineSettings:
    """Hugging Face generate() with static batches."""

    batch_size: int | None = None  # requests per generate() call; None takes engine.max_num_seqs


@dataclass
class HttpSettings:
    """Replay against an OpenAI-compatible server (system measured/http)."""

    base_url: str | None = None  # for example http://127.0.0.1:8000/v1
    model: str | None = None  # model name sent in each request; None takes the run's model name
    api_key: str = "EMPTY"  # sent as the bearer token; local servers ignore it
    max_concurrency: int | None = None  # maximum requests in flight; None sends each at its arrival time
    timeout_s: float = 600.0  # per-request timeout in seconds


@dataclass
class SLOSettings:
    """Service-level objectives of goodput, in seconds; None leaves a metric unconstrained."""

    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None


# primary configs


@dataclass
class RunConfig:
    """`python -m experiments run`: one workload replayed through every selected system."""

    workload: Any = None  # chosen with +workload=NAME; None is an error that lists the workloads
    model: Any = MISSING  # a conf/model file: name, path, load_format, hf_config
    hardware: Any = None  # a conf/hardware file, read by the simulator's roofline cost model
    engine: EngineSettings = field(default_factory=EngineSettings)
    sim: SimSettings = field(default_factory=SimSettings)
    baseline: BaselineSettings = field(default_factory=BaselineSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    slo: SLOSettings = field(default_factory=SLOSettings)
    systems: list[str] = field(default_factory=lambda: list(DEFAULT_SYSTEMS))  # run in this order
    seed: int = 0  # root seed: arrivals, lengths, prompt token ids, dummy weights
    results_dir: str = "results"  # root of the run folders
    calibration_dir: str = "${results_dir}/calibration"  # cache of fitted cost models
    report: bool = True  # build figures and report.md/report.html at the end
    progress: bool = True  # show a progress bar per system


@dataclass
class CalibrateConfig:
    """`python -m experiments calibrate`: profile the engine and fit the simulator's cost model."""

    model: Any = MISSING
    hardware: Any = None
    engine: EngineSettings = field(default_factory=EngineSettings)
    sim: SimSettings = field(default_factory=SimSettings)
    seed: int = 0
    results_dir: str = "results"
    calibration_dir: str = "${results_dir}/calibration"
    output: str | None = None  # where to write the cost model; None writes the calibration cache entry


SCHEMA_SUFFIX = "_schema"


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore; YAML files extend them through their defaults lists."""
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    store.store(name="calibrate_schema", node=CalibrateConfig)
    store.store(group="workload", name="synthetic" + SCHEMA_SUFFIX, node=SyntheticWorkloadConfig)
    store.store(group="workload", name="azure" + SCHEMA_SUFFIX, node=TraceWorkloadConfig)
    store.store(group="engine", name="engine" + SCHEMA_SUFFIX, node=EngineSettings)
    store.store(group="sim", name="sim" + SCHEMA_SUFFIX, node=SimSettings)


def available_options(group: str) -> list[str]:
    """Names of the YAML options of a config group under conf/, without the schemas."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.endswith(SCHEMA_SUFFIX))
