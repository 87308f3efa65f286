"""Test set-up: one torch thread (or ``OMP_NUM_THREADS`` of them), no hub access, shared tiny pipelines."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

# CI runs one thread; OMP_NUM_THREADS=2 (or more) runs the suite with other reduction orders, which
# flushes out tests that depend on the last bits of a float sum (issue 13)
torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"] or 1)))


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
