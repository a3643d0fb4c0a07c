"""JSON Schemas for protobuf messages, following the proto3 JSON mapping (json_format).

One converter serves the manifest's committed schema (scripts/gen_protos.py) and the HTTP
facade's OpenAPI document, so both describe exactly what ``json_format`` writes and reads.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from google.api import field_behavior_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

if TYPE_CHECKING:
    from google._upb._message import Descriptor as UpbDescriptor
    from google._upb._message import FieldDescriptor as UpbFieldDescriptor

_FLOAT = {"anyOf": [{"type": "number"}, {"enum": ["NaN", "Infinity", "-Infinity"]}]}
_INT64 = {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": "^-?[0-9]{1,19}$"}]}  # written as strings
_SCALARS: dict[int, dict] = {
    FieldDescriptor.TYPE_DOUBLE: _FLOAT,
    FieldDescriptor.TYPE_FLOAT: _FLOAT,
    FieldDescriptor.TYPE_INT32: {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
    FieldDescriptor.TYPE_SINT32: {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1},
    FieldDescriptor.TYPE_INT64: _INT64,
    FieldDescriptor.TYPE_UINT64: _INT64,
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
}
_WELL_KNOWN: dict[str, dict] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string"},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.Any": {"type": "object", "properties": {"@type": {"type": "string"}}},
}


def message_schemas(
    *roots: Descriptor | UpbDescriptor,  # Message.DESCRIPTOR is either, by protobuf backend
    ref_prefix: str = "#/$defs/",
    required: dict[str, list[str]] | None = None,
    field_overrides: dict[str, dict] | None = None,
) -> dict[str, dict]:
    """Schemas of ``roots`` and every message they reach, keyed by full name.

    Fields annotated ``(google.api.field_behavior) = REQUIRED`` are listed as required;
    ``required`` adds more per message, ``field_overrides`` (by field full name) adds keywords.
    """
    defs: dict[str, dict] = {}
    required = required or {}
    field_overrides = field_overrides or {}

    def field_schema(field: FieldDescriptor | UpbFieldDescriptor) -> dict:
        if field.message_type is not None:
            full = field.message_type.full_name
            if field.message_type.GetOptions().map_entry:
                return {
                    "type": "object",
                    "additionalProperties": field_schema(field.message_type.fields_by_name["value"]),
                }
            if full in _WELL_KNOWN:
                return dict(_WELL_KNOWN[full])
            add(field.message_type)
            return {"$ref": ref_prefix + full}
        if field.enum_type is not None:
            return {"enum": [v.name for v in field.enum_type.values]}
        return copy.deepcopy(_SCALARS[field.type])

    def add(desc: Descriptor | UpbDescriptor) -> None:
        if desc.full_name in defs:
            return
        defs[desc.full_name] = {}  # recursion guard
        props = {}
        must = list(required.get(desc.full_name, []))
        for field in desc.fields:
            override = dict(field_overrides.get(field.full_name, {}))
            is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
            array = {k: override.pop(k) for k in ("minItems", "maxItems") if k in override}  # the list's, not an item's
            schema = field_schema(field) | override
            if field.is_repeated and not is_map:
                schema = {"type": "array", "items": schema, **array}
            props[field.json_name] = schema
            behaviors = field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
            if field_behavior_pb2.REQUIRED in behaviors and field.json_name not in must:
                must.append(field.json_name)
        body: dict = {"type": "object", "properties": props, "additionalProperties": False}
        if must:
            body["required"] = must
        defs[desc.full_name] = body

    for root in roots:
        add(root)
    return dict(sorted(defs.items()))
