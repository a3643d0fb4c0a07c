"""The web page in a real browser: upload, live progress, players, ZIP, history, errors, phone.

Headless Chromium (tests/helpers/browser.py) against the real gateway in front of the real
mesh (``gateway_url``, default model demucs_unittest). Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import base64
import io
import json
import time
import zipfile
from pathlib import Path

import httpx
import pytest
import soundfile as sf
from selenium.webdriver.common.by import By

from audiomesh.demo import synth_song
from tests.helpers import browser as browser_helpers
from tests.helpers.browser import css, wait

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
STEMS = ["vocals", "drums", "bass", "other"]
TRACKS = [*STEMS, "harmonic", "percussive", "main", "main_harmonic", "main_percussive"]
TERMINAL = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"}
# The fixture (tests/helpers/browser.py), usable here whether or not conftest registers it.
browser = browser_helpers.browser

# Records every state and progress value the page shows, to check progress was live.
RECORD_PROGRESS = """
window.__seen = [];
const badge = document.getElementById("job-state");
const bar = document.getElementById("job-progress");
const note = () => window.__seen.push([badge.dataset.state || "", Number(bar.value),
                                       document.getElementById("job-stage").textContent]);
new MutationObserver(note).observe(badge, {attributes: true, attributeFilter: ["data-state"]});
new MutationObserver(note).observe(bar, {attributes: true, attributeFilter: ["value"]});
"""


# Drags a file made in the page over #drop-zone and drops it; returns whether the zone lit up.
DROP_FILE = """
const [name, text] = arguments;
const data = new DataTransfer();
data.items.add(new File([text], name, {type: "audio/wav"}));
const zone = document.getElementById("drop-zone");
const fire = (type) => zone.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: data}));
fire("dragenter");
fire("dragover");
const highlighted = zone.classList.contains("is-dragover");
fire("drop");
return highlighted && !zone.classList.contains("is-dragover");
"""


def severe_logs(driver, *, expected: tuple[str, ...] = ()) -> list[str]:
    """SEVERE browser console entries, minus those naming one of ``expected``."""
    entries = driver.get_log("browser")
    return [e["message"] for e in entries if e["level"] == "SEVERE" and not any(x in e["message"] for x in expected)]


def screenshot(driver, name: str) -> Path:
    """The whole page (not only the viewport), via the DevTools protocol."""
    ARTIFACTS.mkdir(exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")  # sticky parts as a person first sees them
    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    # Captured beyond the viewport the page has no scrollbar, so it lays out at the full width.
    width = max(size["width"], driver.execute_script("return window.innerWidth"))
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": size["height"], "scale": 1},
        },
    )
    path = ARTIFACTS / name
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def horizontal_overflow(driver) -> list[str]:
    """Elements whose right edge passes the viewport (for a readable failure message)."""
    return driver.execute_script(
        """
        const w = document.documentElement.clientWidth;
        return Array.from(document.querySelectorAll('body *'))
          .filter(e => e.getClientRects().length && e.getBoundingClientRect().right > w + 1)
          .slice(0, 10)
          .map(e => `${e.tagName.toLowerCase()}#${e.id}.${e.className} right=${e.getBoundingClientRect().right}`);
        """
    )


@pytest.mark.timeout(300)
def test_web_page_does_the_whole_job(browser, gateway_url: str, tmp_path: Path) -> None:
    driver = browser
    started = time.monotonic()
    try:
        _whole_job(driver, gateway_url.rstrip("/"), tmp_path)
    except BaseException:
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "web-failure.png"))
        (ARTIFACTS / "web-failure-console.json").write_text(json.dumps(driver.get_log("browser"), indent=1))
        raise
    # The whole browser round trip stays quick (the job itself is a 3 s clip).
    assert time.monotonic() - started < 150


def _whole_job(driver, base: str, tmp_path: Path) -> None:
    # --- the page loads, fills its model list, and logs nothing bad
    driver.get(base + "/")
    wait(driver, 20, lambda d: d.execute_script("return document.body.dataset.ready") == "true", "page never got ready")
    model = css(driver, "#model-select")
    assert model.get_attribute("value") == "demucs_unittest"
    options = {o.get_attribute("value"): o for o in model.find_elements(By.TAG_NAME, "option")}
    assert "htdemucs" in options and options["htdemucs"].get_attribute("disabled") is not None
    assert "(no weights here)" in options["htdemucs"].text
    assert css(driver, "#alert").text == ""
    assert severe_logs(driver) == []

    # --- upload a 3 s synthetic song through the file picker; follow it to the end
    song = tmp_path / "web demo.wav"
    sf.write(song, synth_song(3.0, 44100, seed=7).T, 44100, subtype="PCM_16")
    driver.execute_script(RECORD_PROGRESS)
    css(driver, "#file-input").send_keys(str(song))
    wait(driver, 60, lambda d: css(d, "#job").is_displayed(), "no job panel after the upload")
    assert css(driver, "#upload-progress").get_attribute("value") == "100"
    wait(
        driver,
        180,
        lambda d: css(d, "#job-state").get_attribute("data-state") in TERMINAL,
        "the job did not finish in 180 s",
    )
    job_state = css(driver, "#job-state").get_attribute("data-state")
    assert job_state == "JOB_STATE_SUCCEEDED", css(driver, "#job-error").text
    assert float(css(driver, "#job-progress").get_attribute("value")) == 1.0
    assert css(driver, "#job-stage").text == "Done"
    assert "demo" in css(driver, "#job-name").text
    seen = driver.execute_script("return window.__seen")
    assert seen[0][0] in {"JOB_STATE_QUEUED", "JOB_STATE_RUNNING"}, seen  # shown before it ended
    fractions = [value for _, value, _ in seen]
    assert fractions == sorted(fractions), f"progress went backwards: {seen}"
    nodes = driver.find_elements(By.CSS_SELECTOR, "#job-nodes [data-node]")
    assert {n.get_attribute("data-node") for n in nodes} >= {"separation", "composite", "normalize"}
    assert all(n.get_attribute("data-state") == "NODE_STATE_SUCCEEDED" for n in nodes)
    job_id = css(driver, "#job-id").text.removeprefix("Job ").strip()

    # --- one row per track with a download link; the stems are in the mixer (tests/
    # test_web_mixer.py), every other track has its own player; the players play
    rows = {r.get_attribute("data-track"): r for r in driver.find_elements(By.CSS_SELECTOR, "#tracks [data-track]")}
    assert set(rows) == set(TRACKS)
    for name, row in rows.items():
        link = row.find_element(By.CSS_SELECTOR, "a.download")
        assert link.get_attribute("href").endswith(f"/download/{job_id}/{name}")
        assert link.get_attribute("download")
        assert "LUFS" in row.text and " s" in row.text
        players = row.find_elements(By.TAG_NAME, "audio")
        if name in STEMS:
            assert not players and row.find_elements(By.CSS_SELECTOR, ".channel-solo"), name
            continue
        assert players[0].get_attribute("preload") == "none"
        assert link.get_attribute("href") == players[0].get_attribute("src")
    duration = driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        const audio = document.querySelector('#tracks [data-track="main"] audio');
        audio.addEventListener('loadedmetadata', () => done(audio.duration), {once: true});
        audio.addEventListener('error', () => done('error ' + (audio.error && audio.error.code)), {once: true});
        audio.preload = 'metadata';
        audio.load();
        """
    )
    assert duration == pytest.approx(3.0, abs=0.05), duration
    assert css(driver, "#manifest-link").get_attribute("href").endswith(f"/download/{job_id}/manifest")
    screenshot(driver, "web-desktop.png")

    # --- the ZIP link serves every track and the manifest
    zip_url = css(driver, "#download-all").get_attribute("href")
    assert zip_url.endswith(f"/download/{job_id}/all")
    with httpx.Client(timeout=60) as http:
        reply = http.get(zip_url)
        assert reply.status_code == 200, reply.text[:300]
        with zipfile.ZipFile(io.BytesIO(reply.content)) as archive:
            assert archive.testzip() is None
            names = set(archive.namelist())
            assert names == {f"{t}.wav" for t in TRACKS} | {"manifest.json"}
            manifest = json.loads(archive.read("manifest.json"))
        assert json.dumps(manifest).count(job_id) >= 1
        head = http.get(
            rows["drums"].find_element(By.CSS_SELECTOR, "a.download").get_attribute("href"),
            headers={"Range": "bytes=0-11"},
        )
        assert head.status_code == 206 and head.content[:4] == b"RIFF" and head.content[8:12] == b"WAVE"

    # --- the job is in the history; after a reload it reopens from there
    item = f'#history [data-job-id="{job_id}"]'
    wait(driver, 10, lambda d: d.find_elements(By.CSS_SELECTOR, item), "the job is not in the history")
    assert css(driver, item).get_attribute("data-state") == "JOB_STATE_SUCCEEDED"
    assert "demo" in css(driver, item).text
    # (The page's address names the open job, so a plain reload would reopen it: load "/".)
    driver.get(base + "/")
    wait(driver, 20, lambda d: d.find_elements(By.CSS_SELECTOR, item), "the job is not in the history after a reload")
    assert not css(driver, "#job").is_displayed()
    css(driver, f"{item} .history-open").click()
    wait(
        driver,
        20,
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#tracks [data-track]")) == len(TRACKS),
        "reopening the job from the history did not show its tracks",
    )
    assert driver.execute_script("return location.hash") == f"#/jobs/{job_id}"
    assert css(driver, "#job-state").get_attribute("data-state") == "JOB_STATE_SUCCEEDED"
    assert css(driver, item).get_attribute("aria-current") == "true"
    assert severe_logs(driver) == []

    # --- a file that isn't audio, dropped on the drop zone: a readable error in the alert region
    # (WebDriver cannot drag files from the desktop; the page gets the same events a real drop sends.)
    highlighted = driver.execute_script(DROP_FILE, "notes.wav", "these are my lyrics, not audio\n" * 50)
    assert highlighted, "the drop zone did not highlight while a file was dragged over it"
    wait(driver, 30, lambda d: css(d, "#alert").text.strip(), "no error shown for a non-audio file")
    alert = css(driver, "#alert")
    assert alert.is_displayed() and alert.get_attribute("role") == "alert"
    message = alert.text
    assert "isn't audio we can read:" in message, message
    assert len(message.split(":", 1)[1].strip()) > 10, message  # the server's reason follows
    # Chrome logs the refused upload itself (HTTP 4xx) as a console error; nothing else may appear.
    assert severe_logs(driver, expected=("jobs:upload",)) == []

    # --- a file over the upload limit is refused before any byte is sent, in words
    limit = int(httpx.get(f"{base}/v1/config", timeout=10).json()["config"]["max_upload_bytes"])
    big = tmp_path / "huge.wav"
    with big.open("wb") as f:
        f.truncate(limit + 1)  # sparse: costs no disk
    css(driver, "#alert .dismiss").click()
    assert css(driver, "#alert").text == ""
    css(driver, "#file-input").send_keys(str(big))
    wait(driver, 10, lambda d: "too large" in css(d, "#alert").text, "no error shown for a file over the limit")
    assert "limit" in css(driver, "#alert").text

    # --- phone width: nothing overflows sideways
    driver.set_window_size(375, 800)
    width = driver.execute_script("return window.innerWidth")
    if width != 375:  # a window manager refused the size: emulate the viewport instead
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride", {"width": 375, "height": 800, "deviceScaleFactor": 1, "mobile": True}
        )
    wait(driver, 5, lambda d: d.execute_script("return window.innerWidth") == 375, "could not make a 375 px viewport")
    scroll_width, client_width = driver.execute_script(
        "const e = document.documentElement; return [e.scrollWidth, e.clientWidth]"
    )
    # clientWidth is 375 less a classic scrollbar, where the browser draws one.
    assert scroll_width <= 376 and scroll_width <= client_width + 1, horizontal_overflow(driver)
    screenshot(driver, "web-phone.png")

    # --- delete the job from the history (two clicks, no dialog): gone from the page and server
    delete = css(driver, f"{item} .history-actions button")
    delete.click()
    assert "again" in delete.text
    delete.click()
    wait(driver, 20, lambda d: not d.find_elements(By.CSS_SELECTOR, item), "the deleted job is still listed")
    assert not css(driver, "#job").is_displayed()
    assert httpx.get(f"{base}/v1/jobs/{job_id}", timeout=10).status_code == 404
    assert severe_logs(driver, expected=("jobs:upload",)) == []


# A string that would run script if any of it became markup or an attribute.
HOSTILE = '"\'><img src=x onerror="window.__xss=1">'
# Whether anything ran, what the page asked the server for, and which policy rules fired.
PAGE_FACTS = """
return {
  xss: window.__xss === undefined ? null : window.__xss,
  images: document.querySelectorAll("img").length,
  asked: performance.getEntriesByType("resource").map((e) => new URL(e.name).pathname),
  violations: window.__violations || [],
};
"""


@pytest.mark.timeout(120)
def test_hostile_text_stays_text_and_the_page_policy_holds(browser, gateway_url: str, tmp_path: Path) -> None:
    """A job address that is no job id, and a server message that quotes what the user sent,
    are shown as text; the page's Content-Security-Policy refuses inline script."""
    from urllib.parse import quote

    driver = browser
    base = gateway_url.rstrip("/")
    driver.get(f"{base}/#/jobs/{quote(HOSTILE, safe='')}")
    wait(driver, 20, lambda d: d.execute_script("return document.body.dataset.ready") == "true", "page never got ready")
    driver.execute_script(
        "window.__violations = [];"
        "document.addEventListener('securitypolicyviolation', (e) => window.__violations.push(e.violatedDirective));"
    )
    alert = css(driver, "#alert").text
    assert "isn't a job id" in alert and HOSTILE in alert, alert
    facts = driver.execute_script(PAGE_FACTS)
    assert facts["xss"] is None and facts["images"] == 0
    assert not [p for p in facts["asked"] if p.startswith("/v1/jobs/")], facts["asked"]  # nothing asked for it

    # "#/jobs/.." would make v1/jobs/.. resolve to v1/: refused before any request.
    css(driver, "#alert .dismiss").click()
    driver.execute_script("location.hash = '#/jobs/..'")
    wait(driver, 10, lambda d: "isn't a job id" in css(d, "#alert").text, "no word on a '..' job address")
    assert "/v1/" not in driver.execute_script(PAGE_FACTS)["asked"]

    # The server's refusal quotes the model asked for: shown as it is.
    driver.execute_script(
        "const s = document.getElementById('model-select');"
        "s.append(new Option(arguments[0], arguments[0])); s.value = arguments[0];",
        HOSTILE,
    )
    song = tmp_path / "song.wav"
    sf.write(song, synth_song(0.5, 44100, seed=3).T, 44100, subtype="PCM_16")
    css(driver, "#file-input").send_keys(str(song))
    wait(driver, 30, lambda d: "unknown model" in css(d, "#alert").text, "no refusal of the hostile model shown")
    assert HOSTILE[3:] in css(driver, "#alert").text  # the server quotes it with repr(): \' for '
    facts = driver.execute_script(PAGE_FACTS)
    assert facts["xss"] is None and facts["images"] == 0

    # Markup that got in anyway could not run script: the policy refuses inline handlers.
    driver.execute_script("document.body.insertAdjacentHTML('beforeend', arguments[0])", HOSTILE)
    wait(driver, 10, lambda d: d.execute_script(PAGE_FACTS)["violations"], "no policy violation reported")
    facts = driver.execute_script(PAGE_FACTS)
    assert facts["xss"] is None and "script-src-attr" in facts["violations"], facts
    assert severe_logs(driver, expected=("jobs:upload", "Content Security Policy", "/x - Failed")) == []
