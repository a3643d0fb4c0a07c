"""The web page's model picker with a RoFormer beside Demucs, in a real browser (issue 20).

Headless Chromium (tests/helpers/browser.py) against a real mesh and gateway whose model
repository holds a tiny BS-RoFormer saved the way the community shares it (``NAME.yaml`` +
``NAME.ckpt``, MSST's own network with seeded random weights: tests/helpers/roformer.py) that
delivers vocals and the instrumental (the mix minus the vocals). Nothing is faked; the random
weights only mean the stems are not musically meaningful.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import soundfile as sf
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from audiomesh.demo import synth_song
from audiomesh.launcher import Mesh
from tests.helpers import browser as browser_helpers
from tests.helpers.browser import css, wait
from tests.helpers.mesh import start_mesh
from tests.helpers.roformer import write_roformer

pytest.importorskip("msst")  # writes the tiny RoFormer's checkpoint

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
ROFORMER = "tiny_vocal_roformer"
TERMINAL = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"}
browser = browser_helpers.browser


@pytest.fixture(scope="module")
def roformer_gateway(tmp_path_factory) -> Iterator[Mesh]:
    """A mesh with its HTTP gateway; its repo: the RoFormer (Demucs' built-in test model beside it)."""
    tmp = tmp_path_factory.mktemp("web-models")
    repo = tmp / "models"
    write_roformer(repo, ROFORMER, network="bs_roformer", instruments=("vocals", "instrumental"), target="vocals")
    mesh = start_mesh(tmp, gateway=True, AUDIOMESH_MODEL_REPO=str(repo), AUDIOMESH_COMPILE="false")
    try:
        yield mesh
    finally:
        mesh.stop()


def help_text(driver) -> str:
    return css(driver, "#model-help").text


def sentence(text: str) -> str:
    return text if text.endswith((".", "!", "?")) else f"{text}."


@pytest.mark.timeout(180)
def test_the_picker_explains_a_roformer_and_a_job_runs_on_it(browser, roformer_gateway: Mesh, tmp_path: Path) -> None:
    driver = browser
    base = roformer_gateway.url.rstrip("/")
    started = time.monotonic()
    listed = {m["name"]: m for m in httpx.get(f"{base}/v1/models", timeout=30).json()["models"]}
    try:
        driver.get(base + "/")
        wait(driver, 20, lambda d: d.execute_script("return document.body.dataset.ready") == "true", "page not ready")

        # --- each option names its family; the default (a Demucs) is explained in one line
        select = css(driver, "#model-select")
        options = {o.get_attribute("value"): o.text for o in select.find_elements(By.TAG_NAME, "option")}
        assert "RoFormer" in options[ROFORMER] and "Demucs" not in options[ROFORMER], options
        assert "Demucs" in options["demucs_unittest"] and "(default)" in options["demucs_unittest"], options
        assert select.get_attribute("value") == "demucs_unittest"
        demucs = help_text(driver)
        assert demucs.startswith("Demucs: 4 stems (drums, bass, other, vocals), every instrument at once"), demucs
        assert "Stems:" not in demucs  # the description names them already

        # --- picking the RoFormer: the server's one line, its stems in the two-stems select
        Select(select).select_by_value(ROFORMER)
        wait(driver, 5, lambda d: "RoFormer" in help_text(d), "the help line did not follow the picker")
        line = help_text(driver)
        assert line == sentence(listed[ROFORMER]["description"]), (line, listed[ROFORMER])
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
        assert job["options"]["model"] == ROFORMER, job["options"]

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
    assert time.monotonic() - started < 90
