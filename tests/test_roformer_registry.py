"""RoFormer entries in a local model repository (issue 20), found and described the way the
community lays them out (``NAME.yaml`` + ``NAME.ckpt``), beside Demucs' own files; and the
options a RoFormer refuses. No mesh: the factory and the options checks, directly."""

from __future__ import annotations

import pytest

from audiomesh.errors import InvalidInput, ModelUnavailable
from audiomesh.options import check_options_for_kind
from audiomesh.separation import SeparatorFactory
from audiomesh.separation.repo import scan_repo
from audiomesh.v1 import common_pb2
from tests.helpers.models import make_tiny_repo
from tests.helpers.roformer import write_roformer


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    write_roformer(folder, "bs_vocals", network="bs_roformer", instruments=("vocals", "other"), target="vocals")
    yaml_path, ckpt = write_roformer(
        folder, "mel_pth", network="mel_band_roformer", instruments=("drums", "bass", "other", "vocals"), target=None
    )
    ckpt.rename(ckpt.with_suffix(".pth"))  # .pth is as good as .ckpt
    _, ckpt = write_roformer(folder, "no_weights", network="bs_roformer", instruments=("vocals", "other"))
    ckpt.unlink()
    (folder / "broken.yaml").write_text("model:\n  dim: [unclosed\naudio:\n  chunk_size: 1\n")
    (folder / "broken.ckpt").write_bytes(b"not a checkpoint")
    # Demucs' own layout beside them: a single model and a bag of it.
    make_tiny_repo(folder, "tiny_ht")
    (folder / "tiny_bag.yaml").write_text("models: ['tiny_ht']\n")
    return folder


def test_the_repository_tells_roformer_entries_from_demucs_bags(repo):
    found = scan_repo(repo)
    kinds = {name: (e.kind, e.checkpoint.name if e.checkpoint else None) for name, e in found.items()}
    assert kinds == {
        "bs_vocals": ("roformer", "bs_vocals.ckpt"),
        "mel_pth": ("roformer", "mel_pth.pth"),
        "no_weights": ("roformer", None),
        "broken": ("roformer", "broken.ckpt"),
        "tiny_ht": ("model", None),
        "tiny_bag": ("bag", None),
    }


def test_the_factory_lists_them_from_their_configs_without_loading_weights(repo):
    factory = SeparatorFactory(model_repo=repo, device="cpu", allow_download=False)
    models = {m.name: m for m in factory.list_models()}
    bs, mel = models["bs_vocals"], models["mel_pth"]
    assert (bs.kind, bs.sources, bs.available, bs.loaded) == ("roformer", ("vocals", "other"), True, False)
    assert (mel.kind, mel.sources, mel.available) == ("roformer", ("drums", "bass", "other", "vocals"), True)
    assert models["no_weights"].available is False and models["broken"].available is False
    assert models["tiny_ht"].kind == "demucs" and models["tiny_bag"].available  # Demucs unchanged
    assert not factory.loaded()


def test_a_roformer_loads_by_name_and_separates(repo):
    import numpy as np

    factory = SeparatorFactory(model_repo=repo, device="cpu", allow_download=False)
    model = factory.get("bs_vocals")
    assert model.info.kind == "roformer" and model.sources == ("vocals", "other")
    mix = np.random.default_rng(0).standard_normal((2, 20000)).astype(np.float32) * 0.1
    stems = model.separate(mix)
    assert set(stems) == {"vocals", "other"} and stems["vocals"].shape == mix.shape
    np.testing.assert_allclose(stems["vocals"] + stems["other"], mix, atol=1e-5)  # other = mix - vocals


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("no_weights", "no_weights.yaml has no weights beside it: put its checkpoint in"),
        ("broken", "broken.yaml"),
    ],
)
def test_a_roformer_that_cannot_load_says_why(repo, name, words):
    factory = SeparatorFactory(model_repo=repo, device="cpu", allow_download=False)
    with pytest.raises(ModelUnavailable, match=words):
        factory.get(name)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"shifts": 2}, "runs one pass"),
        ({"overlap": 0.5}, "separation.overlap"),
        ({"overlap": 0.25}, "separation.overlap"),  # even Demucs' default: set means asked for
    ],
)
def test_options_a_roformer_cannot_honour_are_refused(fields, words):
    options = common_pb2.SeparationOptions(**fields)
    with pytest.raises(InvalidInput, match=words):
        check_options_for_kind(options, "roformer", "bs_vocals")
    check_options_for_kind(options, "demucs", "htdemucs")  # all fine for Demucs


def test_one_pass_and_two_stems_are_fine_for_a_roformer():
    for fields in ({}, {"shifts": 0}, {"shifts": 1}, {"two_stems": "vocals"}, {"segment_seconds": 4.0}):
        check_options_for_kind(common_pb2.SeparationOptions(**fields), "roformer", "bs_vocals")
