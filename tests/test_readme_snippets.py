"""The python blocks of the README's "Use the sparse paths in your detector" run as written."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Use the sparse paths in your detector"


def _section() -> tuple[str, str]:
    for path in (ROOT / "README.md",):
        if path.exists():
            text = path.read_text(encoding="utf-8")
            lines = text.splitlines()
            if HEADING in lines:
                start = lines.index(HEADING) + 1
                end, fenced = len(lines), False
                for i in range(start, len(lines)):
                    fenced ^= lines[i].startswith("```")
                    if not fenced and re.match(r"#{1,2} ", lines[i]):  # the next section, not a code comment
                        end = i
                        break
                return path.name, "\n".join(lines[start:end])
    raise AssertionError(f"no {HEADING!r} section in README.md")


def _blocks() -> list[str]:
    _, body = _section()
    return re.findall(r"^```python\n(.*?)^```", body, flags=re.S | re.M)


def test_section_has_a_2d_and_a_3d_snippet():
    blocks = _blocks()
    assert len(blocks) == 2, f"expected 2 python blocks, found {len(blocks)}"
    assert "ndim=3" in blocks[1] and "SparseConvTensor" in blocks[1]


@pytest.mark.parametrize("i", [0, 1])
def test_snippet_runs(i, capsys):
    code = _blocks()[i]
    exec(compile(code, f"<reuse snippet {i}>", "exec"), {"__name__": "__snippet__"})
    assert capsys.readouterr().out.strip()
