"""Shared fixtures: the micro test model and the real data that .ci/run points to."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

MICRO_LLAMA = str(Path(__file__).parent / "data" / "micro-llama.yaml")

# Two threads match the CI machine; more only adds contention between tests.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def micro_llama() -> str:
    """Path of a 2-layer random Llama config with a byte-level tokenizer."""
    return MICRO_LLAMA


@pytest.fixture(scope="session")
def stories260k() -> str:
    """The trained stories260K checkpoint directory, from FLASHSERVE_STORIES260K."""
    path = os.environ.get("FLASHSERVE_STORIES260K")
    if not path:
        pytest.skip("FLASHSERVE_STORIES260K is not set; point it at the stories260K-hf checkpoint directory")
    if not (Path(path) / "model.safetensors").is_file():
        pytest.skip(f"FLASHSERVE_STORIES260K={path} has no model.safetensors")
    return path


@pytest.fixture(scope="session")
def trace_dir() -> Path:
    """Folder with the Azure LLM inference 2023 traces, from FLASHSERVE_TRACE_DIR."""
    path = os.environ.get("FLASHSERVE_TRACE_DIR")
    if not path:
        pytest.skip("FLASHSERVE_TRACE_DIR is not set; point it at the folder of AzureLLMInferenceTrace_*.csv")
    if not (Path(path) / "AzureLLMInferenceTrace_conv.csv").is_file():
        pytest.skip(f"FLASHSERVE_TRACE_DIR={path} has no AzureLLMInferenceTrace_conv.csv")
    return Path(path)
