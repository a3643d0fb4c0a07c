# syntax=docker/dockerfile:1.7
# One image for every audiomesh service:
#   docker run IMAGE serve NAME     NAME: orchestrator | separation | hpss | composite | normalize | gateway
#   docker run -p 8080:8080 IMAGE   (no arguments: `audiomesh up`, the whole mesh in one container)
#
# Build, CPU torch (the default):  docker build -t audiomesh .
# Build, CUDA torch:               docker build --build-arg TORCH_VARIANT=cu128 -t audiomesh:cuda .
#   TORCH_VARIANT names a PyTorch wheel index (cpu, cu126, cu128, ...): pick the CUDA release
#   your nodes' driver supports. The wheels bring their own CUDA runtime; the host needs only
#   the NVIDIA driver and container toolkit.
# See docs/deploy.md.

ARG PYTHON_VERSION=3.11
ARG DEBIAN_RELEASE=bookworm

# ---- build: a virtual environment with torch, the dependencies and audiomesh ----------------
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/audiomesh/bin:$PATH
# torch first, from PyTorch's own index: PyPI's default torch wheel is a multi-GB CUDA build.
# The requirement below (torch==2.13.0 in pyproject.toml) is then already satisfied.
RUN python -m venv /opt/audiomesh \
 && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
# The dependencies as their own layer: a code change does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
COPY README.md ./
COPY libs ./libs
COPY services ./services
COPY gateway ./gateway
RUN pip install --no-deps . \
 && python -c "import audiomesh.cli, audiomesh.gateway.app, audiomesh.services.separation.server"

# ---- runtime ----------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS runtime
ARG TORCH_VARIANT=cpu
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="audiomesh" \
      org.opencontainers.image.description="Music separation as a mesh of gRPC services (any service: audiomesh serve NAME)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT" \
      io.audiomesh.torch-variant="${TORCH_VARIANT}"
# libsndfile reads WAV/FLAC/OGG/MP3; ffmpeg decodes every other container; the separation
# worker runs on jemalloc (LD_PRELOAD in compose and the chart: faster, flat peak RSS). Not pinned:
# Debian's security updates replace exact versions within the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libsndfile1 ffmpeg libjemalloc2 \
 && rm -rf /var/lib/apt/lists/*
# A fixed, numeric non-root user (Kubernetes' runAsNonRoot checks the number).
RUN groupadd --system --gid 10001 audiomesh \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin audiomesh \
 && mkdir -p /data /models /srv/audiomesh /var/lib/audiomesh/secrets \
 && chown 10001:10001 /data /models /var/lib/audiomesh/secrets \
 && chmod 0700 /var/lib/audiomesh/secrets
COPY --from=build /opt/audiomesh /opt/audiomesh
# Container health: gRPC health of the service this container serves (the port comes from
# `--port` or AUDIOMESH_<NAME>_ADDR, like `serve` itself), or GET /health for the gateway
# (and for `up`). Exit 0 = SERVING. Kubernetes uses its native gRPC probes instead.
COPY --chmod=0755 <<'EOF' /usr/local/bin/audiomesh-healthcheck
#!/opt/audiomesh/bin/python
"""audiomesh-healthcheck [NAME [PORT]]: exit 0 when the service answers SERVING."""
import socket
import ssl
import sys
import urllib.request


def target():
    args = sys.argv[1:]
    if not args:  # the command this container runs: [python] audiomesh serve NAME [--port N] | up
        with open("/proc/1/cmdline", "rb") as fh:
            cmd = [a.decode() for a in fh.read().split(b"\0") if a]
        if "up" in cmd:
            return "gateway", None
        if "serve" not in cmd or cmd.index("serve") + 1 >= len(cmd):
            sys.exit(f"unhealthy: PID 1 is not 'audiomesh serve NAME' ({' '.join(cmd)})")
        args = [cmd[cmd.index("serve") + 1]]
        for i, arg in enumerate(cmd):
            if arg == "--port" and i + 1 < len(cmd):
                args.append(cmd[i + 1])
            elif arg.startswith("--port="):
                args.append(arg.partition("=")[2])
    name = args[0]
    port = int(args[1]) if len(args) > 1 and int(args[1]) else None
    return name, port


def main():
    from audiomesh.config import load_settings

    name, port = target()
    settings = load_settings()
    if port is None:
        port = int(settings.address_of(name).rpartition(":")[2])
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    tls = bool(settings.tls_cert_file and settings.tls_key_file)
    if name == "gateway":
        url = f"{'https' if tls else 'http'}://{host}:{port}/health"
        context = ssl._create_unverified_context() if tls else None  # our own port on localhost
        try:
            with urllib.request.urlopen(url, timeout=4, context=context) as resp:
                status = resp.status
        except OSError as exc:
            sys.exit(f"unhealthy: GET {url}: {exc}")
        print(f"gateway {url}: {status}")
        return 0 if status == 200 else 1
    if tls:  # the certificate names a host we cannot guess: check that the port accepts
        with socket.create_connection((host, port), timeout=4):
            print(f"{name} {host}:{port}: accepting (TLS; gRPC health not checked)")
        return 0
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"{host}:{port}") as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=4)
        except grpc.RpcError as exc:
            sys.exit(f"unhealthy: {name} {host}:{port}: {exc.code().name}")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(f"{name} {host}:{port}: {status}")
    return 0 if status == "SERVING" else 1


sys.exit(main())
EOF

# Writable places: /data (file store), /models (weights: AUDIOMESH_MODEL_REPO and the
# download caches of torch hub and HuggingFace, and the torch.compile cache of the separation
# worker, AUDIOMESH_COMPILE_CACHE_DIR; mount a volume so they are fetched/compiled once) and
# /tmp (uploads and stage intermediates; every cache below lives there, so the root
# filesystem can be read-only).
ENV PATH=/opt/audiomesh/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    AUDIOMESH_HOST=0.0.0.0 \
    AUDIOMESH_LOG_FORMAT=json \
    AUDIOMESH_STORE_URL=file:///data \
    AUDIOMESH_MODEL_REPO=/models \
    AUDIOMESH_COMPILE_CACHE_DIR=/models/compile-cache \
    TORCH_HOME=/models/torch \
    HF_HOME=/models/huggingface \
    NUMBA_CACHE_DIR=/tmp/numba \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib
WORKDIR /srv/audiomesh
USER 10001:10001
# orchestrator, separation, hpss, composite, normalize (gRPC); gateway (HTTP)
EXPOSE 50051 50052 50053 50054 50055 8080
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --start-interval=5s --retries=3 \
    CMD ["audiomesh-healthcheck"]
ENTRYPOINT ["audiomesh"]
CMD ["up"]
