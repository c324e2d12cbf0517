"""Executes every notebook in notebooks/ top to bottom, so none of them can rot.

Each notebook runs in a fresh Jupyter kernel started from this interpreter (a kernelspec
written to a temporary directory, so a ``python3`` kernelspec that points at another Python
cannot be picked up) and must finish without an error; the notebooks ``assert`` on their own
results, so a broken library fails here. The notebooks are stored without outputs; this test
never writes them back.
"""

import os
import pathlib
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "lora-jax-test"
CELL_TIMEOUT_S = 170


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory):
    """A kernelspec for this interpreter in a temp prefix, found through JUPYTER_PATH."""
    try:
        from ipykernel import kernelspec
        from jupyter_client.kernelspec import KernelSpecManager
    except ImportError as e:
        pytest.skip(f"ipykernel/jupyter_client are not importable: {e}")
    prefix = tmp_path_factory.mktemp("kernels")
    path = prefix / "share" / "jupyter"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(path))
        kernelspec.install(user=False, prefix=str(prefix), kernel_name=KERNEL,
                           display_name="lora_jax tests")
        assert KernelSpecManager().get_kernel_spec(KERNEL).argv[0] == sys.executable
    return path


def test_notebooks_found():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "adalora.ipynb", "qlora.ipynb",
                                           "sharding.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, jupyter_path, tmp_path, monkeypatch):
    try:
        import nbformat
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError
    except ImportError as e:
        pytest.skip(f"nbclient/nbformat are not importable: {e}")

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # stored without outputs (or the diff of every run would show)
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name} is stored with outputs; clear them before committing")

    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL,
                            resources={"metadata": {"path": str(tmp_path)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as e:  # names the cell and shows the traceback
        pytest.fail(f"{path.name} failed after {time.perf_counter() - t0:.0f} s:\n{e}",
                    pytrace=False)

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors, errors
    assert nb.metadata["language_info"]["name"] == "python"
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs)
    assert images >= 1, f"{path.name} drew no plot"
    print(f"{path.name}: {time.perf_counter() - t0:.1f} s with {sys.executable}")
