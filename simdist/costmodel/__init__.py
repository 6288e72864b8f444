"""Time model: hardware presets, op roofline, collective bandwidth model, step combiner.

A library: it imports nothing else from simdist.
"""

from simdist.costmodel.collectives import COLLECTIVE_KINDS, collective_time, group_link_bw, link_bw
from simdist.costmodel.hardware import PRESETS, GPUSpec, InvalidGPUSpec, UnknownGPU, gpu_spec
from simdist.costmodel.roofline import KERNEL_LAUNCH_FLOOR_S, op_time, op_times
from simdist.costmodel.schedule import StepTime, combine, mfu, pipeline_bubble

__all__ = [
    "COLLECTIVE_KINDS",
    "GPUSpec",
    "InvalidGPUSpec",
    "KERNEL_LAUNCH_FLOOR_S",
    "PRESETS",
    "StepTime",
    "UnknownGPU",
    "collective_time",
    "combine",
    "gpu_spec",
    "group_link_bw",
    "link_bw",
    "mfu",
    "op_time",
    "op_times",
    "pipeline_bubble",
]
