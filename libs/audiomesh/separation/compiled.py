"""Compiled separation: a Demucs model through ``torch.compile``, built in the background.

On a 2-core CPU, ``torch.compile`` runs HTDemucs with the same stems (max abs difference 1.1e-6)
about 4 % faster than eager in the separation worker, which runs on jemalloc (one chunk 2.58 s
against 2.69 s; BENCHMARKS.md). The 1.15x of a whole song was raw ``apply_model`` on glibc's
malloc, where compiling mostly saved allocations. Inductor's first compile takes
~11 minutes (~40 s once its on-disk cache is warm). So nobody waits for it:

* :class:`BackgroundCompiler` listens to a :class:`~audiomesh.separation.registry.SeparatorFactory`:
  each model it loads is served eager at once and compiled on one background thread at the
  lowest CPU priority (niceness 19, inherited by the processes it starts), which starts a
  compile only while no separation runs (:class:`Activity`). A cold Inductor compile (minutes of
  Python, which would hold the GIL a running separation needs) runs first in a child process
  (``audiomesh warm``); this process then compiles from the warm cache. Then, at idle, it times
  one chunk eager and compiled (:meth:`CompiledDemucsModel.chunk_seconds`, Inductor only) and
  keeps eager when compiled is not faster on this machine (``eager_faster``: on a GPU or with
  another torch release it need not be). Otherwise the factory's entry is swapped: later
  requests get the compiled model, a separation in flight keeps the model it started with.
* :func:`compile_model` builds a :class:`CompiledDemucsModel` and warms it: one forward pass of
  the chunk shape the separator uses (``torch.compile`` is lazy: that call compiles), then checks
  the compiled output against eager on that chunk (:data:`TOLERANCE`). A compile that fails, a
  check that fails, or a compiled call that raises later means eager from then on, with the
  reason logged and reported (``warnings`` of the separation's result, ``compile_error`` of the
  model's info); never a failed separation.

Why one compiled graph serves a song: the streaming separator (like ``apply_model``) pads every
chunk to one length (HTDemucs: its training segment), so the graph compiled for
``(1, channels, chunk frames)`` runs every chunk. While serving, compiled graphs are only used,
never built (``torch._dynamo.run``): a chunk of any other shape (a job's own ``segment``, the
shorter last chunk of non-Transformer models) runs eager instead of stalling on a new compile.

Caches and keys. :func:`configure_cache` points Inductor's on-disk cache
(``TORCHINDUCTOR_CACHE_DIR``, and Triton's for CUDA) into one folder, so restarts and new replicas
sharing it compile in seconds. Inductor keys an entry by the traced graph, the shapes, dtypes and
devices of its inputs, the torch version and the compile configuration; the weights are graph
*inputs*, not constants, so models of one architecture share kernels while each runs with its own
weights, and another architecture, device or chunk shape gets another graph. In this process each
model has its own wrapper; dynamo's graphs live on the model class's ``forward`` and run for a
call only when their guards hold (the shapes, dtypes and devices of the weights and the chunk, the
configuration values the trace read), so a model of the same architecture may run a graph traced
on another one's call, with its own weights, and any other model gets its own graph. The folder also holds :data:`MARKER`, the models
compiled there before (keyed by :func:`compile_key`), which ``AUDIOMESH_COMPILE=auto`` consults.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from audiomesh import metrics
from audiomesh.fsutil import atomic_path
from audiomesh.separation.demucs_model import DemucsModel, _submodels
from audiomesh.telemetry import logger

if TYPE_CHECKING:
    from torch import nn

    from audiomesh.separation.base import SeparatorModel
    from audiomesh.separation.chunked import AnyDemucs
    from audiomesh.separation.registry import SeparatorFactory

__all__ = [
    "MARKER",
    "TOLERANCE",
    "Activity",
    "BackgroundCompiler",
    "CompileMode",
    "CompiledDemucsModel",
    "chunk_shapes",
    "compile_key",
    "compile_model",
    "compiled_before",
    "configure_cache",
    "graph_calls",
    "record_compile",
    "warm_cache",
]

#: Largest difference a compiled model's output may have from eager on the warm-up chunk.
TOLERANCE = 1e-5
#: File in the compile cache folder listing what was compiled there (for ``auto``).
MARKER = "audiomesh-compiled.json"
#: Niceness of the background compile thread (and of the compiler processes it starts).
COMPILE_NICE = 19
#: The compiled model replaces eager only when eager takes at least this many times as long per
#: chunk (on a GPU, or with another torch, compiled is not always the faster one).
REQUIRED_SPEEDUP = 1.0
#: Timed runs of each, interleaved; the best of each counts.
TIMING_RUNS = 2
#: Backends whose compiled model is timed against eager before it is served (the others, such as
#: ``aot_eager``, only exercise the mechanism and are slower than eager by design).
TIMED_BACKENDS = ("inductor",)

CompileMode = Literal["auto", "true", "false"]


def configure_cache(cache_dir: Path | str) -> Path:
    """Create ``cache_dir`` and keep Inductor's (and Triton's) on-disk caches in it; return it.

    Call before the first compile in this process.
    """
    folder = Path(cache_dir).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.update(TORCHINDUCTOR_CACHE_DIR=str(folder / "inductor"), TRITON_CACHE_DIR=str(folder / "triton"))
    return folder


def chunk_shapes(module: AnyDemucs) -> list[tuple[int, int, int]]:
    """The input shape of every model call the separator makes for a full chunk, one per submodel.

    ``(1, audio_channels, frames)`` where ``frames`` is what ``apply_model`` pads a chunk of the
    model's own segment to (HTDemucs: its training segment).
    """
    from demucs.demucs import Demucs
    from demucs.htdemucs import HTDemucs

    shapes = []
    for sub in _submodels(module):
        frames = int(sub.samplerate * float(sub.segment))
        if isinstance(sub, (Demucs, HTDemucs)):  # HDemucs has no valid_length
            frames = int(sub.valid_length(frames))
        shapes.append((1, int(sub.audio_channels), frames))
    return shapes


#: How the graphs are cut (bumped when that changes: graphs cached before are other graphs).
GRAPH_LAYOUT = 2  # 2: the inverse STFT is left out of the graphs (see _keep_istft_eager)


def _keep_istft_eager() -> None:
    """Run Demucs' inverse STFT eagerly, between compiled graphs (once per process).

    Tracing ``torch.istft`` on torch 2.13 unrolls its overlap-add into one step per sample of
    the 4096-point window: ~50 CPU-s of every process's first compile (tiny HTDemucs on 2 cores:
    74 s → 24 s), for an operator that runs as the same FFT kernel either way (an FFT is an
    external call even under Inductor). Same stems (max abs difference 3.7e-8 vs eager).
    """
    import demucs.hdemucs
    import demucs.htdemucs

    for module in (demucs.hdemucs, demucs.htdemucs):
        if not hasattr(module.ispectro, "_audiomesh_eager"):
            eager = torch.compiler.disable(module.ispectro)
            eager._audiomesh_eager = True  # a marker: wrap once
            module.ispectro = eager  # type: ignore[attr-defined]  # demucs' stubs do not re-export it


def compile_key(model: DemucsModel, backend: str) -> str:
    """What a compiled graph depends on, as a short hash: name, architecture (every parameter's
    name, shape and dtype), chunk shapes, device, backend, torch version, torch's thread
    count (Inductor's CPU kernels specialize on it) and :data:`GRAPH_LAYOUT`."""
    parts: list[Any] = [model.name, model.device, backend, torch.__version__, torch.get_num_threads()]
    parts.append(GRAPH_LAYOUT)
    for sub, shape in zip(_submodels(model.model), chunk_shapes(model.model), strict=True):
        params = [(n, list(p.shape), str(p.dtype)) for n, p in sub.named_parameters()]
        parts.append([type(sub).__name__, list(shape), params])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def compiled_before(cache_dir: Path | str, key: str) -> dict[str, Any] | None:
    """The :data:`MARKER` entry of ``key`` in ``cache_dir``, or None."""
    entries = _read_marker(Path(cache_dir))
    entry = entries.get(key)
    return entry if isinstance(entry, dict) else None


def _read_marker(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


_marker_lock = threading.Lock()


def record_compile(cache_dir: Path | str, model: DemucsModel, backend: str, seconds: float) -> None:
    """Note in ``cache_dir``'s :data:`MARKER` that ``model`` was compiled there (for ``auto``)."""
    _record(Path(cache_dir), compile_key(model, backend), model, backend, seconds)


def _record(folder: Path, key: str, model: DemucsModel, backend: str, seconds: float) -> None:
    with _marker_lock:
        entries = _read_marker(folder)
        found = entries.get(key)
        entry = found if isinstance(found, dict) else {}
        history = [*entry.get("compiles", []), {"seconds": round(seconds, 3), "at": datetime.now(UTC).isoformat()}]
        entries[key] = {
            "model": model.name,
            "device": model.device,
            "backend": backend,
            "torch": torch.__version__,
            "shapes": [list(s) for s in chunk_shapes(model.model)],
            "compiles": history[-10:],
        }
        with atomic_path(folder / MARKER, make_dirs=True) as tmp:
            Path(tmp).write_text(json.dumps(entries, indent=2) + "\n")


# --------------------------------------------------------------------------- the compiled model


class _CompiledForward:
    """A submodel's ``forward``: its compiled graphs when they fit the call, eager otherwise."""

    def __init__(self, module: nn.Module, backend: str, owner: CompiledDemucsModel) -> None:
        self.eager = module.forward
        _keep_istft_eager()
        self.compiled = torch.compile(module.forward, backend=_backend(backend), dynamic=False)
        self.run_only = torch._dynamo.run(self.compiled)  # cached graphs only: never compiles
        self.owner = owner
        # The chunk shape it was compiled for (set by warm()). Another shape runs eager: the
        # graphs after the inverse STFT's break would otherwise still match some of its calls.
        self.shape: tuple[int, ...] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fits = self.shape is None or (bool(args) and tuple(args[0].shape) == self.shape)
        if self.owner.failure is None and fits:
            before = graph_calls()
            try:
                out = self.run_only(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any failure of the compiled path means eager
                self.owner._fail(f"{type(exc).__name__}: {exc}")
            else:
                if graph_calls() > before:
                    self.owner.compiled_calls += 1
                return out
        return self.eager(*args, **kwargs)


_calls = threading.local()  # compiled-graph calls made by this thread
_backends: dict[str, Callable[..., Any]] = {}
_backends_lock = threading.Lock()


def graph_calls() -> int:
    """Calls of compiled graphs this thread has made so far (a separation runs on one thread:
    the difference before and after it tells whether it ran compiled)."""
    return getattr(_calls, "count", 0)


def _backend(name: str) -> Callable[..., Any]:
    """The ``torch.compile`` backend ``name``, counting the calls of the graphs it compiles.

    One callable per name for the process: dynamo reuses a graph only for the backend that made
    it, so models of one architecture share graphs (their weights are inputs) instead of each
    taking one of the ``recompile_limit`` slots of ``HTDemucs.forward``.
    """
    with _backends_lock:
        if name in _backends:
            return _backends[name]
    from torch._dynamo.backends.registry import lookup_backend

    compiler = lookup_backend(name)  # an unknown name fails here
    if name == "inductor":
        import torch._inductor.config as inductor_config

        if inductor_config.freezing:
            raise RuntimeError(
                "Inductor freezing (TORCHINDUCTOR_FREEZING) folds the weights into the graph, so "
                "models of one architecture could share another's weights: unset it"
            )

    def compile_graph(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        compiled = compiler(gm, example_inputs)

        def run(*args: Any) -> Any:
            _calls.count = graph_calls() + 1
            return compiled(*args)

        return run

    with _backends_lock:
        return _backends.setdefault(name, compile_graph)


class CompiledDemucsModel(DemucsModel):
    """A :class:`DemucsModel` whose submodels run compiled graphs (see :func:`compile_model`).

    It shares the weights of ``eager`` (a shallow copy of its module with ``forward`` replaced),
    so it costs no memory beyond the graphs. Not warm (not compiled) until :meth:`warm`.

    Attributes
    ----------
    eager : DemucsModel
        The model it was built from, served again if this one fails.
    backend : str
        The ``torch.compile`` backend.
    failure : str or None
        Why the compiled graphs stopped being used (then every call runs eager).
    compiled_calls : int
        Calls of compiled graphs so far (to tell that they run).
    """

    def __init__(
        self,
        eager: DemucsModel,
        *,
        backend: str = "inductor",
        on_failure: Callable[[CompiledDemucsModel], None] | None = None,
    ) -> None:
        self.eager = eager
        self.backend = backend
        self.failure: str | None = None
        self.compiled_calls = 0
        self.compile_seconds: float | None = None
        self.max_abs_diff: float | None = None
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._forwards: list[_CompiledForward] = []
        super().__init__(
            self._clone(eager.model),
            name=eager.name,
            origin=eager.info.origin,
            description=eager.info.description,
            device=eager.device,
        )

    def _clone(self, module: AnyDemucs) -> AnyDemucs:
        from demucs.apply import BagOfModels

        if isinstance(module, BagOfModels):
            bag = copy.copy(module)
            bag.__dict__["_modules"] = dict(module._modules)  # the original bag keeps its list
            bag.models = torch.nn.ModuleList([self._clone(sub) for sub in _submodels(module)])
            return bag
        clone = copy.copy(module)  # same submodules and weights, own __dict__
        forward = _CompiledForward(module, self.backend, self)
        clone.forward = forward  # type: ignore[method-assign]  # the point: calls reach the compiled graphs
        self._forwards.append(forward)
        return clone

    @property
    def execution(self) -> str:
        return "compiled" if self.failure is None else "compile_failed"

    def warm(self, *, seed: int = 0) -> float:
        """Compile for the chunk shape and check against eager; return the largest difference.

        Raises
        ------
        RuntimeError
            The compiled output differs from eager by more than :data:`TOLERANCE`, or the
            compiled graphs are not used for the separator's chunks.
        """
        from audiomesh.separation.base import SeparationOptions
        from audiomesh.separation.chunked import ArraySource

        worst = 0.0
        generator = torch.Generator().manual_seed(seed)
        started = time.perf_counter()
        shapes = chunk_shapes(self.model)
        for forward, shape in zip(self._forwards, shapes, strict=True):
            # Made in inference mode, as the separator makes its chunks: dynamo's guards tell
            # inference tensors from others, and a graph is only reused for what it was traced on.
            with torch.inference_mode(), torch.no_grad():  # as the separator calls it
                mix = torch.randn(shape, generator=generator).to(self.device)
                forward.shape = tuple(shape)
                out = forward.compiled(mix)  # compiles: minutes with Inductor and a cold cache
                ref = forward.eager(mix)
            diff = float((out - ref).abs().max())
            if not diff <= TOLERANCE:
                raise RuntimeError(
                    f"compiled output differs from eager by {diff:.3g} on a chunk (more than {TOLERANCE:g})"
                )
            worst = max(worst, diff)
        # The separator's own path, one chunk: its calls must reach the compiled graphs.
        calls = self.compiled_calls
        frames = int(self.sample_rate * float(_submodels(self.model)[0].segment))
        noise = torch.randn((self.audio_channels, frames), generator=generator).numpy()
        for _ in self.separate_stream(ArraySource(noise, self.sample_rate), options=SeparationOptions(shifts=0)):
            pass
        if self.failure is not None:
            raise RuntimeError(f"the compiled model failed on a chunk: {self.failure}")
        if self.compiled_calls == calls:
            raise RuntimeError(f"the compiled graphs are not used for the separator's chunks {shapes}")
        self.compile_seconds = time.perf_counter() - started
        self.max_abs_diff = worst
        return worst

    def chunk_seconds(self, *, runs: int = TIMING_RUNS, seed: int = 0) -> tuple[float, float]:
        """``(eager, compiled)``: seconds for one chunk of the separator's shape through every
        submodel, the best of ``runs`` interleaved runs of each."""
        generator = torch.Generator().manual_seed(seed)
        eager_s = compiled_s = 0.0
        for forward, shape in zip(self._forwards, chunk_shapes(self.model), strict=True):
            with torch.inference_mode(), torch.no_grad():
                mix = torch.randn(shape, generator=generator).to(self.device)
                best = {"eager": float("inf"), "compiled": float("inf")}
                for _ in range(max(1, runs)):
                    for kind, fn in (("eager", forward.eager), ("compiled", forward.run_only)):
                        _synchronize(self.device)
                        started = time.perf_counter()
                        fn(mix)
                        _synchronize(self.device)
                        best[kind] = min(best[kind], time.perf_counter() - started)
            eager_s += best["eager"]
            compiled_s += best["compiled"]
        return eager_s, compiled_s

    def _fail(self, reason: str) -> None:
        with self._lock:
            if self.failure is not None:
                return
            self.failure = reason
        logger(model=self.name).warning("compiled model failed; running eager from now on", reason=reason)
        if self._on_failure is not None:
            self._on_failure(self)


def _synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def compile_model(
    eager: DemucsModel,
    *,
    backend: str = "inductor",
    on_failure: Callable[[CompiledDemucsModel], None] | None = None,
) -> CompiledDemucsModel:
    """``eager`` compiled and warmed for its chunk shape (blocking: minutes with a cold Inductor cache).

    Raises
    ------
    Exception
        Whatever compiling raised (an unknown backend, an operator the backend cannot
        compile...), or ``RuntimeError`` when the result does not match eager.
    """
    model = CompiledDemucsModel(eager, backend=backend, on_failure=on_failure)
    model.warm()
    return model


# --------------------------------------------------------------------------- in the background


class Activity:
    """Counts separations running, so background work can wait for a quiet moment."""

    def __init__(self) -> None:
        self._running = 0
        self.started = 0  # separations started so far: a change tells that one ran meanwhile
        self._cond = threading.Condition()

    def __enter__(self) -> Activity:
        with self._cond:
            self._running += 1
            self.started += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify_all()

    @property
    def running(self) -> int:
        return self._running

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing runs (or ``timeout`` s); return whether it is idle."""
        with self._cond:
            return self._cond.wait_for(lambda: self._running == 0, timeout)


class BackgroundCompiler:
    """Compile every Demucs model ``factory`` loads, one at a time, on a low-priority thread.

    Parameters
    ----------
    factory : SeparatorFactory
        Models it loads from now on are compiled (see :meth:`SeparatorFactory.add_load_listener`);
        the compiled model replaces the eager one in it when ready.
    mode : {"true", "auto"}, keyword-only
        ``true``: compile every model. ``auto``: only models compiled before in ``cache_dir``
        (their graphs are in Inductor's cache, so compiling takes seconds, not minutes).
    backend : str, keyword-only
        The ``torch.compile`` backend (``inductor``; ``aot_eager`` to test cheaply).
    cache_dir : Path, keyword-only
        The compile cache (see :func:`configure_cache`, which the caller runs first).
    activity : Activity, keyword-only
        Running separations: a compile starts only when none runs.
    nice : int, keyword-only
        Niceness of the compile thread (default :data:`COMPILE_NICE`).
    cold_in_child : bool, keyword-only
        Run a compile that the cache does not hold yet in a child process first (``audiomesh
        warm``, inheriting the thread's niceness), then compile here from the warm cache. A cold
        Inductor compile is minutes of Python: in this process it would hold the GIL that a
        running separation needs between its torch calls; in a child it costs that separation
        nothing but CPU at the lowest priority. Default: for ``inductor`` (other backends keep
        nothing on disk, so a child would only repeat the work).
    compare_speed : bool, keyword-only
        After compiling, time one chunk eager and compiled (at idle, on this thread) and serve the
        compiled model only if eager takes :data:`REQUIRED_SPEEDUP` times as long or longer;
        otherwise keep eager (``eager_faster``). Default: for :data:`TIMED_BACKENDS`.
    required_speedup : float, keyword-only
        Default :data:`REQUIRED_SPEEDUP`.
    """

    def __init__(
        self,
        factory: SeparatorFactory,
        *,
        mode: CompileMode = "true",
        backend: str = "inductor",
        cache_dir: Path,
        activity: Activity | None = None,
        nice: int | None = None,
        cold_in_child: bool | None = None,
        compare_speed: bool | None = None,
        required_speedup: float | None = None,
    ) -> None:
        if mode not in ("true", "auto"):
            raise ValueError(f"mode must be 'true' or 'auto', got {mode!r}")
        self.factory = factory
        self.mode = mode
        self.backend = backend
        self.cache_dir = Path(cache_dir)
        self.activity = activity or Activity()
        self.nice = COMPILE_NICE if nice is None else nice
        self.cold_in_child = backend == "inductor" if cold_in_child is None else cold_in_child
        self.compare_speed = backend in TIMED_BACKENDS if compare_speed is None else compare_speed
        self.required_speedup = REQUIRED_SPEEDUP if required_speedup is None else required_speedup
        self._child: subprocess.Popen[str] | None = None
        self._closed = False
        self._queue: queue.Queue[tuple[str, str, DemucsModel] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()
        factory.add_load_listener(self._loaded)

    def _loaded(self, name: str, device: str, model: SeparatorModel) -> None:
        if not isinstance(model, DemucsModel) or isinstance(model, CompiledDemucsModel):
            return
        key = compile_key(model, self.backend)
        if self.mode == "auto" and compiled_before(self.cache_dir, key) is None:
            logger(model=name).info(
                "not compiling: AUDIOMESH_COMPILE=auto and this model was never compiled in the cache "
                "(run `audiomesh warm`, or set AUDIOMESH_COMPILE=true)",
                cache_dir=str(self.cache_dir),
            )
            return
        self.factory.set_execution(name, device, "compiling")
        self._queue.put((name, device, model))
        with self._guard:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audiomesh-compile", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # this thread (and what it starts) only
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        if self.backend == "inductor":
            with contextlib.suppress(Exception):
                import torch._inductor.config as inductor_config

                inductor_config.compile_threads = 1  # codegen on this niced thread, not a worker pool
        while (item := self._queue.get()) is not None:
            self.activity.wait_idle()
            self._compile(*item)

    def _fill_cache(self, name: str, device: str, eager: DemucsModel) -> None:
        """``audiomesh warm --model NAME`` in a child process, unless the cache holds the model."""
        if not self.cold_in_child or compiled_before(self.cache_dir, compile_key(eager, self.backend)):
            return
        env = {
            **os.environ,  # the same settings as this worker (.env is read from the same folder)
            "AUDIOMESH_COMPILE_BACKEND": self.backend,
            "AUDIOMESH_COMPILE_CACHE_DIR": str(self.cache_dir),
            "AUDIOMESH_DEVICE": "cuda" if device.startswith("cuda") else device,
            "AUDIOMESH_TORCH_THREADS": str(torch.get_num_threads()),  # Inductor's kernels specialize on it
        }
        cmd = [sys.executable, "-m", "audiomesh", "warm", "--model", name]
        with self._guard:
            if self._closed:
                raise RuntimeError("the worker is stopping")
            self._child = subprocess.Popen(  # inherits this thread's niceness
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        try:
            output, _ = self._child.communicate()
        finally:
            with self._guard:
                code, self._child = self._child.returncode, None
        if code != 0:
            tail = " | ".join(output.strip().splitlines()[-3:])
            raise RuntimeError(f"`audiomesh warm --model {name}` (the cold compile) exited with {code}: {tail}")

    def _compile(self, name: str, device: str, eager: DemucsModel) -> None:
        log = logger(model=name, device=device, backend=self.backend)
        shapes = chunk_shapes(eager.model)
        log.info("compile started (serving eager meanwhile)", chunk_shapes=[list(s) for s in shapes])
        started = time.perf_counter()
        # MODEL_COMPILE: the cold compile in a child (if any) and the compile here, not the wait
        # for a quiet moment between them.
        outcome, filled = "failed", 0.0
        step = started
        try:
            self._fill_cache(name, device, eager)
            filled = time.perf_counter() - step
            self.activity.wait_idle()
            step = time.perf_counter()
            compiled = compile_model(eager, backend=self.backend, on_failure=self._failed_later)
            outcome = "compiled"
        except Exception as exc:  # noqa: BLE001 - any failure to compile means eager, never a failed job
            reason = f"{type(exc).__name__}: {exc}".strip()[:2000]
            log.warning("compile failed; serving eager", reason=reason)
            self.factory.set_execution(name, device, "compile_failed", f"compiling failed: {reason}")
            return
        finally:
            metrics.MODEL_COMPILE.labels(model=name, outcome=outcome).observe(filled + time.perf_counter() - step)
        seconds = time.perf_counter() - started
        if self.compare_speed and not self._faster(compiled, log):
            return
        if not self.factory.swap(name, device, eager, compiled):
            log.info("compiled model not used: the model was replaced meanwhile")
            return
        self.factory.set_execution(name, device, "compiled")
        log.info("compiled; serving it", seconds=round(seconds, 2), max_abs_diff=compiled.max_abs_diff)
        try:
            _record(self.cache_dir, compile_key(eager, self.backend), eager, self.backend, seconds)
        except OSError as exc:
            log.warning("compile cache marker not written", reason=str(exc))

    def _faster(self, compiled: CompiledDemucsModel, log: Any, attempts: int = 3) -> bool:
        """Time one chunk eager and compiled while no separation runs; record the figures and
        return whether the compiled model is the one to serve (``eager_faster`` otherwise)."""
        name, device = compiled.name, compiled.device
        for _ in range(attempts):
            self.activity.wait_idle()
            before = self.activity.started
            try:
                eager_s, compiled_s = compiled.chunk_seconds()
            except Exception as exc:  # noqa: BLE001 - a compiled model that cannot run is a failed one
                compiled._fail(f"{type(exc).__name__}: {exc}")
                self.factory.set_execution(name, device, "compile_failed", f"timing the compiled model failed: {exc}")
                return False
            if self.activity.started == before and not self.activity.running:
                break  # undisturbed by a separation; otherwise time again at the next quiet moment
        self.factory.set_chunk_seconds(name, device, eager_s, compiled_s)
        speedup = eager_s / max(compiled_s, 1e-9)
        log.info(
            "timed one chunk", eager_s=round(eager_s, 3), compiled_s=round(compiled_s, 3), speedup=round(speedup, 3)
        )
        if speedup >= self.required_speedup:
            return True
        log.info("compiled model not faster here; serving eager", required_speedup=self.required_speedup)
        self.factory.set_execution(name, device, "eager_faster")
        return False

    def _failed_later(self, model: CompiledDemucsModel) -> None:
        self.factory.swap(model.name, model.device, model, model.eager)
        reason = f"the compiled model failed while running: {model.failure}"
        self.factory.set_execution(model.name, model.device, "compile_failed", reason)

    def wait(self, name: str, *, device: str | None = None, timeout: float = 600.0) -> str:
        """Block until (name, device) is no longer ``compiling``; return its execution."""
        deadline = time.monotonic() + timeout
        while True:
            execution, _ = self.factory.execution(name, device=device)
            if execution != "compiling" or time.monotonic() >= deadline:
                return execution
            time.sleep(0.05)

    def warnings(self, model: SeparatorModel) -> list[str]:
        """What a separation that ran on ``model`` should report about compilation."""
        if isinstance(model, CompiledDemucsModel):
            if model.failure is not None:
                return [
                    f"model '{model.name}': the compiled model failed while running ({model.failure}); "
                    "the separation finished on the eager model"
                ]
            return []
        execution, error = self.factory.execution(model.name, device=model.device)
        if execution == "compile_failed":
            return [f"model '{model.name}' ran eager, not compiled: {error}"]
        return []

    def close(self) -> None:
        """Stop after the compile in progress (the thread is a daemon: exiting does not wait);
        a cold compile running in a child process is stopped."""
        with self._guard:
            self._closed = True
            if self._child is not None:
                self._child.terminate()
        self._queue.put(None)


def warm_cache(
    factory: SeparatorFactory,
    names: list[str],
    *,
    backend: str,
    cache_dir: Path,
    device: str | None = None,
    log: Callable[[str], None] = print,
    tick: float = 15.0,
) -> dict[str, CompiledDemucsModel | Exception]:
    """Compile ``names`` into the cache (``audiomesh warm``): in the foreground, at full speed.

    Reports a line per model when it starts, every ``tick`` seconds while it compiles, and when
    it is done (seconds, difference from eager, cache size). Returns the compiled model or the
    error for each name; a model that fails does not stop the others.
    """
    results: dict[str, CompiledDemucsModel | Exception] = {}
    for name in names:
        try:
            eager = factory.get(name, device=device)
            if not isinstance(eager, DemucsModel):
                raise TypeError(f"model '{name}' is not a Demucs model: only Demucs models are compiled")
        except Exception as exc:  # noqa: BLE001 - reported, the next model still runs
            log(f"{name}: not compiled: {exc}")
            results[name] = exc
            continue
        shapes = ", ".join(str(s) for s in chunk_shapes(eager.model))
        log(f"{name}: compiling on {eager.device} with backend {backend}, chunk shape {shapes}, cache {cache_dir}")
        done = threading.Event()
        started = time.perf_counter()

        def ticker(name: str = name, started: float = started, done: threading.Event = done) -> None:
            while not done.wait(tick):
                log(f"{name}: still compiling, {time.perf_counter() - started:.0f} s")

        thread = threading.Thread(target=ticker, name="audiomesh-warm-ticker", daemon=True)
        thread.start()
        try:
            compiled = compile_model(eager, backend=backend)
        except Exception as exc:  # noqa: BLE001 - reported, the next model still runs
            results[name] = exc
            seconds = time.perf_counter() - started
            metrics.MODEL_COMPILE.labels(model=name, outcome="failed").observe(seconds)
            log(f"{name}: compile failed after {seconds:.1f} s: {type(exc).__name__}: {exc}")
            continue
        finally:
            done.set()
            thread.join()
        seconds = time.perf_counter() - started
        metrics.MODEL_COMPILE.labels(model=name, outcome="compiled").observe(seconds)
        _record(cache_dir, compile_key(eager, backend), eager, backend, seconds)
        results[name] = compiled
        log(
            f"{name}: compiled in {seconds:.1f} s (max abs diff from eager {compiled.max_abs_diff:.3g}); "
            f"cache {cache_dir}: {_folder_mb(cache_dir):.0f} MB"
        )
    return results


def _folder_mb(folder: Path) -> float:
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file():
                total += path.stat().st_size
    return total / 1e6
