"""The notebooks in ``notebooks/`` run top to bottom, and follow the shared conventions (``notebooks/README.md``).

* ``test_notebook_runs[NAME]``: every ``notebooks/*.ipynb`` (a glob: a new notebook is tested without editing
  this file) is executed with nbclient in fast mode (``DPMJAX_NOTEBOOK_FAST=1``: tiny sizes, a temporary
  working directory), with a fresh ``tmp_path`` as its working directory and ``TMPDIR`` (nothing is left
  behind), on one CPU device as a Colab user would have (the suite's 8 simulated devices are taken out of
  ``XLA_FLAGS`` for the kernel). A failing cell fails the test with the cell's number, its source and the error.
* ``test_notebook_conventions[NAME]``: cheap static checks, no kernel (not marked ``notebook``: always run):
  valid nbformat, cell 1 a markdown title with the open-in-Colab link naming the notebook's own file, cell 2 the
  install cell, cell 3 the ``DPMJAX_NOTEBOOK_FAST`` switch, no stored outputs or execution counts.
* ``test_a_failing_cell_fails_the_runner``: the runner itself reports a broken notebook (cell source and error).

The kernel is this interpreter (``sys.executable``) through a kernelspec written to a temporary folder, so
neither a user-wide ``python3`` kernelspec of another Python nor a missing one can change what runs.

    DPMJAX_NOTEBOOK_FAST=1 python -m pytest -q -m notebook          # these tests only
    python -m pytest -q tests/test_notebooks.py -m "not notebook"   # static checks, seconds
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
COLAB_URL = "https://colab.research.google.com/github/dpmjax/dpmjax/blob/main/notebooks/{name}"
INSTALL_MARKERS = ('importlib.util.find_spec("dpmjax") is None', "git+https://github.com/dpmjax/dpmjax.git")
FAST_MARKER = 'os.environ.get("DPMJAX_NOTEBOOK_FAST", "0") == "1"'
CELL_TIMEOUT_S = 300
MAX_STORED_BYTES = 200_000
KERNEL_NAME = "dpmjax-notebook-tests"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class NotebookFailed(AssertionError):
    """A notebook cell raised; the message names the notebook, the cell, its source and the error."""


def _kernel_manager(kernel_dir: Path):
    """A KernelManager that starts ``sys.executable -m ipykernel_launcher`` (a kernelspec in ``kernel_dir``)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = kernel_dir / KERNEL_NAME
    spec_dir.mkdir(parents=True, exist_ok=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({sys.executable})", "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(kernel_dir)], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def kernel_env(fast: bool = True) -> dict:
    """The kernel's environment: this one, fast mode on, XLA on one CPU device (not the suite's 8), quick compiles."""
    env = dict(os.environ)
    if fast:
        env["DPMJAX_NOTEBOOK_FAST"] = "1"
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).split()
    # Compiling dominates a fast-mode notebook on a small CPU: LLVM's level 0 compiles about 30% faster (the
    # experiments use it too); the notebooks' checks do not depend on the last ulps.
    if not any(flag.startswith("--xla_backend_optimization_level") for flag in flags):
        flags.append("--xla_backend_optimization_level=0")
    env["XLA_FLAGS"] = " ".join(flags)
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return env


def _failure_message(path: Path, nb, err) -> str:
    for index, cell in enumerate(nb.cells, start=1):
        for output in cell.get("outputs", ()):
            if output.get("output_type") == "error":
                trace = _ANSI.sub("", "\n".join(output.get("traceback", ())))
                return (f"{path.name}: cell {index} failed\n"
                        f"----- cell {index} source -----\n{cell.source}\n"
                        f"----- error -----\n{output.get('ename')}: {output.get('evalue')}\n"
                        f"----- traceback (last 4000 characters) -----\n{trace[-4000:]}")
    return f"{path.name}: execution failed: {_ANSI.sub('', str(err))[-6000:]}"


def run_notebook(path, *, cwd, kernel_dir, timeout: int = CELL_TIMEOUT_S, env: dict | None = None):
    """Execute the notebook at ``path`` in ``cwd``; returns the executed notebook (the file is not changed).

    Raises:
      NotebookFailed: a cell raised (or timed out); the message holds the cell's number, source and error.
    """
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    path = Path(path)
    nb = nbformat.read(str(path), as_version=4)
    client = nbclient.NotebookClient(nb, timeout=timeout, km=_kernel_manager(Path(kernel_dir)),
                                     kernel_name=KERNEL_NAME, resources={"metadata": {"path": str(cwd)}},
                                     allow_errors=False, record_timing=True)
    if env is None:  # the tests: kernel_env(), and the notebooks' tempfile.mkdtemp() folders inside cwd
        env = kernel_env()
        env["TMPDIR"] = str(Path(cwd) / "tmp")
        Path(env["TMPDIR"]).mkdir(parents=True, exist_ok=True)
    try:
        client.execute(env=env)
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as err:
        raise NotebookFailed(_failure_message(path, nb, err)) from None
    return nb


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    try:
        run_notebook(path, cwd=cwd, kernel_dir=tmp_path / "kernels")
    except NotebookFailed as err:
        pytest.fail(str(err), pytrace=False)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_conventions(path):  # no kernel: runs even with -m "not notebook"
    nb = nbformat.read(str(path), as_version=4)
    nbformat.validate(nb)
    cells = nb.cells
    assert len(cells) >= 4, f"{path.name}: expected a title, the install cell, the fast switch and content"
    title, install, fast = cells[0], cells[1], cells[2]
    assert title.cell_type == "markdown" and title.source.lstrip().startswith("#"), \
        f"{path.name}: cell 1 must be a markdown title"
    assert COLAB_URL.format(name=path.name) in title.source, \
        f"{path.name}: cell 1 must link {COLAB_URL.format(name=path.name)} (its own file)"
    assert install.cell_type == "code" and all(m in install.source for m in INSTALL_MARKERS), \
        f"{path.name}: cell 2 must be the install cell (notebooks/README.md)"
    assert fast.cell_type == "code" and FAST_MARKER in fast.source, \
        f"{path.name}: cell 3 must set FAST = {FAST_MARKER}"
    stored = sum(len(json.dumps(c.get("outputs", []))) for c in cells if c.cell_type == "code")
    counts = [i for i, c in enumerate(cells, 1) if c.cell_type == "code" and c.get("execution_count") is not None]
    assert stored <= MAX_STORED_BYTES and path.stat().st_size <= 4 * MAX_STORED_BYTES, \
        f"{path.name}: {stored} bytes of stored outputs: clear them before committing"
    assert not counts and all(not c.get("outputs") for c in cells if c.cell_type == "code"), \
        f"{path.name}: stored outputs / execution counts in cells {counts}: clear them before committing"


@pytest.mark.notebook
def test_a_failing_cell_fails_the_runner(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# broken"),
                nbformat.v4.new_code_cell("import os\nvalue = int(os.environ['DPMJAX_NOTEBOOK_FAST'])"),
                nbformat.v4.new_code_cell("assert value == 2, 'deliberately broken cell'"),
                nbformat.v4.new_code_cell("never_reached = True")]
    path = tmp_path / "broken.ipynb"
    nbformat.write(nb, str(path))
    with pytest.raises(NotebookFailed) as info:
        run_notebook(path, cwd=tmp_path, kernel_dir=tmp_path / "kernels", timeout=60)
    message = str(info.value)
    assert "broken.ipynb: cell 3 failed" in message
    assert "assert value == 2, 'deliberately broken cell'" in message  # the cell's source
    assert "AssertionError: deliberately broken cell" in message  # the error
    assert "never_reached" not in message


def test_notebooks_are_found():
    """A moved or renamed folder must not turn the notebook tests into zero silent tests."""
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOKS_DIR}"
