"""A validating scanner for JSON *prefixes*: where a value ends, or that it has not ended yet.

Streaming tool-call parsing re-reads the model's text after every delta. ``json.loads`` only answers for
complete text; here a prefix of valid JSON is told apart from text that can never become valid JSON
(:class:`Malformed`), so a parser can stream arguments while they arrive and give up as soon as the model
strays from the format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_WS = " \t\n\r"
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_CHARS = frozenset("+-0123456789.eE")
_ESCAPES = frozenset('"\\/bfnrtu')
_HEX = frozenset("0123456789abcdefABCDEF")
_LITERALS = ("true", "false", "null")


class Malformed(ValueError):
    """The text is not a prefix of any valid JSON value."""


def skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in _WS:
        i += 1
    return i


def scan_value(s: str, i: int) -> int | None:
    """Index just past the JSON value starting at ``s[i]`` (after whitespace), or None if ``s`` ends first.

    A number at the very end of ``s`` counts as unfinished (more digits may follow).
    """
    try:
        return _value(s, skip_ws(s, i))
    except RecursionError:
        raise Malformed("JSON nested too deeply") from None


def _value(s: str, i: int) -> int | None:
    if i >= len(s):
        return None
    c = s[i]
    if c == "{":
        return _container(s, i, "}", keyed=True)
    if c == "[":
        return _container(s, i, "]", keyed=False)
    if c == '"':
        return scan_string(s, i)
    if c == "-" or c.isdigit():
        j = i
        while j < len(s) and s[j] in _NUMBER_CHARS:
            j += 1
        if j == len(s):
            return None
        m = _NUMBER.match(s, i)
        if m is None or m.end() != j:
            raise Malformed(f"bad number at {i}")
        return j
    for lit in _LITERALS:
        if s.startswith(lit, i):
            return i + len(lit)
        if lit.startswith(s[i:]):
            return None
    raise Malformed(f"unexpected {c!r} at {i}")


def scan_string(s: str, i: int) -> int | None:
    """Index past the JSON string starting at ``s[i] == '"'``, None if unfinished."""
    j = i + 1
    n = len(s)
    while j < n:
        c = s[j]
        if c == '"':
            return j + 1
        if c == "\\":
            if j + 1 >= n:
                return None
            e = s[j + 1]
            if e not in _ESCAPES:
                raise Malformed(f"bad escape at {j}")
            if e == "u":
                digits = s[j + 2 : j + 6]
                if any(d not in _HEX for d in digits):
                    raise Malformed(f"bad \\u escape at {j}")
                if len(digits) < 4:
                    return None
                j += 6
            else:
                j += 2
            continue
        if c < " ":
            raise Malformed(f"control character in string at {j}")
        j += 1
    return None


def _container(s: str, i: int, close: str, *, keyed: bool) -> int | None:
    j = skip_ws(s, i + 1)
    if j >= len(s):
        return None
    if s[j] == close:
        return j + 1
    while True:
        if keyed:
            j = _key(s, j)
            if j is None:
                return None
        j = _value(s, skip_ws(s, j))
        if j is None:
            return None
        j = skip_ws(s, j)
        if j >= len(s):
            return None
        if s[j] == close:
            return j + 1
        if s[j] != ",":
            raise Malformed(f"expected ',' or {close!r} at {j}")
        j = skip_ws(s, j + 1)


def _key(s: str, j: int) -> int | None:
    """Past ``"key" :`` starting at ``j``; None if unfinished."""
    j = skip_ws(s, j)
    if j >= len(s):
        return None
    if s[j] != '"':
        raise Malformed(f"expected a key at {j}")
    j = scan_string(s, j)
    if j is None:
        return None
    j = skip_ws(s, j)
    if j >= len(s):
        return None
    if s[j] != ":":
        raise Malformed(f"expected ':' at {j}")
    return j + 1


@dataclass
class PartialObject:
    """The members of a JSON object read so far: key → (value start, value end or None if unfinished)."""

    members: dict[str, tuple[int, int | None]]
    end: int | None  # index past the closing brace; None while the object is open


def scan_object(s: str, i: int) -> PartialObject:
    """Read the object starting at ``s[i]`` (after whitespace) as far as ``s`` goes.

    A key is listed once its text and colon are complete; its value end is None while the value is open.
    """
    import json

    i = skip_ws(s, i)
    members: dict[str, tuple[int, int | None]] = {}
    if i >= len(s):
        return PartialObject(members, None)
    if s[i] != "{":
        raise Malformed(f"expected '{{' at {i}")
    j = skip_ws(s, i + 1)
    if j < len(s) and s[j] == "}":
        return PartialObject(members, j + 1)
    while j < len(s):
        key_end = _key(s, j)
        if key_end is None:
            break
        key_start = skip_ws(s, j)
        key = json.loads(s[key_start : scan_string(s, key_start)])
        v_start = skip_ws(s, key_end)
        v_end = scan_value(s, v_start)
        members[key] = (v_start, v_end)
        if v_end is None:
            break
        j = skip_ws(s, v_end)
        if j >= len(s):
            break
        if s[j] == "}":
            return PartialObject(members, j + 1)
        if s[j] != ",":
            raise Malformed(f"expected ',' or '}}' at {j}")
        j = skip_ws(s, j + 1)
    return PartialObject(members, None)
