# syntax=docker/dockerfile:1.7
# Two images from one file, every service either way: `docker run IMAGE serve NAME`.
#
#   runtime (the default target): torch and demucs, for every service.
#     docker run IMAGE serve NAME    NAME: orchestrator | separation | hpss | composite | normalize | gateway
#     docker run -p 8080:8080 IMAGE  (no arguments: `audiomesh up`, the whole mesh in one container)
#   worker-dsp: the hpss, composite and normalize workers only, without torch and demucs, and
#     without ffmpeg (they read only the WAV/FLAC intermediates the mesh writes) and jemalloc
#     (separation's allocator). Same base, user, paths, entrypoint and healthcheck. About 1.3 GiB
#     less than with CPU torch (estimated: python environment 0.55 GiB instead of 1.46 GiB,
#     ffmpeg's Debian packages ~0.45 GiB); far more than that less than a CUDA build.
#     docker run IMAGE               (no arguments: `audiomesh serve hpss`)
#
# Build, CPU torch (the default):  docker build -t audiomesh .
# Build, CUDA torch:               docker build --build-arg TORCH_VARIANT=cu128 -t audiomesh:cuda .
#   TORCH_VARIANT names a PyTorch wheel index (cpu, cu126, cu128, ...): pick the CUDA release
#   your nodes' driver supports. The wheels bring their own CUDA runtime; the host needs only
#   the NVIDIA driver and container toolkit.
# Build, DSP workers:              docker build --target worker-dsp -t audiomesh:dsp .
# See docs/deploy.md.

ARG PYTHON_VERSION=3.11
ARG DEBIAN_RELEASE=bookworm

# ---- build-base: an empty virtual environment and the requirements script ---------------------
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS build-base
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/audiomesh/bin:$PATH
RUN python -m venv /opt/audiomesh
# pyproject.toml's dependencies, one a line, for `pip install -r`: the dependencies get a layer
# of their own (a code change does not reinstall them), and worker-dsp leaves some out.
COPY --chmod=0755 <<'EOF' /usr/local/bin/audiomesh-requirements
#!/usr/local/bin/python
"""audiomesh-requirements PYPROJECT [--without NAME ...]: its dependencies, one a line."""
import re
import sys
import tomllib


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def main():
    path, *rest = sys.argv[1:]
    without = {canonical(n) for n in rest[rest.index("--without") + 1 :]} if "--without" in rest else set()
    with open(path, "rb") as fh:
        deps = tomllib.load(fh)["project"]["dependencies"]
    kept = [d for d in deps if canonical(re.match(r"[A-Za-z0-9._-]+", d).group(0)) not in without]
    unknown = without - {canonical(re.match(r"[A-Za-z0-9._-]+", d).group(0)) for d in deps}
    if unknown:  # a renamed dependency must not slip back in unnoticed
        sys.exit(f"--without names no dependency of {path}: {', '.join(sorted(unknown))}")
    print("\n".join(kept))


main()
EOF

WORKDIR /src

# ---- build: torch, the dependencies and audiomesh -------------------------------------------
FROM build-base AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
# torch first, from PyTorch's own index: PyPI's default torch wheel is a multi-GB CUDA build.
# The requirement below (torch==2.13.0 in pyproject.toml) is then already satisfied.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY pyproject.toml ./
RUN audiomesh-requirements pyproject.toml > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
COPY README.md ./
COPY libs ./libs
COPY services ./services
COPY gateway ./gateway
RUN pip install --no-deps . \
 && python -c "import audiomesh.cli, audiomesh.gateway.app, audiomesh.services.separation.server"

# ---- build-dsp: the dependencies without torch and demucs, and audiomesh ---------------------
FROM build-base AS build-dsp
COPY pyproject.toml ./
RUN audiomesh-requirements pyproject.toml --without torch demucs bs-roformer > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
COPY README.md ./
COPY libs ./libs
COPY services ./services
COPY gateway ./gateway
# --no-deps: pyproject.toml still requires torch. Then the workers must import, and nothing
# installed above may have brought torch or demucs back in.
RUN pip install --no-deps . \
 && python -c "import audiomesh.cli, audiomesh.services.hpss.server, audiomesh.services.composite.server, audiomesh.services.normalize.server" \
 && python -c "import importlib.util as u, sys; found = [m for m in ('torch', 'demucs') if u.find_spec(m)]; sys.exit(f'worker-dsp must not hold {found}' if found else 0)"

# ---- runtime-base: what both images share --------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS runtime-base
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="audiomesh" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT"
# libsndfile reads WAV/FLAC/OGG/MP3. Not pinned: Debian's security updates replace exact
# versions within the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libsndfile1 \
 && rm -rf /var/lib/apt/lists/*
# A fixed, numeric non-root user (Kubernetes' runAsNonRoot checks the number).
RUN groupadd --system --gid 10001 audiomesh \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin audiomesh \
 && mkdir -p /data /models /srv/audiomesh /var/lib/audiomesh/secrets \
 && chown 10001:10001 /data /models /var/lib/audiomesh/secrets \
 && chmod 0700 /var/lib/audiomesh/secrets
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

# Writable places: /data (file store), /models (runtime: weights and caches, below) and /tmp
# (uploads and stage intermediates; every cache below lives there, so the root filesystem can
# be read-only).
ENV PATH=/opt/audiomesh/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    AUDIOMESH_HOST=0.0.0.0 \
    AUDIOMESH_LOG_FORMAT=json \
    AUDIOMESH_STORE_URL=file:///data \
    NUMBA_CACHE_DIR=/tmp/numba \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib
WORKDIR /srv/audiomesh
HEALTHCHECK --interval=30s --timeout=10s --start-period=10m --start-interval=5s --retries=3 \
    CMD ["audiomesh-healthcheck"]
ENTRYPOINT ["audiomesh"]

# ---- worker-dsp: hpss, composite and normalize, without torch (--target worker-dsp) ----------
FROM runtime-base AS worker-dsp
LABEL org.opencontainers.image.description="audiomesh DSP workers without torch (audiomesh serve hpss | composite | normalize)" \
      io.audiomesh.torch-variant="none"
COPY --from=build-dsp /opt/audiomesh /opt/audiomesh
USER 10001:10001
# hpss, composite, normalize (gRPC) and their /metrics (AUDIOMESH_METRICS_PORT defaults)
EXPOSE 50053 50054 50055 9453 9454 9455
CMD ["serve", "hpss"]

# ---- runtime: every service (the default target, so it stays last) ---------------------------
FROM runtime-base AS runtime
ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.description="Music separation as a mesh of gRPC services (any service: audiomesh serve NAME)" \
      io.audiomesh.torch-variant="${TORCH_VARIANT}"
# ffmpeg decodes every container libsndfile cannot (the orchestrator decodes uploads); the
# separation worker runs on jemalloc (LD_PRELOAD in compose and the chart: faster, flat peak RSS).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ffmpeg libjemalloc2 \
 && rm -rf /var/lib/apt/lists/*
# /models: weights (AUDIOMESH_MODEL_REPO and the download caches of torch hub and HuggingFace)
# and the separation worker's torch.compile cache (AUDIOMESH_COMPILE_CACHE_DIR); mount a volume
# so they are fetched/compiled once.
ENV AUDIOMESH_MODEL_REPO=/models \
    AUDIOMESH_COMPILE_CACHE_DIR=/models/compile-cache \
    TORCH_HOME=/models/torch \
    HF_HOME=/models/huggingface
COPY --from=build /opt/audiomesh /opt/audiomesh
USER 10001:10001
# orchestrator, separation, hpss, composite, normalize (gRPC); gateway (HTTP); every service's
# /metrics (AUDIOMESH_METRICS_PORT defaults: gateway 9450, orchestrator 9451 … normalize 9455)
EXPOSE 50051 50052 50053 50054 50055 8080 9450 9451 9452 9453 9454 9455
CMD ["up"]
