"""Flash-Serve: a paged-attention LLM serving engine with continuous and static batching.

The public names are imported on first use, so that `flashserve.core` and the dashboard do not
load torch and transformers until they need the engine.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "flashserve.engine",
    "LLMEngine": "flashserve.engine",
    "EngineConfig": "flashserve.config",
    "CompletionOutput": "flashserve.outputs",
    "RequestOutput": "flashserve.outputs",
    "SamplingParams": "flashserve.sampling_params",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flashserve' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
