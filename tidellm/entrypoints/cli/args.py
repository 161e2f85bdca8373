"""Command-line flags generated from the config dataclasses, so each setting is declared once."""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from typing import Any

from tidellm.config import EngineConfig
from tidellm.config.engine import SECTIONS


def _base_type(tp: Any) -> Any:
    """``int | None`` → int; ``str`` → str."""
    if isinstance(tp, str):
        tp = eval(tp, {}, {})  # annotations are strings under `from __future__ import annotations`
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_engine_args(parser: argparse.ArgumentParser, *, positional_model: bool = False) -> None:
    """Add one flag per config field (``max_num_seqs`` → ``--max-num-seqs``)."""
    for section, klass in SECTIONS.items():
        add_config_args(
            parser.add_argument_group(f"{section} options"), klass, positional_model=positional_model
        )


def add_config_args(group: Any, klass: type, *, positional_model: bool = False) -> None:
    """Add one flag per field of the dataclass ``klass`` to ``group`` (a parser or an argument group).

    A field whose metadata names an ``env`` variable defaults to that variable's value; ``--help`` says so.
    """
    for f in dataclasses.fields(klass):
        if f.name == "model" and positional_model:
            group.add_argument(
                "model", nargs="?", default=f.default, help=f.metadata["help"] + " (default: %(default)s)"
            )
            continue
        flag = "--" + f.name.replace("_", "-")
        tp = _base_type(f.type)
        default = f.default
        env = f.metadata.get("env")
        if env and os.environ.get(env):
            default = tp(os.environ[env])
        kw: dict[str, Any] = {"dest": f.name, "default": default, "help": f.metadata.get("help", "")}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = tp
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        if f.default is not None and tp is not bool:
            kw["help"] += " (default: %(default)s)"
        group.add_argument(flag, **kw)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    parts = {}
    for section, klass in SECTIONS.items():
        parts[section] = klass(**{f.name: getattr(args, f.name) for f in dataclasses.fields(klass)})
    return EngineConfig(**parts)


def engine_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for klass in SECTIONS.values() for f in dataclasses.fields(klass)}
