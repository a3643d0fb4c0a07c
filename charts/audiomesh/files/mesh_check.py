"""`helm test`: gRPC health of every service, then one tiny job through the HTTP gateway.

Runs in the audiomesh image as `python -c` (templates/tests/test-mesh.yaml); tests/test_deploy.py
runs it against a local mesh too:

    python mesh_check.py http://GATEWAY[:PORT] [--model demucs_unittest] [--timeout 300]

Service addresses come from the same AUDIOMESH_* settings the services read (the release's
ConfigMap). AUDIOMESH_API_KEY, when set, is sent as the bearer key. Exit 0 = all good.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
import urllib.error
import urllib.request
import uuid

TERMINAL = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"}


def log(message: str) -> None:
    print(message, flush=True)


async def grpc_health(settings) -> dict[str, str]:
    from audiomesh.config import SERVICES
    from audiomesh.rpc import ClientFactory

    clients = ClientFactory()
    try:
        statuses = await asyncio.gather(*(clients.health(settings.address_of(name), timeout=5.0) for name in SERVICES))
    finally:
        await clients.close()
    return dict(zip(SERVICES, statuses, strict=True))


def http(method: str, url: str, *, key: str, body: bytes | None = None, content_type: str | None = None):
    request = urllib.request.Request(url, data=body, method=method)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError as exc:  # refused, reset, timed out (URLError is one)
        raise SystemExit(f"FAIL {method} {url}: {getattr(exc, 'reason', exc)}") from None


def demo_wav(seconds: float) -> bytes:
    import soundfile as sf

    from audiomesh.demo import synth_song

    buf = io.BytesIO()
    sf.write(buf, synth_song(seconds).T, 44100, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def multipart(fields: list[tuple[str, str | tuple[str, bytes, str]]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields:
        out.write(f"--{boundary}\r\n".encode())
        if isinstance(value, tuple):
            filename, data, ctype = value
            out.write(f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'.encode())
            out.write(f"Content-Type: {ctype}\r\n\r\n".encode())
            out.write(data)
        else:
            out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}'.encode())
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def run_job(base: str, *, key: str, model: str, seconds: float, timeout: float) -> dict:
    body, ctype = multipart([("model", model), ("file", ("helm-test.wav", demo_wav(seconds), "audio/wav"))])
    status, raw = http("POST", f"{base}/v1/jobs:upload", key=key, body=body, content_type=ctype)
    if status != 200:
        raise SystemExit(f"FAIL upload: HTTP {status}: {raw[:500].decode(errors='replace')}")
    job_id = json.loads(raw)["job"]["jobId"]
    log(f"job {job_id} created (model {model})")
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        status, raw = http("GET", f"{base}/v1/jobs/{job_id}", key=key)
        if status != 200:
            raise SystemExit(f"FAIL GET /v1/jobs/{job_id}: HTTP {status}: {raw[:500].decode(errors='replace')}")
        job = json.loads(raw)["job"]
        if job.get("state") in TERMINAL:
            break
        time.sleep(1.0)
    else:
        raise SystemExit(f"FAIL job {job_id} not finished after {timeout:.0f} s (state {job.get('state')})")
    if job["state"] != "JOB_STATE_SUCCEEDED":
        raise SystemExit(f"FAIL job {job_id} {job['state']}: {json.dumps(job.get('error', {}))}")
    tracks = [t["name"] for t in job.get("tracks", [])]
    if not tracks:
        raise SystemExit(f"FAIL job {job_id} succeeded without tracks")
    status, raw = http("GET", f"{base}/download/{job_id}/manifest", key=key)
    manifest = json.loads(raw) if status == 200 else {}
    if not str(manifest.get("job", manifest).get("state", "")).endswith("SUCCEEDED"):
        raise SystemExit(f"FAIL manifest of {job_id}: HTTP {status}: {raw[:300].decode(errors='replace')}")
    log(f"job {job_id} SUCCEEDED: {', '.join(tracks)}")
    return job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="gRPC health of every service, then a tiny job via the gateway")
    parser.add_argument("gateway", help="base URL of the gateway, e.g. http://release-audiomesh-gateway")
    parser.add_argument("--model", default="demucs_unittest")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of the synthesized song")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument(
        "--may-be-at-zero",
        action="append",
        default=[],
        metavar="SERVICE",
        help="a service autoscaling may have scaled to zero pods: not required SERVING (the job wakes it)",
    )
    args = parser.parse_args(argv)

    from audiomesh.config import load_settings

    settings = load_settings()
    key = settings.api_key.get_secret_value() if hasattr(settings, "api_key") else ""
    base = args.gateway.rstrip("/")

    statuses = asyncio.run(grpc_health(settings))
    for name, status in statuses.items():
        log(f"grpc health {name:<13} {settings.address_of(name)}: {status}")
    if any(status != "SERVING" for name, status in statuses.items() if name not in args.may_be_at_zero):
        raise SystemExit("FAIL not every service is SERVING")

    status, raw = http("GET", f"{base}/health", key=key)
    log(f"GET {base}/health: {status} {raw[:200].decode(errors='replace')}")
    at_zero = [name for name in args.may_be_at_zero if statuses.get(name) != "SERVING"]
    if at_zero:  # /health is 503 while a service has no pod; the job below must bring one up
        log(f"scaled to zero now: {', '.join(at_zero)}; the job must start them")
    elif status != 200:
        raise SystemExit("FAIL the gateway's /health is not 200")

    run_job(base, key=key, model=args.model, seconds=args.seconds, timeout=args.timeout)
    log("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
