"""Every option of INSID3, once: name, default, allowed values and help text.

``Insid3Config`` (frozen) holds the options of the model; ``LoadConfig`` those of loading the
DINOv3 weights. The constructors (``INSID3``, the core), ``build_insid3``, the ``insid3-fast``
subcommands and ``insid3-fast eval`` are built from these two dataclasses: a flag is
``add_arguments(parser, names)``, a namespace back to options is ``options_from_args``. A new
option is one field here, with its metadata, and nothing else to keep in step.
"""

from __future__ import annotations

import argparse
import re
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from .debias import NOISE_KINDS
from .errors import InputError
from .inputs import check_image_size, check_int, check_thresholds, warn_input

BACKENDS = ("auto", "native", "reference")
PRECISIONS = ("fp32", "bf16")
MATMUL_PRECISIONS = ("fp32", "bf16x6")
REFINERS = ("bilinear", "crf")
CONNECTIVITIES = (4, 8)
DEVICES = ("auto", "cpu", "cuda")
MODEL_SIZES = ("small", "small_plus", "base", "large", "huge_plus", "7b")


def device_name(text: str) -> str:
    """A ``--device`` value: auto, cpu, cuda or cuda:N (argparse's error otherwise)."""
    if text in DEVICES or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"invalid device {text!r}: use auto, cpu, cuda or cuda:N")


def _option(default: Any, help: str, *, choices: tuple | None = None, cli: bool = True,
            cli_default: Any = dataclasses.MISSING, metavar: str | None = None,
            parse: Any = None) -> Any:
    """A dataclass field with the metadata the command lines are generated from.

    ``cli_default`` (rarely): the default of the flag when it differs from the API's, with the
    reason in ``help``; ``cli=False``: an API-only option (no flag); ``parse``: the flag's own
    argparse type (instead of choices).
    """
    meta = {"help": help, "choices": choices, "cli": cli, "metavar": metavar, "parse": parse}
    if cli_default is not dataclasses.MISSING:
        meta["cli_default"] = cli_default
    return field(default=default, metadata=meta)


TAU_HELP = ("clustering similarity threshold, published range [0, 1] (outside it: a warning): clusters "
            "merge while their average cosine similarity is above tau (the cut is at cosine distance 1 - tau)")


@dataclass(frozen=True)
class Insid3Config:
    """The options of an INSID3 model, validated on construction (``InputError`` otherwise).

    ``dataclasses.replace(config, tau=0.5)`` gives a validated copy; the values are normalised
    (numpy scalars become Python numbers).
    """

    image_size: int = _option(1024, "side the images are resized to (a multiple of 16; the API also takes "
                                    "others, as the published code does)")
    svd_components: int | None = _option(
        500, "rank of the positional subspace removed (the published 500; at or above the embedding size "
             "C it falls back to C // 2 with a warning; None: that rule silently)",
        cli_default=None, metavar="R")
    tau: float = _option(0.6, TAU_HELP)
    merge_threshold: float = _option(0.2, "cluster score threshold alpha: a cluster joins the mask when its "
                                          "score is above it")
    mask_refiner: str = _option("bilinear", "mask upsampling: bilinear, or crf (dense-CRF boundary refinement)",
                                choices=REFINERS)
    resize_to_orig_size: bool = _option(True, "resize the mask to the target's original size", cli=False)
    device: str | None = _option("auto", "where the model runs: auto (cuda when available), cpu, cuda or cuda:N",
                                 parse=device_name, metavar="{auto,cpu,cuda,cuda:N}")
    backend: str = _option("auto", "kernels of the post-backbone ops: native (compiled), reference (plain "
                                   "torch / scikit-learn), auto (native when built)", choices=BACKENDS)
    connectivity: int | None = _option(None, "grid-constrained clustering, 4 or 8 neighbours (default: the "
                                             "published unconstrained clustering)", choices=CONNECTIVITIES)
    noise: str = _option("constant", "input of the positional SVD: constant (published) or gaussian",
                         choices=NOISE_KINDS, cli=False)
    precision: str = _option("fp32", "backbone precision (bf16: autocast, for GPUs; fp32 is the parity mode)",
                             choices=PRECISIONS)
    matmul_precision: str = _option(
        "fp32", "float32 products after the backbone (the clustering's Gram matrix, the debiasing projection): "
                "fp32 (the parity mode), or bf16x6 (each float32 split into three bf16 values, six bf16 "
                "products: tensor cores on a GPU, about float32's error, masks not guaranteed identical)",
        choices=MATMUL_PRECISIONS)
    compile: bool | str = _option(False, "torch.compile the backbone pass and the post-backbone steps (True, "
                                         "or a mode such as 'reduce-overhead')", cli=False)
    exif_transpose: bool = _option(False, "apply the EXIF orientation of the images (the published code "
                                          "ignores it)")

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen
        set_("image_size", check_image_size(self.image_size))
        if self.svd_components is not None:
            set_("svd_components", check_int("svd_components", self.svd_components))  # negative: a slice
        tau, alpha = check_thresholds(self.tau, self.merge_threshold)
        set_("tau", tau)
        set_("merge_threshold", alpha)
        if self.mask_refiner not in REFINERS:
            # The published code tests mask_refiner == 'crf' and upsamples bilinearly otherwise.
            warn_input(f"mask_refiner={self.mask_refiner!r} is not one of {', '.join(REFINERS)}: the masks are "
                       "upsampled bilinearly, as the published code does for anything but 'crf'")
            set_("mask_refiner", "bilinear")
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("matmul_precision", self.matmul_precision, MATMUL_PRECISIONS)
        _check_choice("noise", self.noise, NOISE_KINDS)
        if self.connectivity not in (None, *CONNECTIVITIES) or isinstance(self.connectivity, bool):
            raise InputError(f"connectivity must be None, 4 or 8, got {self.connectivity!r}")
        if self.device is None:
            set_("device", "auto")
        elif isinstance(self.device, torch.device):
            set_("device", str(self.device))
        elif not isinstance(self.device, str):
            raise InputError(f"device must be a torch.device, a device name or None, got {self.device!r}")
        set_("resize_to_orig_size", bool(self.resize_to_orig_size))
        set_("exif_transpose", bool(self.exif_transpose))

    @property
    def cluster_threshold(self) -> float:
        """The cosine distance the clustering cuts at, 1 - tau."""
        return 1.0 - self.tau


@dataclass(frozen=True)
class LoadConfig:
    """Where the DINOv3 weights come from (``build_insid3`` and the commands)."""

    # No argparse choices: an unknown size is the package's one-line InputError, like other bad input.
    model_size: str | None = _option(None, "DINOv3 size: " + ", ".join(MODEL_SIZES) + " (default: read from "
                                     "the weights, else large)")
    weights: str | None = _option(None, "DINOv3 checkpoint (Meta .pth, HF folder or .safetensors); default: "
                                        "$INSID3_WEIGHTS or pretrain/")

    def __post_init__(self) -> None:
        check_model_size(self.model_size)


def check_model_size(model_size: str | None) -> None:
    """InputError unless ``model_size`` is None or one of ``MODEL_SIZES``."""
    if model_size is not None and model_size not in MODEL_SIZES:
        raise InputError(f"unknown model size {model_size!r}; choose one of {', '.join(MODEL_SIZES)}")


def _check_choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise InputError(f"{name} must be one of {allowed}, got {value!r}")


def option_fields(cls: type = Insid3Config) -> dict[str, dataclasses.Field]:
    """The fields of ``cls`` (``Insid3Config`` or ``LoadConfig``) by name."""
    return {f.name: f for f in dataclasses.fields(cls)}


def flag(name: str) -> str:
    """The command-line flag of option ``name`` (``tau`` -> ``--tau``)."""
    return "--" + name.replace("_", "-")


def _argument_type(default: Any, choices: tuple | None):
    if choices is not None:
        return type(choices[0])
    if isinstance(default, bool):
        return None
    if isinstance(default, (int, float)):
        return type(default)
    return str


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line (``prog: error: ...``), not the
    usage block followed by the error: the CLI's rule for every expected error. Exit status 2."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def add_arguments(parser: argparse.ArgumentParser | Any, names: Iterable[str],
                  aliases: Mapping[str, Iterable[str]] | None = None,
                  defaults: Mapping[str, Any] | None = None) -> None:
    """Add the flags of the options ``names`` (fields of ``Insid3Config`` or ``LoadConfig``).

    ``aliases``: extra flags of an option (e.g. the published ``--svd-comps``); ``defaults``:
    a command's own default for an option (e.g. ``--model-size`` of the published scripts).
    A boolean option becomes a ``store_true`` flag.
    """
    fields = {**option_fields(Insid3Config), **option_fields(LoadConfig)}
    aliases, defaults = aliases or {}, defaults or {}
    for name in names:
        f = fields[name]
        meta = f.metadata
        if not meta["cli"]:
            raise ValueError(f"option {name!r} has no command-line flag")
        default = defaults.get(name, meta.get("cli_default", f.default))
        flags = [flag(name), *aliases.get(name, ())]
        if isinstance(f.default, bool):
            parser.add_argument(*flags, dest=name, action="store_true", default=default, help=meta["help"])
            continue
        kwargs: dict[str, Any] = dict(dest=name, default=default, help=meta["help"])
        kwargs["type"] = meta.get("parse") or _argument_type(
            f.default if f.default is not None else meta.get("cli_default"), meta["choices"])
        if meta["choices"] is not None:
            kwargs["choices"] = list(meta["choices"])
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        parser.add_argument(*flags, **kwargs)


def options_from_args(args: argparse.Namespace, cls: type = Insid3Config) -> dict[str, Any]:
    """The options of ``cls`` that ``args`` holds, as keyword arguments."""
    return {name: getattr(args, name) for name in option_fields(cls) if hasattr(args, name)}
