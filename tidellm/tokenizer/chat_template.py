"""Chat-template rendering with the same Jinja environment Hugging Face uses."""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template itself raised (e.g. "Conversation roles must alternate")."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=1)
def _compile_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    return _compile_env().from_string(template)


def _tojson(
    value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False
) -> str:
    import json

    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def template_accepts_tools(template: str) -> bool:
    """Whether the template reads a ``tools`` variable (Hugging Face's convention for tool definitions).

    Templates that do not get the tools described some other way by the caller; a template that does not
    even parse answers False here and fails with its own error when rendered.
    """
    from jinja2 import meta

    try:
        ast = _compile_env().parse(template)
    except jinja2.TemplateSyntaxError:
        return False
    return "tools" in meta.find_undeclared_variables(ast)


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    **kwargs: Any,
) -> str:
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"Invalid chat template (line {e.lineno}): {e.message}") from e
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"Chat template failed to render: {e}") from e
