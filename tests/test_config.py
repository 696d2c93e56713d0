"""One configuration: every option is defined once (insid3_fast.config) and every front end is built from it."""

from __future__ import annotations

import argparse
import dataclasses
import inspect

import pytest

from insid3_fast import INSID3, build_insid3
from insid3_fast.cli import MODEL_OPTIONS as CLI_OPTIONS
from insid3_fast.cli import build_parser
from insid3_fast.config import (BACKENDS, DEVICES, MODEL_SIZES, TAU_HELP, Insid3Config, LoadConfig, flag,
                                option_fields, options_from_args)
from insid3_fast.core import Insid3Core
from insid3_fast.errors import InputError
from insid3_fast.eval.cli import MODEL_OPTIONS as EVAL_OPTIONS
from insid3_fast.eval.cli import add_eval_arguments
from insid3_fast.model import WEIGHT_STEMS

FIELDS = {**option_fields(Insid3Config), **option_fields(LoadConfig)}


def _subcommand(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return parser


def _action(parser: argparse.ArgumentParser, option: str) -> argparse.Action:
    return next(a for a in parser._actions if flag(option) in a.option_strings)


PARSERS = {"segment": lambda: _subcommand("segment"), "segment-many": lambda: _subcommand("segment-many"),
           "match": lambda: _subcommand("match"), "eval": _eval_parser, "insid3-fast eval": lambda: _subcommand("eval")}


@pytest.mark.parametrize("command", list(PARSERS))
def test_every_model_flag_is_the_config_field(command):
    parser = PARSERS[command]()
    options = EVAL_OPTIONS if "eval" in command else CLI_OPTIONS
    for name in options:
        field, action = FIELDS[name], _action(parser, name)
        assert action.dest == name
        assert action.help == field.metadata["help"], name
        choices = field.metadata["choices"]
        assert (list(action.choices) if action.choices is not None else None) == \
            (list(choices) if choices is not None else None), name
        assert action.default == field.metadata.get("cli_default", field.default), name


def test_the_drifted_flags_agree():
    cli, ev = _subcommand("segment"), _eval_parser()
    assert list(_action(ev, "backend").choices) == list(BACKENDS)  # eval's --backend had no choices
    assert _action(cli, "device").default == _action(ev, "device").default == "auto"
    assert _action(cli, "device").type is _action(ev, "device").type  # one rule: auto, cpu, cuda, cuda:N
    for parser in (cli, ev):
        assert _action(parser, "device").type("cuda:1") == "cuda:1"  # a second GPU stays selectable
        for name in DEVICES:
            assert _action(parser, "device").type(name) == name
    with pytest.raises(SystemExit):
        ev.parse_args(["--device", "gpu"])
    assert _action(cli, "tau").help == _action(ev, "tau").help == TAU_HELP
    assert "similarity" in TAU_HELP and "distance" not in TAU_HELP.split(":")[0]
    with pytest.raises(SystemExit):
        ev.parse_args(["--backend", "fast"])


def test_cli_flags_round_trip_to_the_config():
    config = Insid3Config(image_size=256, svd_components=32, tau=0.55, merge_threshold=0.3, device="cpu",
                          backend="reference", precision="bf16", exif_transpose=True, connectivity=8)
    argv = ["--ref-image", "r.png", "--ref-mask", "m.png", "--target", "t.png", "--output", "o.png"]
    for name in (*CLI_OPTIONS, "connectivity"):
        value = getattr(config, name, None)
        if name in ("weights", "model_size"):
            continue
        if isinstance(value, bool):
            argv += [flag(name)] if value else []
        else:
            argv += [flag(name), str(value)]
    args = _subcommand("segment").parse_args(argv)
    assert dataclasses.replace(Insid3Config(), **options_from_args(args)) == config


def test_eval_flags_round_trip_with_the_published_spellings():
    args = _eval_parser().parse_args(["--svd-comps", "7", "--merge-thresh", "0.3", "--tau", "0.5",
                                      "--mask-refiner", "crf", "--backend", "native", "--device", "cpu"])
    config = dataclasses.replace(Insid3Config(), **options_from_args(args))
    assert (config.svd_components, config.merge_threshold, config.tau) == (7, 0.3, 0.5)
    assert (config.mask_refiner, config.backend, config.device) == ("crf", "native", "cpu")
    assert options_from_args(args, LoadConfig) == {"model_size": None, "weights": None}


@pytest.mark.parametrize("fn", [INSID3.__init__, build_insid3])
def test_constructor_defaults_are_the_config_defaults(fn):
    params = inspect.signature(fn).parameters
    for name, field in FIELDS.items():
        if name in params and name != "device":
            assert params[name].default == field.default, (fn.__qualname__, name)
    assert params["device"].default is None  # the published signature's None, which the config reads as "auto"
    assert Insid3Config(device=None) == Insid3Config()


def test_the_core_starts_from_the_config_defaults():
    from insid3_fast.synthetic import SyntheticEncoder

    core = Insid3Core(SyntheticEncoder(16), image_size=64, svd_components=4, device="cpu")
    assert core.config == Insid3Config(image_size=64, svd_components=4, device="cpu")


def test_insid3_takes_every_model_option():
    params = inspect.signature(INSID3.__init__).parameters
    assert set(option_fields(Insid3Config)) <= set(params)
    assert set(option_fields(Insid3Config)) | set(option_fields(LoadConfig)) <= set(inspect.signature(build_insid3).parameters)


def test_config_validates_and_is_frozen():
    with pytest.raises(InputError, match="tau"):
        Insid3Config(tau=float("nan"))
    with pytest.raises(InputError, match="backend"):
        Insid3Config(backend="fast")
    with pytest.raises(InputError, match="connectivity"):
        Insid3Config(connectivity=6)
    with pytest.raises(InputError, match="unknown model size 'gigantic'"):
        LoadConfig(model_size="gigantic")
    config = Insid3Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.tau = 0.5  # type: ignore[misc]
    assert Insid3Config(device=None).device == "auto"
    assert dataclasses.replace(config, tau=0.5).tau == 0.5 and config.tau == 0.6


def test_model_sizes_are_the_weight_stems():
    assert tuple(WEIGHT_STEMS) == MODEL_SIZES


def test_the_model_reports_its_config():
    from insid3_fast.synthetic import SyntheticEncoder

    model = INSID3(SyntheticEncoder(16), image_size=64, svd_components=4, tau=0.5, device="cpu")
    assert model.config == Insid3Config(image_size=64, svd_components=4, tau=0.5, device="cpu")
    again = INSID3.from_config(SyntheticEncoder(16), model.config)
    assert again.config == model.config
    model.tau = 0.7
    assert model.config.tau == 0.7 and model.core.tau == 0.7
