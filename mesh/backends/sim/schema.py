"""Making the sim's JSON answer valid for a caller's JSON schema, as constrained decoding would.

``conform(schema, hint)`` builds an instance of ``schema`` that keeps whatever parts of ``hint``
(the role's natural answer) fit. It covers the JSON-schema subset that pydantic emits and that
function-calling APIs accept: ``type``, ``properties``/``required``/``additionalProperties``,
``items``/``minItems``/``maxItems``, ``enum``/``const``, ``anyOf``/``oneOf``/``allOf``, local
``$ref`` into ``$defs``/``definitions``, string/number bounds and ``default``.
"""

from __future__ import annotations

import re
from typing import Any

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list,), "object": (dict,), "null": (type(None),),
}


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    while isinstance(ref, str) and ref.startswith("#/"):
        node: Any = root
        for key in ref[2:].split("/"):
            node = node[key]
        schema = {**node, **{k: v for k, v in schema.items() if k != "$ref"}}
        ref = node.get("$ref")
    return schema


def _type_ok(value: Any, kind: str) -> bool:
    if isinstance(value, bool) and kind in ("integer", "number"):
        return False
    return isinstance(value, _JSON_TYPES.get(kind, (object,)))


def conform(schema: dict[str, Any], hint: Any = None, *, root: dict[str, Any] | None = None, name: str = "value") -> Any:
    root = root if root is not None else schema
    schema = _resolve(schema, root)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return hint if hint in schema["enum"] else schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [_resolve(o, root) for o in schema[key]]
            fitting = [o for o in options if _fits(hint, o)]
            non_null = [o for o in options if o.get("type") != "null"]
            return conform((fitting or non_null or options)[0], hint, root=root, name=name)
    if "allOf" in schema:
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            part = _resolve(part, root)
            merged.setdefault("properties", {}).update(part.get("properties", {}))
            merged["required"] = [*merged.get("required", []), *part.get("required", [])]
            merged.setdefault("type", part.get("type"))
        return conform(merged, hint, root=root, name=name)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if _type_ok(hint, k)), next((k for k in kind if k != "null"), kind[0]))
    if kind is None:
        kind = "object" if "properties" in schema else "string" if hint is None else None
    if kind == "object":
        return _object(schema, hint if isinstance(hint, dict) else {}, root)
    if kind == "array":
        return _array(schema, hint if isinstance(hint, list) else [], root, name)
    if kind is not None and _type_ok(hint, kind) and _bounds_ok(hint, schema):
        return hint
    if "default" in schema:
        return schema["default"]
    return _scalar(kind, schema, name, hint)


def _fits(value: Any, schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    if value is None:
        return kind == "null"
    return kind is None or any(_type_ok(value, k) for k in (kind if isinstance(kind, list) else [kind]))


def _bounds_ok(value: Any, schema: dict[str, Any]) -> bool:
    if isinstance(value, str):
        pattern = schema.get("pattern")
        return (
            schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value))
            and (pattern is None or re.search(pattern, value) is not None)
        )
    if isinstance(value, int | float) and not isinstance(value, bool):
        return schema.get("minimum", value) <= value <= schema.get("maximum", value)
    return True


def _object(schema: dict[str, Any], hint: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    props: dict[str, Any] = schema.get("properties", {})
    out: dict[str, Any] = {}
    for key, sub in props.items():
        if key in hint or key in schema.get("required", []):
            out[key] = conform(sub, hint.get(key), root=root, name=key)
    extra = schema.get("additionalProperties", True)
    if extra is not False:
        for key, value in hint.items():
            if key not in props:
                out[key] = conform(extra, value, root=root, name=key) if isinstance(extra, dict) else value
    return out


def _array(schema: dict[str, Any], hint: list[Any], root: dict[str, Any], name: str) -> list[Any]:
    items = schema.get("items", {})
    lo, hi = schema.get("minItems", 0), schema.get("maxItems")
    values = hint[:hi] if hi is not None else list(hint)
    values += [None] * max(lo - len(values), 0)
    return [conform(items, v, root=root, name=name) for v in values]


def _scalar(kind: str | None, schema: dict[str, Any], name: str, hint: Any) -> Any:
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0))
        value = max(low, min(schema.get("maximum", low), low))
        return int(value) + (1 if "exclusiveMinimum" in schema else 0) if kind == "integer" else float(value)
    if kind == "boolean":
        return bool(hint) if hint is not None else True
    if kind == "null":
        return None
    text = hint if isinstance(hint, str) else f"[simulated] {name}"
    if "pattern" in schema and not re.search(schema["pattern"], text):
        text = re.sub(r"[^A-Za-z0-9_-]", "-", name)[:64] or "x"
    lo, hi = schema.get("minLength", 0), schema.get("maxLength")
    text = text[:hi] if hi is not None else text
    return text + "x" * max(lo - len(text), 0)
