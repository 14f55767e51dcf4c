"""Rebuilds the notebooks from their py:percent twins and runs them with outputs.

    python notebooks/execute.py            # full runs (the committed outputs)
    python notebooks/execute.py 02 --fast  # one notebook, shrunk (as the tests do)

The ``.py`` files are the source; each ``.ipynb`` is regenerated from its twin
(jupytext), executed in a real kernel (nbclient) and saved with its outputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).parent


def execute(py: Path, fast: bool, timeout: int = 1800) -> nbformat.NotebookNode:
    nb = jupytext.read(py)
    nb.metadata["jupytext"] = {"formats": "ipynb,py:percent"}
    env_before = os.environ.get("SAM_OPTAX_FAST")
    os.environ["SAM_OPTAX_FAST"] = "1" if fast else "0"
    try:
        NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(py.parent)}},
        ).execute()
    finally:
        if env_before is None:
            os.environ.pop("SAM_OPTAX_FAST", None)
        else:
            os.environ["SAM_OPTAX_FAST"] = env_before
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("only", nargs="*", help="notebook name prefixes (default: all)")
    parser.add_argument(
        "--fast", action="store_true", help="the shrunk run of the tests; outputs not saved"
    )
    args = parser.parse_args(argv)
    for py in sorted(HERE.glob("[0-9][0-9]_*.py")):
        if args.only and not any(py.name.startswith(o) for o in args.only):
            continue
        start = time.perf_counter()
        nb = execute(py, args.fast)
        if not args.fast:
            nbformat.write(nb, py.with_suffix(".ipynb"))
        print(f"{py.stem}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
