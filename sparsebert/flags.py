"""Config dataclasses <-> command-line flags, for the CLI and for layers that build commands
(sweeps rebuild a unit's command line from its config).

Each field becomes `--field-name` (bools get --x/--no-x); the help text comes from the
field's metadata["help"]. Flags default to argparse.SUPPRESS, so only flags the user gave
become overrides of the dataclass defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import typing
from collections.abc import Sequence
from typing import Any


def output_path(value: str) -> str:
    """argparse type of an output folder or file: refuses an empty (or blank) value, which
    would name the working directory (an unset shell variable, `--out "$OUT"`); expands a
    leading ~ (the shell leaves `--out=~/x` and '~/x' as they are, and a literal ./~ folder
    is a trap: the models written there are then looked for in the home folder)."""
    if not value.strip():
        raise argparse.ArgumentTypeError(f"expected a path, got {value!r}")
    return os.path.expanduser(value)


def input_path(value: str) -> str:
    """argparse type of a folder or file to read: not empty, a leading ~ expanded."""
    return output_path(value)


def decimal_int(value: str) -> int:
    """argparse type of an integer flag: plain decimal digits with an optional sign. int()
    alone also reads "3_0" as 30 and non-ASCII digits, which a typo should not pass as."""
    if not re.fullmatch(r"\s*[-+]?[0-9]+\s*", value):
        raise argparse.ArgumentTypeError(f"expected a decimal integer, got {value!r}")
    return int(value)


def help_field(text: str, default: Any) -> Any:
    """A dataclass field with a default and a help text for its flag."""
    return dataclasses.field(default=default, metadata={"help": text})


def field_type(cls: type, name: str) -> type:
    """The non-None type of a dataclass field (`int | None` -> int)."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type,
                            skip: Sequence[str] = ()) -> None:
    """One `--field-name` flag per dataclass field of `cls` (except `skip`)."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind = field_type(cls, f.name)
        help_text = f.metadata.get("help", "")
        if "default:" not in help_text:  # some help texts say their default in words
            help_text += f" (default: {f.default})"
        if kind is bool:
            parser.add_argument(flag_name(f.name), dest=f.name,
                                action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag_name(f.name), dest=f.name,
                                type=decimal_int if kind is int else kind,
                                default=argparse.SUPPRESS, metavar=f.name.upper(),
                                help=help_text)


def dataclass_to_argv(obj: Any, skip: Sequence[str] = ()) -> list[str]:
    """Flags that rebuild `obj` through add_dataclass_arguments (fields at default omitted)."""
    argv: list[str] = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in skip or value == f.default:
            continue
        if isinstance(value, bool):
            argv.append(flag_name(f.name) if value else "--no-" + f.name.replace("_", "-"))
        elif value is not None:
            argv.extend([flag_name(f.name), str(value)])
    return argv


def overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The dataclass fields the user set on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def dataclass_from_json(cls: type, data: dict[str, Any], error: type[Exception]) -> Any:
    """cls(**data), refusing unknown fields with `error` naming them and the known ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise error(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
    return cls(**data)
