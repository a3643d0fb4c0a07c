"""HTTP routes derived from the ``google.api.http`` annotations in the service descriptors.

Annotate an RPC in ``protos/`` and, after regenerating, the route exists: nothing here names
an RPC. Path templates follow google/api/http.proto (``/v1/jobs/{job_id}:cancel``); a body of
``"*"`` maps the whole JSON body onto the request; query parameters fill other fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from google.api import annotations_pb2
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

_VERBS = ("get", "put", "post", "delete", "patch")
_PARAM = re.compile(r"\{([a-z_][a-z0-9_.]*)(?:=[^}]*)?\}")


@dataclass(frozen=True)
class HttpRoute:
    verb: str  # GET, POST, ...
    template: str  # /v1/jobs/{job_id}:cancel
    body: str  # "" (no body), "*" (whole body) or a field name
    method: MethodDescriptor
    service: ServiceDescriptor

    @property
    def path_params(self) -> list[str]:
        return _PARAM.findall(self.template)

    @property
    def server_streaming(self) -> bool:
        return self.method.server_streaming

    @property
    def grpc_path(self) -> str:
        return f"/{self.service.full_name}/{self.method.name}"

    @property
    def request_class(self) -> type[Message]:
        return GetMessageClass(self.method.input_type)

    @property
    def response_class(self) -> type[Message]:
        return GetMessageClass(self.method.output_type)

    @property
    def regex(self) -> re.Pattern[str]:
        """Path params match one segment and may not contain ':' so custom verbs stay distinct."""
        pattern, pos = "", 0
        for m in _PARAM.finditer(self.template):
            pattern += re.escape(self.template[pos : m.start()]) + f"(?P<{m.group(1)}>[^/:]+)"
            pos = m.end()
        pattern += re.escape(self.template[pos:])
        return re.compile(f"^{pattern}$")


def http_routes(*services: ServiceDescriptor) -> list[HttpRoute]:
    """Every annotated method of ``services``, including additional_bindings."""
    routes = []
    for service in services:
        for method in service.methods:
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            rule = options.Extensions[annotations_pb2.http]
            for binding in [rule, *rule.additional_bindings]:
                verb = binding.WhichOneof("pattern")
                if verb not in _VERBS:
                    continue
                routes.append(HttpRoute(verb.upper(), getattr(binding, verb), binding.body, method, service))
    return routes
