"""RoFormer models beside Demucs through the whole mesh (issue 20).

A local model repository holds what the community shares — Music-Source-Separation-Training
configs and checkpoints (``NAME.yaml`` + ``NAME.ckpt``) — for a tiny BS-RoFormer (vocals as its
target: vocals + other = mix - vocals) and a tiny 4-stem Mel-Band RoFormer, saved from MSST's own
network classes with seeded random weights (tests/helpers/roformer.py), plus a config whose
checkpoint is missing. A real mesh lists them, runs whole jobs with them (stems, HPSS,
composites, loudness) and refuses what a RoFormer cannot do, with messages that say why. The
web page's model picker explains the RoFormer and runs a job on it in headless Chromium (a
vocals + "instrumental" model: its own stem names all the way to the page's mixer). Nothing is
faked; the random weights only mean the stems are not musically meaningful.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import soundfile as sf
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from audiomesh.demo import synth_song
from audiomesh.launcher import Mesh
from audiomesh.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc, separation_pb2
from tests.helpers.browser import css, wait
from tests.helpers.mesh import SUCCEEDED, read, start_mesh, upload, wait_for, write_song
from tests.helpers.roformer import write_roformer

BS = "tiny_bs_roformer"
MEL = "tiny_mel_roformer"
NO_WEIGHTS = "roformer_without_weights"
VOCAL = "tiny_vocal_roformer"  # vocals + "instrumental", for the page
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
TERMINAL = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"}


@pytest.fixture(scope="module")
def roformer_mesh(tmp_path_factory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("roformer")
    repo = tmp / "models"
    repo.mkdir()
    write_roformer(repo, BS, network="bs_roformer", instruments=("vocals", "other"), target="vocals", seed=1)
    write_roformer(
        repo, MEL, network="mel_band_roformer", instruments=("drums", "bass", "other", "vocals"), target=None, seed=2
    )
    _, checkpoint = write_roformer(repo, NO_WEIGHTS, network="bs_roformer", instruments=("vocals", "other"))
    checkpoint.unlink()
    write_roformer(repo, VOCAL, network="bs_roformer", instruments=("vocals", "instrumental"), target="vocals", seed=3)
    mesh = start_mesh(tmp, gateway=True, AUDIOMESH_MODEL_REPO=str(repo), AUDIOMESH_COMPILE="false")
    try:
        yield mesh
    finally:
        mesh.stop()


def root(mesh: Mesh) -> Path:
    return Path(mesh.env["AUDIOMESH_STORE_URL"].removeprefix("file://"))


async def run_job(mesh: Mesh, song: bytes, model: str, **separation) -> orchestrator_pb2.Job:
    options = orchestrator_pb2.JobOptions(model=model)
    for name, value in separation.items():
        setattr(options.separation, name, value)
    async with grpc.aio.insecure_channel(mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        created = (await upload(stub, song, "song.wav", options)).job
        job, _ = await wait_for(stub, created.job_id, timeout=180)
    return job


async def test_the_models_are_listed_with_their_stems_and_whether_their_weights_are_here(roformer_mesh):
    async with grpc.aio.insecure_channel(roformer_mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        models = {m.name: m for m in (await stub.ListModels(separation_pb2.ListModelsRequest())).models}
    assert "demucs_unittest" in models  # beside Demucs, not instead
    bs, mel, missing = models[BS], models[MEL], models[NO_WEIGHTS]
    assert (bs.kind, list(bs.sources), bs.available, bs.sample_rate, bs.audio_channels) == (
        "roformer",
        ["vocals", "other"],
        True,
        44100,
        2,
    )
    assert (mel.kind, list(mel.sources), mel.available) == ("roformer", ["drums", "bass", "other", "vocals"], True)
    assert "BS-RoFormer" in bs.description and "Mel" in mel.description
    assert missing.kind == "roformer" and not missing.available


async def stems_of(mesh: Mesh, job: orchestrator_pb2.Job, model_name: str) -> dict[str, np.ndarray]:
    """The job's stems computed here: its decoded mix through the same model, loaded from the repo."""
    from audiomesh.audio.stream import ArraySource
    from audiomesh.separation import SeparatorFactory

    model = SeparatorFactory(model_repo=Path(mesh.env["AUDIOMESH_MODEL_REPO"]), device="cpu").get(model_name)
    mix = read(root(mesh) / f"jobs/{job.job_id}/decode/mix.wav")
    blocks = list(model.separate_stream(ArraySource(mix, 44100)))
    return {stem: np.concatenate([b[stem] for _, b in blocks], axis=1) for stem in blocks[0][1]}


@pytest.mark.parametrize(
    ("model", "stems", "main"),
    [
        (BS, ["vocals", "other"], ["other"]),  # two stems: main is the instrumental
        (MEL, ["drums", "bass", "other", "vocals"], ["drums", "bass", "other"]),
    ],
)
async def test_a_whole_job_runs_on_a_roformer(roformer_mesh, tmp_path, model, stems, main):
    song = write_song(tmp_path / "song.wav", 3.0, seed=4).read_bytes()
    job = await run_job(roformer_mesh, song, model)
    assert job.state == SUCCEEDED, job.error
    assert job.separation_parts == 1  # a RoFormer is never split into chunk ranges (Demucs only)
    delivered = {t.name for t in job.tracks}
    assert delivered == {*stems, "harmonic", "percussive", "main", "main_harmonic", "main_percussive"}
    names = [n.name for n in job.nodes]
    assert [f"hpss:{s}" for s in main] == [n for n in names if n.startswith("hpss:") and n != "hpss:mix"]
    store = root(roformer_mesh)
    expected = await stems_of(roformer_mesh, job, model)
    assert list(expected) == stems
    for stem in stems:
        got = read(store / f"jobs/{job.job_id}/separation/{stem}.wav")
        np.testing.assert_allclose(got, expected[stem], atol=1e-6, err_msg=stem)
    composite = read(store / f"jobs/{job.job_id}/composite/main.wav")
    np.testing.assert_allclose(composite, sum(expected[s] for s in main), atol=1e-5)
    manifest = json.loads((store / job.manifest_key).read_bytes())
    assert manifest["job"]["options"]["model"] == model
    assert all(t.HasField("loudness") for t in job.tracks)


@pytest.mark.parametrize(
    ("model", "separation", "code", "words"),
    [
        (BS, {"shifts": 2}, grpc.StatusCode.INVALID_ARGUMENT, "is a RoFormer, which runs one pass"),
        (BS, {"overlap": 0.5}, grpc.StatusCode.INVALID_ARGUMENT, "separation.overlap"),
        (BS, {"two_stems": "drums"}, grpc.StatusCode.INVALID_ARGUMENT, "of model 'tiny_bs_roformer' (vocals, other)"),
    ],
)
async def test_what_a_roformer_cannot_do_is_refused_when_the_job_is_created(
    roformer_mesh, tmp_path, model, separation, code, words
):
    song = write_song(tmp_path / "song.wav", 1.0).read_bytes()
    options = orchestrator_pb2.JobOptions(model=model)
    for name, value in separation.items():
        setattr(options.separation, name, value)
    async with grpc.aio.insecure_channel(roformer_mesh.orchestrator) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await upload(stub, song, "song.wav", options)
    assert err.value.code() == code and words in err.value.details(), err.value.details()


async def test_a_model_without_its_checkpoint_fails_fast_and_says_where_to_put_it(roformer_mesh, tmp_path):
    """As for a Demucs model without weights: the job is taken (its config lists it) and fails
    in seconds, naming the missing file and the folder."""
    song = write_song(tmp_path / "song.wav", 1.0).read_bytes()
    job = await run_job(roformer_mesh, song, NO_WEIGHTS)
    assert job.state == common_pb2.JOB_STATE_FAILED
    assert f"{NO_WEIGHTS}.yaml has no weights beside it: put its checkpoint in" in job.error.message, job.error


async def test_shifts_one_and_two_stems_work_as_for_demucs(roformer_mesh, tmp_path):
    song = write_song(tmp_path / "song.wav", 2.0, seed=8).read_bytes()
    job = await run_job(roformer_mesh, song, MEL, shifts=1, two_stems="vocals")
    assert job.state == SUCCEEDED, job.error
    assert {t.name for t in job.tracks} >= {"vocals", "no_vocals", "main"}
    assert job.state == common_pb2.JOB_STATE_SUCCEEDED


# --- the web page (headless Chromium, tests/helpers/browser.py) ------------------------------------


def help_text(driver) -> str:
    return css(driver, "#model-help").text


def sentence(text: str) -> str:
    return text if text.endswith((".", "!", "?")) else f"{text}."


@pytest.mark.timeout(180)
def test_the_page_s_picker_explains_a_roformer_and_a_job_runs_on_it(
    browser, roformer_mesh: Mesh, tmp_path: Path
) -> None:
    driver = browser
    base = roformer_mesh.url.rstrip("/")
    listed = {m["name"]: m for m in httpx.get(f"{base}/v1/models", timeout=30).json()["models"]}
    try:
        driver.get(base + "/")
        wait(driver, 20, lambda d: d.execute_script("return document.body.dataset.ready") == "true", "page not ready")

        # --- each option names its family; the default (a Demucs) is explained in one line
        select = css(driver, "#model-select")
        options = {o.get_attribute("value"): o.text for o in select.find_elements(By.TAG_NAME, "option")}
        assert "RoFormer" in options[VOCAL] and "Demucs" not in options[VOCAL], options
        assert "Demucs" in options["demucs_unittest"] and "(default)" in options["demucs_unittest"], options
        assert select.get_attribute("value") == "demucs_unittest"
        demucs = help_text(driver)
        assert demucs.startswith("Demucs: 4 stems (drums, bass, other, vocals), every instrument at once"), demucs
        assert "Stems:" not in demucs  # the description names them already

        # --- picking the RoFormer: the server's one line, its stems in the two-stems select
        Select(select).select_by_value(VOCAL)
        wait(driver, 5, lambda d: "RoFormer" in help_text(d), "the help line did not follow the picker")
        line = help_text(driver)
        assert line == sentence(listed[VOCAL]["description"]), (line, listed[VOCAL])
        assert line.startswith("BS-RoFormer: vocals + instrumental (the mix minus vocals), best for vocals;"), line
        assert "much slower than Demucs on CPU" in line and "Stems:" not in line, line
        two = css(driver, "#two-stems-select")
        offered = [(o.get_attribute("value"), o.text) for o in two.find_elements(By.TAG_NAME, "option")]
        assert [value for value, _ in offered] == ["", "vocals", "instrumental"], offered
        assert offered[2][1] == "Instrumental + everything else", offered

        # --- a short song through the file picker: the job runs on the RoFormer
        song = tmp_path / "roformer song.wav"
        sf.write(song, synth_song(2.0, 44100, seed=5).T, 44100, subtype="PCM_16")
        css(driver, "#file-input").send_keys(str(song))
        wait(driver, 30, lambda d: css(d, "#job").is_displayed(), "no job panel after the upload")
        wait(
            driver,
            90,
            lambda d: css(d, "#job-state").get_attribute("data-state") in TERMINAL,
            "the job did not finish in 90 s",
        )
        assert css(driver, "#job-state").get_attribute("data-state") == "JOB_STATE_SUCCEEDED", css(
            driver, "#job-error"
        ).text
        job_id = css(driver, "#job-id").text.removeprefix("Job ").strip()
        job = httpx.get(f"{base}/v1/jobs/{job_id}", timeout=30).json()["job"]
        assert job["options"]["model"] == VOCAL, job["options"]

        # --- its tracks: vocals and the instrumental in the mixer, no Demucs stems anywhere
        rows = {r.get_attribute("data-track"): r for r in driver.find_elements(By.CSS_SELECTOR, "#tracks [data-track]")}
        assert set(rows) == {
            "vocals",
            "instrumental",
            "harmonic",
            "percussive",
            "main",
            "main_harmonic",
            "main_percussive",
        }
        assert not {"drums", "bass", "other"} & set(rows)
        for stem in ("vocals", "instrumental"):
            assert rows[stem].find_elements(By.CSS_SELECTOR, ".channel-solo"), stem  # a mixer channel
            assert (
                rows[stem]
                .find_element(By.CSS_SELECTOR, "a.download")
                .get_attribute("href")
                .endswith(f"/download/{job_id}/{stem}")
            )
        assert "Instrumental" in rows["instrumental"].text
        logs = driver.get_log("browser")
        assert [e["message"] for e in logs if e["level"] == "SEVERE"] == []
    except BaseException:
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "web-models-failure.png"))
        (ARTIFACTS / "web-models-failure-console.json").write_text(json.dumps(driver.get_log("browser"), indent=1))
        raise
