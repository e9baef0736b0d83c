"""The Python examples in the docs run as written."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
RUNNABLE = ["voxel_lib.md", "synth.md", "synth_images_lesions.md"]


def _blocks(name):
    text = (DOCS / name).read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("name", RUNNABLE)
def test_doc_examples_run(name, tmp_path, monkeypatch):
    blocks = _blocks(name)
    assert blocks, f"{name} has no python examples"
    monkeypatch.chdir(tmp_path)
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{name}[block {i}]", "exec"), {"__name__": "__doc_example__"})
        except Exception as exc:  # pragma: no cover - the failure message is the point
            raise AssertionError(f"{name} example {i} failed: {exc!r}\n{code}") from exc
