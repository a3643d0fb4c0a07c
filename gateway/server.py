"""Run the HTTP facade under uvicorn (``audiomesh serve gateway``)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

import uvicorn

from audiomesh.config import Settings
from audiomesh.telemetry import logger

from .app import create_app


async def serve_gateway(
    settings: Settings,
    *,
    port: int | None = None,
    ready_file: Path | None = None,
    announce: dict[str, int] | None = None,
) -> None:
    """``announce``: more to write in the ready file (the metrics port)."""
    if port is None:
        port = int(settings.gateway_addr.rpartition(":")[2])
    clients = settings.client_factory()
    app = create_app(settings, clients=clients)
    # Bind first so port 0 works and the ready file can name the real port.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,  # AccessLog middleware writes one structured line per request
        timeout_graceful_shutdown=20,
        ssl_certfile=str(settings.tls_cert_file) if settings.tls_cert_file else None,
        ssl_keyfile=str(settings.tls_key_file) if settings.tls_key_file else None,
    )
    server = uvicorn.Server(config)

    async def announce_ready() -> None:
        while not server.started:  # noqa: ASYNC110 - uvicorn exposes only a flag
            await asyncio.sleep(0.05)
        scheme = "https" if settings.tls_cert_file else "http"
        logger().info("listening", url=f"{scheme}://{settings.host}:{port}")
        if ready_file is not None:
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"service": "gateway", "port": port, "pid": os.getpid(), **(announce or {})}))
            tmp.replace(ready_file)

    announcer = asyncio.ensure_future(announce_ready())
    try:
        await server.serve(sockets=[sock])
    finally:
        announcer.cancel()
        await clients.close()
