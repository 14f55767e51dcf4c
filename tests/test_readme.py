"""The front door: the README's quickstart runs, the core does not import Flax, the example runs."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"


def test_readme_is_short_and_its_quickstart_runs(capsys):
    text = README.read_text()
    assert len(text.splitlines()) <= 250  # the rest lives in docs/
    block = re.search(r"## Quickstart\s*```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, "README:quickstart", "exec"), namespace)
    params, value = np.asarray(namespace["params"]), float(namespace["value"])
    # sum((w - [1, 2])^2) + 0.1 sum(w^4): from 5.0 at w = 0 to its minimum, where
    # 2 (w - [1, 2]) + 0.4 w^3 = 0 (w = [0.87, 1.42], loss 0.82).
    residual = 2 * (params - np.array([1.0, 2.0])) + 0.4 * params**3
    assert value < 0.9 and np.all(np.abs(residual) < 0.05), (params, value)
    assert "sharpness" in text and np.isfinite(float(capsys.readouterr().out.split()[-1]))


def test_readme_links_resolve():
    for target in re.findall(r"\]\(((?!https?://)[^)]+)\)", README.read_text()):
        path, _, anchor = target.partition("#")
        assert (ROOT / path).exists(), target
        if anchor:  # a heading of that page, as GitHub and MyST slug it
            headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(), re.M)
            slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
            assert anchor in slugs, (target, sorted(slugs))


def test_import_sam_optax_does_not_import_flax():
    code = "import sys, sam_optax, sam_optax.parallel; assert 'flax' not in sys.modules, sorted(m for m in sys.modules if 'flax' in m)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plain_jax_example_runs():
    example = ROOT / "examples" / "digits_mlp.py"
    out = subprocess.run(
        [sys.executable, str(example), "--epochs", "2"], check=True, capture_output=True, text=True
    ).stdout
    assert "SGD test accuracy" in out and "SAM test accuracy" in out
