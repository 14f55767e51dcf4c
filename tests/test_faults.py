"""The program's files under faults, each provoked for real and bounded in time.

* a run killed (SIGKILL) while a checkpoint is being written resumes from the
  previous complete checkpoint and ends bit-identical;
* a corrupted latest checkpoint is reported by its path and the previous one used;
* a second process on the same ``--out`` is refused (a lock), with a clear message;
* ``metrics.jsonl`` is strict JSON (no bare NaN);
* JSON files are replaced atomically: a writer killed at random moments never
  leaves a torn file.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from sam_optax.program import cli
from sam_optax.program import configs
from sam_optax.program import train
from sam_optax.program.rundir import restore_final
from sam_optax.program.train import RunOptions

from helpers import assert_trees_equal

ARGS = ["train", "--epochs", "2", "--no-progress"]


def _cli(argv, **kw):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-m", "sam_optax", *argv], env=env, **kw)


def _final(path):
    state = restore_final(path)
    del state["wall_seconds"]
    return jax.tree.map(np.asarray, state)


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_resumes_from_the_previous_one(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _cli([*ARGS, "--checkpoint-every", "1", "--out", str(full)]).wait(timeout=300) == 0
    proc = _cli(
        [*ARGS, "--checkpoint-every", "1", "--out", str(cut)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    folder, seen = cut / "checkpoints", None
    deadline = time.time() + 240
    try:
        while time.time() < deadline and seen is None:
            if folder.is_dir():
                names = [p.name for p in folder.iterdir()]
                done = [int(n) for n in names if n.isdigit()]
                partial = [n for n in names if "tmp" in n]
                if partial and done and max(done) >= 3:
                    proc.send_signal(signal.SIGKILL)  # in the middle of writing `partial`
                    seen = partial
            assert proc.poll() is None or seen, "the run ended before it could be killed"
            time.sleep(0.001)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert seen, "never caught a checkpoint being written"
    assert not (cut / "summary.json").exists()
    assert (
        _cli([*ARGS, "--checkpoint-every", "1", "--out", str(cut), "--resume"]).wait(timeout=300)
        == 0
    )
    assert_trees_equal(_final(cut), _final(full))
    rows = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    full_rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss", "train_accuracy", "test_accuracy"):
        assert [r[key] for r in rows] == [r[key] for r in full_rows], key
    summary = json.loads((cut / "summary.json").read_text())
    assert (
        summary["test_accuracy"] == json.loads((full / "summary.json").read_text())["test_accuracy"]
    )


def test_a_corrupted_latest_checkpoint_is_reported_and_the_previous_used(tmp_path, capsys):
    c = configs.recipe("digits-noise").replace(epochs=2)
    full, cut = tmp_path / "full", tmp_path / "cut"
    train.train_and_evaluate(c, full, RunOptions(checkpoint_every=5))
    train.train_and_evaluate(c, cut, RunOptions(checkpoint_every=5))
    latest = cut / "checkpoints" / "42"
    files = [p for p in latest.rglob("*") if p.is_file() and p.stat().st_size > 0]
    for p in files:  # garbage over every data file of the newest checkpoint
        p.write_bytes(os.urandom(p.stat().st_size))
    (cut / "summary.json").unlink()
    capsys.readouterr()
    train.train_and_evaluate(c, cut, RunOptions(resume=True, checkpoint_every=5))
    err = capsys.readouterr().err
    assert f"checkpoint {latest} is unreadable" in err and "previous one used" in err
    assert_trees_equal(_final(cut), _final(full))


@pytest.mark.slow
def test_two_processes_cannot_write_the_same_out(tmp_path):
    out = tmp_path / "run"
    first = _cli(
        ["train", "--epochs", "30", "--no-progress", "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (out / "config.json").is_file():
            assert time.time() < deadline and first.poll() is None, "the first run did not start"
            time.sleep(0.05)
        second = _cli(
            ["train", "--epochs", "30", "--no-progress", "--out", str(out), "--resume"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        assert "is in use by another sam-optax process" in err and ".lock" in err
        assert first.poll() is None  # the first run is untouched
    finally:
        first.kill()
        first.wait(timeout=30)


def test_metrics_are_strict_json(tmp_path):
    out = tmp_path / "sgd"
    assert (
        cli.main(["train", "--epochs", "2", "--rho", "0", "--out", str(out), "--no-progress"]) == 0
    )

    def refuse(constant):
        raise AssertionError(f"bare {constant} in metrics.jsonl")

    rows = [
        json.loads(x, parse_constant=refuse)
        for x in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows[0]["sharpness"] is None  # not measured (SGD): null, not NaN
    assert all(json.loads(p.read_text(), parse_constant=refuse) for p in out.glob("*.json"))


@pytest.mark.slow
def test_json_files_are_replaced_whole_even_when_the_writer_is_killed(tmp_path):
    target = tmp_path / "summary.json"
    payloads = [{"which": i, "data": [i] * 200_000} for i in range(2)]
    writer = textwrap.dedent(
        f"""
        import itertools, sys
        from pathlib import Path
        from sam_optax.program.rundir import to_json, write_atomic
        payloads = [{{"which": i, "data": [i] * 200_000}} for i in range(2)]
        texts = [to_json(p) for p in payloads]
        print("ready", flush=True)
        for i in itertools.count():
            write_atomic(Path({str(target)!r}), texts[i % 2])
        """
    )
    rng = random.Random(0)
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.05, 0.4))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        if target.exists():
            assert json.loads(target.read_text()) in payloads
    assert target.exists()
    shutil.rmtree(tmp_path)
