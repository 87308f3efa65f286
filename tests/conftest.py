"""Test set-up: one torch thread, no hub access, shared tiny pipelines."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sd1():
    from daami2i.testing import tiny_sd_pipeline

    return tiny_sd_pipeline("sd1")


@pytest.fixture(scope="session")
def sd2():
    from daami2i.testing import tiny_sd_pipeline

    return tiny_sd_pipeline("sd2")


@pytest.fixture(scope="session")
def sdxl():
    from daami2i.testing import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline()


@pytest.fixture(scope="session")
def shapes_pipe():
    """The embedded shapes model, loaded once (float32, CPU, no progress bars)."""
    from daami2i.shapes.model import load_pipeline

    return load_pipeline()
