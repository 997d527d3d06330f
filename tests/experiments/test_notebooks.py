"""The colabs/ notebooks execute top to bottom (nbclient, the venv's own kernel) on tiny settings.

Each notebook has a cell tagged `parameters`; the test inserts a cell after it that shrinks the run
(papermill's convention), executes every cell and fails on the first cell that raises.
"""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

COLABS = pathlib.Path(__file__).resolve().parents[2] / "colabs"

TINY = {
    "quickstart": {"SFT_STEPS": 8, "NUM_PROBLEMS": 2, "NUM_SAMPLES": 2, "MAX_NEW_TOKENS": 16},
    "grpo": {"VARIANT": "ci", "SFT_STEPS": 8, "GRPO_STEPS": (1, 1), "PROMPTS_PER_STEP": 2, "EVAL_PROBLEMS": 4},
    "eval": {"SFT_STEPS": 8, "NUM_PROBLEMS": 4, "N": 4, "MAX_NEW_TOKENS": 16},
}


def _with_parameters(book, values: dict):
    index = next(i for i, cell in enumerate(book.cells) if "parameters" in cell.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    book.cells.insert(index + 1, cell)
    return book


# The notebooks (quickstart ~22 s, GRPO ~1.5 min, eval ~20 s on 2 cores) run in `make test-slow`, which
# .ci/run also runs.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) for n in sorted(TINY)])
def test_notebook_runs_top_to_bottom(name, tmp_path):
    book = nbformat.read(COLABS / f"{name}.ipynb", as_version=4)
    assert book.cells[1].cell_type == "code" and "%pip install" in book.cells[1].source  # install cell first
    book = _with_parameters(book, {**TINY[name], "WORKDIR": str(tmp_path)})
    env_before = os.environ.get("JAX_PLATFORMS")
    client = NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(COLABS)}})
    client.execute()  # raises CellExecutionError naming the cell that failed
    assert os.environ.get("JAX_PLATFORMS") == env_before
    outputs = [o for cell in book.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    if name != "quickstart":  # the plots rendered
        assert any("image/png" in o.get("data", {}) for o in outputs)
