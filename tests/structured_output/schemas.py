"""JSON schemas for the structured-output tests: nested objects, arrays with bounds, enums, required and
optional fields, bounded numbers, patterns, formats, anyOf, $ref. Each comes with a prompt that invites it.

Strings carry a maxLength and numbers bounds so that every reply ends well within a small max_tokens even
from a 135M model (an unbounded string can go on for ever, and a truncated reply would not parse)."""

from __future__ import annotations

SCHEMAS: dict[str, tuple[str, dict]] = {
    "person": (
        "Describe a person with a name, an age and an email address.",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 20},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "email": {"type": "string", "format": "email"},
            },
            "required": ["name", "age", "email"],
        },
    ),
    "nested_address": (
        "Give a user and their postal address.",
        {
            "type": "object",
            "properties": {
                "user": {"type": "string", "maxLength": 20},
                "address": {
                    "type": "object",
                    "properties": {
                        "street": {"type": "string", "maxLength": 30},
                        "city": {"type": "string", "enum": ["Paris", "Berlin", "Tokyo", "Lima"]},
                        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                    },
                    "required": ["street", "city", "zip"],
                },
            },
            "required": ["user", "address"],
        },
    ),
    "todo_list": (
        "List a few tasks with an id and whether each is done.",
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 1000},
                    "done": {"type": "boolean"},
                },
                "required": ["id", "done"],
            },
            "minItems": 1,
            "maxItems": 3,
        },
    ),
    "status_enum": (
        "Report the account status.",
        {
            "type": "object",
            "properties": {
                "status": {"enum": ["active", "inactive", "banned"]},
                "version": {"const": 2},
            },
            "required": ["status", "version"],
        },
    ),
    "bounded_number": (
        "Give the weather: a temperature and its unit.",
        {
            "type": "object",
            "properties": {
                "temperature": {"type": "number", "minimum": -50, "maximum": 50},
                "unit": {"type": "string", "enum": ["C", "F"]},
                "humidity": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 100},
            },
            "required": ["temperature", "unit", "humidity"],
        },
    ),
    "patterns": (
        "Give a product code and a phone number.",
        {
            "type": "object",
            "properties": {
                "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                "phone": {"type": "string", "pattern": "^\\+1-[0-9]{3}-[0-9]{4}$"},
            },
            "required": ["code", "phone"],
        },
    ),
    "string_array": (
        "Name some fruits.",
        {
            "type": "object",
            "properties": {
                "fruits": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 12},
                    "minItems": 2,
                    "maxItems": 4,
                }
            },
            "required": ["fruits"],
        },
    ),
    "optional_nullable": (
        "Give a title and, if there is one, a subtitle.",
        {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 25},
                "subtitle": {"type": ["string", "null"], "maxLength": 25},
                "pages": {"type": "integer", "minimum": 1, "maximum": 999},
                "step": {"type": "integer", "multipleOf": 5},
            },
            "required": ["title", "subtitle"],
        },
    ),
    "any_of": (
        "Give a small value: a digit or a short word.",
        {
            "type": "object",
            "properties": {
                "value": {
                    "anyOf": [
                        {"type": "integer", "minimum": 0, "maximum": 9},
                        {"type": "string", "maxLength": 5},
                    ]
                }
            },
            "required": ["value"],
        },
    ),
    "formats": (
        "Give an event date and an id.",
        {
            "type": "object",
            "properties": {
                "date": {"type": "string", "format": "date"},
                "id": {"type": "string", "format": "uuid"},
            },
            "required": ["date", "id"],
        },
    ),
    "deep_nesting": (
        "Describe a settings tree.",
        {
            "type": "object",
            "properties": {
                "settings": {
                    "type": "object",
                    "properties": {
                        "display": {
                            "type": "object",
                            "properties": {
                                "dark": {"type": "boolean"},
                                "size": {"type": "integer", "minimum": 8, "maximum": 32},
                            },
                            "required": ["dark", "size"],
                        }
                    },
                    "required": ["display"],
                }
            },
            "required": ["settings"],
        },
    ),
    "defs_ref": (
        "Give a short path of points.",
        {
            "$defs": {
                "point": {
                    "type": "object",
                    "properties": {
                        "x": {"type": "integer", "minimum": -10, "maximum": 10},
                        "y": {"type": "integer", "minimum": -10, "maximum": 10},
                    },
                    "required": ["x", "y"],
                }
            },
            "type": "object",
            "properties": {"path": {"type": "array", "items": {"$ref": "#/$defs/point"}, "maxItems": 3}},
            "required": ["path"],
        },
    ),
    "int_array": (
        "Give three scores out of 100.",
        {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 100},
            "minItems": 3,
            "maxItems": 3,
        },
    ),
}
