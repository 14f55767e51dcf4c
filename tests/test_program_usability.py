"""The program as a user meets it: recipes per dataset, help, missing extras,
divergence, the paper's CIFAR recipe, Ctrl-C and resume with the run's own
settings, meshes, what a run leaves behind."""

import importlib.metadata
import io
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sam_optax.program import cli
from sam_optax.program import configs
from sam_optax.program import models
from sam_optax.program import train
from sam_optax.program import trainer
from sam_optax.program.errors import Interrupted
from sam_optax.program.errors import RunDirError
from sam_optax.program.errors import UsageError
from sam_optax.program.rundir import clear_for_overwrite
from sam_optax.program.rundir import lock_directory
from sam_optax.program.rundir import restore_final
from sam_optax.program.rundir import write_atomic
from sam_optax.program.train import RunOptions

from helpers import assert_trees_close
from helpers import assert_trees_equal


def _write_cifar10(root, n=8):
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, size=(n, 1), dtype=np.uint8)
        pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        (folder / name).write_bytes(np.concatenate([labels, pixels], axis=1).tobytes())


# --------------------------------------------------------------------------
# 2. Switching --dataset switches the defaults; nothing of the digits demo leaks.
# --------------------------------------------------------------------------


def _resolve(argv):
    return cli.config_from_args(cli.build_parser().parse_args(argv))


def test_dataset_picks_its_own_recipe():
    name, c = _resolve(["train", "--dataset", "cifar10", "--model", "resnet20"])
    assert name == "wrn28_10-cifar10"
    assert (c.dataset, c.model, c.label_noise, c.m, c.augment, c.rho) == (
        "cifar10",
        "resnet20",
        0.0,
        None,
        "basic",
        0.05,
    )
    configs.validate(c.replace(batch_size=20), n_devices=1)  # no m that the user never asked for
    assert _resolve(["train", "--dataset", "digits"])[1] == configs.recipe("digits-noise")
    # An explicit --config wins; flags still override it.
    assert _resolve(["train", "--config", "digits-noise", "--dataset", "cifar10"])[1].m == 8


def test_train_on_another_dataset_writes_and_prints_the_resolved_settings(tmp_path, capsys):
    _write_cifar10(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--model",
            "cnn", "--epochs", "1", "--batch-size", "8", "--out", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())
    assert saved["label_noise"] == 0.0 and saved["m"] is None and saved["augment"] == "basic"
    assert saved["l2_in_loss"] is True and saved["clip_norm"] == 5.0 and saved["nesterov"] is True
    assert "recipe wrn28_10-cifar10" in printed
    assert re.search(r"\* model\s+'cnn'", printed) and re.search(r"  label_noise\s+0\.0", printed)
    assert not (out / "label_noise.json").exists()


# --------------------------------------------------------------------------
# 3. Help shows each default once.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "compare"])
def test_help_shows_each_default_once(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    entries = re.split(r" (?=--[a-z])", text)
    for flag in ("--epochs", "--model", "--label-noise", "--m", "--lr"):
        (entry,) = [e for e in entries if e.startswith(flag + " ")]
        assert entry.count("default") == 1, entry
    assert "default 40 (digits), 200 (cifar10, cifar100, fashion_mnist)" in text
    assert "default 0.4 (digits), 0.0 (cifar10, cifar100, fashion_mnist)" in text


# --------------------------------------------------------------------------
# 4. Without the program extra: the missing packages and the pip command.
# --------------------------------------------------------------------------


def test_missing_extra_is_named_with_the_pip_command(monkeypatch, capsys):
    real_version = importlib.metadata.version

    def version(name):  # as if flax and tqdm were not installed
        if name in ("flax", "tqdm"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert cli.main(["train", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "missing here: flax, tqdm." in err
    assert f"Install it with: pip install -e '{Path(__file__).parent.parent}[program]'" in err


def test_the_extra_checked_is_the_packages_own_program_extra():
    # Read from the installed package's metadata, so it cannot drift from
    # pyproject.toml (the hand-kept list it replaces lacked filelock).
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    declared = pyproject["project"]["optional-dependencies"]["program"]
    names = [re.match(r"[A-Za-z0-9._-]+", r).group() for r in declared]
    assert cli.program_requirements() == names
    assert "filelock" in names and "scipy" not in names
    assert cli.missing_program_packages() == []


# --------------------------------------------------------------------------
# 5. A non-finite loss stops the run; the last good checkpoint is kept.
# --------------------------------------------------------------------------


def test_diverging_run_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(
    tmp_path, capsys
):
    out = tmp_path / "run"
    argv = ["train", "--lr", "1e4", "--epochs", "3", "--checkpoint-every", "1",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 3
    err = capsys.readouterr().err
    assert "non-finite at epoch 1" in err and "last good checkpoint" in err and "--lr" in err
    assert not (out / "summary.json").exists()
    kept = restore_final(out)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(kept["params"]))
    # The diverged epoch is not logged as if it had finished (strict JSON of
    # the lines that are written: tests/test_faults.py).
    metrics = out / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text().strip() == ""


# --------------------------------------------------------------------------
# 6. The CIFAR recipes follow the paper's code.
# --------------------------------------------------------------------------


def test_cifar_recipes_follow_the_papers_code():
    for name in ("wrn28_10-cifar10", "wrn28_10-cifar100", "resnet32-cifar10-noise"):
        c = configs.recipe(name)
        assert (c.l2_in_loss, c.clip_norm, c.nesterov, c.m) == (True, 5.0, True, None), name


def test_program_step_is_the_papers_train_step():
    # The paper's step (google-research/sam) re-expressed on one device, float64:
    # loss = xent + wd/2 |w|^2; g = grad; e = rho g/|g|; v = grad at w + e;
    # v clipped to norm 5; Nesterov momentum with the cosine learning rate.
    with jax.enable_x64(True):
        c = configs.recipe("wrn28_10-cifar10").replace(model="mlp", label_smoothing=0.0, rho=0.3)
        model = models.create_model("mlp", 10)
        params = jax.tree.map(
            lambda x: x.astype(jnp.float64),
            models.init_variables(model, (4, 4, 1), jax.random.key(0))["params"],
        )
        rng = np.random.default_rng(0)
        x, y = jnp.asarray(rng.normal(size=(16, 4, 4, 1))), jnp.asarray(rng.integers(0, 10, 16))
        loss = trainer.make_loss(model, lambda v: v, c.replace(augment="none"), 10)
        objective = lambda p: loss(p, (x, y), None, jax.random.key(1))[0]  # noqa: E731
        tx = trainer.make_optimizer(c, total_steps=10, axis_name=None)  # one device
        state, p = tx.init(params), params
        for _ in range(3):
            updates, state = tx.update(jax.grad(objective)(p), state, p, value_fn=objective)
            p = optax.apply_updates(p, updates)

        def by_hand(w):
            def obj(w):
                logits = model.apply(
                    {"params": w}, x, train=True, rngs={"dropout": jax.random.key(0)}
                )
                xent = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
                return xent + c.weight_decay * 0.5 * sum(jnp.sum(v**2) for v in jax.tree.leaves(w))

            g = jax.grad(obj)(w)
            n = optax.tree.norm(g)
            v = jax.grad(obj)(jax.tree.map(lambda a, b: a + c.rho * b / n, w, g))
            return jax.tree.map(lambda a: a * jnp.minimum(1.0, 5.0 / optax.tree.norm(v)), v)

        lr = optax.cosine_decay_schedule(c.lr, 10)
        w, trace = params, jax.tree.map(jnp.zeros_like, params)
        for t in range(3):
            v = by_hand(w)
            trace = jax.tree.map(lambda m, d: 0.9 * m + d, trace, v)
            step = jax.tree.map(lambda m, d: 0.9 * m + d, trace, v)  # Nesterov
            w = jax.tree.map(lambda a, s, t=t: a - lr(t) * s, w, step)
        assert_trees_close(p, w, rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------
# Stopped (Ctrl-C) and resumed from the middle of an epoch: identical, with the run's own settings.
# --------------------------------------------------------------------------


class _StopAfter(threading.Event):
    """A stop event that reads as set from its (n + 1)-th look: the run stops after n steps
    (the loop looks once before each step), as if Ctrl-C had been pressed then."""

    def __init__(self, steps: int):
        super().__init__()
        self.steps, self.looks = steps, 0

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks > self.steps


def test_a_stopped_run_keeps_its_checkpoint_and_resumes_with_its_own_settings(tmp_path, capsys):
    c = configs.recipe("digits-noise").replace(epochs=2, batch_size=64)
    full, cut = tmp_path / "full", tmp_path / "cut"
    train.train_and_evaluate(c, full, RunOptions(checkpoint_every=5))
    # 21 steps an epoch: checkpoints 5, 10, ..., 21, 25, ..., 40, 42; two kept (40, 42).
    kept = sorted(int(p.name) for p in (full / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [40, 42]
    stopped = RunOptions(checkpoint_every=5, stop=_StopAfter(33))
    # Issue 26, item 10: the steps since the last checkpoint (30) are kept: a
    # checkpoint of the step the run stopped at.
    message = (
        r"stopped by Ctrl-C \(SIGINT\) at step 33 of 42 \(epoch 2 of 2\); "
        r"its checkpoint \(step 33\) is in "
    )
    with pytest.raises(Interrupted, match=message):
        train.train_and_evaluate(c, cut, stopped)
    assert not (cut / "summary.json").exists() and not (cut / ".lock").exists()
    assert int(restore_final(cut)["meter"]["counts"]["loss"]) == 33 - 21  # intact, mid-epoch
    # Resumed from the command line with no setting: the run's own (2 epochs,
    # not the recipe's 40), and it says where it goes on from: the very step.
    assert cli.main(["train", "--out", str(cut), "--resume", "--no-progress"]) == 0
    assert f"resuming {cut} at step 33 of 42 (epoch 2, step 12 of 21)" in capsys.readouterr().out
    a, b = restore_final(full), restore_final(cut)
    del a["wall_seconds"], b["wall_seconds"]
    assert_trees_equal(b, a)
    rows = [json.loads(r) for r in (cut / "metrics.jsonl").read_text().splitlines()]
    full_rows = [json.loads(r) for r in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss", "train_accuracy", "test_accuracy"):
        assert [r[key] for r in rows] == [r[key] for r in full_rows], key
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["test_accuracy"] == full_rows[-1]["test_accuracy"]


def test_sampa_takes_the_last_steps_batch_also_after_a_resume(tmp_path):
    # SAMPa's perturbed gradient is taken on the previous step's batch (the
    # authors' rank 0): a run stopped at the first step of epoch 2 (whose
    # previous batch is epoch 1's last) and resumed ends where the whole run does.
    _, c = configs.resolve(None, {"method": "sampa", "epochs": 2, "batch_size": 64})
    assert c.m is None  # one perturbation per device batch
    full, cut = tmp_path / "full", tmp_path / "cut"
    train.train_and_evaluate(c, full)
    with pytest.raises(Interrupted):
        train.train_and_evaluate(c, cut, RunOptions(stop=_StopAfter(22)))
    train.train_and_evaluate(c, cut, RunOptions(resume=True))
    a, b = restore_final(full), restore_final(cut)
    assert_trees_equal(b["params"], a["params"])
    assert_trees_equal(b["opt_state"], a["opt_state"])


@pytest.mark.slow
# preexec_fn forks a process that runs jax's threads: jax warns; the child runs
# signal.signal alone before exec.
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_run_with_a_checkpoint_of_that_step(signum, tmp_path):
    # Issue 26, items 10 and 11: `python -m sam_optax` in a process of its own,
    # stdout a pipe (not a terminal): a line per epoch arrives while it runs;
    # Ctrl-C (SIGINT) or a cluster's SIGTERM then stops it within a second,
    # exit 128 + the signal, with a checkpoint of the step it stopped at.
    out = tmp_path / "run"
    argv = ["train", "--epochs", "60", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sam_optax", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A background job of a non-interactive shell (CI, this test's own
        # runner) starts with SIGINT ignored, and Python then installs no handler.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        lines = []
        while not (lines and lines[-1].startswith("epoch 2/60: train loss")):
            lines.append(proc.stdout.readline())
            assert lines[-1], "".join(lines) + proc.stderr.read()
        assert proc.poll() is None, "the epoch lines came only at the end"
        sent = time.monotonic()
        proc.send_signal(signum)
        rest, err = proc.communicate(timeout=120)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 128 + signum, err
    assert took < 30, took  # the step it was at, a checkpoint, the exit (a busy machine)
    assert "Traceback" not in err and "ERROR" not in err
    first, second = err.strip().splitlines()
    name = {signal.SIGINT: r"Ctrl-C \(SIGINT\)", signal.SIGTERM: "SIGTERM"}[signum]
    found = re.fullmatch(
        rf"sam-optax: stopped by {name} at step (\d+) of 1260 \(epoch \d+ of 60\); "
        r"its checkpoint \(step (\d+)\) is in (.+)\.",
        first,
    )
    assert found and found.group(1) == found.group(2), first
    assert found.group(3) == str(out / "checkpoints"), first
    assert second == f"sam-optax: continue with: sam-optax train --out {out} --resume"
    stopped_at = int(found.group(1))
    assert 42 <= stopped_at < 1260 and "epoch 60/60" not in rest
    latest = max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert latest == stopped_at
    state = restore_final(out)  # reads back whole
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state["params"]))
    assert not (out / ".lock").exists() and not (out / "summary.json").exists()
    # --resume goes on from that very step (stopped again before its first step here).
    config = configs.Config.from_dict(json.loads((out / "config.json").read_text()))
    with pytest.raises(Interrupted, match=rf"at step {stopped_at} of 1260"):
        train.train_and_evaluate(config, out, RunOptions(resume=True, stop=_StopAfter(0)))


@pytest.mark.slow
def test_a_reader_that_stops_reading_stops_the_run_at_a_checkpoint(tmp_path):
    # `sam-optax train | head -3`: the epoch lines meet a closed pipe. The run
    # stops as at a signal: the epoch's checkpoint, the resume command on
    # stderr, exit 141 (128 + SIGPIPE).
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sam_optax", "train", "--epochs", "30", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().startswith("sam-optax train --epochs 30")
        # Close after the first epoch's line: a pipe closed during the settings
        # (two writes under PYTHONUNBUFFERED) ends the program before any work.
        for line in proc.stdout:
            if line.startswith("epoch 1/30"):
                break
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 128 + signal.SIGPIPE, err
    assert "stopped by a closed stdout" in err and "--resume" in err, err
    assert "Traceback" not in err, err
    steps = [int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps and max(steps) >= 21, steps  # an epoch is 21 steps: at least its checkpoint
    assert f"at step {max(steps)} of 630" in err, err
    assert not (out / ".lock").exists()


def test_without_jax_preemption_service_a_distributed_run_does_not_stop(monkeypatch):
    # reached_preemption_sync_point raises without the service: no crash, no stop.
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    stop = threading.Event()
    stop.set()
    jax.config.update("jax_enable_preemption_service", False)
    try:
        assert train._stop_signal(RunOptions(stop=stop), 5) is None
    finally:
        jax.config.update("jax_enable_preemption_service", True)


def test_epoch_lines_unless_the_progress_bars_show_on_a_terminal(monkeypatch):
    def options(stdout, stderr, *flags):
        monkeypatch.setattr(sys, "stdout", stdout)
        monkeypatch.setattr(sys, "stderr", stderr)
        o = cli._options(cli.build_parser().parse_args(["train", *flags]), None)
        return o.progress, o.epoch_lines

    pipe, tty = io.StringIO, _Terminal
    assert options(pipe(), pipe()) == (False, True)  # a log file or CI: one line per epoch
    assert options(tty(), tty()) == (True, False)  # a terminal: the progress bar
    assert options(pipe(), tty()) == (True, True)  # `sam-optax train > log`: both
    assert options(tty(), tty(), "--no-progress") == (False, True)


# --------------------------------------------------------------------------
# What a run leaves and prints: no progress bars off a terminal, no .lock, files as any.
# --------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_only_on_a_terminal_unless_asked(monkeypatch):
    def progress(*flags):
        return cli._options(cli.build_parser().parse_args(["train", *flags]), None).progress

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress() is False and progress("--progress") is True
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert progress() is True and progress("--no-progress") is False


def test_a_finished_run_leaves_no_lock_and_its_files_honour_the_umask(tmp_path, capsys):
    out = tmp_path / "run"
    previous = os.umask(0o022)
    try:
        assert cli.main(["train", "--epochs", "1", "--out", str(out)]) == 0
    finally:
        os.umask(previous)
    assert capsys.readouterr().err == ""  # stderr is not a terminal here: no progress bar
    assert not (out / ".lock").exists()
    for name in ("config.json", "label_noise.json", "metrics.jsonl", "summary.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    previous = os.umask(0o077)
    try:
        write_atomic(tmp_path / "private.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600


def test_program_model_names_match_the_models():
    assert set(configs.MODELS) == set(models.MODELS)


# --------------------------------------------------------------------------
# The efficient family in the program: diagnostics per epoch, the Pareto comparison.
# --------------------------------------------------------------------------


def test_compare_methods_reports_costs_and_writes_the_pareto_figure(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--method", "sgd,looksam,msam", "--epochs", "2", "--seeds", "0",
            "--looksam-every", "3", "--out", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert sorted(r["optimizer"] for r in results["runs"]) == ["looksam", "msam", "sgd", "sgd"]
    rows = {r["method"]: r for r in results["table"]}
    assert set(rows) == {"SGD", "LookSAM", "MSAM"}
    assert rows["MSAM"]["gradients_per_step"] == 1.0
    assert 1.0 < rows["LookSAM"]["gradients_per_step"] < 2.0  # every 3rd step is SAM's
    assert all(r["cost_vs_sgd"] > 0 for r in rows.values())
    md = (out / "results.md").read_text()
    assert "| LookSAM | 0.2 | 8 | 2 |" in md and "gradients / step" in md
    # Each method's own radius: MSAM's is --msam-rho (1 by default), not --rho.
    assert "| MSAM | 1 | 8 | 2 |" in md and rows["MSAM"]["rho"] == 1.0
    assert (out / "runs" / "msam-rho1-m8-e2-seed0" / "summary.json").is_file()
    # The report is the user's numbers, not a development target.
    assert "Goal" not in md and "Met by" not in md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The diagnostics, per epoch, from the method's state.
    metrics = [json.loads(x) for x in (out / "runs" / "looksam-rho0.2-m8-e2-seed0" / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    for row in metrics:
        assert 0 < row["sam_fraction"] < 1 and row["sharpness"] is not None
        assert -1 <= row["cosine"] <= 1 and row["grad_norm"] > 0
    sgd = [json.loads(x) for x in (out / "runs" / "sgd-rho0-mall-e2-seed0" / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert sgd[0]["sharpness"] is None and sgd[0]["sam_fraction"] == 0.0


def test_every_method_trains_through_the_program(tmp_path):
    # Two epochs of each on the default task's data, labels clean: well above
    # chance (0.1). ESAM takes the device batch as its group (here 8 devices
    # of 8 examples, of which it descends on 3: it learns the slowest).
    for method in configs.METHODS:
        _, c = configs.resolve(None, {"epochs": 2, "method": method, "label_noise": 0.0})
        assert c.m == (8 if configs.METHODS[method].groups else None)
        summary = train.train_and_evaluate(c, tmp_path / method)
        assert summary["method"] == method and summary["test_accuracy"] > 0.2, summary


# --------------------------------------------------------------------------
# Meshes: data x model, and perturbations shared within groups of devices.
# --------------------------------------------------------------------------


def test_train_on_a_data_by_model_mesh_equals_the_data_parallel_run(tmp_path):
    # m = 8 on 8 replicas of 8, or on 4 replicas of 16 (two groups each): the same
    # groups of examples, so the same step; the params are sharded over 'model'.
    c = configs.recipe("digits-noise").replace(epochs=2)
    train.train_and_evaluate(c, tmp_path / "flat")
    summary = train.train_and_evaluate(c.replace(mesh="data=4,model=2"), tmp_path / "2d")
    a, b = restore_final(tmp_path / "flat"), restore_final(tmp_path / "2d")
    assert_trees_close(b["params"], a["params"], rtol=2e-5, atol=1e-6)
    assert summary["devices"] == 8
    built = trainer.build_trainer(c.replace(mesh="data=4,model=2", epochs=1))
    w = built.initial_state["params"]["Dense_0"]["kernel"]
    assert w.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    assert built.mesh.shape == {"data": 4, "model": 2}


def test_sync_group_shares_one_perturbation_per_group_of_devices(tmp_path):
    c = configs.recipe("digits-noise").replace(epochs=1, m=None)
    train.train_and_evaluate(c, tmp_path / "own")
    train.train_and_evaluate(c.replace(sync_group=4), tmp_path / "group")
    a, b = restore_final(tmp_path / "own")["params"], restore_final(tmp_path / "group")["params"]
    diff = max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )
    assert diff > 1e-4
    built = trainer.build_trainer(c.replace(sync_group=4))
    assert built.mesh.shape == {"data": 2, "sync": 4, "model": 1}


@pytest.mark.parametrize(
    "flags, match",
    [
        (
            ["--mesh", "data=3,model=2"],
            "--mesh 'data=3,model=2' makes a mesh of data x model = 3 x 2 = 6 devices, "
            "but 8 devices are here: the mesh must use every device (data x model = 8), "
            "e.g. --mesh data=8 or --mesh data=4,model=2",
        ),
        (["--mesh", "data=3"], "= 3 x 1 = 3 devices, but 8 devices are here"),
        (["--mesh", "data=3,model=5"], "= 3 x 5 = 15 devices, but 8 devices are here"),
        (["--mesh", "model=3"], "cannot be split into model groups of 3"),
        (["--mesh", "pipeline=8"], "--mesh must look like 'data=4,model=2'"),
        (
            ["--sync-group", "3", "--m", "batch"],
            "--sync-group 3 does not divide the 8 data replicas",
        ),
    ],
)
def test_mesh_errors_name_the_flag(flags, match, tmp_path, capsys):
    argv = ["train", "--epochs", "1", *flags, "--out", str(tmp_path / "r"), "--no-progress"]
    assert cli.main(argv) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("spec", ["data=2,model=4", "data=3,model=5", "data=8", "model=2"])
def test_a_mesh_larger_than_one_device_is_a_usage_error_not_a_crash(spec):
    # Issue 20, item 1: on one device these divided by zero.
    config = configs.recipe("digits-noise").replace(mesh=spec)
    with pytest.raises(UsageError, match=r"--mesh .*1 device is here|--mesh .*the 1 device here"):
        configs.validate(config, n_devices=1)


# --------------------------------------------------------------------------
# Issue 26: a new user's report. Every refusal exits 2, names the flag or
# file and the fix, and changes nothing in the run directory.
# --------------------------------------------------------------------------


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["train", "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"rho": 0.2, ', "is not valid JSON (Expecting property name enclosed in double "
         "quotes: line 1, column 14)"),
        ('{"rho": "lots"}', """'rho' is "lots", expected a number (flag --rho)"""),
        ('{"epochs": 2.5}', "'epochs' is 2.5, expected an integer (flag --epochs)"),
        ('{"nesterov": "yes"}', """'nesterov' is "yes", expected true or false"""),
        ('{"methd": "sam"}', "'methd' is no setting (did you mean 'method'?)"),
        ('{"rho": -1}', "'rho' must be >= 0, got -1.0"),
        ('{"method": "samm"}', "'method': unknown 'samm' (did you mean 'sam'?)"),
        ("[1, 2]", "expected a JSON object of settings, got list"),
    ],
)  # fmt: skip
def test_a_corrupt_config_json_is_named_with_the_field_and_the_fix(
    text, expected, finished_run, tmp_path, capsys
):
    # Issue 26, item 2: a raw JSONDecodeError or ValueError traceback before.
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "summary.json").unlink()
    (run / "config.json").write_text(text)
    before = _snapshot(run)
    config_file = run / "config.json"
    for argv in (["train", "--out", str(run), "--resume"], ["analyze", str(run)],
                 ["train", "--config", str(config_file), "--out", str(tmp_path / "new")]):  # fmt: skip
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"sam-optax: error: {config_file}") and expected in err, err
        assert "Repair it" in err and "Traceback" not in err
    assert _snapshot(run) == before
    assert not (tmp_path / "new").exists()


def test_a_corrupt_compare_json_is_named(tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "compare.json").write_text(
        '{"base": {"rho": "lots"}, "methods": [], "rhos": [], "seeds": []}'
    )
    assert cli.main(["compare", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f'{out / "compare.json"}, in "base": \'rho\' is "lots", expected a number' in err
    (out / "compare.json").write_text("{")
    assert cli.main(["compare", "--out", str(out), "--resume"]) == 2
    assert "is not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "compare"])
def test_an_out_under_a_file_is_a_usage_error(command, tmp_path, capsys):
    # Issue 26, item 3: a NotADirectoryError traceback from rundir.py before.
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    for out, expected in [
        (a_file / "x", f"--out {a_file / 'x'} cannot be created: {a_file} is a file, not a directory; choose another --out."),
        (a_file / "x" / "y", f"cannot be created: {a_file} is a file"),
        (a_file, f"--out {a_file} is a file, not a directory; choose another --out"),
    ]:  # fmt: skip
        assert cli.main([command, "--epochs", "1", "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err
    assert a_file.read_text() == "mine"


def test_after_a_divergence_the_message_names_a_retry_that_works(tmp_path, capsys):
    # Issue 26, item 12: the same --out was refused ("already exists ... pass
    # --resume"), and --resume kept the bad --lr.
    out = tmp_path / "run"
    argv = ["train", "--epochs", "1", "--lr", "200", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 3
    err = capsys.readouterr().err
    retry = re.search(r"replacing this run: (.+)\n", err).group(1)
    assert retry == f"sam-optax train --epochs 1 --no-progress --lr 20 --out {out} --overwrite"
    again = ["train", "--epochs", "1", "--lr", "20", "--out", str(out), "--no-progress"]
    assert cli.main(again) == 2  # the obvious retry, refused as before, now names --overwrite
    assert "--overwrite to replace it" in capsys.readouterr().err
    assert cli.main(shlex.split(retry)[1:]) == 0
    assert json.loads((out / "config.json").read_text())["lr"] == 20
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1
    # --resume with another --lr names --overwrite too; a resumed run that
    # diverges is retried from its own config.json.
    assert cli.main(["train", "--out", str(out), "--resume", "--lr", "3"]) == 2
    assert "with --overwrite instead of --resume" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(out), "--resume", "--overwrite"]) == 2
    assert "pass one of them" in capsys.readouterr().err


def test_overwrite_replaces_only_a_directory_of_sam_optax(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    for command in ("train", "compare"):
        assert cli.main([command, "--epochs", "1", "--out", str(mine), "--overwrite"]) == 2
        assert "nothing was deleted" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "keep me"


def test_overwrite_starts_a_new_directory(tmp_path, capsys):
    # Scripts that always pass --overwrite: the first run has no directory yet.
    for command in ("train", "compare"):
        out = tmp_path / command
        argv = [command, "--epochs", "1", "--no-progress", "--out", str(out), "--overwrite"]
        if command == "compare":
            argv += ["--method", "sgd", "--seeds", "1"]
        assert cli.main(argv) == 0, capsys.readouterr().err
        assert (out / ("config.json" if command == "train" else "compare.json")).is_file()
        assert not (out / ".lock").exists()


def test_overwrite_empties_a_comparison_unless_one_of_its_runs_is_in_use(tmp_path):
    out = tmp_path / "cmp"
    run = out / "runs" / "sam-rho0.2-m8-e1-seed0"
    run.mkdir(parents=True)
    (out / "compare.json").write_text("{}")
    (run / "config.json").write_text("{}")
    lock = lock_directory(run)  # as a process training that run holds it
    try:
        with pytest.raises(RunDirError, match="is in use by another sam-optax process"):
            clear_for_overwrite(out, "compare.json")
        assert (run / "config.json").is_file()
    finally:
        lock.release()
    clear_for_overwrite(out, "compare.json")
    assert list(out.iterdir()) == []


def test_config_takes_a_saved_config_json_or_run_directory(finished_run, tmp_path, capsys):
    # Issue 26, item 13: recipe names only before.
    saved = configs.Config.from_dict(json.loads((finished_run / "config.json").read_text()))
    for given in (finished_run, finished_run / "config.json"):
        argv = ["train", "--config", str(given), "--lr", "0.1"]
        name, config = cli.config_from_args(cli.build_parser().parse_args(argv))
        assert name == str(given) and config == saved.replace(lr=0.1)
    out = tmp_path / "again"
    argv = [
        "train",
        "--config",
        str(finished_run),
        "--seed",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"settings (from {finished_run}; * = changed by a flag):" in printed
    assert re.search(r"\* seed\s+1", printed) and re.search(r"  epochs\s+1\n", printed)
    # Issue 26, item 15: the settings this run uses (not GSAM's, ESAM's, ...).
    assert "gsam_alpha" not in printed and "esam_beta" not in printed
    assert "(14 settings that this run does not use are not shown)" in printed
    assert configs.Config.from_dict(json.loads((out / "config.json").read_text())) == saved.replace(
        seed=1
    )
    for given, expected in [
        (tmp_path / "nope.json", f"--config {tmp_path / 'nope.json'}: no such file."),
        (tmp_path, "a directory without config.json"),
        ("nope", "or the path of a saved config.json"),
    ]:
        assert cli.main(["train", "--config", str(given), "--out", str(tmp_path / "x")]) == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_install_hint_works_where_the_package_came_from(monkeypatch, tmp_path):
    # Issue 26, item 9: `pip install 'sam-optax[program]'` fails from a clone
    # (PyPI has no sam-optax); the clone's own path works from anywhere.
    root = Path(__file__).parent.parent
    assert cli.install_hint() == f"pip install -e '{root}[program]'"  # this clone
    # Installed into site-packages (no sam-optax pyproject.toml above the
    # package): pip reads the extra from the installed package's metadata.
    monkeypatch.setattr(cli, "PACKAGE_PARENT", tmp_path / "site-packages")
    assert cli.install_hint() == "pip install 'sam-optax[program]'"
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "pyproject.toml").write_text('[project]\nname = "other"\n')
    assert cli.install_hint() == "pip install 'sam-optax[program]'"
    # Run from a clone, not installed at all: the extra read from its pyproject.toml.
    monkeypatch.setattr(cli, "PACKAGE_PARENT", root)
    monkeypatch.setattr(cli, "_installed", lambda: None)
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    declared = pyproject["project"]["optional-dependencies"]["program"]
    assert cli.program_requirements() == [re.match(r"[A-Za-z0-9._-]+", r).group() for r in declared]
    monkeypatch.setattr(cli, "PACKAGE_PARENT", tmp_path)
    assert cli.program_requirements() == []  # nothing to read: nothing checked


def test_analyze_on_a_comparison_lists_its_runs(finished_run, tmp_path, capsys):
    # Issue 26, item 14: "not a run directory" before.
    out = tmp_path / "cmp"
    (out / "runs").mkdir(parents=True)
    (out / "compare.json").write_text("{}")
    names = ["sam-rho0.2-m8-e1-seed0", "sgd-rho0-mall-e1-seed0"]
    for name in names:
        shutil.copytree(finished_run, out / "runs" / name)
    assert cli.main(["analyze", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"sam-optax: error: {out} is a comparison (`sam-optax compare`), not one run; analyze "
        f"one of its 2 runs:\n  sam-optax analyze {out / 'runs' / names[0]}\n"
        f"  sam-optax analyze {out / 'runs' / names[1]}\n"
    )
    assert cli.main(["analyze", str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_of_a_comparison_analyzes_as_listed(finished_run, tmp_path, capsys):
    out = tmp_path / "cmp"
    (out / "runs").mkdir(parents=True)
    (out / "compare.json").write_text("{}")
    shutil.copytree(finished_run, out / "runs" / "sam-rho0.2-m8-e1-seed0")
    assert cli.main(["analyze", str(out)]) == 2
    (listed,) = re.findall(r"^  (sam-optax analyze .+)$", capsys.readouterr().err, re.M)
    fast = ["--examples", "64", "--iterations", "6", "--no-plots"]
    assert cli.main([*shlex.split(listed)[1:], *fast]) == 0
    assert (out / "runs" / "sam-rho0.2-m8-e1-seed0" / "analysis" / "analysis.json").is_file()


def test_analyze_refuses_bad_flags_before_any_work(finished_run, capsys):
    for flags, expected in (
        (["--examples", "0"], "--examples must be at least 1"),
        (["--examples", "-5"], "--examples must be at least 1"),
        (["--iterations", "1"], "--iterations must be at least 5"),
        (["--rho", "-1"], "--rho must be a finite radius > 0, got -1.0"),
        (["--rho", "nan"], "--rho must be a finite radius > 0, got nan"),
    ):
        assert cli.main(["analyze", str(finished_run), *flags]) == 2, flags
        assert expected in capsys.readouterr().err
    assert not (finished_run / "analysis").exists()


def test_compare_refuses_a_seed_or_method_named_twice(tmp_path, capsys):
    # One run counted twice would show a spread (± 0.0) made of one result.
    for flags, named in ((["--seeds", "0,0"], "0"), (["--method", "sam,sgd,sam"], "sam")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["compare", "--out", str(tmp_path / "cmp"), *flags])
        assert exit_.value.code == 2
        assert f"{named} given more than once" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_out_the_system_refuses_is_named_even_for_root(tmp_path, capsys):
    # os.access says yes to root everywhere: the refusal comes from mkdir.
    for command in ("train", "compare"):
        assert cli.main([command, "--epochs", "1", "--out", "/proc/sam-optax-run"]) == 2
        err = capsys.readouterr().err
        assert "--out /proc/sam-optax-run cannot be created" in err and "Traceback" not in err


@pytest.mark.slow
def test_analyze_skips_an_unreadable_last_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--epochs", "2", "--out", str(out), "--no-progress"]) == 0
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) >= 2, steps

    def corrupt(step):
        for f in (out / "checkpoints" / str(step)).rglob("*"):
            if f.is_file():
                f.write_bytes(b"")

    corrupt(steps[-1])
    fast = ["--examples", "64", "--iterations", "6", "--no-plots"]
    capsys.readouterr()
    assert cli.main(["analyze", str(out), *fast]) == 0
    err = capsys.readouterr().err
    assert f"checkpoint {out / 'checkpoints' / str(steps[-1])} is unreadable" in err, err
    assert (out / "checkpoints" / str(steps[-1])).is_dir()  # analyze deletes nothing
    for step in steps:
        corrupt(step)
    assert cli.main(["analyze", str(out), *fast]) == 2
    assert "none of its checkpoints" in capsys.readouterr().err


def test_train_names_the_radius_flag_of_a_method_with_its_own(tmp_path, capsys):
    # --method msam --rho 0.5 used to run at --msam-rho's 1.0, silently.
    out = tmp_path / "msam"
    assert cli.main(["train", "--method", "msam", "--rho", "0.5", "--out", str(out)]) == 2
    assert "Pass --msam-rho 0.5 instead" in capsys.readouterr().err
    assert not out.exists()
