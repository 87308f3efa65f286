"""The embedded shapes-world model: a Stable Diffusion pipeline folder shipped inside the package.

>>> from daami2i.shapes.model import load_pipeline
>>> pipe = load_pipeline()
>>> pipe("a red circle", num_inference_steps=5).images[0].size
(64, 64)
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..errors import Daami2iError


def model_path() -> Path:
    """Folder of the embedded pipeline (``StableDiffusionPipeline.from_pretrained`` loads it offline)."""
    return Path(str(resources.files("daami2i") / "assets" / "shapes-model"))


def load_pipeline(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Any:
    """Load the embedded model (weights are stored in float16; CPUs want float32)."""
    from ..quiet import quiet_loading

    path = model_path()
    if not (path / "model_index.json").is_file():
        raise Daami2iError(f"the embedded shapes model is missing from {path}: reinstall daami2i")
    with quiet_loading():  # no per-component bars, no torchvision notice: it loads in a second
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# sensible sampling defaults for this model (64x64 images)
DEFAULTS: dict[str, Any] = {"num_inference_steps": 25, "guidance_scale": 4.0}
