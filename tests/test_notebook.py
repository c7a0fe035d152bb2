"""The walkthrough notebook: committed executed (a reader on a code host sees its plots), and re-executed top to
bottom on the real model it walks through, with the same findings.

To refresh the committed outputs after editing the notebook:
    BUGHUNT_WRITE_NOTEBOOK=1 .venv/bin/pytest -q tests/test_notebook.py -k executes
"""

import os
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"
PLANTED = "hf:fp32[rope_theta_source=default]"


def _outputs(nb) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _text(nb) -> str:
    return "".join(o.get("text", "") for o in _outputs(nb))


def _images(nb) -> list[str]:
    return [o["data"]["image/png"] for o in _outputs(nb) if "image/png" in o.get("data", {})]


def _check_findings(nb) -> None:
    """What the notebook shows about the real model, in whichever copy of it: committed or just executed."""
    text = _text(nb)
    assert not [o for o in _outputs(nb) if o.get("output_type") == "error"], "a cell raised"
    assert "SmolLM2-135M-Instruct.Q4_1.gguf: 94 MiB" in text
    assert "kind: gguf | file: SmolLM2-135M-Instruct.Q4_1.gguf | type: q4_1" in text
    assert "input: default text (1 x 17 ids)" in text
    rows = {line.split()[0]: line.split()[2] for line in text.splitlines() if re.match(r"\s+hf:(fp32|bf16)\s+(fp32|bf16)\s", line)}
    assert rows == {"hf:fp32": "none", "hf:bf16": "none"}, rows  # correct HF stays within 10x its floor at both dtypes
    assert re.search(r"hf:bf16: mean NLL 4\.\d+ vs 4\.\d+ nats/token", text)
    assert "first capture point above the floor: layer.0.attn" in text
    assert f"WARNING: {PLANTED} departs from reference at layer.0.attn" in text
    assert "behaves like the reference with {rope_theta=10000.0}" in text
    assert len(_images(nb)) == 2, "the per-layer plot of the compare and of the planted bug"
    assert all(len(png) > 10_000 for png in _images(nb))
    # nothing that names this machine: the GGUF and the cache are named by their file names
    assert not re.search(r"(/root/|/home/|/tmp/|/work/|site-packages|\.cache/)", text), text


def test_committed_notebook_has_its_outputs_and_plots():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), "commit the notebook executed, every cell run"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "executed top to bottom, once"
    _check_findings(nb)
    assert NOTEBOOK.stat().st_size < 400_000, "keep the committed notebook small: a couple of images"


@pytest.mark.slow
def test_walkthrough_notebook_executes(smollm2):
    """Re-executes the whole notebook on the real model (about 70 CPU-seconds) and finds what the committed copy shows."""
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    _check_findings(nb)
    if os.environ.get("BUGHUNT_WRITE_NOTEBOOK") == "1":
        for cell in nb.cells:
            cell.metadata.pop("execution", None)
        nbformat.write(nb, NOTEBOOK)
