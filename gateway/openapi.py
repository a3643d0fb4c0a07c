"""The OpenAPI 3.1 document, generated from the same descriptors as the routes."""

from __future__ import annotations

from google.rpc import status_pb2

import audiomesh
from audiomesh.protojson import message_schemas
from audiomesh.ranges import field_schemas
from audiomesh.v1 import orchestrator_pb2

from .routes import HttpRoute

_REF = "#/components/schemas/"
# Path parameters with a documented shape (job ids are UUID4 strings; tracks are names).
_PATH_SCHEMAS = {
    "job_id": {
        "type": "string",
        "format": "uuid",
        "pattern": "^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$",
    },
    "track": {"type": "string", "pattern": "^[a-z0-9_]{1,64}$"},
}


# Object keys: the server accepts more (see audiomesh.store.validate_key); the schema promises
# a conservative subset that is always valid: '/'-separated names without dot segments.
_KEY = {
    "pattern": "^[A-Za-z0-9_][A-Za-z0-9._@ -]{0,127}(/[A-Za-z0-9_][A-Za-z0-9._@ -]{0,127}){0,7}$"
}  # principals may hold @
_FIELD_OVERRIDES = {
    "audiomesh.v1.CreateJobRequest.input_key": _KEY,
    **field_schemas(),  # job option and page-size ranges: the table the validators read (audiomesh.ranges)
}


def _path_param(name: str) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": _PATH_SCHEMAS.get(name, {"type": "string"})}


_ERROR = {
    "description": "google.rpc.Status",
    "content": {"application/json": {"schema": {"$ref": _REF + "google.rpc.Status"}}},
}
_ERRORS = {str(code): _ERROR for code in (400, 401, 403, 404, 409, 413, 415, 429, 499, 500, 501, 503, 504)}


def _query_params(route: HttpRoute, schemas: dict) -> list[dict]:
    if route.body == "*":
        return []
    params = []
    for field in route.request_class.DESCRIPTOR.fields:
        if field.name in route.path_params or field.message_type is not None:
            continue
        schema = schemas[route.request_class.DESCRIPTOR.full_name]["properties"][field.json_name]
        params.append({"name": field.json_name, "in": "query", "required": False, "schema": schema})
    return params


def openapi_document(routes: list[HttpRoute]) -> dict:
    roots = [r.request_class.DESCRIPTOR for r in routes] + [r.response_class.DESCRIPTOR for r in routes]
    roots += [orchestrator_pb2.UploadAudioResponse.DESCRIPTOR, status_pb2.Status.DESCRIPTOR]
    schemas = message_schemas(*roots, ref_prefix=_REF, field_overrides=_FIELD_OVERRIDES)
    paths: dict[str, dict] = {}
    for route in routes:
        response_ref = {"$ref": _REF + route.response_class.DESCRIPTOR.full_name}
        if route.server_streaming:
            line = {
                "type": "object",
                "properties": {"result": response_ref, "error": {"$ref": _REF + "google.rpc.Status"}},
            }
            content = {"application/x-ndjson": {"schema": line}, "text/event-stream": {"schema": {"type": "string"}}}
            ok = {"description": "one JSON object per line (NDJSON), or Server-Sent Events", "content": content}
        else:
            ok = {"description": "OK", "content": {"application/json": {"schema": response_ref}}}
        operation = {
            "operationId": route.method.name,
            "tags": [route.service.name],
            "parameters": [_path_param(p) for p in route.path_params] + _query_params(route, schemas),
            "responses": {"200": ok, **_ERRORS},
        }
        if route.body:
            operation["requestBody"] = {
                "required": False,
                "content": {"application/json": {"schema": {"$ref": _REF + route.request_class.DESCRIPTOR.full_name}}},
            }
        paths.setdefault(route.template, {})[route.verb.lower()] = operation
    job_id = _path_param("job_id")
    json_ok = lambda ref: {"description": "OK", "content": {"application/json": {"schema": {"$ref": _REF + ref}}}}  # noqa: E731
    upload = {
        "operationId": "UploadFile",
        "summary": "Upload audio (multipart: optional 'options' JobOptions JSON or 'model', then 'file') and start a job",
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "options": {"type": "string", "description": "JobOptions as JSON"},
                            "model": {"type": "string"},
                            "file": {"type": "string", "format": "binary"},
                        },
                        "required": ["file"],
                    }
                }
            },
        },
        "responses": {"200": json_ok("audiomesh.v1.UploadAudioResponse"), **_ERRORS},
    }
    binary = {
        "description": "the file",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
    paths["/v1/jobs:upload"] = {"post": upload}
    paths["/process"] = {"post": {**upload, "operationId": "Process", "summary": "Seed alias of /v1/jobs:upload"}}
    paths["/health"] = {
        "get": {
            "operationId": "Health",
            "summary": "gRPC health of every service",
            "responses": {
                "200": {"description": "all SERVING", "content": {"application/json": {"schema": {"type": "object"}}}},
                "503": {
                    "description": "some service is not SERVING",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
            },
        }
    }
    paths["/config"] = {
        "get": {"operationId": "Config", "responses": {"200": json_ok("audiomesh.v1.GetConfigResponse")}}
    }
    paths["/job/{job_id}"] = {
        "get": {
            "operationId": "Job",
            "parameters": [job_id],
            "responses": {"200": json_ok("audiomesh.v1.GetJobResponse"), **_ERRORS},
        }
    }
    paths["/job/{job_id}/outputs"] = {
        "get": {
            "operationId": "JobOutputs",
            "parameters": [job_id],
            "responses": {
                "200": {
                    "description": "tracks with download URLs",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                **_ERRORS,
            },
        }
    }
    paths["/download/{job_id}/all"] = {
        "get": {
            "operationId": "DownloadAll",
            "parameters": [job_id],
            "responses": {
                "200": {
                    "description": "ZIP of every track and manifest.json",
                    "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
                },
                **_ERRORS,
            },
        }
    }
    paths["/download/{job_id}/{track}"] = {
        "get": {
            "operationId": "DownloadTrack",
            "parameters": [job_id, _path_param("track")],
            "responses": {"200": binary, "206": binary, "416": {"description": "range not satisfiable"}, **_ERRORS},
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "audiomesh",
            "version": audiomesh.__version__,
            "description": "Music separation: stems, HPSS, composites, loudness.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": schemas},
    }
