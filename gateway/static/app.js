// audiomesh web page: upload a song, follow its job live, play and download the stems.
// Plain ES2020 module, no dependencies; talks to the gateway's JSON API (proto3 JSON names).
// Fields with default values (0, "", false, []) may be absent from any response: every
// read below has a fallback.

import { Mixer, computePeaks, decodeAll, drawWaveform } from "./mixer.js";

// app.js is served at <root>/static/app.js; the API lives at <root>/v1/..., so the page also
// works when the gateway is mounted under a path prefix.
const ROOT = new URL("../", import.meta.url);
const url = (path) => new URL(path, ROOT).toString();

// API key (servers with AUDIOMESH_API_KEYS): kept in this browser only. fetch and XHR send
// it as a header; EventSource, <audio> and download links cannot, so they carry it as
// ?access_token= (the gateway never logs query strings).
const KEY_STORAGE = "audiomesh.apiKey";
const apiKey = () => {
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return "";
  }
};
const authHeaders = () => (apiKey() ? { Authorization: `Bearer ${apiKey()}` } : {});
const withKey = (href) => {
  if (!apiKey()) return href;
  const u = new URL(href);
  u.searchParams.set("access_token", apiKey());
  return u.toString();
};

const TERMINAL = new Set(["JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"]);
const JOB_STATE_LABELS = {
  JOB_STATE_UNSPECIFIED: "Unknown",
  JOB_STATE_QUEUED: "Queued",
  JOB_STATE_RUNNING: "Running",
  JOB_STATE_SUCCEEDED: "Done",
  JOB_STATE_FAILED: "Failed",
  JOB_STATE_CANCELLED: "Cancelled",
};
const NODE_STATE_LABELS = {
  NODE_STATE_UNSPECIFIED: "Waiting",
  NODE_STATE_PENDING: "Waiting",
  NODE_STATE_RUNNING: "Running",
  NODE_STATE_SUCCEEDED: "Done",
  NODE_STATE_FAILED: "Failed",
  NODE_STATE_CANCELLED: "Cancelled",
  NODE_STATE_SKIPPED: "Skipped",
};
const STAGE_LABELS = {
  decode: "Reading the file",
  validate: "Checking the file",
  separation: "Separating stems",
  stitch: "Joining the separated parts",
  hpss: "Splitting harmonic and percussive parts",
  composite: "Mixing the main tracks",
  normalize: "Normalizing loudness",
};
// Separator families (ModelInfo.kind), named in the model picker's options.
const MODEL_FAMILIES = { demucs: "Demucs", roformer: "RoFormer" };
const TRACK_LABELS = {
  vocals: "Vocals",
  no_vocals: "Everything but vocals",
  drums: "Drums",
  bass: "Bass",
  other: "Other",
  guitar: "Guitar",
  piano: "Piano",
  harmonic: "Harmonic (whole song)",
  percussive: "Percussive (whole song)",
  instrumental: "Instrumental",
  main: "Instrumental (main)",
  main_harmonic: "Instrumental, harmonic",
  main_percussive: "Instrumental, percussive",
};
// What each track is, in one line (keep in step with the README's list of output tracks).
const TRACK_MEANINGS = {
  vocals: "the singing voice, lead and backing (a separated stem)",
  drums: "drums and percussion (a separated stem)",
  bass: "bass guitar and synth bass (a separated stem)",
  other: "everything the other stems don't take: guitars, keys, strings, synths (a separated stem)",
  guitar: "guitars (a separated stem)",
  piano: "piano and keys (a separated stem)",
  harmonic: "the whole song's sustained, pitched sound: chords, notes, voice (HPSS of the mix)",
  percussive: "the whole song's short, hit sounds: drum hits, plucks, consonants (HPSS of the mix)",
  main: "everything except vocals (the instrumental): the other stems summed",
  main_harmonic: "the harmonic (pitched) part of main's stems, summed; with main_percussive it adds up to main",
  main_percussive: "the percussive (hit) part of main's stems, summed; with main_harmonic it adds up to main",
};
// Tracks made from the stems or the mix, as opposed to the stems themselves: they don't go in
// the mixer (they would play the same sound twice).
const DERIVED_TRACKS = new Set(["harmonic", "percussive", "main", "main_harmonic", "main_percussive"]);
const ENCODINGS = {
  wav_pcm16: "AUDIO_ENCODING_WAV_PCM16",
  wav_pcm24: "AUDIO_ENCODING_WAV_PCM24",
  wav_float32: "AUDIO_ENCODING_WAV_FLOAT32",
  flac_pcm16: "AUDIO_ENCODING_FLAC_PCM16",
  flac_pcm24: "AUDIO_ENCODING_FLAC_PCM24",
  mp3: "AUDIO_ENCODING_MP3",
};
const MP3 = "AUDIO_ENCODING_MP3";
// gRPC code numbers, as they appear in google.rpc.Status bodies.
const GRPC = { CANCELLED: 1, INVALID_ARGUMENT: 3, NOT_FOUND: 5, PERMISSION_DENIED: 7, RESOURCE_EXHAUSTED: 8,
  FAILED_PRECONDITION: 9, UNIMPLEMENTED: 12, UNAVAILABLE: 14, UNAUTHENTICATED: 16 };

const $ = (id) => document.getElementById(id);
const el = (tag, props = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
};
// replaceChildren() would print null as "null": skip empty children.
const setChildren = (node, ...children) => node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));

// A lost progress stream is reopened after 0.2 s, doubling to 2 s, for up to 60 s without
// one successful reconnect (the gateway itself reopens the stream to the orchestrators).
const RETRY_FIRST_MS = 200;
const RETRY_MAX_MS = 2000;
const RETRY_GIVE_UP_MS = 60000;

const state = {
  config: {},
  models: [],
  defaultModel: "",
  xhr: null, // the upload in flight
  jobId: "", // the job shown in the job panel
  job: null,
  source: null, // its EventSource
  retryTimer: 0,
  retryDelay: RETRY_FIRST_MS,
  lostSince: 0, // when the watch was lost (0: it is not); retries stop RETRY_GIVE_UP_MS after
  tracksSignature: "",
  historyToken: "",
  mixer: null, // the open job's Mixer (stems)
  loading: null, // AbortController of its track downloads
  peaks: new Map(), // track name -> peaks, redrawn when the canvases change size
  jobNotice: "", // the job a notice ("Cancelling…") is about: cleared when that job ends
  frame: 0, // the mixer's pending animation frame
};

// ---------------------------------------------------------------- formatting

function fmtBytes(n) {
  n = Number(n) || 0;
  if (n < 1024) return `${n} B`;
  const units = ["KB", "MB", "GB", "TB"];
  let i = -1;
  do {
    n /= 1024;
    i += 1;
  } while (n >= 1024 && i < units.length - 1);
  return `${n >= 100 || Number.isInteger(n) ? Math.round(n) : n.toFixed(1)} ${units[i]}`;
}

function fmtDuration(seconds) {
  let s = Math.max(0, Number(seconds) || 0);
  if (s < 10) return `${s.toFixed(1)} s`;
  s = Math.round(s);
  if (s < 60) return `${s} s`;
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  return h ? `${h} h ${m} min` : `${m}:${String(sec).padStart(2, "0")}`;
}

function fmtEta(seconds) {
  const s = Math.max(0, Math.round(Number(seconds) || 0));
  if (s < 5) return "Almost done";
  if (s < 60) return `About ${s} s left`;
  if (s < 3600) {
    const m = Math.floor(s / 60);
    const rest = s % 60;
    return `About ${m} min${rest && m < 10 ? ` ${rest} s` : ""} left`;
  }
  return `About ${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min left`;
}

function parseTime(text) {
  if (!text) return null;
  // RFC 3339 with up to nanoseconds: keep milliseconds, which Date parses everywhere.
  const d = new Date(String(text).replace(/(\.\d{3})\d+/, "$1"));
  return Number.isNaN(d.getTime()) ? null : d;
}

function fmtWhen(date) {
  if (!date) return "";
  const now = new Date();
  const time = date.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
  if (date.toDateString() === now.toDateString()) return `Today, ${time}`;
  const opts = { month: "short", day: "numeric" };
  if (date.getFullYear() !== now.getFullYear()) opts.year = "numeric";
  return `${date.toLocaleDateString(undefined, opts)}, ${time}`;
}

function fmtLufs(value) {
  if (value === undefined || value === null) return "";
  const v = Number(value);
  if (!Number.isFinite(v) || v <= -150) return "silent";
  return `${v.toFixed(1).replace("-", "−")} LUFS`;
}

const pct = (fraction) => `${Math.floor(Math.min(1, Math.max(0, Number(fraction) || 0)) * 100)} %`;

function stageLabel(name) {
  if (!name) return "";
  // "hpss:drums:part1of2" -> "Splitting harmonic and percussive parts (drums, part 1 of 2)"
  const [stage, ...details] = String(name).split(":");
  const base = STAGE_LABELS[stage] || stage.replace(/_/g, " ");
  const detail = details
    .map((d) => d.replace(/^part(\d+)of(\d+)$/, "part $1 of $2").replace(/_/g, " "))
    .join(", ");
  return detail ? `${base} (${detail})` : base;
}

const trackLabel = (name) => TRACK_LABELS[name] || name.replace(/_/g, " ");

// ---------------------------------------------------------------- messages

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

class NetworkError extends Error {}

function statusMessage(body, fallback) {
  if (body && typeof body === "object") {
    const err = body.error && typeof body.error === "object" ? body.error : body;
    if (typeof err.message === "string" && err.message) return { code: err.code, message: err.message };
  }
  return { code: undefined, message: fallback };
}

function parseJson(text) {
  try {
    return text ? JSON.parse(text) : {};
  } catch {
    return null;
  }
}

function errorFromResponse(status, statusText, text) {
  const body = parseJson(text);
  const fallback = (body === null && text ? text.slice(0, 200) : "") || statusText || `HTTP ${status}`;
  const { code, message } = statusMessage(body, fallback);
  return new ApiError(status, code, message);
}

const sentence = (text) => {
  const t = String(text || "").trim();
  return t && !/[.!?…]$/.test(t) ? `${t}.` : t;
};

// A sentence a person can act on; `context` is "upload", "job" or "" (anything else).
function describe(err, context = "") {
  if (err instanceof NetworkError) {
    return "Can't reach the audiomesh server. Check your connection (and that the service is running), then try again.";
  }
  if (!(err instanceof ApiError)) return sentence(`Something went wrong in this page: ${err && err.message}`);
  const msg = sentence(err.message);
  const { status, code } = err;
  const limit = state.config.max_upload_bytes ? ` (limit ${fmtBytes(state.config.max_upload_bytes)})` : "";
  const tooLarge = status === 413 || (code === GRPC.RESOURCE_EXHAUSTED && /too large|too big|exceed|limit|bytes/i.test(err.message));
  if (tooLarge) return `The file is too large${limit}: ${msg}`;
  if (status === 401 || status === 403 || code === GRPC.UNAUTHENTICATED || code === GRPC.PERMISSION_DENIED) {
    return `This server needs an API key: enter yours under "API key" at the top of the page. (${msg})`;
  }
  if (status === 404 || code === GRPC.NOT_FOUND) {
    if (context === "job") return `That job doesn't exist any more (it may have been deleted): ${msg}`;
    return `Not found: ${msg}`;
  }
  if (code === GRPC.FAILED_PRECONDITION) return `This can't be done here: ${msg}`;
  if (context === "upload" && (status === 415 || status === 400 || code === GRPC.INVALID_ARGUMENT)) {
    if (/option|model|stem|encoding/i.test(err.message) && !/audio|decode|format|empty|truncat/i.test(err.message)) {
      return `Those options were refused: ${msg}`;
    }
    return `That file isn't audio we can read: ${msg}`;
  }
  if (status === 400 || code === GRPC.INVALID_ARGUMENT) return `The server refused the request: ${msg}`;
  if (status === 429 || code === GRPC.RESOURCE_EXHAUSTED) return `The server is busy right now — please try again in a minute. (${err.message})`;
  if (status === 503 || code === GRPC.UNAVAILABLE) return `The separation service isn't available at the moment — please try again shortly. (${err.message})`;
  if (status === 504) return `The server took too long to answer — please try again. (${err.message})`;
  if (status === 499 || code === GRPC.CANCELLED) return `The request was cancelled: ${msg}`;
  return `Something went wrong on the server (HTTP ${status}): ${msg}`;
}

function showMessage(region, text) {
  region.replaceChildren(
    el("p", { class: "message-text", text }),
    el("button", { type: "button", class: "dismiss", "aria-label": "Dismiss message", text: "×", onclick: () => clearMessage(region) }),
  );
  region.classList.add("is-visible");
}

function clearMessage(region) {
  if (region.id === "notice") state.jobNotice = "";
  region.replaceChildren();
  region.classList.remove("is-visible");
}

const showError = (text) => {
  clearMessage($("notice"));
  showMessage($("alert"), text);
};
let noticeTimer = 0;
const showNotice = (text, { sticky = false } = {}) => {
  showMessage($("notice"), text);
  state.jobNotice = "";
  clearTimeout(noticeTimer);
  if (!sticky) noticeTimer = setTimeout(() => clearMessage($("notice")), 8000);
};
const clearAlert = () => clearMessage($("alert"));

// ---------------------------------------------------------------- API

async function api(method, path, body) {
  const init = { method, headers: { Accept: "application/json", ...authHeaders() } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(url(path), init);
  } catch (e) {
    throw new NetworkError(String(e));
  }
  const text = await resp.text();
  if (!resp.ok) throw errorFromResponse(resp.status, resp.statusText, text);
  return parseJson(text) || {};
}

const jobPath = (id) => `v1/jobs/${encodeURIComponent(id)}`;
const downloadUrl = (id, what) => withKey(url(`download/${encodeURIComponent(id)}/${encodeURIComponent(what)}`));

// ---------------------------------------------------------------- options

function fillModels() {
  const select = $("model-select");
  const models = state.models;
  if (!models.length) {
    select.replaceChildren(el("option", { value: "", text: "Server default" }));
    updateModelHelp();
    return;
  }
  const byName = new Map(models.map((m) => [m.name, m]));
  let chosen = byName.get(state.defaultModel);
  // The default without weights here would only fail: start on a model that can run.
  if (!chosen || chosen.available === false) chosen = models.find((m) => m.available) || chosen || models[0];
  select.replaceChildren(
    ...models.map((m) => {
      let text = m.name;
      if (m.kind) text += ` · ${MODEL_FAMILIES[m.kind] || m.kind}`;
      if (m.name === state.defaultModel) text += " (default)";
      if (!m.available) text += " (no weights here)";
      return el("option", { value: m.name, disabled: !m.available, selected: m === chosen, text });
    }),
  );
  select.value = chosen.name;
  updateModelHelp();
}

function updateModelHelp() {
  const model = state.models.find((m) => m.name === $("model-select").value);
  const help = $("model-help");
  const twoStems = $("two-stems-select");
  const previous = twoStems.value;
  const sources = (model && model.sources) || ["vocals", "drums", "bass", "other"];
  twoStems.replaceChildren(
    el("option", { value: "", text: "No — every stem" }),
    ...sources.map((s) => el("option", { value: s, text: `${trackLabel(s)} + everything else` })),
  );
  twoStems.value = sources.includes(previous) ? previous : "";
  if (!model) {
    help.textContent = "";
    return;
  }
  // The server's description says what the model is and what it is good for, stems included
  // (separation registry: describe_model); the stems are listed here only when it doesn't name them.
  const parts = [];
  const description = model.description || "";
  if (description) parts.push(sentence(description.charAt(0).toUpperCase() + description.slice(1)));
  const stems = model.sources || [];
  const named = (s) => new RegExp(`\\b${s.replace(/\W/g, "\\$&")}\\b`).test(description);
  if (stems.length && !stems.every(named)) parts.push(`Stems: ${stems.join(", ")}.`);
  if (!model.available) parts.push("Its weights aren't on this server, so jobs with it will fail.");
  help.textContent = parts.join(" ");
}

function jobOptions() {
  const options = {};
  const model = $("model-select").value;
  if (model) options.model = model;
  const twoStems = $("two-stems-select").value;
  if (twoStems) options.separation = { twoStems };
  const encoding = $("encoding-select").value;
  if (encoding) options.encoding = encoding;
  if (encoding === MP3 && $("mp3-bitrate-select").value) options.mp3BitrateKbps = Number($("mp3-bitrate-select").value);
  return options;
}

// ---------------------------------------------------------------- upload

function startUpload(file) {
  if (state.xhr) {
    showError("One upload at a time, please — wait for this one to finish or stop it first.");
    return;
  }
  clearAlert();
  clearMessage($("notice"));
  // The last upload's line ("Upload failed.") goes: a refusal below is about this file.
  $("upload-status").hidden = true;
  const limit = Number(state.config.max_upload_bytes) || 0;
  if (limit && file.size > limit) {
    showError(`The file is too large (limit ${fmtBytes(limit)}): “${file.name}” is ${fmtBytes(file.size)}.`);
    return;
  }
  if (file.size === 0) {
    showError(`“${file.name}” is empty — choose a file that contains audio.`);
    return;
  }

  const form = new FormData();
  form.append("options", JSON.stringify(jobOptions())); // before the file: read first by the server
  form.append("file", file, file.name);

  const xhr = new XMLHttpRequest();
  state.xhr = xhr;
  const bar = $("upload-progress");
  const label = $("upload-label");
  $("upload-status").hidden = false;
  $("upload-name").textContent = file.name;
  $("upload-abort").hidden = false;
  $("drop-zone").classList.add("is-busy");
  bar.value = 0;
  bar.removeAttribute("data-done");
  label.textContent = `Uploading… 0 % of ${fmtBytes(file.size)}`;

  const finish = () => {
    state.xhr = null;
    $("upload-abort").hidden = true;
    $("drop-zone").classList.remove("is-busy");
  };

  let step = -1;
  xhr.upload.onprogress = (ev) => {
    const total = ev.lengthComputable ? ev.total : file.size;
    const f = total ? ev.loaded / total : 0;
    bar.value = Math.round(f * 100);
    // The label is a live region: new words every 10 %, not on every event.
    if (Math.floor(f * 10) === step) return;
    step = Math.floor(f * 10);
    label.textContent =
      f >= 1 ? "Uploaded — checking the file…" : `Uploading… ${pct(f)} (${fmtBytes(ev.loaded)} of ${fmtBytes(total)})`;
  };
  xhr.onload = () => {
    finish();
    if (xhr.status >= 200 && xhr.status < 300) {
      bar.value = 100;
      bar.dataset.done = "true";
      const data = parseJson(xhr.responseText) || {};
      label.textContent = `Uploaded ${fmtBytes(data.sizeBytes || file.size)}.`;
      if (data.job && data.job.jobId) {
        label.textContent += " Separation started.";
        openJob(data.job);
        // On a small screen the job panel starts below the fold: bring it into view.
        const panel = $("job");
        if (panel.getBoundingClientRect().top > window.innerHeight * 0.6) panel.scrollIntoView({ behavior: "smooth", block: "start" });
        upsertHistory(data.job, { prepend: true });
      }
    } else {
      // The alert says what went wrong; a second "Upload failed." line would outlive it.
      $("upload-status").hidden = true;
      showError(describe(errorFromResponse(xhr.status, xhr.statusText, xhr.responseText), "upload"));
    }
  };
  xhr.onerror = () => {
    finish();
    $("upload-status").hidden = true;
    showError(describe(new NetworkError("upload failed"), "upload"));
  };
  xhr.onabort = () => {
    finish();
    bar.value = 0;
    label.textContent = "Upload stopped.";
  };
  xhr.open("POST", url("v1/jobs:upload"));
  for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
  xhr.setRequestHeader("Accept", "application/json");
  xhr.send(form);
}

function setupUpload() {
  const input = $("file-input");
  const zone = $("drop-zone");
  input.addEventListener("change", () => {
    const file = input.files && input.files[0];
    if (file) startUpload(file);
    input.value = ""; // choosing the same file again starts another job
  });
  $("upload-abort").addEventListener("click", () => state.xhr && state.xhr.abort());

  // Clicks anywhere in the zone open the picker (the label button does so on its own).
  zone.addEventListener("click", (ev) => {
    if (ev.target.closest("label, input, button, a")) return;
    input.click();
  });

  let depth = 0;
  const hasFiles = (ev) => ev.dataTransfer && Array.from(ev.dataTransfer.types || []).includes("Files");
  zone.addEventListener("dragenter", (ev) => {
    if (!hasFiles(ev)) return;
    ev.preventDefault();
    depth += 1;
    zone.classList.add("is-dragover");
  });
  zone.addEventListener("dragover", (ev) => {
    if (!hasFiles(ev)) return;
    ev.preventDefault();
    ev.dataTransfer.dropEffect = "copy";
  });
  zone.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) zone.classList.remove("is-dragover");
  });
  zone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    depth = 0;
    zone.classList.remove("is-dragover");
    const files = Array.from((ev.dataTransfer && ev.dataTransfer.files) || []);
    if (!files.length) return;
    if (files.length > 1) showNotice(`One file at a time: uploading “${files[0].name}”.`);
    startUpload(files[0]);
  });
  // A file dropped next to the zone must not navigate away from the page.
  for (const type of ["dragover", "drop"]) {
    window.addEventListener(type, (ev) => {
      if (!zone.contains(ev.target) && hasFiles(ev)) {
        ev.preventDefault();
        if (ev.dataTransfer) ev.dataTransfer.dropEffect = "none";
      }
    });
  }
}

// ---------------------------------------------------------------- the job panel

// ---------------------------------------------------------------- per-job URLs

// The open job is in the address (#/jobs/<id>): a reload reopens it, back and forward move
// between the jobs opened. A fragment, so it works behind any path prefix.
// Job ids are UUIDs: only hex digits and dashes are taken from the address, so a link can't
// make the page ask for another path ("#/jobs/.." would resolve v1/jobs/.. to v1/).
const ROUTE = /^#\/jobs\/([0-9A-Fa-f][0-9A-Fa-f-]{0,63})$/;
const ROUTE_PREFIX = "#/jobs/";

function routeJobId() {
  const match = location.hash.match(ROUTE);
  return match ? match[1].toLowerCase() : "";
}

// "#/jobs/<something that is no job id>": said in words (as text), not asked for.
function badRoute() {
  if (!location.hash.startsWith(ROUTE_PREFIX) || routeJobId()) return false;
  let given = location.hash.slice(ROUTE_PREFIX.length);
  try {
    given = decodeURIComponent(given);
  } catch {
    /* shown as it is */
  }
  showError(`The address names no job: “${given.slice(0, 80)}” isn't a job id. Open a job from History instead.`);
  return true;
}

function setRoute(id, { replace = false } = {}) {
  if (routeJobId() === id && (id || !location.hash)) return;
  const target = id ? `#/jobs/${encodeURIComponent(id)}` : location.pathname + location.search;
  history[replace ? "replaceState" : "pushState"](null, "", target);
}

function followRoute() {
  if (badRoute()) return;
  const id = routeJobId();
  if (id && id !== state.jobId) openJobById(id, { fromRoute: true });
  else if (!id && state.jobId) closeJob();
}

function closeJob() {
  stopWatching();
  closeMixer();
  state.jobId = "";
  state.job = null;
  state.tracksSignature = "";
  $("job").hidden = true;
  document.title = BASE_TITLE;
  markCurrentInHistory();
}

const BASE_TITLE = document.title;

// ---------------------------------------------------------------- the job panel

function openJob(job, { fromRoute = false } = {}) {
  const id = job.jobId;
  if (!fromRoute) setRoute(id);
  if (id !== state.jobId) {
    stopWatching();
    state.jobId = id;
    state.tracksSignature = "";
    state.retryDelay = RETRY_FIRST_MS;
    state.lostSince = 0;
    $("job-connection").textContent = "";
  }
  renderJob(job);
  markCurrentInHistory();
  if (!TERMINAL.has(job.state)) watch(id);
}

async function openJobById(id, { fromRoute = false } = {}) {
  clearAlert();
  try {
    const data = await api("GET", jobPath(id));
    // Another job may have been opened while this one was asked for.
    if (fromRoute && routeJobId() !== id) return;
    if (data.job) {
      openJob(data.job, { fromRoute });
      $("job").scrollIntoView({ behavior: "smooth", block: "start" });
      $("job-heading").focus({ preventScroll: true });
    }
  } catch (err) {
    showError(describe(err, "job"));
    if (err instanceof ApiError && err.status === 404) {
      removeFromHistory(id);
      if (fromRoute && routeJobId() === id) setRoute("", { replace: true });
    }
  }
}

function stopWatching() {
  if (state.source) state.source.close();
  state.source = null;
  clearTimeout(state.retryTimer);
  state.retryTimer = 0;
}

function watch(id) {
  stopWatching();
  const source = new EventSource(withKey(url(`${jobPath(id)}:watch`)));
  state.source = source;
  source.onopen = () => {
    $("job-connection").textContent = "";
  };
  // The gateway says so while it reopens the stream upstream (an orchestrator went away).
  source.addEventListener("reconnecting", () => {
    if (state.source === source) $("job-connection").textContent = "Reconnecting…";
  });
  source.onmessage = (ev) => {
    if (state.source !== source) return;
    const payload = parseJson(ev.data);
    if (!payload) return;
    if (payload.error) {
      stopWatching();
      const { code, message } = statusMessage(payload, "the progress stream failed");
      showError(describe(new ApiError(0, code, message), "job"));
      refreshJob(id);
      return;
    }
    const job = payload.result && payload.result.job;
    if (!job || job.jobId && job.jobId !== id) return;
    state.retryDelay = RETRY_FIRST_MS;
    state.lostSince = 0;
    $("job-connection").textContent = "";
    renderJob(job);
    upsertHistory(job);
    if (TERMINAL.has(job.state)) stopWatching();
  };
  source.onerror = () => {
    // EventSource would reconnect by itself; we ask for the job first so a deleted job or a
    // server error turns into words instead of an endless retry.
    if (state.source !== source) return;
    stopWatching();
    $("job-connection").textContent = "Connection lost — reconnecting…";
    retryLater(id);
  };
}

// Schedules the next attempt to reopen the watch, or gives up (with a note) once the watch
// has been lost for RETRY_GIVE_UP_MS.
function retryLater(id) {
  const now = Date.now();
  if (!state.lostSince) state.lostSince = now;
  if (now - state.lostSince >= RETRY_GIVE_UP_MS) {
    $("job-connection").textContent = "Lost the connection to the server — reload the page to try again.";
    state.lostSince = 0;
    return;
  }
  const delay = state.retryDelay;
  state.retryDelay = Math.min(RETRY_MAX_MS, delay * 2);
  state.retryTimer = setTimeout(() => refreshJob(id, { rewatch: true }), delay);
}

async function refreshJob(id, { rewatch = false } = {}) {
  if (state.jobId !== id) return;
  try {
    const data = await api("GET", jobPath(id));
    if (state.jobId !== id || !data.job) return;
    $("job-connection").textContent = "";
    state.lostSince = 0;
    renderJob(data.job);
    upsertHistory(data.job);
    if (rewatch && !TERMINAL.has(data.job.state)) watch(id);
  } catch (err) {
    if (state.jobId !== id) return;
    if (err instanceof NetworkError || (err instanceof ApiError && err.status >= 500)) {
      $("job-connection").textContent = "Can't reach the server — still trying…";
      if (rewatch) retryLater(id);
    } else {
      $("job-connection").textContent = "";
      showError(describe(err, "job"));
    }
  }
}

function renderJob(job) {
  const id = job.jobId;
  const jobState = job.state || "JOB_STATE_UNSPECIFIED";
  const previous = state.job && state.job.jobId === id ? state.job.state : null;
  state.job = job;
  // Steps are open while the job runs or when it failed; folded away once it succeeded
  // (only when the state changes, so a person's own toggling is kept).
  if (previous !== jobState) $("nodes-details").open = jobState !== "JOB_STATE_SUCCEEDED";
  const terminal = TERMINAL.has(jobState);
  const succeeded = jobState === "JOB_STATE_SUCCEEDED";
  $("job").hidden = false;
  $("job-name").textContent = (job.input && job.input.name) || "Untitled";
  document.title = `${(job.input && job.input.name) || "Job"} — audiomesh`;
  $("job-id").textContent = `Job ${id}`;

  const badge = $("job-state");
  badge.textContent = JOB_STATE_LABELS[jobState] || jobState;
  badge.dataset.state = jobState;
  badge.className = `badge ${stateClass(jobState)}`;

  const fraction = succeeded ? 1 : Math.min(1, Math.max(0, Number(job.fraction) || 0));
  const bar = $("job-progress");
  bar.value = fraction;
  bar.dataset.state = jobState;
  bar.setAttribute("aria-valuetext", `${pct(fraction)}, ${JOB_STATE_LABELS[jobState] || ""}`);
  $("job-percent").textContent = pct(fraction);

  const stage = $("job-stage");
  const eta = $("job-eta");
  if (jobState === "JOB_STATE_QUEUED") {
    stage.textContent = "Waiting for a free slot…";
    eta.textContent = "";
  } else if (jobState === "JOB_STATE_RUNNING") {
    stage.textContent = runningText(job);
    eta.textContent = job.etaSeconds === undefined || job.etaSeconds === null ? "Estimating time left…" : fmtEta(job.etaSeconds);
  } else {
    stage.textContent = { JOB_STATE_SUCCEEDED: "Done", JOB_STATE_FAILED: "Failed", JOB_STATE_CANCELLED: "Cancelled" }[jobState] || "";
    const start = parseTime(job.retryTime || job.createTime); // a retried job: its latest run
    const end = parseTime(job.updateTime);
    eta.textContent = succeeded && start && end ? `Took ${fmtDuration((end - start) / 1000)}` : "";
  }
  stage.dataset.stage = job.currentStage || "";

  renderJobError(job);
  jobUpdated(job);
  $("job-cancel").hidden = terminal;
  $("job-retry").hidden = !(jobState === "JOB_STATE_FAILED" || jobState === "JOB_STATE_CANCELLED");
  const del = $("job-delete");
  del.hidden = !terminal;
  if (del.hidden) resetConfirm(del);
  renderNodes(job.nodes || [], job.error || {});
  renderTracks(job);
}

// What runs now. currentStage names the node started last, which may already be done while
// an earlier one still runs: prefer the nodes that are running.
function runningText(job) {
  const running = (job.nodes || []).filter((n) => n.state === "NODE_STATE_RUNNING").map((n) => n.name);
  if (running.includes(job.currentStage)) running.unshift(...running.splice(running.indexOf(job.currentStage), 1));
  const first = running[0] || job.currentStage;
  if (!first) return "Starting…";
  const more = running.length - 1;
  return `${stageLabel(first)}${more > 0 ? ` + ${more} more step${more > 1 ? "s" : ""}` : ""}…`;
}

function renderJobError(job) {
  const box = $("job-error");
  const err = job.error || {};
  if (job.state === "JOB_STATE_FAILED") {
    const where = err.node ? ` in the step “${stageLabel(err.node)}” (${err.node})` : "";
    setChildren(
      box,
      el("strong", { text: `The separation failed${where}.` }),
      el("p", { class: "error-message", text: sentence(err.message || "No reason was given.") }),
      err.code ? el("p", { class: "help mono", text: err.code }) : null,
    );
    box.hidden = false;
  } else if (job.state === "JOB_STATE_CANCELLED") {
    setChildren(box, el("strong", { text: "This job was cancelled." }), err.message ? el("p", { text: sentence(err.message) }) : null);
    box.hidden = false;
  } else {
    box.hidden = true;
    box.replaceChildren();
  }
  box.className = `job-error ${job.state === "JOB_STATE_CANCELLED" ? "is-cancelled" : ""}`;
}

function stateClass(jobState) {
  return `state-${String(jobState).replace(/^(JOB|NODE)_STATE_/, "").toLowerCase()}`;
}

// Through the CSSOM: the page's Content-Security-Policy refuses style="" attributes.
function barFill(fraction) {
  const fill = el("span");
  fill.style.width = `${Math.round(Math.min(1, Math.max(0, fraction)) * 100)}%`;
  return fill;
}

function renderNodes(nodes, jobError = {}) {
  const list = $("job-nodes");
  const existing = new Map(Array.from(list.children).map((li) => [li.dataset.node, li]));
  const wanted = [];
  let done = 0;
  for (const node of nodes) {
    const nodeState = node.state || "NODE_STATE_PENDING";
    if (nodeState === "NODE_STATE_SUCCEEDED" || nodeState === "NODE_STATE_SKIPPED") done += 1;
    const li = existing.get(node.name) || el("li", { class: "node", dataset: { node: node.name } });
    const fraction = nodeState === "NODE_STATE_SUCCEEDED" ? 1 : Number(node.fraction) || 0;
    const details = [];
    if (nodeState === "NODE_STATE_RUNNING") details.push(pct(fraction));
    if (nodeState === "NODE_STATE_SUCCEEDED" && node.durationSeconds) details.push(fmtDuration(node.durationSeconds));
    if ((node.attempts || 0) > 1) details.push(`try ${node.attempts}`);
    li.dataset.state = nodeState;
    li.className = `node ${stateClass(nodeState)}`;
    setChildren(
      li,
      el("span", { class: "node-dot", "aria-hidden": "true" }),
      el(
        "span",
        { class: "node-text" },
        el("span", { class: "node-name", text: stageLabel(node.name) }),
        el("span", { class: "node-id mono", text: node.name }),
      ),
      el("span", { class: "node-state", text: [NODE_STATE_LABELS[nodeState] || nodeState, ...details].join(" · ") }),
      el("span", { class: "node-bar", "aria-hidden": "true" }, barFill(fraction)),
      // The failed node's message is already in the job's error box above.
      node.error && node.error.message && node.error.message !== jobError.message
        ? el("span", { class: "node-error", text: node.error.message })
        : null,
    );
    wanted.push(li);
  }
  list.replaceChildren(...wanted);
  $("nodes-summary").textContent = nodes.length ? `— ${done} of ${nodes.length} done` : "";
  $("nodes-details").hidden = nodes.length === 0;
}

function renderTracks(job) {
  const results = $("results");
  const tracks = job.state === "JOB_STATE_SUCCEEDED" ? job.tracks || [] : [];
  const signature = `${job.jobId}|${tracks.map((t) => `${t.name}:${t.sha256 || ""}`).join(",")}`;
  if (signature === state.tracksSignature) return; // keep players as they are (a song may be playing)
  state.tracksSignature = signature;
  closeMixer();
  const list = $("tracks");
  if (!tracks.length) {
    results.hidden = true;
    list.replaceChildren();
    $("loudness-note").textContent = "";
    return;
  }
  const base = ((job.input && job.input.name) || "song").replace(/\.[^.]+$/, "");
  const stems = tracks.filter((t) => !DERIVED_TRACKS.has(t.name));
  const derived = tracks.filter((t) => DERIVED_TRACKS.has(t.name));
  const sampleRate = Number((tracks[0].audio || {}).sampleRate) || 44100;
  const mixer = stems.length ? new Mixer({ sampleRate, onChange: () => renderMixer() }) : null;
  for (const track of stems) mixer.addChannel(track.name);
  state.mixer = mixer;

  const row = (track) => trackRow(job, track, base, mixer);
  setChildren(
    list,
    stems.length
      ? el(
          "section",
          { class: "mixer", id: "mixer", dataset: { testid: "mixer" }, "aria-labelledby": "mixer-heading" },
          el("h4", { id: "mixer-heading", text: "Stems — played together" }),
          transport(mixer),
          el("ul", { class: "track-list" }, stems.map(row)),
        )
      : null,
    derived.length
      ? el(
          "section",
          { class: "derived", "aria-labelledby": "derived-heading" },
          el("h4", { id: "derived-heading", text: "Made from the stems and the mix" }),
          el("ul", { class: "track-list" }, derived.map(row)),
        )
      : null,
  );
  $("loudness-note").textContent = loudnessNote(job);
  const all = $("download-all");
  all.href = downloadUrl(job.jobId, "all");
  all.setAttribute("download", `${base}_${job.jobId.slice(0, 8)}.zip`);
  $("manifest-link").href = downloadUrl(job.jobId, "manifest");
  results.hidden = false;
  renderMixer();
  loadTracks(job, [...stems, ...derived]);
}

function trackRow(job, track, base, mixer) {
  const href = downloadUrl(job.jobId, track.name);
  const ext = ((track.key || "").match(/\.([a-z0-9]+)$/i) || [null, "wav"])[1];
  const audio = track.audio || {};
  const label = trackLabel(track.name);
  const meta = [
    audio.durationSeconds ? fmtDuration(audio.durationSeconds) : "",
    track.loudness ? fmtLufs(track.loudness.integratedLufs ?? -200) : "",
    track.sizeBytes ? fmtBytes(track.sizeBytes) : "",
  ].filter(Boolean);
  const inMixer = mixer && mixer.channels.has(track.name);
  const player = inMixer ? null : el("audio", { controls: true, preload: "none", src: href, "aria-label": `Play ${label}` });
  const wave = el(
    "div",
    { class: "wave", dataset: { wave: track.name }, title: "Click to play from here" },
    el("canvas", { class: "waveform", "aria-hidden": "true" }),
    el("div", { class: "wave-progress", "aria-hidden": "true" }),
    el("span", { class: "wave-note help", text: "Loading the waveform…" }),
  );
  wave.addEventListener("click", (ev) => {
    const rect = wave.getBoundingClientRect();
    const fraction = Math.min(1, Math.max(0, (ev.clientX - rect.left) / rect.width));
    if (inMixer) {
      mixer.seek(fraction * mixer.duration);
      return;
    }
    const seek = () => {
      player.currentTime = fraction * player.duration;
    };
    if (Number.isFinite(player.duration)) seek();
    else {
      player.addEventListener("loadedmetadata", seek, { once: true });
      player.preload = "metadata";
      player.load();
    }
  });
  if (player) {
    const progress = () => {
      const d = player.duration;
      setProgress(wave, Number.isFinite(d) && d > 0 ? player.currentTime / d : 0);
    };
    for (const type of ["timeupdate", "seeked", "emptied"]) player.addEventListener(type, progress);
    // One thing plays at a time: a single track stops the stems and the other tracks.
    player.addEventListener("play", () => {
      if (state.mixer) state.mixer.pause();
      for (const other of $("tracks").querySelectorAll("audio")) if (other !== player) other.pause();
    });
  }
  return el(
    "li",
    { class: `track ${inMixer ? "is-stem" : "is-derived"}`, dataset: { track: track.name } },
    el(
      "div",
      { class: "track-info" },
      el("span", { class: "track-name", text: label }),
      el("span", { class: "track-about", text: `${track.name}: ${trackMeaning(job, track.name)}` }),
      el("span", { class: "track-meta" }, [`${track.name}.${ext}`, ...meta].map((text, i) => el("span", { class: i ? "" : "mono", text }))),
    ),
    wave,
    inMixer ? channelControls(mixer, track.name, label) : player,
    el("a", {
      class: "download button small",
      href,
      download: `${base}_${track.name}.${ext}`, // as the server names it
      "aria-label": `Download ${label}`,
      text: "Download",
    }),
  );
}

function trackMeaning(job, name) {
  const mainStems = (job.options && job.options.mainStems) || [];
  if (name === "main" && mainStems.length) return `${mainStems.join(" + ")} summed (this job's recipe)`;
  if (TRACK_MEANINGS[name]) return TRACK_MEANINGS[name];
  const without = name.match(/^no_(.+)$/);
  if (without) return `everything except ${without[1].replace(/_/g, " ")} (two-stem mode)`;
  return "a stem of the model";
}

function channelControls(mixer, name, label) {
  const toggle = (kind, text, title) =>
    el("button", {
      type: "button",
      class: `button small channel-${kind}`,
      "aria-pressed": "false",
      "aria-label": `${title} ${label}`,
      title: `${title} ${label}`,
      text,
      onclick: (ev) => {
        const on = ev.currentTarget.getAttribute("aria-pressed") !== "true";
        if (kind === "mute") mixer.setMuted(name, on);
        else mixer.setSolo(name, on);
      },
    });
  return el(
    "div",
    { class: "channel", dataset: { channel: name } },
    toggle("mute", "M", "Mute"),
    toggle("solo", "S", "Solo"),
    el("input", {
      type: "range",
      class: "channel-volume",
      min: "0",
      max: "100",
      value: "100",
      "aria-label": `Volume of ${label}`,
      oninput: (ev) => mixer.setVolume(name, Number(ev.currentTarget.value) / 100),
    }),
  );
}

function transport(mixer) {
  const play = el("button", {
    type: "button",
    id: "mixer-play",
    class: "button primary mixer-play",
    disabled: true,
    "aria-label": "Play the stems",
    text: "Play",
    onclick: () => {
      if (mixer.playing) mixer.pause();
      else {
        for (const audio of $("tracks").querySelectorAll("audio")) audio.pause();
        mixer.play().catch((err) => showError(`The stems can't be played in this browser: ${err.message}`));
      }
    },
  });
  const seek = el("input", {
    type: "range",
    id: "mixer-seek",
    class: "mixer-seek",
    min: "0",
    max: "1000",
    value: "0",
    disabled: true,
    "aria-label": "Position in the song",
    oninput: (ev) => mixer.seek((Number(ev.currentTarget.value) / 1000) * mixer.duration),
  });
  return el(
    "div",
    { class: "transport" },
    play,
    el("span", { id: "mixer-time", class: "mixer-time mono", text: "0:00 / 0:00" }),
    seek,
    el("p", { id: "mixer-status", class: "help mixer-status", "aria-live": "polite", text: "Loading the stems…" }),
  );
}

const fmtClock = (seconds) => {
  const s = Math.max(0, Math.floor(Number(seconds) || 0));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
};

function setProgress(wave, fraction) {
  wave.querySelector(".wave-progress").style.width = `${(Math.min(1, Math.max(0, fraction)) * 100).toFixed(2)}%`;
}

// The transport and the channel buttons from the mixer's state; runs every frame while playing.
function renderMixer() {
  const mixer = state.mixer;
  if (!mixer || !$("mixer-play")) return;
  const duration = mixer.duration;
  const position = mixer.position();
  const play = $("mixer-play");
  play.disabled = !mixer.ready;
  play.textContent = mixer.playing ? "Pause" : "Play";
  play.setAttribute("aria-label", mixer.playing ? "Pause the stems" : "Play the stems");
  play.dataset.playing = String(mixer.playing);
  $("mixer-time").textContent = `${fmtClock(position)} / ${fmtClock(duration)}`;
  const seek = $("mixer-seek");
  seek.disabled = !mixer.ready;
  if (document.activeElement !== seek) seek.value = String(duration ? Math.round((position / duration) * 1000) : 0);
  for (const [name, ch] of mixer.channels) {
    const row = $("tracks").querySelector(`.is-stem[data-track="${CSS.escape(name)}"]`);
    if (!row) continue;
    row.querySelector(".channel-mute").setAttribute("aria-pressed", String(ch.muted));
    row.querySelector(".channel-solo").setAttribute("aria-pressed", String(ch.solo));
    row.classList.toggle("is-silent", mixer.targetGain(ch) === 0);
    setProgress(row.querySelector(".wave"), duration ? position / duration : 0);
  }
  if (mixer.playing && !state.frame) {
    state.frame = requestAnimationFrame(() => {
      state.frame = 0;
      if (state.mixer !== mixer) return;
      mixer.tick();
      renderMixer();
    });
  }
}

function closeMixer() {
  if (state.loading) state.loading.abort();
  state.loading = null;
  if (state.mixer) state.mixer.close();
  state.mixer = null;
  state.peaks.clear();
  waveResize.disconnect(); // the rows go; the new ones are observed as they come
}

// Every track is downloaded once and decoded here: its peaks draw its waveform; a stem's
// decoded audio stays for the mixer, the others' is let go.
function loadTracks(job, tracks) {
  const controller = new AbortController();
  state.loading = controller;
  const mixer = state.mixer;
  const stemCount = mixer ? mixer.channels.size : 0;
  let stemsDone = 0;
  const status = (text) => {
    if ($("mixer-status")) $("mixer-status").textContent = text;
  };
  const failures = [];
  const waveOf = (name) => $("tracks").querySelector(`.wave[data-wave="${CSS.escape(name)}"]`);
  decodeAll(
    tracks.map((t) => ({ name: t.name, url: downloadUrl(job.jobId, t.name), sampleRate: Number((t.audio || {}).sampleRate) || 0 })),
    {
      sampleRate: mixer ? mixer.sampleRate : 44100,
      headers: authHeaders(),
      signal: controller.signal,
      onDecoded: (track, buffer) => {
        const peaks = computePeaks(buffer);
        state.peaks.set(track.name, peaks);
        const wave = waveOf(track.name);
        if (wave) {
          wave.querySelector(".wave-note").remove();
          drawWaveform(wave.querySelector("canvas"), peaks);
        }
        if (mixer && mixer.channels.has(track.name)) {
          mixer.setBuffer(track.name, buffer);
          stemsDone += 1;
          status(stemsDone < stemCount ? `Loading the stems (${stemsDone} of ${stemCount})…` : "");
        }
      },
      onFailed: (track, err) => {
        const wave = waveOf(track.name);
        if (wave) wave.querySelector(".wave-note").textContent = "No waveform: this browser couldn't read the file.";
        failures.push(track.name);
        if (mixer && mixer.channels.has(track.name)) {
          // The mixer plays the stems it has; the failed one is still downloadable.
          mixer.channels.delete(track.name);
          const row = $("tracks").querySelector(`.is-stem[data-track="${CSS.escape(track.name)}"] .channel`);
          if (row) row.replaceChildren(el("span", { class: "help", text: "Not in the mixer" }));
          status(`${failures.join(", ")} couldn't be decoded in this browser (${err.message}); download ${failures.length > 1 ? "them" : "it"} instead.`);
          renderMixer();
        }
      },
    },
  );
}

// Canvases follow their width (window resized, phone turned).
const waveResize = new ResizeObserver((entries) => {
  for (const entry of entries) {
    const wave = entry.target.closest(".wave");
    const peaks = wave && state.peaks.get(wave.dataset.wave);
    if (peaks) drawWaveform(entry.target, peaks);
  }
});
new MutationObserver(() => {
  for (const canvas of $("tracks").querySelectorAll("canvas")) waveResize.observe(canvas);
}).observe($("tracks"), { childList: true, subtree: true });

// The normalization outcome in words, from the job's summary, its options and the server's
// defaults (as `audiomesh show` words it).
function loudnessNote(job) {
  const options = (job.options && job.options.normalize) || {};
  const config = state.config;
  const mode =
    { NORMALIZE_MODE_LOUDNESS: "loudness", NORMALIZE_MODE_PEAK: "peak", NORMALIZE_MODE_OFF: "off" }[options.mode] ||
    config.normalize_mode ||
    "loudness";
  if (mode === "off") return "Loudness: measured only (normalization was off for this job).";
  const peak = mode === "peak";
  const unit = peak ? "dBFS" : "LUFS";
  const num = (v) => `${Number(v).toFixed(1).replace("-", "−")}`;
  const defaultTarget = config.target_db !== undefined && (config.normalize_mode || "loudness") === mode ? config.target_db : peak ? -1 : -14;
  const target = options.target ?? defaultTarget;
  const ceiling = options.truePeakCeilingDbtp ?? config.true_peak_ceiling_db ?? -1;
  const linking = { GAIN_LINKING_LINKED: "linked", GAIN_LINKING_PER_TRACK: "per_track" }[options.linking] || config.gain_linking || "linked";
  const summary = job.normalization || {};
  const reference = summary.reference || {};
  const gain = Number(summary.linkedGainDb) || 0;
  const measured = peak ? reference.samplePeakDbfs : reference.integratedLufs;
  const reached = measured === undefined ? null : Number(measured) + gain;
  const fmtTarget = `${num(target)} ${unit}`;
  if (summary.limitedByCeiling) {
    const at = reached === null ? "" : `: ${num(reached)} ${unit}`;
    return `Loudness limited by the ${num(ceiling)} dBTP ceiling${at} (target ${fmtTarget}) — louder would clip. One gain for every track, so the stems still add up to the song.`;
  }
  if (linking === "per_track") return `Loudness: each track on its own to ${fmtTarget}, peaks under ${num(ceiling)} dBTP.`;
  const onTarget = reached === null || Math.abs(reached - target) < 0.05;
  const at = onTarget ? `${fmtTarget}, the target` : `${num(reached)} ${unit} (target ${fmtTarget})`;
  return `Loudness: ${at}, one gain for every track (${gain >= 0 ? "+" : "−"}${Math.abs(gain).toFixed(1)} dB), so the stems still add up to the song.`;
}

// ---------------------------------------------------------------- cancel / delete

// A notice about a job that is still going ("Cancelling…") lasts until that job ends.
function showJobNotice(job, text) {
  if (TERMINAL.has(job.state)) return; // the job's own panel and badge already say it
  showNotice(text, { sticky: true });
  state.jobNotice = job.jobId;
}

function jobUpdated(job) {
  if (state.jobNotice && job.jobId === state.jobNotice && TERMINAL.has(job.state)) {
    state.jobNotice = "";
    clearMessage($("notice"));
  }
}

async function cancelJob(id, button) {
  button.disabled = true;
  try {
    const data = await api("POST", `${jobPath(id)}:cancel`, {});
    if (data.job) {
      showJobNotice(data.job, "Cancelling the job…");
      if (id === state.jobId) renderJob(data.job);
      upsertHistory(data.job);
    }
  } catch (err) {
    showError(describe(err, "job"));
  } finally {
    button.disabled = false;
  }
}

// FAILED or CANCELLED: the same job runs again; finished steps are reused.
async function retryJob(id, button) {
  button.disabled = true;
  clearAlert();
  try {
    const data = await api("POST", `${jobPath(id)}:retry`, {});
    if (data.job) {
      showJobNotice(data.job, "Running the job again — finished steps are reused.");
      if (id === state.jobId) openJob(data.job, { fromRoute: true });
      upsertHistory(data.job);
    }
  } catch (err) {
    showError(describe(err, "job"));
  } finally {
    button.disabled = false;
  }
}

// Two clicks to delete: the first arms the button for a few seconds (no blocking dialog).
function confirmThen(button, action) {
  if (button.dataset.armed === "true") {
    resetConfirm(button);
    action();
    return;
  }
  button.dataset.armed = "true";
  button.dataset.label = button.textContent;
  button.textContent = "Click again to delete";
  button.classList.add("is-armed");
  button._timer = setTimeout(() => resetConfirm(button), 4000);
}

function resetConfirm(button) {
  if (button.dataset.armed !== "true") return;
  clearTimeout(button._timer);
  button.dataset.armed = "false";
  button.textContent = button.dataset.label || "Delete";
  button.classList.remove("is-armed");
}

async function deleteJob(id, name) {
  try {
    await api("DELETE", jobPath(id));
    removeFromHistory(id);
    if (id === state.jobId) {
      closeJob();
      setRoute("", { replace: true });
    }
    showNotice(`Deleted “${name}” and its files.`);
  } catch (err) {
    showError(describe(err, "job"));
  }
}

// ---------------------------------------------------------------- history

function historyItem(job) {
  const id = job.jobId;
  const jobState = job.state || "JOB_STATE_UNSPECIFIED";
  const name = (job.input && job.input.name) || "Untitled";
  const created = parseTime(job.createTime);
  const terminal = TERMINAL.has(jobState);
  const stateText =
    jobState === "JOB_STATE_RUNNING" ? `${JOB_STATE_LABELS[jobState]} ${pct(job.fraction)}` : JOB_STATE_LABELS[jobState] || jobState;
  const actions = terminal
    ? el("button", { type: "button", class: "button small ghost", text: "Delete", "aria-label": `Delete ${name}`,
        onclick: (ev) => confirmThen(ev.currentTarget, () => deleteJob(id, name)) })
    : el("button", { type: "button", class: "button small danger-outline", text: "Cancel", "aria-label": `Cancel ${name}`,
        onclick: (ev) => cancelJob(id, ev.currentTarget) });
  return el(
    "li",
    { class: "history-item", dataset: { jobId: id, state: jobState }, "aria-current": id === state.jobId ? "true" : null },
    el(
      "button",
      { type: "button", class: "history-open", onclick: () => openJobById(id), title: "Show this job" },
      el("span", { class: "history-name", text: name, title: name }),
      el(
        "span",
        { class: "history-meta" },
        el("span", { class: `badge small ${stateClass(jobState)}`, text: stateText }),
        created ? el("time", { datetime: job.createTime, text: fmtWhen(created) }) : null,
      ),
    ),
    el("span", { class: "history-actions" }, actions),
  );
}

function upsertHistory(job, { prepend = false } = {}) {
  if (!job || !job.jobId) return;
  jobUpdated(job);
  const list = $("history");
  const old = list.querySelector(`[data-job-id="${CSS.escape(job.jobId)}"]`);
  if (old && old.dataset.state === job.state && job.state !== "JOB_STATE_RUNNING") return;
  // Keep an armed delete button as it is while the state hasn't changed.
  const item = historyItem(job);
  if (old) old.replaceWith(item);
  else if (prepend || job.jobId === state.jobId) list.prepend(item);
  else return;
  $("history-empty").hidden = true;
}

function removeFromHistory(id) {
  const item = $("history").querySelector(`[data-job-id="${CSS.escape(id)}"]`);
  if (item) item.remove();
  $("history-empty").hidden = $("history").children.length > 0;
}

function markCurrentInHistory() {
  for (const item of $("history").children) {
    if (item.dataset.jobId === state.jobId) item.setAttribute("aria-current", "true");
    else item.removeAttribute("aria-current");
  }
}

async function loadHistory({ more = false } = {}) {
  const params = new URLSearchParams({ pageSize: "20" });
  if (more && state.historyToken) params.set("pageToken", state.historyToken);
  const button = more ? $("history-more") : $("history-refresh");
  button.disabled = true;
  try {
    const data = await api("GET", `v1/jobs?${params}`);
    const list = $("history");
    const items = (data.jobs || []).filter((j) => j.jobId).map(historyItem);
    if (more) {
      const seen = new Set(Array.from(list.children, (li) => li.dataset.jobId));
      list.append(...items.filter((li) => !seen.has(li.dataset.jobId)));
    } else {
      list.replaceChildren(...items);
    }
    state.historyToken = data.nextPageToken || "";
    $("history-more").hidden = !state.historyToken;
    $("history-empty").hidden = list.children.length > 0;
  } catch (err) {
    showError(`The job history couldn't be loaded. ${describe(err)}`);
  } finally {
    button.disabled = false;
  }
}

// Jobs in the list that are still going (other than the one watched) are looked at again now
// and then, so their state and percentage stay current.
async function pollHistory() {
  if (document.hidden) return;
  const items = Array.from($("history").children).filter(
    (li) => li.dataset.jobId !== state.jobId && !TERMINAL.has(li.dataset.state),
  );
  for (const li of items.slice(0, 10)) {
    const id = li.dataset.jobId;
    try {
      const data = await api("GET", jobPath(id));
      if (data.job) upsertHistory(data.job);
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) removeFromHistory(id);
      else return; // the server is away: try again next round
    }
  }
}

// ---------------------------------------------------------------- start

async function loadConfig() {
  try {
    const data = await api("GET", "v1/config");
    state.config = data.config || {};
    if (data.version) $("version").textContent = `v${data.version}`;
    const limit = Number(state.config.max_upload_bytes) || 0;
    if (limit) $("size-limit").textContent = `, up to ${fmtBytes(limit)}`;
    await offerMp3();
    const encoding = ENCODINGS[state.config.output_encoding];
    if (encoding && $("encoding-select").querySelector(`option[value="${encoding}"]`)) $("encoding-select").value = encoding;
    showMp3Bitrate();
    const hours = Number(state.config.retention_hours) || 0;
    if (hours > 0) {
      const span = hours % 24 === 0 ? `${hours / 24} day${hours === 24 ? "" : "s"}` : `${hours} hours`;
      $("footer-note").textContent = `Your files are processed on this server; finished jobs are deleted after ${span}.`;
    }
    if (!state.defaultModel && state.config.default_model) state.defaultModel = state.config.default_model;
  } catch (err) {
    showError(`The server's settings couldn't be loaded. ${describe(err)}`);
  }
}

// MP3 is offered only where this server's API knows it (its OpenAPI document lists the
// encoding), so the page also works with a gateway from before MP3 output.
async function offerMp3() {
  const select = $("encoding-select");
  if (select.querySelector(`option[value="${MP3}"]`)) return;
  let text = "";
  try {
    const resp = await fetch(url("openapi.json"), { headers: authHeaders() });
    if (resp.ok) text = await resp.text();
  } catch {
    return; // no MP3 then; the other formats work
  }
  if (!text.includes(`"${MP3}"`)) return;
  select.append(el("option", { value: MP3, text: "MP3" }));
  // The bitrate rides along only where the API has the field.
  $("mp3-bitrate-field").dataset.supported = String(text.includes('"mp3BitrateKbps"'));
}

function showMp3Bitrate() {
  const field = $("mp3-bitrate-field");
  field.hidden = !($("encoding-select").value === MP3 && field.dataset.supported === "true");
}

async function loadModels() {
  try {
    const data = await api("GET", "v1/models");
    state.models = (data.models || []).filter((m) => m.name);
    state.defaultModel = data.defaultModel || state.defaultModel;
  } catch (err) {
    state.models = [];
    showError(`The list of models couldn't be loaded, so the server's default will be used. ${describe(err)}`);
  }
  fillModels();
}

function main() {
  setupUpload();
  $("model-select").addEventListener("change", updateModelHelp);
  $("encoding-select").addEventListener("change", showMp3Bitrate);
  $("job-retry").addEventListener("click", (ev) => state.jobId && retryJob(state.jobId, ev.currentTarget));
  // On narrow screens History sits below everything else: this jumps there.
  $("jump-history").addEventListener("click", () => {
    $("history-card").scrollIntoView({ behavior: "smooth", block: "start" });
    $("history-heading").focus({ preventScroll: true });
  });
  window.addEventListener("popstate", followRoute);
  window.audiomeshMixer = {
    // The audio graph as data: which sources run, their gains and positions (tests use it).
    state: () => (state.mixer ? { jobId: state.jobId, ...state.mixer.state() } : null),
  };
  $("history-refresh").addEventListener("click", () => loadHistory());
  $("history-more").addEventListener("click", () => loadHistory({ more: true }));
  $("job-cancel").addEventListener("click", (ev) => state.jobId && cancelJob(state.jobId, ev.currentTarget));
  $("job-delete").addEventListener("click", (ev) => {
    const { jobId, job } = state;
    if (jobId) confirmThen(ev.currentTarget, () => deleteJob(jobId, (job && job.input && job.input.name) || "the job"));
  });
  $("job-heading").setAttribute("tabindex", "-1");
  window.addEventListener("pagehide", () => {
    stopWatching();
    closeMixer();
  });
  setInterval(pollHistory, 5000);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) loadHistory();
  });
  setupApiKey();
  document.body.dataset.ready = "loading";
  // The job in the address opens once the settings are in (its loudness line needs them).
  const routed = routeJobId();
  badRoute();
  Promise.all([loadConfig().then(loadModels), loadHistory()])
    .then(() => routed && routeJobId() === routed && !state.jobId && openJobById(routed, { fromRoute: true }))
    .finally(() => {
      document.body.dataset.ready = "true";
    });
}

function setupApiKey() {
  const input = $("api-key");
  const status = $("api-key-status");
  const show = () => {
    status.textContent = apiKey() ? "Key saved in this browser." : "No key (open servers need none).";
  };
  input.value = apiKey();
  show();
  $("api-key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    try {
      if (input.value.trim()) localStorage.setItem(KEY_STORAGE, input.value.trim());
      else localStorage.removeItem(KEY_STORAGE);
    } catch {
      /* storage blocked: the key lasts until the page closes */
    }
    show();
    clearAlert();
    Promise.all([loadConfig().then(loadModels), loadHistory()]);
  });
}

main();
