"""Sphinx configuration of the sam_optax documentation.

Build (from the repository root; warnings are errors, every cross-reference must resolve):

    sphinx-build -W -b html docs docs/_build/html

Nothing is fetched from the network, at build time or when a page is viewed: no
intersphinx, MathJax served from the build (sphinx-mathjax-offline), notebooks
rendered from their committed outputs (never executed here).

The notebooks live in ``notebooks/`` (with their py:percent twins). Sphinx reads
sources only under ``docs/``, so each build starts by copying
``notebooks/*.ipynb`` into ``docs/notebooks/`` (gitignored; only
``docs/notebooks/index.md`` is committed). A copy rather than a committed
symlink: symlinks are lost on some checkouts (Windows, zip archives) and a
copy is an ordinary file to every tool. Files are rewritten only when their
bytes differ, so an incremental build rereads only the notebooks that changed.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "ext"))

import sam_optax  # noqa: E402

# -- Project -------------------------------------------------------------------

project = "sam_optax"
author = "sam_optax developers"
copyright = "sam_optax developers"
version = release = sam_optax.__version__

# -- General -------------------------------------------------------------------

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx-mathjax-offline",  # MathJax copied into _static: math without the network
    "myst_nb",  # Markdown (MyST) pages and notebooks
    "coverage_check",  # docs/ext: every public name has an entry
]

root_doc = "index"
# _generated: Markdown fragments pulled into pages by `{include}`, not pages themselves.
exclude_patterns = ["_build", "_generated", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

# Every cross-reference must resolve. Without intersphinx (no network), names
# of other projects cannot: those, and only those, are ignored.
nitpicky = True
_EXTERNAL = (
    r"(jax|jaxlib|jnp|optax|chex|flax|nnx|linen|nn|equinox|eqx|numpy|np|matplotlib"
    r"|plt|mpl_toolkits|typing|collections|types|functools|pathlib|os)"
)
nitpick_ignore_regex = [
    (r"py:.*", _EXTERNAL + r"(\..+)?"),
]

# -- autodoc, autosummary, napoleon -------------------------------------------

autosummary_generate = True  # stubs under docs/api/_autosummary/ (gitignored)
autosummary_imported_members = False
autodoc_member_order = "bysource"
# Our modules use `from __future__ import annotations`: the annotations stay
# strings and go into each argument's description, keeping signatures short.
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
# Kept as written, not expanded into the unions they stand for.
autodoc_type_aliases = {
    name: name
    for name in (
        "jax.typing.ArrayLike",
        "optax.ScalarOrSchedule",
        "optax.Schedule",
        "optax.Params",
        "optax.Updates",
    )
}


def _alias_reads_as_its_name() -> None:
    # Sphinx unwraps an alias only at the top of an annotation: inside
    # `optax.ScalarOrSchedule | None` it would print the placeholder's repr.
    from sphinx.util import inspect as sphinx_inspect

    placeholder = getattr(sphinx_inspect, "TypeAliasForwardRef", None)
    if placeholder is not None:
        placeholder.__repr__ = lambda self: self.name


_alias_reads_as_its_name()

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# An `Attributes:` entry says what the field holds; the class annotations would
# add private paths (jax.Array is `jaxlib._jax.Array` at run time).
napoleon_attr_annotations = False

# Doctests of the docs pages (`sphinx-build -b doctest docs docs/_build/doctest`);
# the docstrings' own examples run under `pytest --doctest-modules sam_optax`.
doctest_global_setup = """
import jax
import jax.numpy as jnp
import optax
import sam_optax
"""

# -- MyST and notebooks --------------------------------------------------------

myst_enable_extensions = ["amsmath", "colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # rendered from the committed outputs
nb_merge_streams = True
# Markdown a cell displays (the notebooks' result tables) is rendered as MyST,
# with tables; myst-nb's default, CommonMark, showed them as raw pipes.
nb_render_markdown_format = "myst"

# -- HTML ----------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = f"sam_optax {release}"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "home_page_in_toc": True,
    # pydata-sphinx-theme >= 0.16 puts a second search button in a top bar
    # unless told not to; the sidebar has one.
    "navbar_persistent": [],
}
html_static_path = ["_static"]
# Wide code and outputs wrap at the page's width instead of scrolling sideways.
html_css_files = ["wrap.css"]
html_show_sourcelink = False


# -- The notebooks -------------------------------------------------------------


def copy_notebooks(app=None, config=None) -> list[Path]:
    """Copies ``notebooks/*.ipynb`` into ``docs/notebooks/``; removes copies without a source."""
    del app, config
    source, target = ROOT / "notebooks", DOCS / "notebooks"
    target.mkdir(exist_ok=True)
    notebooks = sorted(source.glob("*.ipynb"))
    names = {nb.name for nb in notebooks}
    for stale in target.glob("*.ipynb"):
        if stale.name not in names:
            stale.unlink()
    for nb in notebooks:
        copy = target / nb.name
        if not copy.exists() or copy.read_bytes() != nb.read_bytes():
            shutil.copyfile(nb, copy)
    return notebooks


def skip_named_tuple_fields(app, what, name, obj, skip, options):
    """NamedTuple fields are documented by their class's ``Attributes:`` section."""
    del app, what, name, options
    return True if type(obj).__name__ == "_tuplegetter" else skip


def setup(app) -> None:
    app.connect("config-inited", copy_notebooks)
    app.connect("autodoc-skip-member", skip_named_tuple_fields)
