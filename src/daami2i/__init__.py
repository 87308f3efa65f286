"""daami2i: attention attribution for diffusion models.

Self-attention ("image to image") and cross-attention ("text to image", DAAM) heat maps for
Stable Diffusion (1.x, 2.x, XL, 3) and Flux pipelines on current diffusers::

    with daami2i.trace(pipe) as trc:
        image = pipe(prompt).images[0]
        ghm = trc.compute_global_heat_map()
    ghm.compute_pixel_heat_map(list(range(1024))).expand_as(image)
    ghm.compute_word_heat_map("cat").expand_as(image)
"""

from .compat import auto_autocast, auto_device, cache_dir, plot_mask_heat_map, set_seed
from .errors import ConfigError, Daami2iError, QueryError, TraceError, UnsupportedPipelineError
from .heatmaps import GlobalHeatMap, HeatMap, ParsedHeatMap, PixelHeatMap, SyntacticHeatMapPair, WordHeatMap
from .storage.experiment import Experiment, ExperimentError, load_experiment
from .tracing import DiffusionHeatMapHooker, Trace, trace, trace_image

__version__ = "0.3.0.dev0"

__all__ = [
    "ConfigError",
    "Daami2iError",
    "DiffusionHeatMapHooker",
    "Experiment",
    "ExperimentError",
    "GlobalHeatMap",
    "HeatMap",
    "ParsedHeatMap",
    "PixelHeatMap",
    "QueryError",
    "SyntacticHeatMapPair",
    "Trace",
    "TraceError",
    "UnsupportedPipelineError",
    "WordHeatMap",
    "__version__",
    "auto_autocast",
    "auto_device",
    "cache_dir",
    "load_experiment",
    "plot_mask_heat_map",
    "set_seed",
    "trace",
    "trace_image",
]
