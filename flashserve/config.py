"""Engine configuration: every option with its meaning, unit and default."""

from __future__ import annotations

from dataclasses import dataclass

from flashserve.core.scheduler import BATCHING_POLICIES, KV_ALLOCATIONS


@dataclass
class EngineConfig:
    """Options of `LLM` and `LLMEngine`, named as in vLLM where vLLM has the option."""

    model: str = "tiny-llama"  # checkpoint directory, config file, or a name in conf/model
    block_size: int = 16  # token slots per KV block
    num_kv_blocks: int | None = None  # KV blocks; None sizes the cache from the memory settings below
    max_num_seqs: int = 64  # maximum requests running in one step
    max_num_batched_tokens: int = 2048  # token budget of one step; longer prefills are chunked
    max_model_len: int | None = None  # maximum prompt + output tokens; None takes the model's max_position_embeddings
    batching: str = "continuous"  # "continuous" (iteration-level) or "static" (a new batch only when idle)
    kv_allocation: str = "paged"  # "paged" (blocks on demand) or "contiguous" (reserve prompt + max_tokens)
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    dtype: str = "auto"  # "auto" (float32 on the CPU, bfloat16 on CUDA), "float32", "bfloat16", "float16"
    seed: int = 0  # seed of dummy weights and of requests without their own seed
    load_format: str = "auto"  # "auto" (weights from the checkpoint) or "dummy" (seeded random weights)
    kv_cache_memory_gb: float = 1.0  # CPU: GiB of KV cache when num_kv_blocks is None
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of GPU memory that weights + KV cache may use

    def validate(self) -> None:
        if self.batching not in BATCHING_POLICIES:
            raise ValueError(f"batching must be one of {BATCHING_POLICIES}, got {self.batching!r}")
        if self.kv_allocation not in KV_ALLOCATIONS:
            raise ValueError(f"kv_allocation must be one of {KV_ALLOCATIONS}, got {self.kv_allocation!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("num_kv_blocks", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or a positive integer, got {value!r}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
