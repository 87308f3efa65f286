"""The only code that touches a pipeline: the trace context manager and its capturing processors."""

from .capture import CapturingProcessor
from .real import trace_image
from .trace import DiffusionHeatMapHooker, Trace, trace
from .unet import AttentionSite, find_sites

__all__ = [
    "AttentionSite",
    "CapturingProcessor",
    "DiffusionHeatMapHooker",
    "Trace",
    "find_sites",
    "trace",
    "trace_image",
]
