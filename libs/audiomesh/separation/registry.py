"""Find, load once and cache separation models by name.

:class:`SeparatorFactory` maps a model name to a :class:`ModelSpec` (what it is and
where its weights are) and a spec to a loaded :class:`SeparatorModel` through the
builder registered for the spec's ``kind``. The ``"demucs"`` and ``"roformer"`` kinds are
built in; another separator plugs in with :meth:`SeparatorFactory.register`.

A RoFormer (BS-RoFormer, Mel-Band RoFormer) is a name in a local repository folder:
``NAME.yaml`` (its Music-Source-Separation-Training config) with ``NAME.ckpt`` beside it, built
by :class:`~audiomesh.separation.roformer_model.RoformerModel`; listed from the yaml alone.

Demucs names resolve in this order:

1. ``demucs_unittest``: a tiny random HDemucs built into demucs (offline, for tests).
2. A name in a local repository folder (``model_repo``, e.g. from
   ``AUDIOMESH_MODEL_REPO``): ``NAME.yaml`` or a ``.th`` signature, loaded with
   ``demucs.pretrained.get_model(NAME, repo=folder)``; see :mod:`.repo` for the layout.
   For a pretrained name, the folder may also hold only the ``.th`` files its bundled
   yaml lists (e.g. ``955717e8-8726e21a.th`` for ``htdemucs``).
3. A demucs pretrained name (:data:`PRETRAINED`), from weights already on this
   machine: the HuggingFace cache (``adefossez/HTDemucs`` & co., what demucs 4.1
   downloads first) or torch hub's cache (``$TORCH_HOME/hub/checkpoints``, what older
   demucs downloaded), else downloaded with ``get_model(NAME)`` when
   ``allow_download`` and the download hosts answer a TCP probe.

Offline, demucs' own ``get_model("htdemucs")`` retries the HuggingFace hub five
times with backoff and then tries AWS: about 25 s before it fails. The factory
never calls it without weights on disk unless the probe (``probe_timeout``
seconds at most) reached a host, so a missing model fails in seconds with
``ModelUnavailable`` saying how to provide the weights.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from audiomesh import metrics
from audiomesh.errors import AudiomeshError, ConfigError, InvalidInput, ModelUnavailable, NotFound
from audiomesh.memory import allocator
from audiomesh.separation.base import ModelInfo, Origin, SeparatorModel, resolve_device
from audiomesh.separation.demucs_model import DemucsModel
from audiomesh.separation.repo import ROFORMER_CHECKPOINTS, RepoEntry, scan_repo
from audiomesh.telemetry import logger

__all__ = [
    "BUILTIN",
    "PRETRAINED",
    "Builder",
    "ModelSpec",
    "SeparatorFactory",
    "configure_torch_threads",
    "describe_model",
    "log_runtime",
]

_FOUR = ("drums", "bass", "other", "vocals")
_SIX = ("drums", "bass", "other", "vocals", "guitar", "piano")
_HT_SEGMENT = 7.8

#: Demucs' pretrained names: (sources, max segment in s or None, description).
PRETRAINED: Mapping[str, tuple[tuple[str, ...], float | None, str]] = {
    "htdemucs": (_FOUR, _HT_SEGMENT, "Hybrid Transformer Demucs v4, demucs' default model"),
    "htdemucs_ft": (_FOUR, _HT_SEGMENT, "htdemucs fine-tuned per source: a bag of 4 models, 4x slower"),
    "htdemucs_6s": (_SIX, _HT_SEGMENT, "htdemucs with guitar and piano sources (piano is weak)"),
    "hdemucs_mmi": (_FOUR, None, "Hybrid Demucs v3 retrained on MusDB HQ + 800 songs"),
    "mdx": (_FOUR, None, "Bag of 4 models, MDX 2021 challenge track A (MusDB HQ only)"),
    "mdx_extra": (_FOUR, None, "Bag of 4 models trained with extra data, MDX 2021 track B"),
    "mdx_q": (_FOUR, None, "Quantized mdx: smaller download, needs the diffq package"),
    "mdx_extra_q": (_FOUR, None, "Quantized mdx_extra: smaller download, needs the diffq package"),
}

#: Names built into demucs, no weights needed.
BUILTIN: Mapping[str, tuple[tuple[str, ...], str]] = {
    "demucs_unittest": (
        _FOUR,
        "Tiny HDemucs with random weights built into demucs, for tests (no real stems)",
    ),
}

_DOWNLOAD_HOSTS = ("huggingface.co", "dl.fbaipublicfiles.com")
_AWS_ROOT = "https://dl.fbaipublicfiles.com/demucs/"


@dataclass(frozen=True)
class ModelSpec:
    """A resolvable model: its name, the kind that builds it, and where its weights are.

    Attributes
    ----------
    name, kind, origin, description
        As in :class:`ModelInfo`.
    info : ModelInfo or None
        What is known before loading (for ``list_models``).
    available : bool
        The weights can be loaded without a download.
    repo : Path or None
        The local repository folder, for ``origin="local_repo"``.
    options : mapping
        Kind-specific details for the builder.
    """

    name: str
    kind: str
    origin: Origin
    description: str = ""
    info: ModelInfo | None = None
    available: bool = True
    repo: Path | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


#: ``builder(spec, device) -> SeparatorModel``; ``device`` is concrete (``"cpu"``, ``"cuda"``...).
Builder = Callable[[ModelSpec, str], SeparatorModel]

_FAMILIES = {"demucs": "Demucs", "roformer": "RoFormer"}


def describe_model(
    kind: str, sources: Sequence[str], detail: str = "", *, family: str = "", target: str | None = None
) -> str:
    """What a model is and what it is good for, in one line, then ``detail`` (this model's own words).

    The description ``ListModels`` returns: the web page's model picker and ``audiomesh models``
    show it. ``family`` names the network (default: the kind's), ``target`` a RoFormer's target
    instrument. Speeds are BENCHMARKS.md's (*RoFormer models beside Demucs*, 2 CPU cores): a
    released Mel-Band RoFormer takes ~12x htdemucs' time per second of song, a BS-RoFormer ~2.5x that.
    """
    family = family or _FAMILIES.get(kind, kind)
    stems = ", ".join(sources)
    if kind == "roformer":
        if len(sources) == 2:
            best = target or ("vocals" if "vocals" in sources else sources[0])
            rest = next(s for s in sources if s != best)
            what = f"{best} + {rest}" + (f" (the mix minus {best})" if target else "") + f", best for {best}"
        else:
            what = f"{len(sources)} stems ({stems})" if sources else "stems as its config lists"
        line = f"{family}: {what}; much slower than Demucs on CPU (12-30x at released sizes), meant for a GPU"
    elif kind == "demucs":
        if len(sources) >= 4:
            line = f"{family}: {len(sources)} stems ({stems}), every instrument at once; fast on CPU"
        else:
            line = f"{family}: {stems}; fast on CPU" if sources else f"{family}; fast on CPU"
    else:
        line = f"{family}: {stems}" if sources else family
    return f"{line}. {detail}" if detail else line


def _demucs_description(sources: Sequence[str], max_segment: float | None, detail: str) -> str:
    # Only HTDemucs has a maximum segment: that is how a listing tells the hybrid transformer.
    family = "Demucs (hybrid transformer)" if max_segment is not None else "Demucs"
    return describe_model("demucs", sources, detail, family=family)


def configure_torch_threads(n: int | None) -> int:
    """Set torch's intra-op thread count (``None`` keeps torch's default); return the count in effect.

    Call once at start, before the first separation.
    """
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidInput(f"torch thread count must be an integer >= 1 or None, got {n!r}")
        torch.set_num_threads(n)
    return torch.get_num_threads()


def log_runtime(*, compile_mode: str) -> None:
    """Log what separation runs on (threads, CUDA, allocator); warn when it runs on the C library's
    malloc on CPU (jemalloc and mimalloc are as fast as each other)."""
    cuda = torch.cuda.is_available()
    logger().info("torch", threads=torch.get_num_threads(), cuda=cuda, compile=compile_mode, allocator=allocator())
    if allocator() == "libc" and not cuda:
        logger().warning(
            "separation runs on the C library's malloc: start the worker through `audiomesh up` (it preloads "
            "jemalloc, or mimalloc from the cmeel-mimalloc wheel audiomesh installs), or LD_PRELOAD one of "
            "them yourself: a CPU chunk runs 1.26x faster on either (BENCHMARKS.md)"
        )


class SeparatorFactory:
    """Resolve model names, load each model once per device, and cache it.

    Parameters
    ----------
    model_repo : Path or sequence of Path, optional
        Local repository folder(s) searched in order (see :mod:`.repo` for the layout).
    device : str, keyword-only
        Default device for :meth:`get`: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    allow_download : bool, keyword-only
        Download pretrained weights that are not on disk (``get_model(NAME)``) when a
        download host answers. ``HF_HUB_OFFLINE=1`` in the environment turns it off.
    probe_timeout : float, keyword-only
        Seconds to wait for the download hosts before declaring the model unavailable.

    Raises
    ------
    ConfigError
        A ``model_repo`` folder does not exist.

    Examples
    --------
    >>> factory = SeparatorFactory(model_repo=None, allow_download=False)
    >>> model = factory.get("demucs_unittest", device="cpu")
    >>> model.sources
    ('drums', 'bass', 'other', 'vocals')
    """

    def __init__(
        self,
        model_repo: Path | str | Sequence[Path | str] | None = None,
        *,
        device: str = "auto",
        allow_download: bool = True,
        probe_timeout: float = 3.0,
    ) -> None:
        if model_repo is None:
            repos: list[Path] = []
        elif isinstance(model_repo, str | Path):
            repos = [Path(model_repo)]
        else:
            repos = [Path(p) for p in model_repo]
        for folder in repos:
            if not folder.is_dir():
                raise ConfigError(
                    f"model repository {str(folder)!r} is not a directory (AUDIOMESH_MODEL_REPO): "
                    "create it or unset the variable"
                )
        resolve_device(device)  # fail early on a bad value
        self._repos = tuple(repos)
        self._device = device
        self._allow_download = allow_download
        self._probe_timeout = probe_timeout
        self._guard = threading.Lock()
        self._builders: dict[str, Builder] = {"demucs": self._build_demucs, "roformer": self._build_roformer}
        self._specs: dict[str, ModelSpec] = {}
        self._cache: dict[tuple[str, str], SeparatorModel] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._peeked: dict[tuple[str, int, int], ModelInfo | str] = {}
        self._execution: dict[tuple[str, str], tuple[str, str]] = {}
        self._chunk_seconds: dict[tuple[str, str], tuple[float, float]] = {}
        self._load_listeners: list[Callable[[str, str, SeparatorModel], None]] = []

    # -- registry -------------------------------------------------------------------

    @property
    def model_repos(self) -> tuple[Path, ...]:
        return self._repos

    @property
    def default_device(self) -> str:
        return self._device

    def register(self, kind: str, builder: Builder, *, specs: Iterable[ModelSpec] = ()) -> None:
        """Register (or replace) the builder of ``kind`` and the model names it serves.

        Registered ``specs`` take precedence over demucs names. Models already
        loaded stay cached.
        """
        specs = list(specs)
        for spec in specs:
            if spec.kind != kind:
                raise InvalidInput(f"spec '{spec.name}' has kind '{spec.kind}', expected '{kind}'")
        with self._guard:
            self._builders[kind] = builder
            for spec in specs:
                self._specs[spec.name] = spec

    def builder(self, kind: str) -> Builder:
        """The builder registered for ``kind`` (to wrap it, e.g. for instrumentation)."""
        with self._guard:
            try:
                return self._builders[kind]
            except KeyError:
                raise NotFound(f"no separator kind '{kind}'; kinds: {', '.join(sorted(self._builders))}") from None

    def names(self) -> list[str]:
        """Every name :meth:`get` resolves, whether or not its weights are here."""
        names = list(self._specs)
        for name in [*BUILTIN, *self._local_entries(), *PRETRAINED]:
            if name not in names:
                names.append(name)
        return names

    def resolve(self, name: str) -> ModelSpec:
        """The spec for ``name`` (see the module docstring for the order).

        Raises
        ------
        InvalidInput
            Empty name.
        NotFound
            Unknown name; the message lists the available ones.
        """
        if not isinstance(name, str) or not name.strip():
            raise InvalidInput("model name must be a non-empty string")
        with self._guard:
            spec = self._specs.get(name)
        if spec is not None:
            return spec
        if name in BUILTIN:
            sources, detail = BUILTIN[name]
            description = _demucs_description(sources, None, detail)
            return ModelSpec(
                name,
                "demucs",
                "builtin",
                description,
                info=_static_info(name, sources, "builtin", description, None),
            )
        local = self._local_entries()
        if name in local:
            folder, entry = local[name]
            return self._local_spec(name, folder, entry)
        if name in PRETRAINED:
            return self._pretrained_spec(name)
        raise NotFound(f"unknown model {name!r}; available models: {', '.join(self.names())}")

    # -- loading --------------------------------------------------------------------

    def get(self, name: str, *, device: str | None = None) -> SeparatorModel:
        """The loaded model ``name`` on ``device`` (default: the factory's), loading it once.

        Concurrent first requests for the same (name, device) load it once; failures
        are not cached, so a later call retries (e.g. after weights were added).

        Raises
        ------
        NotFound
            Unknown name.
        ModelUnavailable
            Known name whose weights cannot be loaded here; the message says how to
            provide them.
        """
        if not isinstance(name, str) or not name.strip():
            raise InvalidInput("model name must be a non-empty string")
        resolved = resolve_device(device or self._device)
        key = (name, resolved)
        with self._guard:
            model = self._cache.get(key)
            if model is not None:
                return model
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            with self._guard:
                model = self._cache.get(key)
            if model is not None:
                return model
            spec = self.resolve(name)
            with self._guard:
                builder = self._builders.get(spec.kind)
            if builder is None:
                raise ModelUnavailable(f"model '{name}' needs separator kind '{spec.kind}', which is not registered")
            started = time.perf_counter()
            model = builder(spec, resolved)
            metrics.MODEL_LOAD.labels(model=name).observe(time.perf_counter() - started)  # loads that worked
            with self._guard:
                self._cache[key] = model
                listeners = list(self._load_listeners)
        for listener in listeners:
            listener(name, resolved, model)
        return self.current(name, device=resolved) or model

    def current(self, name: str, *, device: str | None = None) -> SeparatorModel | None:
        """The model :meth:`get` returns now for (name, device), or None when not loaded."""
        with self._guard:
            return self._cache.get((name, resolve_device(device or self._device)))

    def add_load_listener(self, listener: Callable[[str, str, SeparatorModel], None]) -> None:
        """Call ``listener(name, device, model)`` after each model is loaded (on the loading thread)."""
        with self._guard:
            self._load_listeners.append(listener)

    def swap(self, name: str, device: str, old: SeparatorModel, new: SeparatorModel) -> bool:
        """Serve ``new`` for (name, device) from now on if ``old`` is what is served; return whether it was.

        Callers holding ``old`` (a separation in flight) keep it: the swap only changes what
        later :meth:`get` calls return (e.g. a compiled model replacing the eager one).
        """
        key = (name, resolve_device(device))
        with self._guard:
            if self._cache.get(key) is not old:
                return False
            self._cache[key] = new
            return True

    def set_execution(self, name: str, device: str, execution: str, error: str = "") -> None:
        """Record how (name, device) runs, for :meth:`list_models` (see :class:`ModelInfo`)."""
        with self._guard:
            self._execution[(name, resolve_device(device))] = (execution, error)

    def set_chunk_seconds(self, name: str, device: str, eager: float, compiled: float) -> None:
        """Record one chunk's time eager and compiled, as timed after compiling (name, device)."""
        with self._guard:
            self._chunk_seconds[(name, resolve_device(device))] = (eager, compiled)

    def execution(self, name: str, *, device: str | None = None) -> tuple[str, str]:
        """``(execution, compile_error)`` of a loaded model; ``("", "")`` when not loaded."""
        key = (name, resolve_device(device or self._device))
        with self._guard:
            model = self._cache.get(key)
            if model is None:
                return "", ""
            return self._execution.get(key, (model.execution, ""))

    def loaded(self) -> list[SeparatorModel]:
        """Models loaded so far."""
        with self._guard:
            return list(self._cache.values())

    def list_models(self) -> list[ModelInfo]:
        """Every resolvable name with what is known about it, marking ``loaded`` and ``available``.

        Cheap: no model is loaded; the ``.th`` files of local repositories are read
        once (memory-mapped) for their sources.
        """
        with self._guard:
            loaded = {name: model for (name, _), model in self._cache.items()}
            executions = {key[0]: self._execution.get(key, (model.execution, "")) for key, model in self._cache.items()}
            timings = {key[0]: self._chunk_seconds.get(key) for key in self._cache}
        infos = []
        for name in self.names():
            try:
                spec = self.resolve(name)
            except AudiomeshError:
                continue
            if name in loaded:
                execution, error = executions[name]
                info = replace(
                    loaded[name].info,
                    origin=spec.origin,
                    available=True,
                    loaded=True,
                    execution=execution,
                    compile_error=error,
                    chunk_seconds=timings[name],
                )
            else:
                info = spec.info or ModelInfo(name, (), 44100, 2, spec.origin, spec.description, kind=spec.kind)
                info = replace(info, available=spec.available, loaded=False)
            infos.append(info)
        return infos

    # -- demucs ---------------------------------------------------------------------

    def _local_entries(self) -> dict[str, tuple[Path, RepoEntry]]:
        found: dict[str, tuple[Path, RepoEntry]] = {}
        for folder in self._repos:
            for name, entry in scan_repo(folder).items():
                found.setdefault(name, (folder, entry))
        return found

    def _local_spec(self, name: str, folder: Path, entry: RepoEntry) -> ModelSpec:
        if entry.kind == "roformer":
            return self._roformer_spec(name, folder, entry)
        problem = None
        if entry.kind == "bag":
            try:
                sigs = _bag_signatures(entry.path)
            except Exception as exc:  # noqa: BLE001 - any parse error makes the bag unusable
                sigs, problem = [], f"{entry.path.name} is not a valid bag yaml: {exc}"
            local = scan_repo(folder)
            missing = [sig for sig in sigs if sig not in local or local[sig].kind != "model"]
            if missing and problem is None:
                problem = (
                    f"bag {entry.path.name} lists {', '.join(missing)} but {folder} has no "
                    f"{missing[0]}.th or {missing[0]}-<checksum>.th"
                )
            first = local[sigs[0]].path if sigs and not missing else None
            detail = f"Bag of {len(sigs)} model(s) from {entry.path}"
        else:
            first = entry.path
            detail = f"One model from {entry.path}"
        if name in PRETRAINED:
            detail = f"{PRETRAINED[name][2]} ({detail[0].lower()}{detail[1:]})"
        info = self._peek(name, first, "local_repo", detail) if first is not None else None
        if isinstance(info, str):
            problem, info = info, None
        if info is not None:
            description = _demucs_description(info.sources, info.max_segment, detail)
            info = replace(info, description=description)
        elif name in PRETRAINED:
            description = _demucs_description(PRETRAINED[name][0], PRETRAINED[name][1], detail)
        else:
            description = describe_model("demucs", (), detail)
        return ModelSpec(
            name,
            "demucs",
            "local_repo",
            description,
            info=info,
            available=problem is None,
            repo=folder,
            options={"loader": "get_model", "problem": problem},
        )

    # -- roformer ---------------------------------------------------------------------

    def _roformer_spec(self, name: str, folder: Path, entry: RepoEntry) -> ModelSpec:
        """A RoFormer entry described from its yaml alone (no weights read); unavailable, with
        the reason, when its checkpoint is missing or its config cannot be used."""
        from audiomesh.separation.roformer_model import KIND, load_config

        problem, info = None, None
        description = f"RoFormer from {entry.path}"
        try:
            config = load_config(entry.path)
        except AudiomeshError as exc:
            problem = str(exc)
        else:
            description = describe_model(
                KIND, config.sources, f"Size {config.shape()}", family=config.title, target=config.target
            )
            info = ModelInfo(
                name, config.sources, config.sample_rate, config.channels, "local_repo", description, kind=KIND
            )
        if entry.checkpoint is None and problem is None:
            suffixes = " or ".join(f"{name}{s}" for s in ROFORMER_CHECKPOINTS)
            problem = f"{entry.path.name} has no weights beside it: put its checkpoint in {folder} as {suffixes}"
        return ModelSpec(
            name,
            KIND,
            "local_repo",
            description,
            info=info,
            available=problem is None,
            repo=folder,
            options={"config": entry.path, "checkpoint": entry.checkpoint, "problem": problem},
        )

    def _build_roformer(self, spec: ModelSpec, device: str) -> SeparatorModel:
        from audiomesh.separation.roformer_model import RoformerModel

        if spec.options.get("problem"):
            raise ModelUnavailable(f"model '{spec.name}' cannot be loaded: {spec.options['problem']}")
        return RoformerModel.load(
            spec.options["config"],
            spec.options["checkpoint"],
            name=spec.name,
            origin=spec.origin,
            description=spec.description,
            device=device,
        )

    def _pretrained_spec(self, name: str) -> ModelSpec:
        sources, max_segment, detail = PRETRAINED[name]
        description = _demucs_description(sources, max_segment, detail)

        def spec(origin: Origin, available: bool, **options: Any) -> ModelSpec:
            info = _static_info(name, sources, origin, description, max_segment)
            repo = options.pop("repo", None)
            return ModelSpec(
                name,
                "demucs",
                origin,
                description,
                info=info,
                available=available,
                repo=repo,
                options=options,
            )

        bundled = _bundled_bag(name)
        for folder in self._repos:
            files = _find_signatures(folder, bundled["models"]) if bundled else None
            if bundled and files is not None:
                return spec("local_repo", True, loader="bag_files", yaml=bundled["path"], files=files, repo=folder)
        cached = _hf_cached(name)
        if cached is not None:
            return spec("pretrained", True, loader="hf_cache", **cached)
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        files = _find_signatures(hub, bundled["models"]) if bundled else None
        if bundled and files is not None:
            return spec("pretrained", True, loader="bag_files", yaml=bundled["path"], files=files)
        return spec("pretrained", False, loader="download")

    def _build_demucs(self, spec: ModelSpec, device: str) -> SeparatorModel:
        loader = spec.options.get("loader", "get_model")
        name = spec.name
        if spec.options.get("problem"):
            raise ModelUnavailable(f"model '{name}' cannot be loaded: {spec.options['problem']}")
        try:
            if spec.origin == "builtin":
                from demucs.pretrained import get_model

                module = get_model(name)
            elif loader == "get_model":
                from demucs.pretrained import get_model

                module = get_model(name, repo=spec.repo)
            elif loader == "bag_files":
                module = _load_bag_files(Path(spec.options["yaml"]), spec.options["files"])
            elif loader == "hf_cache":
                module = _load_hf_cached(spec.options)
            else:
                module = self._download(name)
        except AudiomeshError:
            raise
        except (Exception, SystemExit) as exc:  # demucs calls sys.exit on some errors (missing diffq)
            where = f"local repository {spec.repo}" if spec.repo else "the pretrained weights"
            detail = str(exc) or type(exc).__name__
            if isinstance(exc, SystemExit) or "diffq" in detail:
                detail = "it needs the diffq package (pip install diffq)"
            raise ModelUnavailable(f"model '{name}' could not be loaded from {where}: {detail}") from exc
        return DemucsModel(module, name=name, origin=spec.origin, description=spec.description, device=device)

    def _download(self, name: str) -> torch.nn.Module:
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
        if not self._allow_download or offline or not _reachable(_DOWNLOAD_HOSTS, self._probe_timeout):
            raise ModelUnavailable(_offline_message(name))
        from demucs.pretrained import get_model

        return get_model(name)

    def _peek(self, name: str, path: Path, origin: Origin, description: str) -> ModelInfo | str:
        """ModelInfo from a ``.th`` file's kwargs (memory-mapped, cached by mtime), or an error string."""
        try:
            stat = path.stat()
        except OSError as exc:
            return f"{path} cannot be read: {exc}"
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        with self._guard:
            cached = self._peeked.get(key)
        if cached is None:
            cached = _peek_th(path)
            with self._guard:
                self._peeked[key] = cached
        if isinstance(cached, str):
            return cached
        return replace(cached, name=name, origin=origin, description=description)


# -- helpers --------------------------------------------------------------------------


def _static_info(
    name: str, sources: tuple[str, ...], origin: Origin, description: str, max_segment: float | None
) -> ModelInfo:
    return ModelInfo(name, sources, 44100, 2, origin, description, kind="demucs", max_segment=max_segment)


def _peek_th(path: Path) -> ModelInfo | str:
    try:
        try:
            package = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:  # legacy (non-zip) file: no mmap
            package = torch.load(path, map_location="cpu", weights_only=False)
        kwargs = dict(package.get("kwargs") or {})
        klass = package.get("klass")
    except Exception as exc:  # noqa: BLE001 - any failure means the file cannot be loaded
        return f"{path} is not a demucs model file: {exc}"
    segment = kwargs.get("segment")
    is_ht = getattr(klass, "__name__", "") == "HTDemucs"
    return ModelInfo(
        name=path.stem,
        sources=tuple(kwargs.get("sources") or ()),
        sample_rate=int(kwargs.get("samplerate", 44100)),
        audio_channels=int(kwargs.get("audio_channels", 2)),
        origin="local_repo",
        kind="demucs",
        max_segment=float(segment) if is_ht and segment is not None else None,
    )


def _bag_signatures(path: Path) -> list[str]:
    import yaml

    bag = yaml.safe_load(path.read_text())
    if not isinstance(bag, dict) or not isinstance(bag.get("models"), list) or not bag["models"]:
        raise ValueError("expected a mapping with a non-empty 'models' list")
    return [str(sig) for sig in bag["models"]]


def _bundled_bag(name: str) -> dict[str, Any] | None:
    """The yaml demucs ships for a pretrained name (``demucs/remote/NAME.yaml``)."""
    from demucs.pretrained import REMOTE_ROOT

    path = Path(REMOTE_ROOT) / f"{name}.yaml"
    if not path.is_file():
        return None
    return {"path": path, "models": _bag_signatures(path)}


def _remote_files() -> dict[str, str]:
    """signature -> URL, from demucs' ``remote/files.txt`` (the format its pretrained module parses)."""
    from demucs.pretrained import REMOTE_ROOT

    root, urls = "", {}
    for line in (Path(REMOTE_ROOT) / "files.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("root:"):
            root = line.split(":", 1)[1].strip()
        else:
            urls[line.split("-", 1)[0]] = _AWS_ROOT + root + line
    return urls


def _find_signatures(folder: Path, sigs: Sequence[str]) -> dict[str, Path] | None:
    """``{sig: file}`` when ``folder`` holds a ``.th`` file for every signature, else None."""
    entries = scan_repo(folder)
    files = {}
    for sig in sigs:
        entry = entries.get(sig)
        if entry is None or entry.kind != "model":
            return None
        files[sig] = entry.path
    return files


def _load_bag_files(yaml_path: Path, files: Mapping[str, Path]) -> torch.nn.Module:
    """A BagOfModels from a bag yaml and ``{sig: .th file}``, checking checksums like LocalRepo."""
    import yaml
    from demucs.apply import BagOfModels
    from demucs.repo import check_checksum
    from demucs.states import load_model

    bag = yaml.safe_load(yaml_path.read_text())
    models = []
    for sig in bag["models"]:
        path = Path(files[str(sig)])
        if "-" in path.stem:
            check_checksum(path, path.stem.rsplit("-", 1)[1])
        models.append(load_model(path))
    return BagOfModels(models, bag.get("weights"), bag.get("segment"))


def _hf_cached(name: str) -> dict[str, Any] | None:
    """Paths of ``name``'s yaml and safetensors in the HuggingFace cache, if all are there."""
    try:
        import yaml
        from demucs.hf import DEFAULT_NAMESPACE, hf_repo_name
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo_id = f"{DEFAULT_NAMESPACE}/{hf_repo_name(name)}"
    try:
        yaml_path = try_to_load_from_cache(repo_id, f"{name}.yaml")
        if not isinstance(yaml_path, str):
            return None
        bag = yaml.safe_load(Path(yaml_path).read_text())
        paths = []
        for sig in bag["models"]:
            path = try_to_load_from_cache(repo_id, f"{sig}.safetensors")
            if not isinstance(path, str):
                return None
            paths.append(path)
    except Exception:  # noqa: BLE001 - a broken cache entry means "not cached"
        return None
    return {"paths": tuple(paths), "weights": bag.get("weights"), "segment": bag.get("segment")}


def _load_hf_cached(options: Mapping[str, Any]) -> torch.nn.Module:
    from demucs.apply import BagOfModels
    from demucs.hf import load_safetensors_model

    models = [load_safetensors_model(path) for path in options["paths"]]
    return BagOfModels(models, options.get("weights"), options.get("segment"))


def _reachable(hosts: Sequence[str], timeout: float) -> bool:
    """Whether any host accepts a TCP connection on 443 within ``timeout`` s in all (DNS included)."""
    reached = threading.Event()

    def probe() -> None:
        for host in hosts:
            try:
                with socket.create_connection((host, 443), timeout=timeout):
                    reached.set()
                    return
            except OSError:
                continue

    thread = threading.Thread(target=probe, name="audiomesh-download-probe", daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(max(timeout - (time.monotonic() - start), 0.0))
    return reached.is_set()


def _offline_message(name: str) -> str:
    bundled = _bundled_bag(name)
    urls = _remote_files()
    files = [f"{name}.yaml (a copy of demucs/remote/{name}.yaml from the demucs package)"]
    if bundled:
        files += [urls.get(sig, f"{sig}.th") for sig in bundled["models"]]
    return (
        f"model '{name}' weights are not available offline: put {name}'s .th/.yaml files in a folder "
        f"and set AUDIOMESH_MODEL_REPO=/that/folder, or use model 'demucs_unittest' for a quick test; "
        f"{name} needs: {'; '.join(files)}"
    )
