"""A Sphinx extension that fails the build when a public name has no entry in the docs.

The public names are those in ``__all__`` of each module of :data:`PUBLIC_MODULES`;
a name is documented when the Python domain holds an object (function, class,
data, module...) of that full name, e.g. ``sam_optax.parallel.pmap_step`` from
an ``autosummary`` table or an ``autofunction``. The check runs on every build
(Sphinx's ``env-updated`` event, after all pages are read), incremental ones
included, and raises a :class:`sphinx.errors.SphinxError`: the build stops with
an error whether or not warnings are errors (``-W``).
"""

from __future__ import annotations

import importlib
from typing import Any

from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.errors import SphinxError

PUBLIC_MODULES = (
    "sam_optax",
    "sam_optax.parallel",
    "sam_optax.flax",
    "sam_optax.analysis",
)


def public_names() -> list[str]:
    """The full name of every entry of ``__all__`` of :data:`PUBLIC_MODULES`, sorted."""
    names = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        names += [f"{module_name}.{name}" for name in module.__all__]
    return sorted(names)


def documented_names(env: BuildEnvironment) -> set[str]:
    """The full names of the objects the Python domain holds (modules included)."""
    return {name for name, *_ in env.get_domain("py").get_objects()}


def missing_names(env: BuildEnvironment) -> list[str]:
    """The public names without an entry, sorted."""
    documented = documented_names(env)
    return [name for name in public_names() if name not in documented]


class UndocumentedNamesError(SphinxError):
    category = "Public names missing from the API reference"


def check_coverage(app: Sphinx, env: BuildEnvironment) -> None:
    del app
    missing = missing_names(env)
    if missing:
        raise UndocumentedNamesError(
            f"{len(missing)} public name(s) have no entry in the documentation; add each to "
            "an autosummary table of docs/api/ (the page of its module):\n  " + "\n  ".join(missing)
        )


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("env-updated", check_coverage)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
