"""Local model repositories: the folder layout demucs reads, and writing models into it.

Layout (what ``demucs.pretrained.get_model(NAME, repo=FOLDER)`` reads; point
``AUDIOMESH_MODEL_REPO`` at such a folder to use real weights offline)::

    FOLDER/
      htdemucs.yaml            a bag: "models: ['955717e8']"
      955717e8-8726e21a.th     one model; signature 955717e8, sha256 prefix 8726e21a
      tiny.th                  one model; signature "tiny", no checksum

Rules (``demucs.repo.LocalRepo`` and ``BagOnlyRepo``):

* Every ``*.th`` file is one model, a ``torch.save``-d dict ``{"klass", "args", "kwargs",
  "state", ...}`` (what ``demucs.states.serialize_model`` returns). Its signature is the
  file stem, or, when the stem holds a ``-``, the part before the last ``-``; the part
  after it is checked against the first hex digits of the file's sha256 at load time.
  Two files with the same signature make the whole folder fail to load.
* Every ``*.yaml`` file is a bag of models: ``models: [sig, ...]`` (signatures of
  ``.th`` files in the same folder), optional ``weights`` (one list of per-source
  weights per model) and ``segment`` (seconds, overrides each model's segment).
  ``NAME`` can be a yaml stem (a bag) or a ``.th`` signature (a single model).
* ``files.txt`` is *not* read for a local folder: it only maps signatures to download
  URLs for demucs' own remote repository (``demucs/remote/files.txt``).
* Only ``.th`` files are read: the ``.safetensors`` files of demucs' HuggingFace
  repositories are not (the factory uses them from the HuggingFace cache instead).

RoFormer models (BS-RoFormer, Mel-Band RoFormer) sit in the same folder the way the community
shares them (Music-Source-Separation-Training, UVR, python-audio-separator): a config and a
checkpoint with one stem, ``NAME.yaml`` + ``NAME.ckpt`` (or ``.pth`` / ``.pt``), e.g.
``model_bs_roformer_ep_317_sdr_12.9755.yaml`` and ``….ckpt``. A yaml with such a checkpoint
beside it, or with top-level ``model:`` and ``audio:`` blocks (its weights missing), is a RoFormer
entry, not a bag (:mod:`.roformer_model` reads it).

To make the real pretrained models available, copy the yaml from the demucs package
(``demucs/remote/NAME.yaml``) and the ``.th`` files it names, from
``https://dl.fbaipublicfiles.com/demucs/<root>/<sig>-<checksum>.th`` (roots and file
names in ``demucs/remote/files.txt``): e.g. for ``htdemucs``, ``htdemucs.yaml`` and
``hybrid_transformer/955717e8-8726e21a.th``; for ``htdemucs_ft`` the four files
``f7e0c4bc-ba3fe64a.th d12395a8-e57c48e6.th 92cfc3b6-ef3bcb9c.th 04573f0d-f3cf25b2.th``;
for ``htdemucs_6s`` ``5c90dfd2-34c22ccb.th``. (The factory also accepts the ``.th``
files of a pretrained name without its yaml, and reads demucs' bundled yaml then;
the ``*_q`` models need the ``diffq`` package.)

``save_model_to_repo`` writes that dict without ``serialize_model``, which imports
omegaconf (not a demucs dependency). ``build_htdemucs`` builds an HTDemucs with the
configuration of the released ``htdemucs`` and random weights: same compute, for
benchmarks; with overrides, tiny models for tests.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from audiomesh.errors import AlreadyExists, InvalidInput

if TYPE_CHECKING:
    from demucs.htdemucs import HTDemucs
    from torch import nn

__all__ = [
    "HTDEMUCS_CONFIG",
    "RepoEntry",
    "build_htdemucs",
    "save_model_to_repo",
    "scan_repo",
]

#: HTDemucs keyword arguments of the released ``htdemucs`` (signature 955717e8).
#: Defaults of ``HTDemucs.__init__`` plus the overrides of its training grid
#: (``demucs/grids/mmi.py``: ``model=htdemucs``, ``dconv_mode=3``, ``depth=4``,
#: ``t_dropout=0.02``, ``t_layers=5``, ``bottom_channels=512``) and the dataset
#: (4 sources, 44.1 kHz stereo); ``segment`` is the training chunk, 39/5 = 7.8 s.
#: 42.0 M parameters (84 MB in half precision, the size of 955717e8-8726e21a.th).
#: ``htdemucs_6s`` is the same with 6 sources and ``bottom_channels=0``.
HTDEMUCS_CONFIG: Mapping[str, Any] = {
    "sources": ["drums", "bass", "other", "vocals"],
    "audio_channels": 2,
    "samplerate": 44100,
    "segment": Fraction(39, 5),
    "channels": 48,
    "growth": 2,
    "nfft": 4096,
    "cac": True,
    "depth": 4,
    "rewrite": True,
    "freq_emb": 0.2,
    "emb_scale": 10,
    "emb_smooth": True,
    "kernel_size": 8,
    "time_stride": 2,
    "stride": 4,
    "context": 1,
    "context_enc": 0,
    "norm_starts": 4,
    "norm_groups": 4,
    "dconv_mode": 3,
    "dconv_depth": 2,
    "dconv_comp": 8,
    "dconv_init": 1e-3,
    "bottom_channels": 512,
    "t_layers": 5,
    "t_emb": "sin",
    "t_hidden_scale": 4.0,
    "t_heads": 8,
    "t_dropout": 0.02,
    "t_layer_scale": True,
    "t_gelu": True,
    "t_cross_first": False,
    "rescale": 0.1,
    "use_train_segment": True,
}

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.]*$")


def build_htdemucs(*, seed: int = 0, **overrides: Any) -> HTDemucs:
    """Build an ``HTDemucs`` with :data:`HTDEMUCS_CONFIG` and seeded random weights, in eval mode.

    Parameters
    ----------
    seed : int, keyword-only
        Seeds the weight initialization (the global torch RNG is left as it was).
    **overrides
        Any ``HTDemucs`` keyword argument, e.g. ``channels=8, t_layers=1,
        segment=Fraction(1)`` for a tiny test model. ``segment`` may be a float; it
        is stored as a Fraction like demucs does.

    Returns
    -------
    model : demucs.htdemucs.HTDemucs

    Notes
    -----
    ``depth`` below 4 leaves many frequency bins at the Transformer (2048 / 4**depth),
    and attention over them is slow: keep ``depth=4`` and shrink ``channels`` and
    ``t_layers`` instead.
    """
    from demucs.htdemucs import HTDemucs

    kwargs = dict(HTDEMUCS_CONFIG)
    kwargs.update(overrides)
    kwargs["sources"] = list(kwargs["sources"])
    segment = kwargs.get("segment")
    if isinstance(segment, float):
        kwargs["segment"] = Fraction(segment).limit_denominator(1000)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HTDemucs(**kwargs)
    return model.eval()


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidInput(
            f"model name must be letters, digits, '_' or '.' (not starting with '.'; no '-', which "
            f"demucs reads as a checksum separator), got {name!r}"
        )


def _package(model: nn.Module, *, half: bool, training_args: Mapping[str, Any] | None) -> dict[str, Any]:
    from demucs.states import get_state

    try:
        # Set by demucs.states.capture_init; nn.Module.__getattr__ declares every attribute Tensor | Module.
        args, kwargs = model._init_args_kwargs  # type: ignore[misc]
    except AttributeError:
        raise InvalidInput(
            f"{type(model).__name__} cannot be saved to a demucs repository: its __init__ is not "
            "wrapped with demucs.states.capture_init (Demucs, HDemucs and HTDemucs are)"
        ) from None
    return {
        "klass": model.__class__,
        "args": args,
        "kwargs": kwargs,
        "state": get_state(model, None, half),
        "training_args": dict(training_args or {}),
    }


def _atomic_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_free(folder: Path, sig: str, keep: Path) -> None:
    for other in folder.glob(f"{sig}-*.th"):
        if other != keep and other.stem.rsplit("-", 1)[0] == sig:
            raise AlreadyExists(
                f"{other} already holds a model with signature '{sig}': demucs refuses a folder with "
                "two files for one signature; delete it first"
            )


def save_model_to_repo(
    model: nn.Module,
    name: str,
    folder: Path | str,
    *,
    half: bool = False,
    training_args: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``model`` as ``folder/NAME.th`` so that ``get_model(NAME, repo=folder)`` loads it.

    Parameters
    ----------
    model : torch.nn.Module
        A demucs model (``Demucs``, ``HDemucs``, ``HTDemucs``: their ``__init__``
        arguments are recorded by ``capture_init``) or a ``BagOfModels``, saved as
        ``NAME.yaml`` plus one ``NAME_<i>.th`` per model (with its weights).
    name : str
        Letters, digits, ``_`` and ``.``; no ``-`` (demucs would read a checksum).
    folder : Path
        Created if missing.
    half : bool, keyword-only
        Store the weights as float16, like demucs' releases (half the size; the
        loaded model is float32 again, with rounded weights).
    training_args : mapping, keyword-only
        Stored as ``training_args`` (demucs keeps the training config there).

    Returns
    -------
    path : Path
        The ``.th`` file (``.yaml`` for a bag), written atomically.

    Raises
    ------
    InvalidInput
        Bad name, or a model demucs cannot rebuild.
    AlreadyExists
        Another file in ``folder`` holds the same signature (``NAME-<checksum>.th``).
    """
    import yaml
    from demucs.apply import BagOfModels

    _check_name(name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(model, BagOfModels):
        sigs = []
        for index, sub in enumerate(model.models):
            sig = f"{name}_{index}"
            save_model_to_repo(sub, sig, folder, half=half, training_args=training_args)
            sigs.append(sig)
        path = folder / f"{name}.yaml"
        text = yaml.safe_dump({"models": sigs, "weights": [list(map(float, w)) for w in model.weights]})
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(tmp, path)
        return path
    path = folder / f"{name}.th"
    _check_free(folder, name, path)
    _atomic_save(_package(model, half=half, training_args=training_args), path)
    return path


#: Checkpoint suffixes of a RoFormer entry, in the order they are looked for.
ROFORMER_CHECKPOINTS = (".ckpt", ".pth", ".pt")


@dataclass(frozen=True)
class RepoEntry:
    """One loadable name in a local repository.

    ``kind`` is ``"model"`` (a ``.th`` file), ``"bag"`` (a ``.yaml`` file) or ``"roformer"``
    (``path`` its yaml config, ``checkpoint`` its weights, None when missing);
    ``checksum`` is the sha256 prefix in the file name, if any.
    """

    name: str
    path: Path
    kind: str
    checksum: str | None = None
    checkpoint: Path | None = None


def scan_repo(folder: Path | str) -> dict[str, RepoEntry]:
    """Names ``get_model(NAME, repo=folder)`` can load, as demucs' LocalRepo/BagOnlyRepo see them.

    A missing folder holds nothing. When a ``.th`` signature and a ``.yaml`` stem
    share a name, demucs loads the single model, and so does this listing.
    """
    folder = Path(folder)
    found: dict[str, RepoEntry] = {}
    if not folder.is_dir():
        return found
    files = sorted(f for f in folder.iterdir() if not f.name.startswith(".") and f.is_file())
    for file in files:
        if file.suffix == ".th":
            sig, checksum = file.stem.rsplit("-", 1) if "-" in file.stem else (file.stem, None)
            found.setdefault(sig, RepoEntry(sig, file, "model", checksum))
    names = {f.name for f in files}
    for file in files:
        if file.suffix == ".yaml":
            checkpoint = next((file.with_suffix(s) for s in ROFORMER_CHECKPOINTS if file.stem + s in names), None)
            if checkpoint is not None or _looks_like_roformer_config(file):
                found.setdefault(file.stem, RepoEntry(file.stem, file, "roformer", checkpoint=checkpoint))
            else:
                found.setdefault(file.stem, RepoEntry(file.stem, file, "bag"))
    return found


def _looks_like_roformer_config(path: Path) -> bool:
    """A Music-Source-Separation-Training config (top-level ``model:`` and ``audio:``), not a
    demucs bag (``models:``): read as text, its ``!!python/tuple`` tags need no loader."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return False
    keys = set(re.findall(r"^([A-Za-z_]+):", text, flags=re.MULTILINE))
    return {"model", "audio"} <= keys and "models" not in keys
