// The page: read the chosen file as a data: URL, POST it to /v1/emotion with stream=true, and draw the
// server-sent events as they come (emotion.frames, emotion.scores, emotion.delta, emotion.done).
"use strict";

const $ = (id) => document.getElementById(id);
const GATE_COLOURS = ["#4f5bd5", "#e07a5f", "#81b29a", "#f2cc8f", "#3d405b", "#9c6644", "#6d597a", "#b56576"];
let objectUrl = null;

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function kindOf(file) {
  const top = (file.type || "").split("/")[0];
  return ["video", "image", "audio"].includes(top) ? top : null;
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function clearResults() {
  $("frames").replaceChildren();
  $("scores").replaceChildren();
  $("gates").replaceChildren();
  $("description").textContent = "";
  $("label").textContent = "";
}

function seek(video, t) {
  return new Promise((resolve) => {
    video.addEventListener("seeked", resolve, { once: true });
    video.currentTime = t;
  });
}

async function drawFrames(kind, times) {
  const box = $("frames");
  if (kind === "image") {
    const img = document.createElement("img");
    img.src = objectUrl;
    box.append(figure(img, "image"));
    return;
  }
  if (kind !== "video" || !times.length) {
    box.textContent = kind === "audio" ? "(audio only: no frames)" : "";
    return;
  }
  const video = $("video");
  video.src = objectUrl;
  await new Promise((resolve) => {
    if (video.readyState >= 1) resolve();
    else video.addEventListener("loadedmetadata", resolve, { once: true });
  });
  for (const t of times) {
    await seek(video, Math.min(t, Math.max(video.duration - 0.001, 0)));
    const canvas = document.createElement("canvas");
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    canvas.getContext("2d").drawImage(video, 0, 0);
    box.append(figure(canvas, `${t.toFixed(2)} s`));
  }
}

function figure(el, caption) {
  const fig = document.createElement("figure");
  const cap = document.createElement("figcaption");
  cap.textContent = caption;
  fig.append(el, cap);
  return fig;
}

function drawScores(label, scores) {
  $("label").textContent = label;
  const box = $("scores");
  box.replaceChildren();
  for (const [word, p] of Object.entries(scores)) {
    const row = document.createElement("div");
    row.className = "bar" + (word === label ? " top" : "");
    row.dataset.label = word;
    const name = document.createElement("span");
    name.textContent = word;
    const track = document.createElement("div");
    track.className = "track";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.textContent = p.toFixed(3);
    row.append(name, track, value);
    box.append(row);
  }
}

function itemName(kind, item, times) {
  // The gate gives one row per image or clip (images first): name it by what it weighs.
  if (kind === "video" && times.length) return `clip ${times[0].toFixed(2)}-${times[times.length - 1].toFixed(2)} s`;
  return kind === "image" ? "image" : `item ${item}`;
}

function gateRow(label, weights, className) {
  const row = document.createElement("div");
  row.className = className;
  const name = document.createElement("span");
  name.textContent = label;
  const stack = document.createElement("div");
  stack.className = "stack";
  weights.forEach((w, e) => {
    const part = document.createElement("div");
    part.style.width = `${(100 * w).toFixed(1)}%`;
    part.style.background = GATE_COLOURS[e % GATE_COLOURS.length];
    part.title = `expert ${e}: ${w.toFixed(3)}`;
    stack.append(part);
  });
  row.append(name, stack);
  return row;
}

function drawGates(gates, kind, times, timeline) {
  // One row per image or clip (the weights the model used), then, for a clip, one row per temporal patch
  // group: the gate applied to that moment alone.
  const box = $("gates");
  box.replaceChildren();
  if (!gates || !gates.length) {
    box.innerHTML = '<p class="hint">no gate: this checkpoint routes tokens (scale mode) or the input has no image or clip</p>';
    return;
  }
  const legend = document.createElement("div");
  legend.className = "legend";
  gates[0].forEach((_, e) => {
    const s = document.createElement("span");
    s.innerHTML = `<i style="background:${GATE_COLOURS[e % GATE_COLOURS.length]}"></i>expert ${e}`;
    legend.append(s);
  });
  box.append(legend);
  gates.forEach((weights, item) => box.append(gateRow(itemName(kind, item, times), weights, "gate")));
  if (!timeline || !timeline.weights.length) return;
  const title = document.createElement("p");
  title.className = "hint";
  title.textContent = "over time (each moment's frames alone):";
  box.append(title);
  timeline.weights.forEach((weights, g) => {
    const at = timeline.times[g] === undefined ? `moment ${g}` : `${timeline.times[g].toFixed(2)} s`;
    box.append(gateRow(at, weights, "gate moment"));
  });
}

async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

async function analyse(file) {
  const kind = kindOf(file);
  clearResults();
  if (!kind) {
    setStatus(`cannot read ${file.name}: not a video, image or audio file (${file.type || "unknown type"})`, true);
    return;
  }
  if (objectUrl) URL.revokeObjectURL(objectUrl);
  objectUrl = URL.createObjectURL(file);
  setStatus(`sending ${file.name} ...`);
  const body = { labels: $("labels").value, describe: $("describe").checked, stream: true, gate_timeline: true };
  body[kind] = await readAsDataUrl(file);
  if ($("subtitle").value.trim()) body.subtitle = $("subtitle").value.trim();
  const headers = { "Content-Type": "application/json" };
  if ($("apikey").value) headers.Authorization = `Bearer ${$("apikey").value}`;
  const response = await fetch("/v1/emotion", { method: "POST", headers, body: JSON.stringify(body) });
  if (!response.ok) {
    let message = `${response.status}`;
    try { message += `: ${(await response.json()).error.message}`; } catch (e) { /* not JSON */ }
    setStatus(message, true);
    return;
  }
  setStatus("the model is reading ...");
  let framesDrawn = Promise.resolve();
  let times = [];
  for await (const data of sseEvents(response)) {
    if (data === "[DONE]") break;
    const event = JSON.parse(data);
    if (event.error) { setStatus(event.error.message, true); return; }
    if (event.object === "emotion.frames") { times = event.frames; framesDrawn = drawFrames(kind, times); }
    else if (event.object === "emotion.scores") {
      drawScores(event.label, event.scores);
      drawGates(event.gate_weights, kind, times, event.gate_timeline);
    }
    else if (event.object === "emotion.delta") $("description").textContent += event.delta;
    else if (event.object === "emotion.done") {
      if (event.description !== undefined) $("description").textContent = event.description;
      setStatus(`done: ${event.usage.prompt_tokens} prompt tokens, ${event.usage.completion_tokens} generated`);
    }
  }
  await framesDrawn;
}

function run(file) {
  analyse(file).catch((err) => setStatus(`failed: ${err}`, true));
}

$("file").addEventListener("change", (e) => { if (e.target.files.length) run(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) run(e.dataTransfer.files[0]);
});
