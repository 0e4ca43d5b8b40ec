"""Model runner: the paged KV cache and one forward pass per scheduler step."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import torch

from flashserve.core import SchedulerOutput
from flashserve.model import attention
from flashserve.model.sampler import SampledToken, sample
from flashserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_device(device: str) -> torch.device:
    """'auto' picks CUDA when available, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available; use device='cpu' or 'auto'")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"invalid device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return resolved


def cpu_name() -> str:
    """Return the CPU model from /proc/cpuinfo where it exists, else platform.processor()."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is float32 on the CPU and bfloat16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def kv_bytes_per_token(hf_config, dtype: torch.dtype) -> int:
    """Bytes of K and V that one token occupies across all layers."""
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * hf_config.num_hidden_layers * hf_config.num_key_value_heads * head_dim * element


class ModelRunner:
    """Owns the model and its paged KV cache; turns a SchedulerOutput into sampled tokens."""

    def __init__(self, model, num_kv_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.block_size = block_size
        self.device = device
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        num_slots = num_kv_blocks * block_size
        shape = (num_slots, config.num_key_value_heads, head_dim)
        # NOTE: zeros, not empty: padded context positions read slot 0, and NaN garbage there would
        # poison the masked SDPA output (0 * NaN = NaN).
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_hidden_layers)
        ]
        self._generators: dict[str, torch.Generator] = {}

    def add_generator(self, request_id: str, seed: int) -> None:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed)
        self._generators[request_id] = generator

    def remove_generator(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    @torch.inference_mode()
    def execute(
        self,
        output: SchedulerOutput,
        params: dict[str, SamplingParams],
        suppressed: dict[str, list[int]] | None = None,
    ) -> dict[str, SampledToken]:
        """Run the step's forward pass and sample a token for each request whose chunk ends at its last token.

        `suppressed` maps request ids to token ids they may not sample this step.
        """
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode, prefill = [], []  # (packed offset, start, query length, block table)
        sample_offsets, sample_ids = [], []
        block_size = self.block_size

        for item in output.scheduled:
            request = item.request
            offset = len(input_ids)
            input_ids.extend(request.tokens(item.start, item.end))
            positions.extend(range(item.start, item.end))
            table = request.block_ids
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(item.start, item.end))
            group = decode if item.num_new_tokens == 1 else prefill
            group.append((offset, item.start, item.num_new_tokens, table))
            if item.samples:
                sample_offsets.append(len(input_ids) - 1)
                sample_ids.append(request.request_id)

        device = self.device
        groups = [
            attention.build_group([g[0] for g in members], [g[1] for g in members], [g[2] for g in members],
                                  [g[3] for g in members], block_size, device)
            for members in (decode, prefill) if members
        ]
        metadata = attention.PagedAttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            groups=groups,
            kv_caches=self.kv_caches,
        )
        if not sample_ids:
            logits_to_keep = torch.tensor([len(input_ids) - 1], device=device)
        else:
            logits_to_keep = torch.tensor(sample_offsets, device=device)

        result = self.model(
            input_ids=torch.tensor([input_ids], device=device),
            position_ids=torch.tensor([positions], device=device),
            use_cache=False,
            logits_to_keep=logits_to_keep,
            paged_metadata=metadata,
        )
        if not sample_ids:
            return {}

        logits = result.logits[0]
        sampled = sample(
            logits,
            [params[request_id] for request_id in sample_ids],
            [self._generators.get(request_id) for request_id in sample_ids],
            [suppressed.get(request_id) for request_id in sample_ids] if suppressed else None,
        )
        return dict(zip(sample_ids, sampled))
