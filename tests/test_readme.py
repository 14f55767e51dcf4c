"""The README's code runs: its Flax and Equinox examples, and the core's promise not to import Flax."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"


def _example(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- example: {name} .*?-->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README has no example {name!r}"
    return match.group(1)


@pytest.mark.parametrize("name", ["flax_nnx", "flax_linen", "equinox"])
def test_readme_framework_example_runs_and_learns(name, capsys):
    namespace: dict = {}
    exec(compile(_example(name), f"README:{name}", "exec"), namespace)
    out = capsys.readouterr().out
    accuracy = float(re.search(r"test accuracy ([0-9.]+)", out).group(1))
    assert accuracy > 0.7, out


def test_import_sam_optax_does_not_import_flax():
    code = "import sys, sam_optax, sam_optax.parallel; assert 'flax' not in sys.modules, sorted(m for m in sys.modules if 'flax' in m)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plain_jax_example_runs():
    example = README.parent / "examples" / "digits_mlp.py"
    out = subprocess.run(
        [sys.executable, str(example), "--epochs", "2"], check=True, capture_output=True, text=True
    ).stdout
    assert "SGD test accuracy" in out and "SAM test accuracy" in out
