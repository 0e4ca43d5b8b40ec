"""SimPy simulator of the flashserve engine: the engine's own scheduler with a cost model in
place of the forward pass."""

from sim.cost_model import (
    CostModel,
    FittedCostModel,
    HardwareSpec,
    RooflineCostModel,
    StepShape,
    load_cost_model,
    load_hardware,
    step_shape,
)
from sim.simulator import SimResult, make_request, simulate

__all__ = [
    "CostModel",
    "FittedCostModel",
    "HardwareSpec",
    "RooflineCostModel",
    "SimResult",
    "StepShape",
    "load_cost_model",
    "load_hardware",
    "make_request",
    "simulate",
    "step_shape",
]
