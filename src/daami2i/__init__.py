"""daami2i: attention attribution for diffusion models.

Self-attention ("image to image") and cross-attention ("text to image", DAAM) heat maps for
Stable Diffusion (1.x, 2.x, XL, 3) and Flux pipelines on current diffusers::

    with daami2i.trace(pipe) as trc:
        image = pipe(prompt).images[0]
        ghm = trc.compute_global_heat_map()
    ghm.compute_pixel_heat_map(list(range(1024))).expand_as(image)
    ghm.compute_word_heat_map("cat").expand_as(image)
"""

from .errors import ConfigError, Daami2iError, QueryError, TraceError, UnsupportedPipelineError
from .heatmaps import GlobalHeatMap, HeatMap, PixelHeatMap, WordHeatMap
from .storage.experiment import Experiment, ExperimentError, load_experiment
from .tracing import Trace, trace, trace_image

__version__ = "0.3.0.dev0"

__all__ = [
    "ConfigError",
    "Daami2iError",
    "Experiment",
    "ExperimentError",
    "GlobalHeatMap",
    "HeatMap",
    "PixelHeatMap",
    "QueryError",
    "Trace",
    "TraceError",
    "UnsupportedPipelineError",
    "WordHeatMap",
    "__version__",
    "load_experiment",
    "trace",
    "trace_image",
]
