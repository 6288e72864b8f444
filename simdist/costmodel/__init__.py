"""Time model: hardware presets, the calibration table, kernel times per op class, NCCL-style
collective times, the pricing of recorded rows, the event simulation of a step (step_sim), and
utilisation. (roofline.py: the single-factor op estimate the dispatch cache's cost rows keep.)

A library: it imports nothing else from simdist.
"""

from simdist.costmodel.calibration import (
    CALIBRATION_SCHEMA,
    Calibration,
    default_calibration,
    load_calibration,
)
from simdist.costmodel.collectives import (
    COLLECTIVE_KINDS,
    CollectiveEstimate,
    Placement,
    collective_times,
    nccl_collective,
)
from simdist.costmodel.hardware import PRESETS, GPUSpec, InvalidGPUSpec, UnknownGPU, gpu_spec
from simdist.costmodel.kernels import OpClass, kernel_times, op_class
from simdist.costmodel.utilisation import mfu

__all__ = [
    "CALIBRATION_SCHEMA",
    "COLLECTIVE_KINDS",
    "Calibration",
    "CollectiveEstimate",
    "OpClass",
    "Placement",
    "collective_times",
    "default_calibration",
    "kernel_times",
    "load_calibration",
    "nccl_collective",
    "op_class",
    "GPUSpec",
    "InvalidGPUSpec",
    "PRESETS",
    "UnknownGPU",
    "gpu_spec",
    "mfu",
]
