"""System names of a run and what each one means.

A name is `KIND/VARIANT`. measured/* replays the workload through the engine, predicted/*
through the simulator, and each predicted system is compared with the measured system of the
same variant (its twin). The variant is the batching policy, optionally followed by the KV
allocation: `continuous` is continuous batching with paged KV blocks, `static` is static
batching with contiguous reservation of prompt + max_tokens (the pre-vLLM pairing), and
`continuous-contiguous` or `static-paged` choose the other allocation.
"""

from __future__ import annotations

from dataclasses import dataclass

from flashserve.core.scheduler import BATCHING_POLICIES, KV_ALLOCATIONS

DEFAULT_KV_ALLOCATION = {"continuous": "paged", "static": "contiguous"}
BASELINE_SYSTEMS = ("baseline/hf-generate",)
HTTP_SYSTEM = "measured/http"


@dataclass(frozen=True)
class System:
    """One system of a run: which runner serves the workload, and under which policies."""

    name: str
    kind: str  # "measured", "predicted" or "baseline"
    runner: str  # "engine", "sim", "hf-generate" or "http"
    batching: str | None  # None where the policy is not ours to set (a remote server)
    kv_allocation: str | None
    twin: str | None = None  # the measured system a predicted one is compared with


def known_systems() -> list[str]:
    """Return every accepted system name."""
    variants = list(DEFAULT_KV_ALLOCATION)
    variants += [f"{batching}-{allocation}" for batching in BATCHING_POLICIES for allocation in KV_ALLOCATIONS]
    names = [f"{kind}/{variant}" for kind in ("measured", "predicted") for variant in variants]
    return names + [HTTP_SYSTEM, *BASELINE_SYSTEMS]


def parse_system(name: str) -> System:
    """Parse a system name. Raises ValueError, listing the accepted names, for an unknown one."""
    if name == HTTP_SYSTEM:
        return System(name, "measured", "http", None, None)
    if name == "baseline/hf-generate":
        # generate() pads every prompt of a batch to the longest and grows the cache step by step
        return System(name, "baseline", "hf-generate", "static", "padded")

    kind, _, variant = name.partition("/")
    batching, _, allocation = variant.partition("-")
    allocation = allocation or DEFAULT_KV_ALLOCATION.get(batching, "")
    if kind not in ("measured", "predicted") or batching not in BATCHING_POLICIES or allocation not in KV_ALLOCATIONS:
        raise ValueError(
            f"unknown system {name!r}; choose from {known_systems()}, for example "
            f"systems=[measured/continuous,predicted/continuous]"
        )
    if kind == "measured":
        return System(name, kind, "engine", batching, allocation)
    return System(name, kind, "sim", batching, allocation, twin=f"measured/{variant}")
