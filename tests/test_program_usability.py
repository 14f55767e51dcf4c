"""The program as a user meets it: recipes per dataset, help, missing extras,
divergence, the paper's CIFAR recipe, step-level checkpoints."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sam_optax.program import cli
from sam_optax.program import configs
from sam_optax.program import models
from sam_optax.program import train
from sam_optax.program.rundir import restore_final

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


def test_missing_extra_is_named_with_the_pip_command(tmp_path):
    for name in ("tqdm", "flax"):  # shadow two packages of the extra
        (tmp_path / f"{name}.py").write_text(f'raise ImportError("No module named {name}")\n')
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [sys.executable, "-m", "sam_optax", "train", "--epochs", "1"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "missing here: flax, tqdm" in proc.stderr
    assert "pip install 'sam-optax[program]'" in proc.stderr


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
        loss = train.make_loss(model, lambda v: v, c.replace(augment="none"), 10)
        objective = lambda p: loss(p, (x, y), None, jax.random.key(1))[0]  # noqa: E731
        tx = train.make_optimizer(c, total_steps=10, axis_name=None)  # one device
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
# Step-level checkpoints: a run resumed from the middle of an epoch ends identical.
# --------------------------------------------------------------------------


def test_resume_from_a_mid_epoch_checkpoint_ends_identical(tmp_path):
    c = configs.recipe("digits-noise").replace(epochs=2, batch_size=64)
    full, cut = tmp_path / "full", tmp_path / "cut"
    train.train_and_evaluate(c, full, progress=False, checkpoint_every=5)
    train.train_and_evaluate(c, cut, progress=False, checkpoint_every=5)
    # 21 steps an epoch: checkpoints 5, 10, ..., 21, 25, ..., 40, 42; two kept (40, 42).
    kept = sorted(int(p.name) for p in (cut / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [40, 42]
    import shutil

    shutil.rmtree(cut / "checkpoints" / "42")  # as if killed after step 40 of 42
    (cut / "summary.json").unlink()
    summary = train.train_and_evaluate(c, cut, resume=True, progress=False, checkpoint_every=5)
    a, b = restore_final(full), restore_final(cut)
    del a["wall_seconds"], b["wall_seconds"]
    assert_trees_equal(b, a)
    rows = [json.loads(r) for r in (cut / "metrics.jsonl").read_text().splitlines()]
    full_rows = [json.loads(r) for r in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss", "train_accuracy", "test_accuracy"):
        assert [r[key] for r in rows] == [r[key] for r in full_rows], key
    assert summary["test_accuracy"] == full_rows[-1]["test_accuracy"]


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
    assert "| LookSAM | 0.2 | 8 | 2 |" in md and "gradients / step" in md and "Goal:" in md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The diagnostics, per epoch, from the method's state.
    metrics = [json.loads(x) for x in (out / "runs" / "looksam-rho0.2-m8-e2-seed0" / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    for row in metrics:
        assert 0 < row["sam_fraction"] < 1 and row["sharpness"] is not None
        assert -1 <= row["cosine"] <= 1 and row["grad_norm"] > 0
    sgd = [json.loads(x) for x in (out / "runs" / "sgd-rho0-mall-e2-seed0" / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert sgd[0]["sharpness"] is None and sgd[0]["sam_fraction"] == 0.0


def test_every_method_trains_through_the_program(tmp_path):
    for method in configs.METHODS:
        c = configs.recipe("digits-noise").replace(epochs=1, method=method)
        summary = train.train_and_evaluate(c, tmp_path / method, progress=False)
        assert summary["method"] == method and summary["test_accuracy"] > 0.3, summary


# --------------------------------------------------------------------------
# Meshes: data x model, and perturbations shared within groups of devices.
# --------------------------------------------------------------------------


def test_train_on_a_data_by_model_mesh_equals_the_data_parallel_run(tmp_path):
    # m = 8 on 8 replicas of 8, or on 4 replicas of 16 (two groups each): the same
    # groups of examples, so the same step; the params are sharded over 'model'.
    c = configs.recipe("digits-noise").replace(epochs=2)
    train.train_and_evaluate(c, tmp_path / "flat", progress=False)
    summary = train.train_and_evaluate(
        c.replace(mesh="data=4,model=2"), tmp_path / "2d", progress=False
    )
    a, b = restore_final(tmp_path / "flat"), restore_final(tmp_path / "2d")
    assert_trees_close(b["params"], a["params"], rtol=2e-5, atol=1e-6)
    assert summary["devices"] == 8
    trainer = train.build_trainer(c.replace(mesh="data=4,model=2", epochs=1))
    w = trainer.state["params"]["Dense_0"]["kernel"]
    assert w.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    assert trainer.mesh.shape == {"data": 4, "model": 2}


def test_sync_group_shares_one_perturbation_per_group_of_devices(tmp_path):
    c = configs.recipe("digits-noise").replace(epochs=1, m=None)
    train.train_and_evaluate(c, tmp_path / "own", progress=False)
    train.train_and_evaluate(c.replace(sync_group=4), tmp_path / "group", progress=False)
    a, b = restore_final(tmp_path / "own")["params"], restore_final(tmp_path / "group")["params"]
    diff = max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )
    assert diff > 1e-4
    trainer = train.build_trainer(c.replace(sync_group=4))
    assert trainer.mesh.shape == {"data": 2, "sync": 4, "model": 1}


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--mesh", "data=3,model=2"], "needs 6 devices, 8 are here"),
        (["--mesh", "pipeline=8"], "--mesh must look like 'data=4,model=2'"),
        (
            ["--sync-group", "3", "--m", "batch"],
            "--sync-group 3 does not divide the 8 data replicas",
        ),
    ],
)
def test_mesh_errors_name_the_flag(flags, match, tmp_path, capsys):
    assert (
        cli.main(["train", "--epochs", "1", *flags, "--out", str(tmp_path / "r"), "--no-progress"])
        == 2
    )
    assert match in capsys.readouterr().err
