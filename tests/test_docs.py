"""The documentation's code runs, and its API reference cannot silently miss a name.

Convention for code in the pages of ``docs/`` (MyST Markdown):

* a fenced block whose language is ``python`` (```` ```python ````) is RUN:
  the blocks of one page run in page order in one namespace, like a doctest
  session, in a fresh interpreter per page (as a reader pasting them would;
  matplotlib gets its non-interactive backend). Keep them fast: a few seconds
  per page.
* a block written as ```` ```{code-block} python ```` is only SHOWN (code that
  needs a GPU, several hosts, a dataset download, or minutes of training);
  so is any other language (``bash``, ``text``, ``pycon``...).
* blocks nested in a directive (```` ````{note} ```` or ``:::{note}``) follow
  the same rule.

The build itself (``sphinx-build -W -b html docs docs/_build/html``) runs in
``.ci/run``; docstring examples run under ``pytest --doctest-modules sam_optax``.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
PUBLIC_MODULES = ("sam_optax", "sam_optax.parallel", "sam_optax.flax", "sam_optax.analysis")

# Directives whose content is text or code to show, never pages of Markdown.
_LITERAL_DIRECTIVES = {"code-block", "code", "sourcecode", "code-cell", "eval-rst", "math"}


def pages() -> list[Path]:
    """The Markdown pages of the docs (not the build output)."""
    return sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.relative_to(DOCS).parts)


def python_blocks(text: str, first_line: int = 0) -> list[tuple[int, str]]:
    """The ``python`` blocks of a page: (0-based line of the code's first line, code)."""
    from markdown_it import MarkdownIt

    blocks = []
    for token in MarkdownIt("commonmark").parse(text):
        if token.type != "fence":
            continue
        info = token.info.strip()
        start = first_line + token.map[0] + 1
        if info == "python":
            blocks.append((start, token.content))
        elif info.startswith("{"):
            name = info[1:].split("}", 1)[0]
            if name not in _LITERAL_DIRECTIVES:
                blocks += python_blocks(token.content, start)
    return blocks


def run_page(path: Path) -> None:
    """Runs the page's blocks in order in one namespace; tracebacks point into the page."""
    namespace = {"__name__": "__main__"}
    for start, code in python_blocks(path.read_text()):
        exec(compile("\n" * start + code, str(path), "exec"), namespace)


_PAGES = pages()
_WITH_CODE = [p for p in _PAGES if "```python" in p.read_text()]


def test_python_blocks_are_found_where_the_convention_says():
    page = "\n".join(
        [
            "# Title",  # line 0
            "```python",
            "x = 1",  # line 2: runs
            "```",
            "```{code-block} python",
            "shown = 1",
            "```",
            "````{note}",
            "```python",
            "y = x + 1",  # line 9: runs
            "```",
            "````",
            "```bash",
            "ls",
            "```",
        ]
    )
    assert python_blocks(page) == [(2, "x = 1\n"), (9, "y = x + 1\n")]


@pytest.mark.skipif(not _WITH_CODE, reason="no docs page has a python block yet")
@pytest.mark.parametrize("page", _WITH_CODE, ids=[str(p.relative_to(DOCS)) for p in _WITH_CODE])
def test_page_code_runs(page):
    pytest.importorskip("markdown_it")
    env = {**os.environ, "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, __file__, str(page)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{page.relative_to(ROOT)}:\n{result.stderr[-6000:]}"


# --------------------------------------------------------------------------
# The API reference.
# --------------------------------------------------------------------------


def _coverage_check():
    pytest.importorskip("sphinx")
    sys.path.insert(0, str(DOCS / "ext"))
    try:
        return importlib.import_module("coverage_check")
    finally:
        sys.path.remove(str(DOCS / "ext"))


def _all_names() -> list[str]:
    names = []
    for module_name in PUBLIC_MODULES:
        names += [f"{module_name}.{n}" for n in importlib.import_module(module_name).__all__]
    return names


def test_coverage_check_lists_every_name_of_every_all():
    check = _coverage_check()
    assert check.PUBLIC_MODULES == PUBLIC_MODULES
    names = check.public_names()
    expected = _all_names()
    assert len(expected) > 40 and len(set(expected)) == len(expected)
    assert names == sorted(expected)
    assert {
        "sam_optax.sam",
        "sam_optax.parallel.shard_map_step",
        "sam_optax.flax.nnx_train_step",
        "sam_optax.analysis.sharpness",
    } <= set(names)


def test_coverage_check_names_what_is_missing_and_fails_the_build():
    check = _coverage_check()
    from sphinx.errors import SphinxError

    class Domain:
        def __init__(self, names):
            self.names = names

        def get_objects(self):
            return [(n, n, "function", "api", n, 1) for n in self.names]

    class Env:
        def __init__(self, names):
            self.domain = Domain(names)

        def get_domain(self, name):
            assert name == "py"
            return self.domain

    names = check.public_names()
    assert check.missing_names(Env(names)) == []
    check.check_coverage(None, Env(names))
    dropped = ["sam_optax.flax.SAMTrainState", "sam_optax.sam"]
    env = Env([n for n in names if n not in dropped])
    assert check.missing_names(env) == dropped
    with pytest.raises(SphinxError, match=r"sam_optax\.flax\.SAMTrainState\n\s+sam_optax\.sam"):
        check.check_coverage(None, env)


def test_every_public_name_is_in_an_autosummary_table():
    # The build's check, without a build: each name sits under `.. currentmodule::`
    # of its module in an autosummary table of docs/api/.
    listed = set()
    for page in (DOCS / "api").glob("*.md"):
        module = None
        in_table = False
        for line in page.read_text().splitlines():
            if m := re.match(r"\.\. currentmodule:: (\S+)", line.strip()):
                module = m.group(1)
            elif line.strip().startswith(".. autosummary::"):
                in_table = True
            elif in_table and line.startswith("   ") and not line.strip().startswith(":"):
                listed.add(f"{module}.{line.strip()}")
            elif in_table and line.strip() and not line.startswith("   "):
                in_table = False
    missing = sorted(set(_all_names()) - listed)
    assert not missing, f"not in any autosummary table of docs/api/: {missing}"


if __name__ == "__main__":
    # 8 CPU devices, as the pages say their multi-device examples run (and the suite does).
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    run_page(Path(sys.argv[1]))
