"""Settings: read once at start from the environment (prefix ``AUDIOMESH_``) and ``.env``.

Precedence: environment > ``.env`` > secrets folder > defaults. Every default suits one laptop:
a file store under ``./data``, every service on 127.0.0.1. An invalid value fails at start with
a :class:`~audiomesh.errors.ConfigError` naming the variable.

A process reads them once (:func:`load_settings`); the launcher reads its children's once too
(``load_settings(environ=...)``) and derives each worker's thread settings from that object
(:func:`audiomesh.launcher.thread_env`), so ``.env`` counts the same under ``audiomesh up``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from audiomesh.errors import ConfigError

if TYPE_CHECKING:  # imported where used: they import this module
    from audiomesh.auth import KeyRing
    from audiomesh.rpc import ClientFactory
    from audiomesh.store import ObjectStore

ENV_PREFIX = "AUDIOMESH_"
SERVICES = ("orchestrator", "separation", "hpss", "composite", "normalize")
DEFAULT_PORTS = {"orchestrator": 50051, "separation": 50052, "hpss": 50053, "composite": 50054, "normalize": 50055}
# Seconds in-flight calls get to finish after SIGTERM when AUDIOMESH_DRAIN_SECONDS is 0: a
# separation runs for minutes (a whole song), the DSP workers for seconds to a minute.
DRAIN_DEFAULTS = {"orchestrator": 30.0, "separation": 600.0, "hpss": 120.0, "composite": 120.0, "normalize": 120.0}
# Stages served by another service's workers: the stitch of a split separation runs on them.
STAGE_SERVICES = {"stitch": "separation"}

CommaList = Annotated[list[str], NoDecode]

# The environment load_settings(environ=...) reads instead of os.environ (None: os.environ).
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("audiomesh_settings_environ", default=None)


class _EnvironSource(EnvSettingsSource):
    """Environment variables from a mapping (a child's environment) instead of ``os.environ``."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ  # read by _load_env_vars, which the base __init__ calls
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in self._environ.items()}  # case-insensitive, like os.environ


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        environ = _ENVIRON.get()
        if environ is not None:
            env_settings = _EnvironSource(settings_cls, environ)
        return init_settings, env_settings, dotenv_settings, file_secret_settings

    # Object store
    store_url: str = Field("./data", description="a folder, file:///path or s3://bucket[/prefix]")
    s3_endpoint: str = Field("", description="host:port of the S3 API (MinIO, moto, AWS)")
    s3_access_key: SecretStr = SecretStr("")
    s3_secret_key: SecretStr = SecretStr("")
    s3_region: str = ""
    s3_secure: bool = Field(False, description="HTTPS to the S3 endpoint")

    # Network: where each service listens (host) and where clients find it (addresses)
    host: str = Field("127.0.0.1", description="interface every service binds; 0.0.0.0 in containers")
    orchestrator_addr: str = f"127.0.0.1:{DEFAULT_PORTS['orchestrator']}"
    separation_addr: str = f"127.0.0.1:{DEFAULT_PORTS['separation']}"
    hpss_addr: str = f"127.0.0.1:{DEFAULT_PORTS['hpss']}"
    composite_addr: str = f"127.0.0.1:{DEFAULT_PORTS['composite']}"
    normalize_addr: str = f"127.0.0.1:{DEFAULT_PORTS['normalize']}"
    gateway_addr: str = Field("127.0.0.1:8080", description="where the HTTP facade listens (host:port)")

    # Separation
    device: Literal["cpu", "cuda", "auto"] = "auto"
    default_model: str = "htdemucs"
    model_repo: Path | None = Field(None, description="folder of offline Demucs weights (NAME.th / NAME.yaml)")
    torch_threads: int = Field(0, ge=0, description="0 = torch's default")
    compile: Literal["auto", "true", "false"] = Field(
        "auto",
        description="run separation models through torch.compile, compiled in the background while eager "
        "serves: true = always, auto = only models compiled before in the compile cache (audiomesh warm), "
        "false = never",
    )
    compile_backend: str = Field("inductor", min_length=1, description="torch.compile backend (aot_eager: cheap)")
    compile_nice: int = Field(
        19,
        ge=0,
        le=19,
        description="niceness of the background compile: 19 = only CPU that requests leave idle; "
        "0 = the worker's own priority (a dedicated machine, or one shared with other busy processes, "
        "where niceness 19 would starve it)",
    )
    compile_cache_dir: Path | None = Field(
        None, description="compiled graphs (Inductor's on-disk cache); default <file store>/cache/compile"
    )

    # Normalization defaults (a job may override them)
    normalize_mode: Literal["loudness", "peak", "off"] = "loudness"
    target_db: float = Field(-14.0, ge=-70.0, le=0.0, description="LUFS (loudness) or dBFS (peak)")
    true_peak_ceiling_db: float = Field(-1.0, ge=-20.0, le=0.0)
    gain_linking: Literal["linked", "per_track"] = "linked"
    output_encoding: Literal["wav_pcm16", "wav_pcm24", "wav_float32", "flac_pcm16", "flac_pcm24", "mp3"] = "wav_pcm16"

    # Limits
    max_upload_bytes: int = Field(500 * 1024 * 1024, gt=0)
    max_duration_seconds: float = Field(3600.0, gt=0)
    min_duration_seconds: float = Field(0.5, ge=0, description="shortest accepted song")
    worker_concurrency: int = Field(
        2, ge=1, description="requests one worker runs at once; more get RESOURCE_EXHAUSTED"
    )
    max_running_jobs: int = Field(
        0,
        ge=0,
        description="jobs one orchestrator runs at once (others wait QUEUED); 0 = no cap: the workers' "
        "capacity bounds the work in flight (busy workers answer RESOURCE_EXHAUSTED and nodes wait)",
    )
    max_parallel_nodes: int = Field(4, ge=1, description="stage-graph nodes of one job running at once")
    separation_split_max: int = Field(
        4,
        ge=1,
        le=64,
        description="most parts one song's separation is split into, run by several separation workers at once "
        "and stitched exactly; a job gets as many as there are workers (and chunks), up to this; 1 = never split",
    )
    hpss_split_max: int = Field(
        4,
        ge=1,
        le=64,
        description="most parts each stem's HPSS is split into when several hpss workers can take work (each part "
        "a run of ~12 s blocks, joined exactly by the composite); a job gets the fewest parts that keep every "
        "worker busy, up to this; 1 = never split",
    )
    node_attempts: int = Field(3, ge=1, le=10, description="tries per node on retryable errors")
    unavailable_budget_seconds: float = Field(
        120.0, ge=0, description="how long a node keeps retrying a worker or store that cannot be reached"
    )
    stage_timeout_seconds: float = Field(3600.0, gt=0, description="deadline of one worker call")
    replica_id: str = Field(
        "",
        max_length=200,
        pattern=r"^[A-Za-z0-9._:-]*$",
        description="this orchestrator's name in job leases and manifests; empty = hostname-pid",
    )
    lease_ttl_seconds: float = Field(
        15.0,
        ge=1.0,
        le=600.0,
        description="job lease lifetime: an orchestrator renews its jobs' leases every third of it; another "
        "takes a job over when its lease stayed unchanged this long (docs/consistency.md)",
    )
    drain_seconds: float = Field(
        0.0,
        ge=0,
        description="on SIGTERM, how long in-flight calls may run on (new calls are refused) before they are "
        "cancelled; 0 = the service's default: separation 600, hpss/composite/normalize 120, orchestrator 30",
    )
    retention_hours: float = Field(
        168.0, ge=0, description="delete finished jobs, and uploads no job uses, older than this; 0 keeps them"
    )

    # Observability and security
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    otlp_endpoint: str = Field("", description="OTLP/gRPC collector, e.g. http://otel:4317; empty = no export")
    metrics_enabled: bool = Field(True, description="serve Prometheus metrics at /metrics on AUDIOMESH_METRICS_PORT")
    metrics_port: int = Field(
        -1,
        ge=-1,
        le=65535,
        description="port of this service's /metrics (on AUDIOMESH_HOST); -1 = the service's default (gateway 9450, "
        "orchestrator 9451, separation 9452, hpss 9453, composite 9454, normalize 9455), 0 = any free port",
    )
    cors_origins: CommaList = Field(default_factory=list)
    api_keys: CommaList = Field(
        default_factory=list, description="NAME=sha256:<hex>,… (hashes of keys: audiomesh hash-key); empty = open mode"
    )
    api_key: SecretStr = Field(SecretStr(""), description="the key the CLI sends (client side)")
    service_token: SecretStr = Field(
        SecretStr(""),
        description="shared secret workers require from their callers; required with API keys (services refuse "
        "to start without it; audiomesh up generates one per run); empty = none",
    )
    rate_limit_per_minute: int = Field(600, ge=0, description="requests per minute per API key; 0 = unlimited")
    max_active_jobs_per_principal: int = Field(20, ge=1, description="queued + running jobs one key may have")
    max_queued_jobs: int = Field(200, ge=1, description="queued jobs in all; more get RESOURCE_EXHAUSTED")
    max_channels: int = Field(8, ge=1, le=64, description="most channels an input may have")
    min_sample_rate: int = Field(8000, ge=1000, description="lowest accepted input sample rate (Hz)")
    max_sample_rate: int = Field(192000, le=768000, description="highest accepted input sample rate (Hz)")
    tls_cert_file: Path | None = Field(None, description="serve gRPC and HTTP over TLS with this certificate")
    tls_key_file: Path | None = Field(None, description="the certificate's private key")
    tls_ca_file: Path | None = Field(None, description="CA bundle clients trust when services use TLS")

    # Thread budgets (one machine, concurrent stages)
    thread_budget: bool = Field(
        True,
        description="the launcher (audiomesh up/process, Mesh) sets each worker's thread counts so concurrent "
        "stages don't oversubscribe the cores: separation gets every core for torch (AUDIOMESH_TORCH_THREADS), "
        "HPSS one thread per request (AUDIOMESH_HPSS_THREADS) and more requests at once "
        "(AUDIOMESH_WORKER_CONCURRENCY), the other workers one OMP/MKL/OpenBLAS/numba thread; a value set in "
        "the environment, .env or the secrets folder wins",
    )
    hpss_threads: int = Field(0, ge=0, description="threads per HPSS request; 0 = up to 2 per channel (usable CPUs)")

    @field_validator("cors_origins", "api_keys", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _hashed_keys(cls, value: list[str]) -> list[str]:
        from audiomesh.auth import parse_key_entries

        parse_key_entries(value)  # ValueError names the bad entry
        return value

    @field_validator("store_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if "://" not in value:
            # A plain folder (the laptop default): absolute, so every process agrees on it.
            return Path(value).expanduser().resolve().as_uri()
        if not value.startswith(("file://", "s3://")):
            raise ValueError("must be a folder, file:///absolute/path or s3://bucket[/prefix]")
        return value

    @field_validator("orchestrator_addr", "separation_addr", "hpss_addr", "composite_addr", "normalize_addr")
    @classmethod
    def _grpc_target(cls, value: str) -> str:
        check_target(value)
        return value

    @field_validator("gateway_addr")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError("must be host:port")
        return value

    def client_factory(self, *, as_user: bool = False, as_service: bool = False) -> ClientFactory:
        """The one way to make gRPC clients: TLS trust from AUDIOMESH_TLS_CA_FILE, and the
        caller's credentials (the CLI's API key, or the service token between services)."""
        from audiomesh.rpc import ClientFactory

        return ClientFactory(
            root_certificates=self.tls_ca_file.read_bytes() if self.tls_ca_file else None,
            api_key=self.api_key.get_secret_value() if as_user else "",
            service_token=self.service_token.get_secret_value() if as_service else "",
        )

    def key_ring(self) -> KeyRing:
        from audiomesh.auth import KeyRing, parse_key_entries

        return KeyRing(parse_key_entries(self.api_keys))

    def drain_seconds_of(self, service: str) -> float:
        """AUDIOMESH_DRAIN_SECONDS, or the service's default (DRAIN_DEFAULTS) when it is 0."""
        return self.drain_seconds or DRAIN_DEFAULTS.get(service, 30.0)

    def address_of(self, service: str) -> str:
        """Where ``service`` (or a stage another service's workers run, e.g. stitch) is found."""
        return getattr(self, f"{STAGE_SERVICES.get(service, service)}_addr")

    def public_dict(self) -> dict[str, Any]:
        """Settings without secrets, for GetConfig and manifests."""
        data = self.model_dump(
            mode="json", exclude={"s3_access_key", "s3_secret_key", "api_keys", "api_key", "service_token"}
        )
        data["api_keys_configured"] = len(self.api_keys)
        return data

    def compile_cache_path(self) -> Path:
        """Where compiled separation graphs are kept: AUDIOMESH_COMPILE_CACHE_DIR, else
        ``cache/compile`` in a file store's folder, else a folder in the temp directory."""
        if self.compile_cache_dir is not None:
            return self.compile_cache_dir
        if self.store_url.startswith("file://"):
            from urllib.parse import unquote, urlparse

            return Path(unquote(urlparse(self.store_url).path)) / "cache" / "compile"
        import tempfile

        return Path(tempfile.gettempdir()) / "audiomesh-compile-cache"

    def open_store(self, *, create_bucket: bool = True) -> ObjectStore:
        """The configured store; ``create_bucket=False`` does not contact an S3 server yet."""
        from audiomesh.store import open_store

        return open_store(
            self.store_url,
            create_bucket=create_bucket,
            s3_endpoint=self.s3_endpoint or None,
            s3_access_key=self.s3_access_key.get_secret_value() or None,
            s3_secret_key=self.s3_secret_key.get_secret_value() or None,
            s3_region=self.s3_region or None,
            s3_secure=self.s3_secure,
        )


_TARGET_FORMS = (
    "host:port, dns:///host:port (every address the name resolves to, round-robin), "
    "ipv4:a.b.c.d:port,a.b.c.d:port or ipv6:[addr]:port,[addr]:port (a fixed list, round-robin)"
)


def check_target(value: str) -> None:
    """Raise ValueError unless ``value`` is a gRPC target audiomesh clients can dial:
    ``host:port``, ``dns:///host:port`` (or ``dns://authority/host:port``), or a fixed list
    ``ipv4:a:p,b:p`` / ``ipv6:[a]:p,[b]:p`` (gRPC's own multi-address targets)."""
    import ipaddress

    def port_ok(port: str) -> bool:
        return port.isdigit() and 0 < int(port) < 65536

    scheme, sep, rest = value.partition(":")
    if sep and scheme in ("ipv4", "ipv6"):
        for item in rest.split(","):
            host, colon, port = item.rpartition(":")
            try:
                if scheme == "ipv6":
                    if not (host.startswith("[") and host.endswith("]")):
                        raise ValueError
                    ipaddress.IPv6Address(host[1:-1])
                else:
                    ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"{item!r} in {value!r} is not an {scheme} address; use {_TARGET_FORMS}") from None
            if not colon or not port_ok(port):
                raise ValueError(f"{item!r} in {value!r} has no valid port; use {_TARGET_FORMS}")
        return
    target = value
    if value.startswith("dns:"):
        target = value.removeprefix("dns:")
        if target.startswith("//"):  # dns://[authority]/host:port
            target = target[2:].partition("/")[2]
    host, colon, port = target.rpartition(":")
    if not colon or not host or "," in target or "/" in target or not port_ok(port):
        raise ValueError(f"{value!r} is not a gRPC target; use {_TARGET_FORMS}")


def load_settings(*, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read settings once; raise ConfigError naming the first bad variable.

    ``AUDIOMESH_SECRETS_DIR`` names a folder of secret files, one per setting, named like the
    variable in lower case (``audiomesh_service_token``), as Docker and Kubernetes mount
    secrets; the environment and ``.env`` win over them.

    ``environ``: the environment variables to read instead of ``os.environ`` (``.env`` in the
    current folder and the secrets folder are read all the same): the launcher reads the
    settings its children will have. The result's ``model_fields_set`` names the settings some
    source gave (environment, ``.env``, secrets, ``overrides``) rather than the default.
    """
    secrets_dir = (os.environ if environ is None else environ).get("AUDIOMESH_SECRETS_DIR") or None
    if secrets_dir is not None and not Path(secrets_dir).is_dir():
        raise ConfigError(f"AUDIOMESH_SECRETS_DIR={secrets_dir!r}: not a folder")
    reading = _ENVIRON.set(environ)
    try:
        return Settings(_secrets_dir=secrets_dir, **overrides)  # an init option (typed by the pydantic mypy plugin)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            value = err.get("input")
            problems.append(f"{ENV_PREFIX}{field.upper()}={value!r}: {err['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
    finally:
        _ENVIRON.reset(reading)
