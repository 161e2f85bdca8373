"""JSON-schema keywords the grammar cannot enforce while generating, found before anything is queued.

A grammar builds the output left to right; some keywords relate parts of a value to each other (unique
items, "exactly one of", "if this then that") or to everything it may contain, which a token-by-token
grammar cannot check. Others xgrammar 0.2 could enforce alone but drops in combination (a length next to
a pattern or format, multipleOf next to bounds, constraints next to an enum). In every such case it
accepts the schema and silently ignores the keyword (each checked against an instance that breaks it), so
the output could fail validation; we refuse the schema with a 400 naming the keyword, where and the fix.
"""

from __future__ import annotations

from typing import Any

# keyword -> how to fix the schema
_UNSUPPORTED = {
    "oneOf": "use anyOf (whether exactly one branch matches cannot be checked while generating)",
    "not": "describe the allowed values positively",
    "if": "use anyOf over the allowed cases",
    "then": "use anyOf over the allowed cases",
    "else": "use anyOf over the allowed cases",
    "contains": "list the items with prefixItems or constrain every item with items",
    "minContains": "constrain every item with items",
    "maxContains": "constrain every item with items",
    "dependentRequired": "list the fields in required, or use anyOf over the allowed shapes",
    "dependentSchemas": "use anyOf over the allowed shapes",
    "dependencies": "use anyOf over the allowed shapes",
    "patternProperties": "list the properties under properties",
    "propertyNames": "list the properties under properties",
    "$dynamicRef": "use $ref to a local definition",
    "$recursiveRef": "use $ref to a local definition",
}

# Formats xgrammar enforces (each checked against an invalid string); others would be ignored.
SUPPORTED_FORMATS = frozenset(
    {
        "date",
        "time",
        "date-time",
        "duration",
        "email",
        "hostname",
        "ipv4",
        "ipv6",
        "uri",
        "uri-reference",
        "uri-template",
        "uuid",
        "json-pointer",
        "relative-json-pointer",
    }
)

_SCHEMA_KEYS = (
    "items",
    "additionalProperties",
    "unevaluatedProperties",
    "unevaluatedItems",
    "additionalItems",
)
_SCHEMA_LIST_KEYS = ("anyOf", "allOf", "prefixItems")
_SCHEMA_MAP_KEYS = ("properties", "$defs", "definitions")


# Validation keywords xgrammar ignores when a node also has enum / const (it emits one of the values as is).
_VALUE_CONSTRAINTS = (
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
)
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_JSON_TYPES = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
    "array": (list,),
    "object": (dict,),
}


def unsupported_features(schema: Any) -> list[str]:
    """One message per keyword in ``schema`` that cannot be enforced, naming where it is and the fix."""
    problems: list[str] = []
    for path, node in iter_subschemas(schema):
        problems += _node_problems(node, path)
    return problems


def string_patterns(schema: Any) -> list[tuple[str, str]]:
    """(path, regex) of every ``pattern`` in ``schema``: the backend checks each as a regex, since in a schema
    xgrammar skips what it cannot enforce (a lookahead) instead of refusing it."""
    return [(p, n["pattern"]) for p, n in iter_subschemas(schema) if isinstance(n.get("pattern"), str)]


def iter_subschemas(node: Any, path: str = "#"):
    """Every subschema (dict) of ``node`` with its JSON-pointer path, following the keywords that hold
    subschemas (never into annotations such as ``default`` or ``examples``)."""
    if not isinstance(node, dict):
        return  # booleans are fine; other types are reported by the backend's parser
    yield path, node
    for key in _SCHEMA_KEYS:
        if key in node:
            yield from iter_subschemas(node[key], f"{path}/{key}")
    for key in _SCHEMA_LIST_KEYS:
        sub = node.get(key)
        if isinstance(sub, list):
            for i, s in enumerate(sub):
                yield from iter_subschemas(s, f"{path}/{key}/{i}")
    for key in _SCHEMA_MAP_KEYS:
        sub = node.get(key)
        if isinstance(sub, dict):
            for name, s in sub.items():
                yield from iter_subschemas(s, f"{path}/{key}/{_escape(name)}")


def _node_problems(node: dict, path: str) -> list[str]:
    problems = [
        f"'{key}' at {path} cannot be enforced; {fix}" for key, fix in _UNSUPPORTED.items() if key in node
    ]
    if node.get("uniqueItems") is True:
        problems.append(f"'uniqueItems' at {path} cannot be enforced; drop it or use an enum per position")
    all_of = node.get("allOf")
    if isinstance(all_of, list) and len(all_of) > 1:
        problems.append(f"'allOf' with {len(all_of)} subschemas at {path} cannot be enforced; merge them")
    if "multipleOf" in node:
        if node.get("type") != "integer" or not _is_int(node["multipleOf"]):
            problems.append(f"'multipleOf' at {path} is only enforced on integers, with an integer step")
        elif any(b in node for b in _BOUNDS):
            problems.append(
                f"'multipleOf' together with minimum/maximum at {path} cannot be enforced; list the allowed "
                "values in an enum instead"
            )
    fmt = node.get("format")
    if isinstance(fmt, str) and fmt not in SUPPORTED_FORMATS:
        problems.append(
            f"format '{fmt}' at {path} cannot be enforced; use a pattern, or one of: "
            + ", ".join(sorted(SUPPORTED_FORMATS))
        )
    lengths = [k for k in ("minLength", "maxLength") if k in node]
    shaped = [k for k in ("pattern", "format") if k in node]
    if lengths and shaped:
        problems.append(
            f"'{lengths[0]}' together with '{shaped[0]}' at {path} cannot be enforced; put the length in the "
            "pattern instead (e.g. ^[a-z]{1,20}$)"
        )
    if "enum" in node or "const" in node:
        values = node["enum"] if "enum" in node else [node["const"]]
        extra = [k for k in _VALUE_CONSTRAINTS if k in node]
        if extra:
            problems.append(
                f"'{extra[0]}' next to enum/const at {path} cannot be enforced; keep only the allowed values"
            )
        types = node.get("type")
        types = [types] if isinstance(types, str) else types
        if isinstance(types, list) and isinstance(values, list):
            for v in values:
                if not any(_has_type(v, t) for t in types):
                    problems.append(
                        f"the value {v!r} at {path} does not have the type {node['type']}; remove it"
                    )
                    break
    ref = node.get("$ref")
    if isinstance(ref, str) and not ref.startswith("#"):
        problems.append(f"'$ref' {ref!r} at {path} is not local; inline it under $defs and use '#/$defs/...'")
    return problems


def _has_type(value: Any, type_name: Any) -> bool:
    if type_name == "integer":
        return _is_int(value)
    if isinstance(value, bool) and type_name != "boolean":
        return False
    return isinstance(value, _JSON_TYPES.get(type_name, (object,)))


def _is_int(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


def _escape(name: str) -> str:
    """JSON-pointer escaping of a property name."""
    return str(name).replace("~", "~0").replace("/", "~1")
