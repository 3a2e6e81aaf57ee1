"""docs/notebooks/quickstart.ipynb runs top to bottom: recipe, packed row, a short training
run, the loss plot, and the export generating in transformers."""

import os
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "docs", "notebooks", "quickstart.ipynb")


def _text(cell) -> str:
  """A code cell's printed output (streams and text/plain results)."""
  parts = []
  for out in cell.get("outputs", []):
    if out.get("output_type") == "stream":
      parts.append(out.get("text", ""))
    elif "data" in out:
      parts.append(out["data"].get("text/plain", ""))
  return "".join(parts)


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  # A kernelspec for this interpreter (the venv's), found through JUPYTER_PATH only.
  prefix = tmp_path / "jupyter"
  kernelspec.install(prefix=str(prefix), kernel_name="jaxtune-test")
  monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  # As a reader's kernel sees it: one CPU device, not the 4 that tests/conftest.py asks for.
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                 os.environ.get("XLA_FLAGS", "")).strip()
  monkeypatch.setenv("XLA_FLAGS", flags)
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  # The notebook's tempfile.mkdtemp() lands here too, so a failing run leaves nothing behind.
  (tmp_path / "tmp").mkdir()
  monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))

  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
      "save the notebook without outputs")
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="jaxtune-test",
                                   resources={"metadata": {"path": str(cwd)}})
  client.execute()   # raises CellExecutionError on the first failing cell

  code = [c for c in nb.cells if c.cell_type == "code"]
  everything = "\n".join(_text(c) for c in code)
  assert "⟦" in everything and "⟧" in everything, "the packed row shows its loss mask"
  assert re.search(r"^text layers: 1$", everything, re.M)
  steps = re.search(r"^steps: (\d+) of (\d+)$", everything, re.M)
  assert steps and steps.group(1) == steps.group(2) == "4"
  assert any(out.get("data", {}).get("image/png") for c in code for out in c.outputs), (
      "the loss plot is an image")
  evals = re.findall(r"^eval_loss_\S+ \[(.*)\]$", everything, re.M)
  assert evals and all(len(e.split(",")) >= 2 for e in evals), "eval losses at least twice"
  generated = re.search(r"^generated: '(.*)'$", _text(code[-2]), re.M | re.S)
  assert generated and generated.group(1).strip(), "the export generated text"
  assert list(cwd.iterdir()) == [], "the notebook leaves nothing in its working directory"
