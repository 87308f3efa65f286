"""The range of each sampling option that the CLI, the dataset tools and the explorer accept.

Checked before a model is loaded, so that a bad value is one clear error instead of a crash deep in
a scheduler or a NaN image after minutes of work.
"""

from __future__ import annotations

SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 0 .. 2**64 - 1
STEPS_MAX = 999  # SD schedulers: 1000 training timesteps, and steps_offset=1 makes 1000 steps overrun them
GUIDANCE_MAX = 100.0  # far above any useful scale; 1e308 overflows the pipeline into NaN images
