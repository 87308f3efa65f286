"""Loading a pipeline without noise the user cannot act on.

diffusers and transformers draw a progress bar per component and weight file, and transformers
tells at import time that torchvision is missing (it falls back to PIL image processors, which is
all daami2i needs). :func:`quiet_loading` hides both while daami2i itself loads a model, and puts
the libraries' settings back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide the libraries' loading bars and notices inside the block; restore their settings after it.

    >>> with quiet_loading():
    ...     from diffusers import StableDiffusionPipeline
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    bars = [lib for lib in (diffusers_logging, transformers_logging) if lib.is_progress_bar_enabled()]
    levels = [(lib, lib.get_verbosity()) for lib in (diffusers_logging, transformers_logging)]
    for lib in bars:
        lib.disable_progress_bar()
    for lib, _ in levels:
        lib.set_verbosity_error()
    try:
        yield
    finally:
        for lib in bars:
            lib.enable_progress_bar()
        for lib, level in levels:
            lib.set_verbosity(level)
