"""The ``sam-optax`` program: models, augmentation, CLI errors, smoke runs, resume."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_optax.program import augment
from sam_optax.program import cli
from sam_optax.program import configs
from sam_optax.program import models

# --------------------------------------------------------------------------
# Models and augmentation.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, shape, classes, approx_params",
    [
        ("mlp", (8, 8, 1), 10, 85_002),
        ("cnn", (8, 8, 1), 10, 87_274),
        ("resnet20", (32, 32, 3), 10, 0.27e6),
        ("resnet32", (32, 32, 3), 10, 0.47e6),
        ("wrn28_10", (32, 32, 3), 10, 36.5e6),
        ("wrn28_10", (32, 32, 3), 100, 36.5e6),
    ],
)
def test_model_output_shape_and_parameter_count(name, shape, classes, approx_params):
    model = models.create_model(name, classes)
    variables = jax.eval_shape(lambda k: models.init_variables(model, shape, k), jax.random.key(0))
    n = models.count_params(variables["params"])
    assert abs(n - approx_params) / approx_params < 0.01, n
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, *shape)), train=False), variables)
    assert out.shape == (2, classes)
    assert ("batch_stats" in variables) == (name != "mlp")


def test_models_train_mode_uses_dropout_and_batch_stats():
    model = models.create_model("cnn", 10, dropout=0.5)
    variables = models.init_variables(model, (8, 8, 1), jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))

    def run(k):
        return model.apply(variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": k})

    a, stats = run(jax.random.key(2))
    b, _ = run(jax.random.key(3))
    assert not np.allclose(a, b)
    assert not np.allclose(
        stats["batch_stats"]["BatchNorm_0"]["mean"], variables["batch_stats"]["BatchNorm_0"]["mean"]
    )
    with pytest.raises(ValueError, match="valid choices"):
        models.create_model("vgg", 10)


def test_flip_crop_and_cutout():
    x = jnp.arange(2 * 6 * 6 * 1, dtype=jnp.float32).reshape(2, 6, 6, 1) + 1
    key = jax.random.key(0)
    y = augment.flip_crop(x, key, pad=2)
    assert y.shape == x.shape
    np.testing.assert_array_equal(y, augment.flip_crop(x, key, pad=2))
    # every output pixel is an input pixel of the same image (or padding zero)
    for i in range(2):
        assert set(np.asarray(y[i]).ravel()) <= set(np.asarray(x[i]).ravel()) | {0.0}
    z = augment.cutout(jnp.ones((8, 10, 10, 3)), key, size=4)
    zeros_per_image = np.asarray((z == 0).all(-1).sum((1, 2)))
    assert zeros_per_image.max() == 16 and zeros_per_image.min() >= 4  # clipped at borders
    assert augment.augment(x, key, "none") is x


# --------------------------------------------------------------------------
# Command line: errors before any work, and never overwriting.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, match",
    [
        (["train", "--dataset", "svhn"], "valid choices: digits, cifar10, cifar100, fashion_mnist"),
        (["train", "--model", "vgg"], "valid choices: mlp, cnn"),
        (["train", "--config", "nope"], "valid choices: digits-noise"),
        (["train", "--rho", "-0.1"], "--rho must be >= 0"),
        (["train", "--label-noise", "1.0"], r"--label-noise must be in \[0, 1\)"),
        (["train", "--label-noise", "-0.1"], r"--label-noise must be in \[0, 1\)"),
        (["train", "--batch-size", "64", "--m", "3"], "not divisible by devices x m = 8 x 3"),
        (["train", "--batch-size", "12"], "does not split over 8 devices"),
        (["compare", "--rho", "0,-1"], "--rho must be a comma list of numbers >= 0"),
        (["train", "--augment", "autoaugment"], "valid choices: none, basic, cutout"),
        (["train", "--resume"], "--resume needs --out"),
        (["train", "--m", "0"], r"--m must be >= 1 \(or batch\), got 0\."),
        (["train", "--sync-group", "0"], r"--sync-group must be >= 1 \(or none\), got 0\."),
        (["train", "--clip-norm", "0"], r"--clip-norm must be > 0 \(or none\), got 0\.0\."),
        (["train", "--norm", "1"], r"--norm must be > 1 \(inf for the sign\), got 1\.0\."),
        (["train", "--method", "msam", "--adaptive"], "--method msam takes neither --adaptive"),
    ],
)
def test_bad_input_is_refused_before_any_work(argv, match, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main([*argv, "--out", str(out)] if "--resume" not in argv else argv)
    assert code == 2
    assert __import__("re").search(match, capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["train", "--clip-norm", "abc"], "argument --clip-norm: expected a number or 'none', got 'abc'"),
        (["train", "--epochs", "x"], "argument --epochs: expected an integer, got 'x'"),
        (["train", "--m", "eight"], "argument --m: expected an integer or 'batch', got 'eight'"),
        (["train", "--checkpoint-every", "0"], "argument --checkpoint-every: expected an integer >= 1"),
        (["compare", "--rho", "0,x"], "argument --rho: expected a comma list of numbers, got '0,x'"),
        (["compare", "--seeds", "0,a"], "argument --seeds: expected a comma list of integers"),
    ],
)  # fmt: skip
def test_unparsable_values_exit_2_naming_the_flag_and_what_was_expected(argv, match, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "invalid" not in err


def test_existing_out_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert cli.main(["train", "--epochs", "1", "--out", str(out), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]


def test_help_documents_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--dataset",
        "--data-dir",
        "--model",
        "--epochs",
        "--batch-size",
        "--lr",
        "--weight-decay",
        "--rho",
        "--norm",
        "--adaptive",
        "--m",
        "--sync-perturbation",
        "--label-noise",
        "--label-smoothing",
        "--augment",
        "--seeds",
        "--out",
        "--resume",
        "--config",
    ):
        assert flag in text, flag
    assert "default" in text and "0.4" in text


def test_config_flags_override_the_recipe():
    args = cli.build_parser().parse_args(
        ["train", "--config", "wrn28_10-cifar100", "--epochs", "3", "--m", "batch", "--nesterov"]
    )
    name, c = cli.config_from_args(args)
    assert name == "wrn28_10-cifar100"
    assert (c.dataset, c.model, c.rho, c.lr, c.epochs, c.m, c.nesterov) == (
        "cifar100",
        "wrn28_10",
        0.1,
        0.1,
        3,
        None,
        True,
    )
    assert cli.config_from_args(cli.build_parser().parse_args(["train"])) == (
        "digits-noise",
        configs.recipe("digits-noise"),
    )


# --------------------------------------------------------------------------
# Smoke runs of the real entry points.
# --------------------------------------------------------------------------


def test_train_smoke(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(
        [
            "train",
            "--epochs",
            "2",
            "--model",
            "cnn",
            "--augment",
            "basic",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer"] == "sam" and summary["devices"] == 8
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    flipped = json.loads((out / "label_noise.json").read_text())["flipped"]
    assert len(flipped) == round(0.4 * 1347)
    assert "test accuracy" in capsys.readouterr().out


def test_compare_smoke(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--epochs", "2", "--seeds", "0,1", "--rho", "0,0.1", "--out", str(out)]
    code = cli.main([*argv, "--no-progress"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 2 * 3  # per seed: SGD at 2 and 4 epochs, SAM at 2
    for run in results["runs"]:
        assert {
            "optimizer",
            "rho",
            "m",
            "seed",
            "label_noise",
            "epochs",
            "test_accuracy",
            "wall_seconds",
        } <= set(run)
    assert {r["epochs"] for r in results["runs"] if r["optimizer"] == "sgd"} == {2, 4}
    md = (out / "results.md").read_text()
    assert "| SAM | 0.1 |" in md and "| SGD | 0 |" in md and "±" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Issue 26, item 15: the SGD row reported is the unit of the epoch times;
    # the columns are explained; the last line names everything written.
    (sgd,) = [r for r in results["table"] if r["optimizer"] == "sgd"]
    assert sgd["cost_vs_sgd"] == 1.0 and re.search(r"\| SGD \| 0 \|.*\| 1\.00 \| 1\.00 \| - \|", md)
    assert "divided by that of the SGD row above" in md and "the share of SAM's gain" in md
    printed = capsys.readouterr().out
    wrote = printed.strip().splitlines()[-1]
    assert wrote.startswith(f"Wrote in {out}: compare.json (the grid), runs/ (")
    for entry in out.iterdir():
        assert entry.name + ("/" if entry.is_dir() else "") + " (" in wrote, entry
    # The settings printed: those the runs use, the grid on a line of its own.
    assert (
        "grid: SGD (rho 0, at 1x and 2x the epochs), sam at --rho 0.1; seeds 0,1: 6 runs" in printed
    )
    assert "gsam_alpha" not in printed and not re.search(r"^  [ *] seed ", printed, re.M)
    # resuming a finished comparison reuses every run, with its own grid and settings
    resume = ["compare", "--out", str(out), "--resume", "--no-progress"]
    assert cli.main(resume) == 0
    assert json.loads((out / "results.json").read_text())["runs"] == results["runs"]
    assert cli.main([*resume, "--rho", "0,0.1", "--seeds", "0,1", "--epochs", "2"]) == 0
    capsys.readouterr()
    assert cli.main([*resume, "--seeds", "0", "--rho", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "--rho 0.2 (the comparison has 0,0.1); --seeds 0 (the comparison has 0,1)" in err


@pytest.mark.parametrize(
    "level, df, expected",
    [  # two-sided Student's t quantiles: closed forms for df 1, 2, else SciPy 1.17's t.ppf
        (0.95, 1, 12.706204736174707),  # tan(0.475 pi)
        (0.95, 2, 4.302652729749464),  # 0.95 / sqrt(2 * 0.975 * 0.025)
        (0.95, 3, 3.1824463052837078),
        (0.95, 4, 2.7764451051977934),
        (0.95, 9, 2.262157162798205),
        (0.95, 30, 2.0422724563012378),
        (0.99, 5, 4.032142983555228),
        (0.90, 7, 1.8945786050900062),
    ],
)
def test_t_critical_values(level, df, expected):
    from sam_optax.program.compare import t_critical

    np.testing.assert_allclose(t_critical(level, df), expected, rtol=1e-13)


def test_confidence_interval_is_the_t_interval():
    from sam_optax.program.compare import confidence_interval

    values = [0.90, 0.92, 0.97]
    sd = np.std(values, ddof=1)
    np.testing.assert_allclose(
        confidence_interval(values), 4.302652729749464 * sd / np.sqrt(3), rtol=1e-12
    )
    assert np.isnan(confidence_interval([0.5]))


# --------------------------------------------------------------------------
# Resume (a run killed midway ends identical: tests/test_faults.py).
# --------------------------------------------------------------------------


def test_resume_refuses_only_flags_that_contradict_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        cli.main(["train", "--epochs", "1", "--nesterov", "--out", str(out), "--no-progress"]) == 0
    )
    capsys.readouterr()
    argv = ["train", "--out", str(out), "--resume", "--no-progress"]
    # Flags that agree with the run are fine (here it has finished already).
    assert cli.main([*argv, "--epochs", "1", "--nesterov", "--lr", "0.05"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert cli.main([*argv, "--epochs", "2", "--no-nesterov", "--lr", "0.05"]) == 2
    err = capsys.readouterr().err
    assert "--epochs 2 (the run has --epochs 1); --no-nesterov (the run has --nesterov)" in err
    assert "--lr" not in err and str(out / "config.json") in err
    # --config: every value of the recipe must agree.
    assert cli.main([*argv, "--config", "wrn28_10-cifar10"]) == 2
    assert "--config wrn28_10-cifar10's --dataset cifar10 (the run has --dataset digits)" in (
        capsys.readouterr().err
    )
    assert cli.main(["train", "--epochs", "1", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "holds no run to resume (no config.json)" in capsys.readouterr().err
