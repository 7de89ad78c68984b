"""Params files (``train-captioner --params params.yaml``): every value checked before use.

A section (``train``, ``model``) holds fields of a config dataclass (TrainConfig,
CaptionerConfig). Each key must be one of its fields, and each value must fit the field's type
annotation and the field's range (``RULES``); anything else is a ``ParamsError`` (a
click.ClickException: one ``Error:`` line, no traceback) naming the file, the key and the value::

    params.yaml: train.max_epochs: expected an integer >= 1, got 2.5

Types follow the annotations (``typing.get_type_hints``): int, float (an int is accepted and
becomes a float), bool, str, ``Literal[...]``, ``X | None``, lists and tuples of a type, dicts.
A bool is never a number here, although Python's bool is an int. The command-line flags that
set the same fields are checked by the same rules (``FieldType``). What depends on several
fields at once (hard attention's samples >= 2, pad_id < vocab_size, ...) is left to the config
classes themselves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import click
import torch
import yaml

from astar.pipelines.text import NotUTF8Error, decode_utf8
from astar.train.data import ON_CORRUPT
from astar.train.loop import TrainConfig
from astar.train.model import VARIANTS, CaptionerConfig

__all__ = ["RULES", "FieldType", "ParamsError", "Rule", "read_params", "read_section"]

# The scores the validation of train-captioner reports (astar.train.run.make_validator), the only
# ones early stopping can follow.
VALIDATION_METRICS = ("CIDEr", "BLEU-4", "ROUGE_L")


class ParamsError(click.ClickException):
    """A params file (or a flag) whose value cannot configure a run."""


@dataclass(frozen=True)
class Rule:
    """What a field's value must be beyond its type: a range, one of some choices, or a test.

    For a list or dict field the rule applies to each item (each value of a dict).
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # value > low (else >= low)
    high_open: bool = False  # value < high (else <= high)
    choices: tuple[Any, ...] = ()
    test: Callable[[Any], bool] | None = None  # with ``text`` saying what it accepts
    text: str = ""  # what the field accepts, in words, instead of its type and range

    def allows(self, value: Any) -> bool:
        if self.choices and value not in self.choices:
            return False
        if self.test is not None and not self.test(value):
            return False
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        """The range as text: ">= 1", "> 0", "in [0, 1)"; empty without one."""
        if self.low is not None and self.high is not None:
            opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {opening}{_number(self.low)}, {_number(self.high)}{closing}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_number(self.high)}"
        return ""


def at_least(low: float) -> Rule:
    return Rule(low=low)


def above(low: float) -> Rule:
    return Rule(low=low, low_open=True)


def one_of(*choices: Any) -> Rule:
    return Rule(choices=choices)


def _is_device(value: str) -> bool:
    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        return False
    return True


DEVICE = Rule(test=_is_device, text="a device such as cpu, cuda or cuda:1")

RULES: dict[type, dict[str, Rule]] = {
    TrainConfig: {
        "videos_per_batch": at_least(1),
        "captions_per_video": at_least(1),
        "learning_rate": above(0),
        "clip_norm": above(0),
        "max_epochs": at_least(1),
        "patience": at_least(1),
        "metric": one_of(*VALIDATION_METRICS),
        "validate_every": at_least(1),
        "max_length": at_least(1),
        "checkpoint_every": at_least(0),  # 0: only after each epoch
        "seed": Rule(low=0, high=2**64 - 1, text="an integer >= 0 (of 64 bits)"),  # as torch
        # ^ and numpy (no negative seeds) take it
        "device": DEVICE,
        "precision": one_of("fp32", "bf16", "auto"),
        "cache_videos": at_least(0),  # 0: stream every read
        "prefetch": at_least(0),  # 0: read each batch when it is needed
        "max_steps": at_least(1),
        "max_nonfinite_steps": at_least(1),
        "lr_schedule": one_of("constant", "cosine"),
        "on_corrupt": one_of(*ON_CORRUPT),
    },
    CaptionerConfig: {
        "vocab_size": at_least(2),  # pad and end-of-sentence at least
        "variant": one_of(*VARIANTS),
        "layer_channels": at_least(1),  # each layer's channels; the names are the config's
        "fc_dim": at_least(1),
        "feature_dim": at_least(1),
        "hidden_dim": at_least(1),
        "embed_dim": at_least(1),
        "attention_dim": at_least(1),
        "dropout": Rule(low=0, high=1, high_open=True),  # a probability; 1 would drop all
        "samples": at_least(1),  # hard attention needs 2 (checked by CaptionerConfig)
        "init_range": above(0),
        "pad_id": at_least(0),
        "eos_id": at_least(0),
    },
}


# --------------------------------------------------------------------------------------------
# Files and sections


def read_params(path: Path | None) -> dict[str, Any]:
    """The mapping a params YAML file holds ({} without a file); its sections are unchecked."""
    if path is None:
        return {}
    try:
        params = yaml.safe_load(decode_utf8(path.read_bytes(), str(path))) or {}
    except NotUTF8Error as error:
        raise ParamsError(str(error)) from None
    except (OSError, yaml.YAMLError) as error:
        raise ParamsError(f"{path}: cannot read params: {error}") from error
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level, got {_shown(params)}")
    return params


def read_section(params: dict, name: str, cls: type, path: Path | None) -> dict[str, Any]:
    """The ``name`` section of ``params``, every key a field of ``cls`` and every value checked
    by its type and ``RULES``; ints given for float fields become floats."""
    section = params.get(name)
    if section is None:  # absent, or a bare "train:"
        return {}
    if not isinstance(section, dict):
        raise ParamsError(
            f"{path}: {name}: expected a mapping of {cls.__name__} fields, got {_shown(section)}"
        )
    hints = field_types(cls)
    unknown = sorted(str(key) for key in section if key not in hints)
    if unknown:
        raise ParamsError(
            f"{path}: unknown keys in '{name}': {', '.join(unknown)} "
            f"(known: {', '.join(sorted(hints))})"
        )
    rules = RULES.get(cls, {})
    return {
        key: check_value(value, hints[key], rules.get(key), f"{path}: {name}.{key}")
        for key, value in section.items()
    }


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type annotation of each field of the dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_value(value: Any, hint: Any, rule: Rule | None, where: str) -> Any:
    """``value`` as the field takes it, or ParamsError: ``where: expected ..., got ...``."""
    try:
        return _convert(value, hint, rule)
    except _Mismatch:
        raise ParamsError(
            f"{where}: expected {expected(hint, rule)}, got {_shown(value)}{_hint(value, hint)}"
        ) from None


# --------------------------------------------------------------------------------------------
# Command-line flags


class FieldType(click.ParamType):
    """A flag that sets a config field (``--epochs`` -> TrainConfig.max_epochs), checked by the
    same type and rule as the field in a params file."""

    def __init__(self, cls: type, field: str) -> None:
        self.hint = _without_none(field_types(cls)[field])
        self.rule = RULES.get(cls, {}).get(field)
        self.name = {int: "integer", float: "number"}.get(self.hint, "text")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        parse = self.hint if self.hint in (int, float) else None
        try:
            parsed = parse(value) if parse is not None and isinstance(value, str) else value
            return _convert(parsed, self.hint, self.rule)
        except (ValueError, _Mismatch):
            self.fail(f"expected {expected(self.hint, self.rule)}, got {value}", param, ctx)


# --------------------------------------------------------------------------------------------
# Types


class _Mismatch(Exception):
    """A value that does not fit a type annotation (or its rule)."""


def _convert(value: Any, hint: Any, rule: Rule | None) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            try:
                return _convert(value, option, rule)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if any(value == choice and type(value) is type(choice) for choice in args):
            return value
        raise _Mismatch
    if origin in (list, tuple):
        return _sequence(value, origin, args, rule)
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        key_type, value_type = args or (Any, Any)
        return {
            _convert(k, key_type, None): _convert(v, value_type, rule) for k, v in value.items()
        }
    return _scalar(value, hint, rule)


def _sequence(value: Any, origin: type, args: tuple, rule: Rule | None) -> Any:
    """A list or tuple field, given as a YAML list."""
    if not isinstance(value, list | tuple):
        raise _Mismatch
    if origin is tuple and args and args[-1] is not Ellipsis:  # tuple[int, str]: fixed length
        if len(value) != len(args):
            raise _Mismatch
        return tuple(_convert(v, t, rule) for v, t in zip(value, args, strict=True))
    item = args[0] if args else Any
    return origin(_convert(v, item, rule) for v in value)


def _scalar(value: Any, hint: Any, rule: Rule | None) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise _Mismatch
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Mismatch
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Mismatch
        value = float(value)
        if not math.isfinite(value):
            raise _Mismatch
    elif isinstance(hint, type) and not isinstance(value, hint):
        raise _Mismatch
    if rule is not None and not rule.allows(value):
        raise _Mismatch
    return value


def expected(hint: Any, rule: Rule | None = None) -> str:
    """What a field accepts, in words: "an integer >= 1", "one of "fp32", "bf16", "auto"", ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        options = [expected(option, rule) for option in args if option is not type(None)]
        return " or ".join(options) + (", or null" if type(None) in args else "")
    if origin is Literal:
        return _choices(args)
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)}: " + ", ".join(expected(t, rule) for t in args)
        return f"a list, each item {expected(args[0] if args else Any, rule)}"
    if origin is dict:
        key_type, value_type = args or (Any, Any)
        return (
            f"a mapping, each key {expected(key_type)} and each value {expected(value_type, rule)}"
        )
    if rule is not None and rule.text:
        return rule.text
    if rule is not None and rule.choices:
        return _choices(rule.choices)
    noun = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, "anything" if hint is Any else f"a {getattr(hint, '__name__', hint)}"
    )
    bound = rule.describe() if rule is not None else ""
    return f"{noun} {bound}" if bound else noun


def _choices(choices: tuple[Any, ...]) -> str:
    return "one of " + ", ".join(_shown(choice) for choice in choices)


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _shown(value: Any) -> str:
    """A value as YAML would show it: text quoted, null, true/false, lists in brackets."""
    return json.dumps(value, default=str, ensure_ascii=False)


# A number YAML read as text: quoted, or an exponent without a dot or sign (YAML 1.1 reads 1e-3
# and 1.0e3 as text, 1.0e-3 as a number).
_NUMBER_TEXT = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")


def _hint(value: Any, hint: Any) -> str:
    """Why a number was refused when it was text; empty otherwise."""
    if not (isinstance(value, str) and _NUMBER_TEXT.fullmatch(value)):
        return ""
    if _without_none(hint) not in (int, float):
        return ""
    mantissa, exponent, power = value.strip().lower().partition("e")
    if exponent and ("." not in mantissa or power[0] not in "+-"):
        # YAML 1.1 (PyYAML) reads an exponent as a number only after a dot and with a sign.
        mantissa = mantissa if "." in mantissa else mantissa + ".0"
        power = power if power[0] in "+-" else "+" + power
        return f" (text to YAML: write {mantissa}e{power})"
    return " (text to YAML: write numbers without quotes)"


def _without_none(hint: Any) -> Any:
    """``X`` of ``X | None``; any other type as it is."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        options = [option for option in typing.get_args(hint) if option is not type(None)]
        if len(options) == 1:
            return options[0]
    return hint
