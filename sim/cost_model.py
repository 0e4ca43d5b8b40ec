"""Cost models: the predicted duration of one engine step from the shape of its batch.

Two models share one interface, `step_time(output, after_idle) -> seconds`, applied to the
scheduler's `SchedulerOutput`:

- `FittedCostModel`: a linear function of the step's shape, fitted to steps the real engine ran
  (see `sim.profiling`). It predicts the machine it was measured on.
- `RooflineCostModel`: max(compute time, memory time) + a fixed overhead per step, from the
  model's shapes and a hardware spec (`conf/hardware/*.yaml`). It predicts hardware that was
  never measured, so its outputs are estimates.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from flashserve.core import SchedulerOutput

logger = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
COST_MODELS = ("fitted", "roofline")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# shape of a step


@dataclass(frozen=True, slots=True)
class StepShape:
    """Work of one step in tokens and sequences, which is the input of every cost model.

    The first six fields have the same meaning as the `StepRecord` fields of the same name.
    """

    num_prefill_tokens: int  # prompt (or recomputed) tokens processed
    num_prefill_seqs: int
    num_decode_seqs: int  # sequences that processed only their newest token
    num_context_tokens: int  # sum over sequences of the tokens each one attends to
    sum_sq_prefill_tokens: int  # sum of squared prefill chunk lengths
    num_sampled: int  # sequences that sample a token (rows of the LM head)
    num_attention_pairs: int  # causal (query, key) pairs over all sequences
    num_padded_decode_keys: int  # decode sequences x maximum decode context: keys of a padded batched decode
    num_padded_prefill_scores: int  # prefill sequences x maximum chunk x maximum prefill context
    after_idle: int = 0  # 1 for the first step after the engine waited idle for an arrival, else 0

    @property
    def num_tokens(self) -> int:
        return self.num_prefill_tokens + self.num_decode_seqs


def step_shape(output: SchedulerOutput, after_idle: bool = False) -> StepShape:
    """Shape of a scheduled step, computed in one pass over its sequences."""
    prefill_tokens = prefill_seqs = decode_seqs = context = sum_sq = sampled = pairs = 0
    max_decode_context = max_chunk = max_prefill_context = 0
    for item in output.scheduled:
        start = item.start
        num_new = item.num_new_tokens
        end = start + num_new
        context += end
        if item.samples:
            sampled += 1
        if item.is_prefill:
            prefill_tokens += num_new
            prefill_seqs += 1
            sum_sq += num_new * num_new
            pairs += num_new * start + num_new * (num_new + 1) // 2
            if num_new > max_chunk:
                max_chunk = num_new
            if end > max_prefill_context:
                max_prefill_context = end
        else:
            decode_seqs += 1
            pairs += end
            if end > max_decode_context:
                max_decode_context = end
    return StepShape(
        prefill_tokens, prefill_seqs, decode_seqs, context, sum_sq, sampled, pairs,
        decode_seqs * max_decode_context, prefill_seqs * max_chunk * max_prefill_context, int(after_idle),
    )


class CostModel:
    """Interface of a cost model: seconds that one step takes."""

    kind = "base"
    is_estimate = False  # True when the figures come from datasheet peaks, not from measurements

    def step_time(self, output: SchedulerOutput, after_idle: bool = False) -> float:
        """Seconds that the step `output` takes; `after_idle` marks the first step after an idle wait."""
        return self.shape_time(step_shape(output, after_idle))

    def shape_time(self, shape: StepShape) -> float:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


# fitted


FEATURES = (
    "intercept",
    "num_prefill_tokens",
    "num_prefill_seqs",
    "num_decode_seqs",
    "num_context_tokens",
    "sum_sq_prefill_tokens",
    "num_padded_decode_keys",
    "num_padded_prefill_scores",
    "after_idle",
)
SHAPE_FIELDS = tuple(f.name for f in fields(StepShape))


def feature_value(source, name: str) -> float:
    """Value of feature `name` for a StepShape, StepRecord or profiled step; `intercept` is 1."""
    if name == "intercept":
        return 1.0
    value = getattr(source, name, None)
    if value is None:
        raise ValueError(
            f"feature {name!r} is missing from {type(source).__name__}; plain StepRecords carry only "
            f"{list(SHAPE_FIELDS[:6])}; profile with sim.profiling.profile_engine for the others"
        )
    return float(value)


@dataclass
class FittedCostModel(CostModel):
    """Step time = sum of coefficient x feature, coefficients in seconds per unit of each feature.

    `metadata` records where the coefficients came from (model, hardware, dtype, threads,
    block size, package versions) and how well they fit.
    """

    coefficients: dict[str, float]
    metadata: dict = field(default_factory=dict)

    kind = "fitted"

    def __post_init__(self) -> None:
        unknown = [name for name in self.coefficients if name not in FEATURES]
        if unknown:
            raise ValueError(f"unknown cost-model features {unknown}; the known ones are {list(FEATURES)}")
        self._intercept = float(self.coefficients.get("intercept", 0.0))
        # terms in FEATURES order, so that the sum (and its rounding) does not depend on the dict's order
        self._terms = tuple(
            (name, float(self.coefficients[name]))
            for name in FEATURES[1:]
            if self.coefficients.get(name, 0.0) != 0.0
        )

    def shape_time(self, shape: StepShape) -> float:
        total = self._intercept
        for name, coefficient in self._terms:
            total += coefficient * getattr(shape, name)
        return total

    def describe(self) -> str:
        meta = self.metadata
        return (
            f"fitted to {meta.get('num_steps', '?')} steps of {meta.get('model', '?')} on "
            f"{meta.get('hardware', '?')} ({meta.get('dtype', '?')}, {meta.get('torch_threads', '?')} threads)"
        )

    def to_json(self) -> dict:
        return {"kind": self.kind, "coefficients": dict(self.coefficients), "metadata": self.metadata}

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json(cls, data: dict) -> FittedCostModel:
        if data.get("kind") != "fitted" or not isinstance(data.get("coefficients"), dict):
            raise ValueError("not a fitted cost model: expected {'kind': 'fitted', 'coefficients': {...}, ...}")
        return cls({k: float(v) for k, v in data["coefficients"].items()}, dict(data.get("metadata", {})))

    @classmethod
    def load(cls, path: str | os.PathLike) -> FittedCostModel:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"cost model file {path} not found; create one with `python -m sim calibrate --out {path}`")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"cost model file {path} is not valid JSON: {error}") from None
        try:
            return cls.from_json(data)
        except ValueError as error:
            raise ValueError(f"cost model file {path}: {error}") from None


# roofline


@dataclass
class HardwareSpec:
    """Peak figures of one accelerator (or CPU), as in `conf/hardware/*.yaml`."""

    name: str
    description: str
    peak_flops: float  # FLOP/s of dense matrix math in `dtype`
    memory_bandwidth: float  # bytes/s
    memory_capacity: float  # bytes
    dtype: str = "bfloat16"  # dtype of weights and KV cache
    memory_utilization: float = 0.9  # fraction of memory that weights + KV cache may use
    step_overhead: float = 0.0  # seconds per step outside the model's math (host work, launches)

    def __post_init__(self) -> None:
        for name in ("peak_flops", "memory_bandwidth", "memory_capacity"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"hardware {self.name!r}: {name} must be a positive number, got {value!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"hardware {self.name!r}: dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if not 0 < self.memory_utilization <= 1:
            raise ValueError(f"hardware {self.name!r}: memory_utilization must be in (0, 1], got {self.memory_utilization}")
        if self.step_overhead < 0:
            raise ValueError(f"hardware {self.name!r}: step_overhead must be >= 0, got {self.step_overhead}")


def hardware_dir() -> Path:
    """Folder of the shipped hardware specs, `conf/hardware` (FLASHSERVE_CONF_DIR overrides `conf`)."""
    return Path(os.environ.get("FLASHSERVE_CONF_DIR", CONF_DIR)) / "hardware"


def available_hardware() -> list[str]:
    return sorted(p.stem for p in hardware_dir().glob("*.yaml"))


def load_hardware(name: str | os.PathLike) -> HardwareSpec:
    """Read a hardware spec: a name in conf/hardware (for example "a100") or a YAML file path."""
    path = Path(name)
    if not path.is_file():
        path = hardware_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown hardware {str(name)!r}; use a YAML file or one of {available_hardware()}")
    data = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in fields(HardwareSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"hardware spec {path} has unknown fields {unknown}; the fields are {sorted(known)}")
    data.setdefault("name", path.stem)
    data.setdefault("description", data["name"])
    for name in ("peak_flops", "memory_bandwidth", "memory_capacity", "memory_utilization", "step_overhead"):
        # PyYAML reads a float without a sign in its exponent (312.0e12) as a string
        if isinstance(data.get(name), str):
            try:
                data[name] = float(data[name])
            except ValueError:
                raise ValueError(f"hardware spec {path}: {name} must be a number, got {data[name]!r}") from None
    try:
        return HardwareSpec(**data)
    except TypeError as error:
        raise ValueError(f"hardware spec {path} is incomplete: {error}") from None


@dataclass
class ModelShape:
    """Sizes of a decoder-only transformer that set its FLOPs and bytes per step."""

    name: str
    num_params: int  # all parameters, embeddings included
    num_linear_params: int  # weights of the matmuls every token goes through (attention and MLP projections)
    num_lm_head_params: int  # vocab x hidden: the output projection, applied to sampled rows only
    num_layers: int
    num_heads: int
    head_dim: int
    kv_bytes_per_token: int  # K and V of one token over all layers, in the roofline's dtype
    weight_bytes: int  # bytes read per step: every weight except an untied input embedding table
    max_position_embeddings: int


def model_shape(model: str, dtype: str = "bfloat16") -> ModelShape:
    """Shape of `model` (a name in conf/model, a config file or a checkpoint dir) from its HF config.

    Counts the parameters of Llama-style decoders (Llama, Mistral, Qwen2): embeddings, per-layer
    attention projections (with Qwen2's q/k/v biases), a gated MLP, two RMSNorms per layer, a
    final norm, and an LM head unless tied to the embeddings.
    """
    import torch

    from flashserve.model.loader import resolve_model
    from flashserve.model.runner import kv_bytes_per_token, resolve_dtype

    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    source = resolve_model(model)
    config = source.hf_config
    try:
        hidden = int(config["hidden_size"])
        num_layers = int(config["num_hidden_layers"])
        num_heads = int(config["num_attention_heads"])
        num_kv_heads = int(config.get("num_key_value_heads") or num_heads)
        head_dim = int(config.get("head_dim") or hidden // num_heads)
        intermediate = int(config["intermediate_size"])
        vocab = int(config["vocab_size"])
    except KeyError as error:
        raise ValueError(f"model config of {source.name} is missing {error.args[0]!r}; the roofline needs a Llama-style config") from None
    tied = bool(config.get("tie_word_embeddings", False))
    model_type = config.get("model_type", "llama")
    if model_type not in ("llama", "mistral", "qwen2"):
        # NOTE: other architectures are counted as Llama-style; their parameter count may be off.
        logger.warning("model type %r is counted as a Llama-style decoder", model_type)

    q_size = num_heads * head_dim
    kv_size = num_kv_heads * head_dim
    attention = hidden * q_size + 2 * hidden * kv_size + q_size * hidden
    if model_type == "qwen2":
        attention += q_size + 2 * kv_size  # q, k and v biases
    elif config.get("attention_bias"):
        attention += q_size + 2 * kv_size + hidden
    mlp = 3 * hidden * intermediate + (2 * intermediate + hidden if config.get("mlp_bias") else 0)
    per_layer = attention + mlp + 2 * hidden
    embedding = vocab * hidden
    num_params = embedding + num_layers * per_layer + hidden + (0 if tied else embedding)

    element = DTYPE_BYTES[dtype]
    shim = _AttributeView(config)
    kv_bytes = kv_bytes_per_token(shim, resolve_dtype(dtype, torch.device("cpu")))
    weight_bytes = (num_params - (0 if tied else embedding)) * element
    return ModelShape(
        name=source.name,
        num_params=num_params,
        num_linear_params=num_layers * (attention + mlp),
        num_lm_head_params=embedding,
        num_layers=num_layers,
        num_heads=num_heads,
        head_dim=head_dim,
        kv_bytes_per_token=kv_bytes,
        weight_bytes=weight_bytes,
        max_position_embeddings=int(config.get("max_position_embeddings") or 2048),
    )


class _AttributeView:
    """Attribute access to a config dict, for helpers written against HF config objects."""

    def __init__(self, data: dict):
        self._data = data

    def __getattr__(self, name: str):
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(name) from None


class RooflineCostModel(CostModel):
    """Step time = max(FLOPs / peak FLOP/s, bytes / bandwidth) + hardware.step_overhead.

    FLOPs: 2 per linear weight per token, 2 per LM-head weight per sampled row, and 4 x heads x
    head_dim per causal (query, key) pair per layer (QK^T and PV). Bytes: every weight read once
    per step plus the K/V of every attended token read and of every new token written.
    Activations are left out, so the compute and memory times are lower bounds.
    """

    kind = "roofline"
    is_estimate = True

    def __init__(self, model: ModelShape, hardware: HardwareSpec):
        self.model = model
        self.hardware = hardware
        self._flops_per_token = 2.0 * model.num_linear_params
        self._flops_per_row = 2.0 * model.num_lm_head_params
        self._flops_per_pair = 4.0 * model.num_layers * model.num_heads * model.head_dim
        self._kv_bytes = float(model.kv_bytes_per_token)
        self._weight_bytes = float(model.weight_bytes)

    def shape_time(self, shape: StepShape) -> float:
        hardware = self.hardware
        tokens = shape.num_prefill_tokens + shape.num_decode_seqs
        flops = (
            self._flops_per_token * tokens
            + self._flops_per_row * max(shape.num_sampled, 1)
            + self._flops_per_pair * shape.num_attention_pairs
        )
        memory = self._weight_bytes + self._kv_bytes * (shape.num_context_tokens + tokens)
        return max(flops / hardware.peak_flops, memory / hardware.memory_bandwidth) + hardware.step_overhead

    def kv_cache_blocks(self, block_size: int) -> int:
        """Blocks that fit in memory_capacity x memory_utilization after the weights."""
        hardware = self.hardware
        weights = self.model.num_params * DTYPE_BYTES[hardware.dtype]
        # NOTE: activations and the runtime's workspace are not subtracted, so this cache is
        # somewhat larger than an engine on this hardware would allocate.
        budget = hardware.memory_capacity * hardware.memory_utilization - weights
        num_blocks = int(budget // (self.model.kv_bytes_per_token * block_size))
        if num_blocks < 1:
            raise ValueError(
                f"{self.model.name} ({self.model.num_params / 1e9:.2f}B parameters, {hardware.dtype}) leaves no room "
                f"for a KV cache in {hardware.memory_capacity / 2**30:.0f} GiB x {hardware.memory_utilization} of "
                f"{hardware.name}; pick larger hardware or set num_kv_blocks"
            )
        return num_blocks

    def describe(self) -> str:
        hardware = self.hardware
        return (
            f"roofline estimate for {self.model.name} on {hardware.description} ({hardware.dtype}, "
            f"{hardware.peak_flops / 1e12:g} TFLOP/s, {hardware.memory_bandwidth / 1e12:g} TB/s, "
            f"{hardware.step_overhead * 1e3:g} ms overhead per step)"
        )

    def to_json(self) -> dict:
        return {"kind": self.kind, "model": asdict(self.model), "hardware": asdict(self.hardware)}


def load_cost_model(
    kind: str,
    path: str | os.PathLike | None = None,
    model: str = "tiny-llama",
    hardware: str | os.PathLike = "cpu",
) -> CostModel:
    """Build a cost model by kind: "fitted" reads coefficients from `path` (JSON written by
    `python -m sim calibrate`); "roofline" combines `model`'s shapes with the `hardware` spec."""
    if kind == "fitted":
        if path is None:
            raise ValueError("the fitted cost model needs a coefficient file; create one with `python -m sim calibrate --out PATH`")
        return FittedCostModel.load(path)
    if kind == "roofline":
        spec = load_hardware(hardware)
        return RooflineCostModel(model_shape(model, spec.dtype), spec)
    raise ValueError(f"cost model must be one of {COST_MODELS}, got {kind!r}")
