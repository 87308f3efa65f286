"""The only code that touches a pipeline: the trace context manager and its capturing processors."""

from .capture import CapturingProcessor
from .families import AttentionSite
from .families.unet import find_sites
from .real import trace_image
from .trace import DiffusionHeatMapHooker, Trace, trace

__all__ = [
    "AttentionSite",
    "CapturingProcessor",
    "DiffusionHeatMapHooker",
    "Trace",
    "find_sites",
    "trace",
    "trace_image",
]
