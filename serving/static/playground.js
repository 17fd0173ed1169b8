// The char-rnn playground: calls this service's own API (same origin) with fetch; nothing else is loaded.
// POST /model_info (header), /generate_stream (one sample, server-sent events read from a ReadableStream),
// /generate (several samples side by side), /models (the models view), /training (polled: the newest run's
// progress, and the served model, so that the page switches to a newly promoted model without a reload). The API key, when the service wants
// one, is kept in sessionStorage: this tab only.
"use strict";

const $ = (id) => document.getElementById(id);
const FIELDS = ["max_new_chars", "temperature", "top_k", "top_p", "seed", "num_samples", "unknown_chars"];
const KEY = "char-rnn-api-key";
const SVG = "http://www.w3.org/2000/svg";

let vocab = null; // the served model's characters (a Set), from /model_info
let servedTag = null;
let running = null; // the AbortController of the generation in progress
let refused = new Set(); // prompt characters the service refused last time

class KeyNeeded extends Error {}

function authHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

/** POST `route` with a JSON body; a 401 opens the key form and throws KeyNeeded. */
async function post(route, body, signal) {
  const r = await fetch(route, { method: "POST", headers: authHeaders(), body: JSON.stringify(body || {}), signal });
  if (r.status === 401) {
    const { error } = await r.json();
    askKey(sessionStorage.getItem(KEY) ? "That key was refused. " + error : "");
    throw new KeyNeeded(error);
  }
  return r;
}

function askKey(message) {
  $("key-form").hidden = false;
  $("key-error").textContent = message;
  $("key").focus();
}

/** Server-sent events from a fetch body: yields {event, data} as each block arrives. */
async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      yield { event, data: JSON.parse(data) };
    }
  }
}

// ---- the served model ----

function when(iso) {
  return iso ? iso.replace("T", " ").replace(/\.\d+/, "").replace(/(\+00:00|Z)$/, " UTC") : "unknown";
}

async function loadInfo() {
  let r;
  try {
    r = await post("/model_info");
  } catch (e) {
    if (e instanceof KeyNeeded) return;
    throw e;
  }
  const info = await r.json();
  $("no-model").hidden = r.ok;
  if (!r.ok) {
    $("no-model").textContent = info.error;
    for (const id of ["model-tag", "model-loss", "model-date", "model-vocab"]) $(id).textContent = "none";
    return;
  }
  servedTag = info.model;
  vocab = new Set(info.vocab);
  $("model-tag").textContent = info.model;
  $("model-loss").textContent = info.val_loss == null ? "not recorded" : `${info.val_loss.toFixed(4)} nats/char`;
  $("model-date").textContent = when(info.trained_at);
  $("model-vocab").textContent = `${info.vocab.length} characters`;
  markPrompt();
}

// ---- the prompt, with unknown characters marked ----

function unknownChars() {
  const found = new Set(refused);
  if (vocab) for (const ch of $("prompt").value.normalize("NFC")) if (!vocab.has(ch)) found.add(ch);
  return found;
}

function markPrompt() {
  const text = $("prompt").value, unknown = unknownChars(), layer = $("prompt-marks");
  layer.replaceChildren();
  let run = "";
  for (const ch of text) {
    if (!unknown.has(ch)) {
      run += ch;
      continue;
    }
    const mark = document.createElement("mark");
    mark.textContent = ch;
    layer.append(run, mark);
    run = "";
  }
  layer.append(run + (text.endsWith("\n") ? " " : "")); // a textarea shows the line after a final newline
  layer.scrollTop = $("prompt").scrollTop;
  const listed = [...unknown].map((c) => JSON.stringify(c)).join(" ");
  $("prompt-note").textContent = unknown.size
    ? `${unknown.size} character(s) not in the model's vocabulary: ${listed}` +
      ($("unknown_chars").value === "skip" ? " (they will be skipped)" : "")
    : "";
}

// ---- generating ----

function requestBody() {
  const body = { prompt: $("prompt").value };
  for (const field of FIELDS) {
    const value = $(field).value.trim();
    if (value !== "") body[field] = field === "unknown_chars" ? value : Number(value);
  }
  return body;
}

function clearErrors() {
  $("error").hidden = true;
  $("skip").hidden = true;
  for (const el of document.querySelectorAll(".invalid")) el.classList.remove("invalid");
  for (const el of document.querySelectorAll(".field-error")) el.remove();
}

function showError(message) {
  $("error").hidden = false;
  $("error-text").textContent = message;
}

/** An error body from the API, shown where it belongs: the fields it names, the prompt's characters. */
function showFailure(body, status) {
  const detail = Array.isArray(body.detail) ? body.detail : [];
  for (const d of detail) {
    if (d.type === "unknown_chars") {
      refused = new Set(d.chars);
      markPrompt();
      $("skip").hidden = false;
    }
    const el = $(String((d.loc || [])[0]));
    if (el && d.type !== "unknown_chars") {
      el.classList.add("invalid");
      const note = document.createElement("span");
      note.className = "field-error";
      note.textContent = d.msg;
      if (el.closest("label")) el.closest("label").append(note);
    }
  }
  showError(body.error || `the service answered ${status}`);
}

function sampleCard(index, prompt) {
  const card = document.createElement("article");
  card.className = "sample";
  const title = document.createElement("h3");
  title.textContent = `sample ${index + 1}`;
  const pre = document.createElement("pre");
  const echo = document.createElement("span");
  echo.className = "echo";
  echo.textContent = prompt;
  const generated = document.createElement("span");
  generated.className = "generated";
  pre.append(echo, generated);
  card.append(title, pre);
  $("outputs").append(card);
  return generated;
}

function finished(model, chars, started) {
  const seconds = ((performance.now() - started) / 1000).toFixed(2);
  $("status").textContent = `${chars} characters in ${seconds} s from ${model}`;
  if (model !== servedTag) loadInfo(); // the service switched models meanwhile
}

async function streamOne(body, signal, started) {
  const r = await post("/generate_stream", body, signal);
  if (!r.ok) return showFailure(await r.json(), r.status);
  const out = sampleCard(0, body.prompt);
  let chars = 0;
  for await (const { event, data } of events(r.body)) {
    if (event === "message") {
      out.append(data.text);
      chars += [...data.text].length;
      $("status").textContent = `streaming… ${chars} characters`;
    } else if (event === "done") {
      return finished(data.model, data.chars, started);
    } else if (event === "error") {
      return showError(`${data.error} (after ${data.chars} characters)`);
    }
  }
  showError(`the stream ended early, after ${chars} characters`);
}

async function generateMany(body, signal, started) {
  $("status").textContent = `generating ${body.num_samples} samples…`;
  const r = await post("/generate", body, signal);
  const answer = await r.json();
  if (!r.ok) return showFailure(answer, r.status);
  answer.completions.forEach((text, i) => sampleCard(i, body.prompt).append(text));
  const chars = answer.completions.reduce((n, c) => n + [...c].length, 0);
  finished(answer.model, chars, started);
  if (answer.skipped_chars.length) $("status").textContent += ` (skipped ${answer.skipped_chars.join(" ")})`;
}

async function generate() {
  if (running) running.abort();
  clearErrors();
  refused = new Set();
  markPrompt();
  $("outputs").replaceChildren();
  const body = requestBody(), controller = new AbortController(), started = performance.now();
  running = controller;
  $("generate").disabled = true;
  $("stop").disabled = false;
  try {
    if ((body.num_samples ?? 1) === 1) await streamOne(body, controller.signal, started);
    else await generateMany(body, controller.signal, started);
  } catch (e) {
    if (e.name === "AbortError") $("status").textContent = "stopped";
    else if (e instanceof KeyNeeded) showError(e.message);
    else showError(`the service did not answer: ${e.message}`);
  } finally {
    if (running === controller) running = null;
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

// ---- the models view ----

function svg(name, attrs, text) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

/** About five round numbers (1, 2 or 5 times a power of ten apart) between lo and hi. */
function ticks(lo, hi) {
  const raw = (hi - lo) / 5, power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const digits = Math.max(0, -Math.floor(Math.log10(step)));
  const found = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi; v += step) found.push(Number(v.toFixed(digits)));
  return found;
}

function drawCurve(curve, plot = $("curve"), empty = "no loss history in the served model's checkpoint") {
  plot.replaceChildren();
  const points = curve ? [...curve.train, ...curve.val] : [];
  if (!points.length) {
    plot.append(svg("text", { x: 20, y: 40 }, empty));
    return;
  }
  const [W, H, L, R, T, B] = [720, 300, 56, 16, 12, 36];
  const steps = points.map((p) => p[0]), losses = points.map((p) => p[1]);
  let [x0, x1] = [Math.min(...steps), Math.max(...steps)];
  let [y0, y1] = [Math.min(...losses), Math.max(...losses)];
  if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
  const pad = (y1 - y0) * 0.05 || 0.1;
  [y0, y1] = [y0 - pad, y1 + pad];
  const sx = (s) => L + ((s - x0) / (x1 - x0)) * (W - L - R);
  const sy = (v) => T + ((y1 - v) / (y1 - y0)) * (H - T - B);
  for (const v of ticks(y0, y1)) {
    plot.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: sy(v), y2: sy(v) }));
    plot.append(svg("text", { x: L - 6, y: sy(v) + 4, "text-anchor": "end" }, String(v)));
  }
  for (const s of ticks(x0, x1).filter(Number.isInteger)) {
    plot.append(svg("text", { x: sx(s), y: H - B + 16, "text-anchor": "middle" }, String(s)));
  }
  plot.append(svg("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  plot.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  plot.append(svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, "step"));
  for (const name of ["train", "val"]) {
    const line = curve[name].map(([s, v]) => `${sx(s).toFixed(1)},${sy(v).toFixed(1)}`).join(" ");
    plot.append(svg("polyline", { class: name, points: line }));
    if (name === "val" || curve[name].length === 1) {
      for (const [s, v] of curve[name]) plot.append(svg("circle", { class: name, cx: sx(s), cy: sy(v), r: 3 }));
    }
  }
}

async function loadModels() {
  const body = $("history").tBodies[0];
  let r;
  try {
    r = await post("/models");
  } catch (e) {
    if (!(e instanceof KeyNeeded)) throw e;
    return;
  }
  const view = await r.json();
  if (!r.ok) {
    body.replaceChildren();
    return showError(view.error);
  }
  const cells = (row) => [
    ["tag", row.tag],
    ["action", row.action],
    ["at", when(row.at)],
    ["loss", row.val_loss == null ? "—" : row.val_loss.toFixed(4)],
    ["parent", row.parent || "—"],
    ["chars", row.corpus_chars == null ? "—" : row.corpus_chars.toLocaleString("en")],
    ["run", row.run_id || "—"],
    ["serving", row.serving ? "● serving" : ""],
  ];
  body.replaceChildren(
    ...view.history.toReversed().map((row) => {
      const tr = document.createElement("tr");
      tr.classList.toggle("serving", row.serving);
      for (const [cls, text] of cells(row)) {
        const td = document.createElement("td");
        td.className = cls;
        td.textContent = text;
        tr.append(td);
      }
      return tr;
    })
  );
  $("curve-tag").textContent = view.serving || "";
  drawCurve(view.curve);
}

function show(tab) {
  const models = tab === "models";
  $("play").hidden = models;
  $("models").hidden = !models;
  $("tab-play").setAttribute("aria-selected", String(!models));
  $("tab-models").setAttribute("aria-selected", String(models));
  history.replaceState(null, "", models ? "#models" : "#");
  if (models) loadModels();
}

// ---- the newest run's training, live ----

let watched = null; // the run this page has seen training
let polling = null; // the timer of the next poll

function duration(seconds) {
  if (seconds == null) return "…";
  const s = Math.round(seconds);
  return s < 60 ? `${s} s` : `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
}

function stateLine(t) {
  return {
    training: `training${t.warm_start ? `, continuing ${t.warm_start}` : " a new model"}`,
    trained: "trained: being scored against the served model",
    promoted: `promoted as ${t.tag}, which this page now uses`,
    kept: `not promoted: ${t.reason}`,
    failed: `failed: ${t.reason}`,
    stopped: "stopped: the process that trained it is gone",
  }[t.state];
}

function showTraining(t, shown) {
  $("training").hidden = !shown;
  if (!shown) return;
  const fixed = (v) => (v == null ? "…" : `${v.toFixed(3)} nats/char`);
  $("training").dataset.state = t.state;
  $("train-run").textContent = t.run;
  $("train-state").textContent = stateLine(t);
  $("train-bar").value = t.steps ? t.step / t.steps : 0;
  $("train-step").textContent = `${t.step} / ${t.steps}`;
  $("train-loss").textContent = fixed(t.loss);
  $("train-val").textContent = fixed(t.val_loss);
  $("train-speed").textContent = t.chars_per_s == null ? "…" : `${Math.round(t.chars_per_s).toLocaleString("en")} chars/s`;
  $("train-eta").textContent = t.state === "training" ? duration(t.eta_s) : "—";
  $("train-why").textContent = t.why ? `${t.step === t.steps ? "Trained" : "Trains"} ${t.steps} steps: ${t.why}.` : "";
  drawCurve({ train: t.train, val: t.val }, $("train-curve"), "no step yet");
  const first = servedTag === null && ["training", "trained"].includes(t.state);
  $("no-model").classList.toggle("waiting", first);
  if (first) $("no-model").textContent = "The first model is training (below); this page switches to it once it is promoted.";
}

/** Poll POST /training: every second while a run trains, else every few seconds; stops when a key is needed. */
async function pollTraining() {
  clearTimeout(polling);
  let t;
  try {
    const r = await post("/training");
    if (!r.ok) throw new Error(`the service answered ${r.status}`);
    t = await r.json();
  } catch (e) {
    if (!(e instanceof KeyNeeded)) polling = setTimeout(pollTraining, 5000);
    return;
  }
  if (t.serving !== servedTag) {
    await loadInfo(); // a newly promoted model (or a rollback): switch to it
    if (!$("models").hidden) loadModels();
  }
  const live = t.state === "training" || t.state === "trained";
  if (live) watched = t.run;
  showTraining(t, live || (t.run !== null && t.run === watched));
  polling = setTimeout(pollTraining, live ? 1000 : 3000);
}

// ---- wiring ----

$("gen-form").addEventListener("submit", (e) => {
  e.preventDefault();
  generate();
});
$("stop").addEventListener("click", () => running && running.abort());
$("skip").addEventListener("click", () => {
  $("unknown_chars").value = "skip";
  generate();
});
$("prompt").addEventListener("input", markPrompt);
$("prompt").addEventListener("scroll", () => ($("prompt-marks").scrollTop = $("prompt").scrollTop));
$("unknown_chars").addEventListener("change", markPrompt);
$("temperature-range").addEventListener("input", () => ($("temperature").value = $("temperature-range").value));
$("temperature").addEventListener("input", () => ($("temperature-range").value = $("temperature").value));
$("tab-play").addEventListener("click", () => show("play"));
$("tab-models").addEventListener("click", () => show("models"));
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY, $("key").value.trim());
  $("key-form").hidden = true;
  loadInfo().finally(pollTraining);
  if (!$("models").hidden) loadModels();
});

markPrompt();
loadInfo().finally(pollTraining);
if (location.hash === "#models") show("models");
