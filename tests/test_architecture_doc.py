"""docs/architecture.md's example of a new structure runs as written (in a fresh process, so its
registration does not leak into other tests)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_new_structure_example_runs_and_works_with_surgery_and_mup():
    (example,) = _python_blocks(DOC.read_text(encoding="utf-8"))
    # The doc promises surgery and μP work with the new structure unchanged: check that too.
    check = """
from structlin import mup
def mlp(width):
    model = nn.Sequential(nn.Linear(64, width), nn.GELU(), nn.Linear(width, 10))
    return model, sl.structurize(model, "two_factor:rank=4", target_modules=["0"])
model, report = mlp(256)
base, _ = mlp(32)
assert type(model[0]).__name__ == "TwoFactorLinear" and report.replaced == ["0"]
assert sl.parse_spec(report[0].new) == ("two_factor", {"rank": 4})
groups = mup.param_groups(model, lr=1e-3, base=base)
assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", example + check], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_the_example_is_short():
    (example,) = _python_blocks(DOC.read_text(encoding="utf-8"))
    body = example[example.index("@sl.register_structure") : example.index("layer = ")]
    lines = [ln for ln in body.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert len(lines) <= 16
