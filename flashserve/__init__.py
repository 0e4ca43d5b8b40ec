"""Flash-Serve: a paged-attention LLM serving engine with continuous and static batching."""

from flashserve.config import EngineConfig
from flashserve.engine import LLM, LLMEngine
from flashserve.outputs import CompletionOutput, RequestOutput
from flashserve.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "EngineConfig", "LLMEngine", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
