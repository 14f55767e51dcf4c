"""The command line is derived from ``Config``: one flag per field, help, types and
checks read from the fields, every message naming the flag; the method table."""

import dataclasses
import json
import math
import os
import re
import signal

import jax.numpy as jnp
import pytest

from sam_optax.program import cli
from sam_optax.program import configs
from sam_optax.program import trainer
from sam_optax.program.errors import UsageError

FIELDS = dataclasses.fields(configs.Config)


def _options(parser, command):
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {a.dest: a for a in sub._actions}


@pytest.mark.parametrize("command", ["train", "compare"])
def test_every_config_field_is_one_flag_with_its_help(command):
    actions = _options(cli.build_parser(), command)
    for field in FIELDS:
        if command == "compare" and field.name in cli.GRID_FIELDS:
            continue  # replaced by the grid's comma lists
        action = actions[field.name]
        flag = "--" + field.name.replace("_", "-")
        assert flag in action.option_strings, field.name
        assert action.help.startswith(field.metadata["help"].replace("%", "%%")), field.name
    if command == "compare":
        assert {"methods", "rhos", "seeds"} <= set(actions)
        assert "seed" not in actions and "rho" not in actions


def test_flags_are_typed_from_the_annotations():
    args = cli.build_parser().parse_args(
        ["train", "--epochs", "3", "--lr", "0.5", "--m", "batch", "--clip-norm", "none",
         "--norm", "inf", "--nesterov", "--mesh", "data=8", "--sync-group", "2"]
    )  # fmt: skip
    given = cli.given_settings(args)
    assert given == {
        "epochs": 3,
        "lr": 0.5,
        "m": None,
        "clip_norm": None,
        "norm": math.inf,
        "nesterov": True,
        "mesh": "data=8",
        "sync_group": 2,
    }
    assert type(given["epochs"]) is int and type(given["lr"]) is float


def _bad_value(check):
    for value in (-1, -0.5, 0, 0.5, 1, 1.5, math.nan, math.inf):
        try:
            if not check.ok(value):
                return value
        except TypeError:
            continue
    raise AssertionError("no bad value found")


CHECKED = [f for f in FIELDS if f.metadata["check"] is not None]
CHOICES = [f for f in FIELDS if f.metadata["choices"] is not None]


@pytest.mark.parametrize("field", CHECKED, ids=[f.name for f in CHECKED])
def test_each_checked_field_is_refused_by_its_flag_name(field):
    bad = _bad_value(field.metadata["check"])
    config = configs.recipe("digits-noise").replace(**{field.name: bad})
    flag = "--" + field.name.replace("_", "-")
    with pytest.raises(UsageError, match=rf"^{flag} must be .+, got {re.escape(repr(bad))}\.$"):
        configs.validate(config, n_devices=1)


@pytest.mark.parametrize("field", CHOICES, ids=[f.name for f in CHOICES])
def test_each_field_with_choices_lists_them(field):
    config = configs.recipe("digits-noise").replace(**{field.name: "xyzzy"})
    flag = "--" + field.name.replace("_", "-")
    with pytest.raises(UsageError) as err:
        configs.validate(config, n_devices=1)
    assert str(err.value) == (
        f"{flag}: unknown 'xyzzy'; valid choices: {', '.join(field.metadata['choices'])}."
    )


@pytest.mark.parametrize(
    "argv, meant",
    [
        # Issue 26, item 1: a KeyError traceback (exit 1) before.
        (["train", "--method", "sgd"], "(plain SGD is --rho 0, with any --method; "
         "`sam-optax compare --method sgd,sam` puts SGD beside SAM)"),
        (["train", "--method", "samm"], "(did you mean 'sam'?)"),
        (["train", "--method", "GSAM", "--rho", "0"], "(did you mean 'gsam'?)"),
        (["train", "--augment", "basc"], "(did you mean 'basic'?)"),
    ],
)  # fmt: skip
def test_an_unknown_choice_says_what_was_meant_and_lists_the_choices(argv, meant, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    flag, value = argv[1], argv[2]
    choices = configs.Config.__dataclass_fields__[flag[2:]].metadata["choices"]
    assert err == (
        f"sam-optax: error: {flag}: unknown {value!r} {meant}; valid choices: "
        f"{', '.join(choices)}.\n"
    )
    assert not out.exists()
    # `sgd` is a method of compare (SGD beside the others): accepted there.
    methods, rhos = cli._grid(["sgd", "sam"], None, configs.recipe("digits-noise"))
    assert (methods, rhos) == (["sam"], [0.0, 0.2])


def test_each_method_names_its_own_hyperparameters():
    owned = [h for m in configs.METHODS.values() for h in m.hyperparameters]
    assert len(owned) == len(set(owned))
    for name, method in configs.METHODS.items():
        prefixed = {f.name for f in FIELDS if f.name.startswith(name + "_")}
        assert set(method.hyperparameters) == prefixed, name
        assert method.radius == "rho" or method.radius in method.hyperparameters


def _shown(printed):
    return {line.split()[0 if line.startswith("    ") else 1] for line in printed.splitlines()[1:]
            if re.match(r"  [ *] \w", line)}  # fmt: skip


def test_the_settings_printed_are_those_the_run_uses():
    def shown(config, **kw):
        return _shown(configs.describe(config, "settings:", **kw))

    base = configs.recipe("digits-noise")
    names = {f.name for f in FIELDS}
    others = {h for m in configs.METHODS.values() for h in m.hyperparameters}
    sam = shown(base)
    assert sam == names - others - {"eta"}  # ASAM's eta: not without --adaptive
    looksam = shown(base.replace(method="looksam"))
    assert looksam == sam | {"looksam_every", "looksam_alpha"}
    perturbation = {"method", "norm", "adaptive", "perturb", "m", "sync_perturbation", "sync_group"}
    assert shown(base.replace(rho=0.0)) == sam - perturbation  # SGD
    assert "msam_rho" in shown(base.replace(method="msam")) and "norm" not in shown(
        base.replace(method="msam")
    )
    assert "eta" in shown(base.replace(adaptive=True))
    # A grid shows what any of its runs uses; the count of the others is said.
    text = configs.describe(
        base, "settings:", runs=[base.replace(rho=0.0), base.replace(method="gsam")]
    )
    assert _shown(text) == sam | {"gsam_alpha"}
    assert (
        f"({len(names - _shown(text))} settings that these runs do not use are not shown)" in text
    )


def test_every_recipe_is_valid_and_every_value_round_trips_through_its_flag():
    for name, config in configs.RECIPES.items():
        assert configs.field_errors(config) == [], name
        for field in FIELDS:
            value = getattr(config, field.name)
            text = configs.as_flag(field.name, value)
            if isinstance(value, bool):
                parsed = cli.build_parser().parse_args(["train", text])
                assert getattr(parsed, field.name) is value
            else:
                assert configs.parse_value(field.name, text.split(" ", 1)[1]) == value, text


def test_config_json_keeps_an_infinite_norm():
    # --norm inf (the sign direction) is no JSON number; config.json keeps its text.
    config = configs.recipe("digits-noise").replace(norm=math.inf)
    saved = json.loads(json.dumps(config.to_dict(), allow_nan=False))
    assert saved["norm"] == "inf"
    assert configs.Config.from_dict(saved) == config


def test_the_method_table_is_the_only_list_of_methods():
    parser = cli.build_parser()
    assert _options(parser, "train")["method"].help.endswith(
        f"one of {', '.join(configs.METHODS)} [default sam]"
    )
    assert configs.Config.__dataclass_fields__["method"].metadata["choices"] == tuple(
        configs.METHODS
    )
    base = configs.recipe("digits-noise")
    params = {"w": jnp.ones(3)}
    for name, method in configs.METHODS.items():
        config = base.replace(method=name)
        tx = trainer.make_optimizer(config, total_steps=10, axis_name=None)
        state = tx.init(params)
        closure = (
            (lambda p: p["w"] ** 2) if method.per_example else (lambda p: jnp.sum(p["w"] ** 2))
        )
        updates, _ = tx.update(params, state, params, value_fn=closure)
        assert jnp.all(jnp.isfinite(updates["w"])), name
        assert config.radius == getattr(config, method.radius)
    assert base.replace(method="msam").radius == base.msam_rho
    assert base.replace(rho=0.0, method="msam").radius == 0.0


def test_ctrl_c_under_jax_distributed_is_forwarded_to_jax_as_sigterm(monkeypatch):
    # Under jax.distributed every process must stop at the same step: jax's
    # preemption service (which takes SIGTERM) decides it, so Ctrl-C is sent
    # on to it (the real run: tests/test_program_multihost.py).
    import jax

    sent = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(cli.os, "kill", lambda pid, signum: sent.append((pid, signum)))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with cli.stop_on_signals() as stop:
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
            assert stop.is_set() and stop.signum == signal.SIGINT
            assert sent == [(os.getpid(), signal.SIGTERM)]
            with pytest.raises(KeyboardInterrupt):  # a second one stops at once
                signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
