"""Constraints before they reach the engine: StructuredOutputsParams checks, cache keys, and the front-end
validation that turns bad or unenforceable schemas, regexes and grammars into clear errors."""

from __future__ import annotations

import msgspec
import pytest
from schemas import SCHEMAS

from tidellm.sample.params import SamplingParams, StructuredOutputsParams
from tidellm.structured_output import backend as backend_mod
from tidellm.structured_output.json_schema import unsupported_features
from tidellm.structured_output.spec import GrammarSpec, StructuredOutputError, grammar_spec
from tidellm.structured_output.validate import StructuredOutputValidator


# ------------------------------------------------------------------ StructuredOutputsParams
def test_params_one_constraint_and_types():
    assert StructuredOutputsParams(json={"type": "object"}).kind == "json"
    assert StructuredOutputsParams(choice=("a", "b")).choice == ["a", "b"]
    assert StructuredOutputsParams(json_object=True).kind == "json_object"
    StructuredOutputsParams()  # may be built empty and filled in (vLLM's front end does)
    with pytest.raises(ValueError, match=r"exactly one of .* \(got json, regex\)"):
        StructuredOutputsParams(json={}, regex="a")
    with pytest.raises(ValueError, match="got none"):
        SamplingParams(structured_outputs=StructuredOutputsParams())
    with pytest.raises(ValueError, match="got none"):
        SamplingParams(structured_outputs=StructuredOutputsParams(json_object=False))
    for kwargs, name in [
        ({"choice": []}, "structured_outputs.choice"),
        ({"choice": ["a", 1]}, "structured_outputs.choice"),
        ({"regex": ""}, "structured_outputs.regex"),
        ({"grammar": 3}, "structured_outputs.grammar"),
        ({"json": 5}, "structured_outputs.json"),
        ({"json_object": "yes"}, "structured_outputs.json_object"),
        ({"regex": "a", "disable_any_whitespace": 1}, "structured_outputs.disable_any_whitespace"),
    ]:
        with pytest.raises(ValueError, match=name.replace(".", r"\.") + " must be"):
            StructuredOutputsParams(**kwargs)
    with pytest.raises(ValueError, match="structured_outputs must be a StructuredOutputsParams"):
        SamplingParams(structured_outputs={"json": {}})


def test_params_travel_in_msgspec_and_fan_out():
    p = SamplingParams(n=2, structured_outputs=StructuredOutputsParams(json={"type": "integer"}))
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=SamplingParams)
    assert back.structured_outputs == p.structured_outputs
    children = p.child_params()
    assert all(c.structured_outputs == p.structured_outputs for c in children)
    assert children[0].structured_outputs is not children[1].structured_outputs  # each child its own copy


def test_spec_key_is_the_same_for_dict_and_text_and_keeps_key_order():
    a = grammar_spec(StructuredOutputsParams(json={"b": 1, "a": 2}))
    b = grammar_spec(StructuredOutputsParams(json='{"b": 1,\n "a": 2}'))
    assert a == b == GrammarSpec("json", '{"b":1,"a":2}', True)
    compact = grammar_spec(StructuredOutputsParams(json={"b": 1, "a": 2}, disable_any_whitespace=True))
    assert compact != a and not compact.any_whitespace
    assert grammar_spec(StructuredOutputsParams(choice=["x", 'y"'])).text == '["x","y\\""]'
    with pytest.raises(StructuredOutputError, match="not valid JSON"):
        grammar_spec(StructuredOutputsParams(json="{oops"))


# ------------------------------------------------------------------ unenforceable schema features
@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": "array", "uniqueItems": True}, "'uniqueItems' at #"),
        ({"oneOf": [{"type": "integer"}, {"type": "string"}]}, "'oneOf' at # cannot be enforced; use anyOf"),
        ({"allOf": [{"type": "integer"}, {"minimum": 1}]}, "'allOf' with 2 subschemas"),
        ({"not": {"type": "string"}}, "'not' at #"),
        ({"if": {}, "then": {}}, "'if' at #"),
        ({"type": "array", "contains": {"const": 1}}, "'contains'"),
        ({"type": "object", "dependentRequired": {"a": ["b"]}}, "'dependentRequired'"),
        ({"type": "object", "patternProperties": {"^x": {}}}, "'patternProperties'"),
        ({"type": "number", "multipleOf": 0.5}, "only enforced on integers"),
        ({"type": "integer", "multipleOf": 5, "maximum": 100}, "together with minimum/maximum"),
        ({"type": "string", "format": "password"}, "format 'password' at #"),
        ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}, "'maxLength' together with 'pattern'"),
        ({"type": "string", "format": "email", "minLength": 3}, "'minLength' together with 'format'"),
        ({"enum": ["aaaa", "b"], "maxLength": 2}, "'maxLength' next to enum/const"),
        ({"type": "integer", "enum": [1, "x"]}, "the value 'x' at # does not have the type integer"),
        ({"$ref": "https://example.com/s.json"}, "is not local"),
        (
            {"type": "object", "properties": {"tags": {"type": "array", "items": {"not": {}}}}},
            "'not' at #/properties/tags/items",
        ),
        ({"$defs": {"a/b": {"oneOf": []}}, "$ref": "#/$defs/a~1b"}, "at #/$defs/a~1b"),
    ],
)
def test_unenforceable_features_are_named_with_their_place(schema, expected):
    problems = unsupported_features(schema)
    assert problems and expected in problems[0], problems


def test_supported_schemas_pass_and_keywords_are_only_read_where_they_are_keywords():
    for name, (_, schema) in SCHEMAS.items():
        assert unsupported_features(schema) == [], name
    # A property called "not", an enum of the right type, annotations holding keyword-like data: all fine.
    schema = {
        "type": "object",
        "properties": {"not": {"type": "string", "enum": ["a", "b"]}, "oneOf": {"type": "integer"}},
        "default": {"oneOf": 1},
        "examples": [{"uniqueItems": True}],
    }
    assert unsupported_features(schema) == []
    assert unsupported_features(True) == []


# ------------------------------------------------------------------ the validator (xgrammar's parsers)
@pytest.mark.parametrize(
    ("so", "match"),
    [
        (StructuredOutputsParams(regex="("), r"Invalid regex: .*parenthesis is not closed"),
        (StructuredOutputsParams(regex="a(?=b)"), r"Invalid regex: .*Lookahead"),
        (StructuredOutputsParams(grammar='start ::= "a"'), r"Invalid grammar \(EBNF.*'root' rule.*not found"),
        (StructuredOutputsParams(grammar='root ::= "a" |'), r"Invalid grammar"),
        (StructuredOutputsParams(json={"type": "foo"}), r'Invalid JSON schema: Unsupported type "foo"'),
        (StructuredOutputsParams(json={"$ref": "#/$defs/x"}), r"Invalid JSON schema: .*\$defs"),
        (StructuredOutputsParams(json={"type": "integer", "minimum": 5, "maximum": 1}), r"minimum greater"),
        (StructuredOutputsParams(json="[1]"), r"should be an object or bool"),
        (
            StructuredOutputsParams(json={"type": "string", "pattern": "^(?=.*[0-9])[a-z0-9]+$"}),
            r"the pattern .* at # cannot be enforced: .*Lookahead",
        ),
        (StructuredOutputsParams(json={"type": "array", "uniqueItems": True}), r"Unsupported JSON schema"),
    ],
)
def test_validator_refuses_with_the_parser_message(so, match):
    with pytest.raises(StructuredOutputError, match=match) as info:
        StructuredOutputValidator().validate(so)
    assert "/project/cpp" not in str(info.value) and "Check failed" not in str(info.value)


def test_validator_accepts_and_remembers(monkeypatch):
    v = StructuredOutputValidator()
    good = [
        StructuredOutputsParams(regex=r"\d{3}-[a-z]+"),
        StructuredOutputsParams(grammar='root ::= "yes" | "no" | [0-9]+'),
        StructuredOutputsParams(choice=['say "hi"', "back\\slash", "new\nline", "ünï"]),
        StructuredOutputsParams(json_object=True),
        *(StructuredOutputsParams(json=s) for _, s in SCHEMAS.values()),
    ]
    for so in good:
        v.validate(so)
    calls = []
    real = backend_mod.backend_class

    def counting(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr("tidellm.structured_output.validate.backend_class", counting)
    for so in good:
        v.validate(so)
    assert calls == []  # every spec was checked once
