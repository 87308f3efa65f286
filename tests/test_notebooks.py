"""The example notebooks execute from scratch, offline, every cell within a minute and without error.

Each notebook runs in a fresh IPython kernel started from this interpreter (``sys.executable``, the
project's environment: no kernelspec needs installing), with its own folder as the working
directory, through nbclient. The committed copies must hold their outputs (they read on the
repository page) and carry no error.

To refresh the committed outputs after editing a notebook::

    python tests/test_notebooks.py examples/getting_started.ipynb examples/merging_and_detection.ipynb
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))
CELL_TIMEOUT = 60  # seconds, per cell
NOTEBOOK_BUDGET = 100  # seconds, per notebook (both take about 20 s and 35 s on one CPU core)
KERNEL = "daami2i-test"


def _kernel_manager(spec_dir: Path):
    """A kernel manager whose only kernel is IPython on ``sys.executable``."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    folder = spec_dir / KERNEL
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "daami2i (this interpreter)",
        "language": "python",
    }
    (folder / "kernel.json").write_text(json.dumps(spec))
    return KernelManager(
        kernel_name=KERNEL,
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec_dir)]),
        transport="ipc",  # local sockets in spec_dir: nothing on TCP
        ip=str(spec_dir / "kernel"),
    )


def _kernel_env() -> dict[str, str]:
    """The test's environment (offline, one thread) for the kernel, less the Agg backend conftest sets:
    notebooks draw inline."""
    env = dict(os.environ)
    if env.get("MPLBACKEND", "").lower() == "agg":
        env.pop("MPLBACKEND")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("JPY_PARENT_PID", None)
    return env


def execute(path: Path) -> tuple[object, float]:
    """The notebook at ``path`` executed from scratch (outputs cleared first) and its wall time."""
    # a short folder of our own for the kernelspec and the kernel's sockets (a socket path has at most 107 bytes)
    with tempfile.TemporaryDirectory(prefix="daami2i-nb-") as tmp:
        return _execute(path, Path(tmp))


def _execute(path: Path, spec_dir: Path) -> tuple[object, float]:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)
    km = _kernel_manager(spec_dir)
    client = NotebookClient(
        nb,
        km=km,
        timeout=CELL_TIMEOUT,
        kernel_name=KERNEL,
        allow_errors=False,
        record_timing=True,
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    try:
        client.execute(env=_kernel_env())
    finally:  # the kernel manager is ours: nbclient leaves its kernel running
        if km.has_kernel:
            km.shutdown_kernel(now=True)
        km.cleanup_resources()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    return nb, time.perf_counter() - start


def cell_seconds(nb) -> list[float]:
    """Each code cell's execution time, from the timestamps nbclient records."""
    from datetime import datetime

    out = []
    for cell in nb.cells:
        stamps = cell.metadata.get("execution", {}) if cell.cell_type == "code" else {}
        if "iopub.execute_input" in stamps and "shell.execute_reply" in stamps:
            t0, t1 = (
                datetime.fromisoformat(stamps[k].replace("Z", "+00:00"))
                for k in ("iopub.execute_input", "shell.execute_reply")
            )
            out.append((t1 - t0).total_seconds())
    return out


def _problems(nb) -> list[str]:
    """Error outputs and stderr text (warnings, tracebacks) of the notebook's cells."""
    found = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if out.output_type == "error":
                found.append(f"cell {i}: {out.ename}: {out.evalue}")
            elif out.output_type == "stream" and out.name == "stderr":
                found.append(f"cell {i} wrote to stderr: {out.text[:300]}")
    return found


def _images(nb) -> int:
    return sum(
        "image/png" in out.get("data", {})
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"getting_started.ipynb", "merging_and_detection.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_with_outputs(path):
    """The committed notebook was run top to bottom, and shows its pictures without errors."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "run it top to bottom once"
    assert not _problems(nb)
    assert _images(nb) >= 5


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_executes_from_scratch(path):
    """Every cell runs within CELL_TIMEOUT seconds (nbclient raises CellTimeoutError otherwise) and
    without error (CellExecutionError), writes nothing to stderr, and the pictures come back."""
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb, seconds = execute(path)
    assert not _problems(nb), _problems(nb)
    assert _images(nb) >= 5
    print(f"{path.name}: {seconds:.1f}s, slowest cell {max(cell_seconds(nb), default=0.0):.1f}s")
    assert seconds < NOTEBOOK_BUDGET, f"{path.name} took {seconds:.0f}s: keep both notebooks under two minutes"


def main(paths: list[str]) -> None:
    """Execute the notebooks and write them back with their outputs."""
    import nbformat

    for name in paths:
        path = Path(name).resolve()
        nb, seconds = execute(path)
        problems = _problems(nb)
        if problems:
            raise SystemExit(f"{path.name}: " + "; ".join(problems))
        slowest = max(cell_seconds(nb), default=0.0)
        for cell in nb.cells:
            cell.metadata.pop("execution", None)  # timestamps: no churn in the committed file
        nbformat.write(nb, path)
        print(f"{path.name}: executed in {seconds:.1f}s (slowest cell {slowest:.1f}s), {_images(nb)} pictures")


if __name__ == "__main__":
    main(sys.argv[1:])
