"""gRPC plumbing shared by every service: one server bootstrap, one client factory."""

from audiomesh.rpc.client import ClientFactory, status_of
from audiomesh.rpc.server import (
    AuthPolicy,
    Registration,
    RunningServer,
    ServiceSpec,
    run_in_thread,
    start_server,
    stream_work,
)

__all__ = [
    "AuthPolicy",
    "ClientFactory",
    "Registration",
    "RunningServer",
    "ServiceSpec",
    "run_in_thread",
    "start_server",
    "status_of",
    "stream_work",
]
