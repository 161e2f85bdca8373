"""The constraint a completions or chat request asks for, in each spelling clients use.

OpenAI's ``response_format`` (``text`` | ``json_object`` | ``json_schema``), vLLM's older ``guided_json`` /
``guided_regex`` / ``guided_choice`` / ``guided_grammar`` extras and its newer ``structured_outputs`` object all
become one ``StructuredOutputsParams``. More than one constraint in a request is a 400 naming both; so is a
field we would otherwise have to ignore (a whitespace pattern, another backend), because ignoring it would
mean output the client did not ask for.
"""

from __future__ import annotations

from tidellm.entrypoints.openai import errors
from tidellm.entrypoints.openai.protocol import _SamplingFields
from tidellm.sample.params import StructuredOutputsParams

_BACKENDS = ("auto", "xgrammar")


def structured_outputs_from_request(
    req: _SamplingFields,
) -> tuple[StructuredOutputsParams | None, str | None]:
    """(the request's constraint or None, the request field it came from, for error messages)."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(("response_format", StructuredOutputsParams(json_object=True)))
    elif rf is not None and rf.type == "json_schema":
        js = rf.json_schema
        if js is None or js.schema_ is None:
            param = "response_format.json_schema" + ("" if js is None else ".schema")
            raise errors.bad_request(
                "response_format of type 'json_schema' needs json_schema.schema, the JSON schema of the "
                "reply (e.g. {'type': 'json_schema', 'json_schema': {'name': 'x', 'schema': {...}}}).",
                param=param,
            )
        found.append(("response_format", StructuredOutputsParams(json=js.schema_)))
    guided = {
        "guided_json": ("json", req.guided_json),
        "guided_regex": ("regex", req.guided_regex),
        "guided_choice": ("choice", req.guided_choice),
        "guided_grammar": ("grammar", req.guided_grammar),
    }
    for name, (field, value) in guided.items():
        if value is not None:
            found.append((name, _params(name, **{field: value})))
    so = req.structured_outputs
    if so is not None:
        kwargs = so.model_dump(exclude_none=True, by_alias=True)
        if not any(k != "disable_any_whitespace" for k in kwargs):
            raise errors.bad_request(
                "structured_outputs must set one of json, regex, choice, grammar or json_object.",
                param="structured_outputs",
            )
        found.append(("structured_outputs", _params("structured_outputs", **kwargs)))

    if req.guided_whitespace_pattern is not None:
        raise errors.bad_request(
            "guided_whitespace_pattern is not supported; use structured_outputs.disable_any_whitespace for "
            "compact JSON.",
            param="guided_whitespace_pattern",
        )
    backend = req.guided_decoding_backend
    if backend is not None and backend.split(":")[0] not in _BACKENDS:
        raise errors.bad_request(
            f"guided_decoding_backend {backend!r} is not available; this server uses xgrammar.",
            param="guided_decoding_backend",
        )
    if len(found) > 1:
        names = " and ".join(name for name, _ in found)
        raise errors.bad_request(
            f"Only one constraint per request: got {names}. Keep one of them.", param=found[1][0]
        )
    if not found:
        return None, None
    name, params = found[0]
    if backend is not None and "disable-any-whitespace" in backend.split(":", 1)[-1]:
        params.disable_any_whitespace = True  # vLLM's "xgrammar:disable-any-whitespace" spelling
    return params, name


def _params(param: str, **kwargs: object) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**kwargs)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise errors.bad_request(str(e), param=param) from None
