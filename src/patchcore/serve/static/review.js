// The review page: upload images, see score, label and overlay, record verdicts, export.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { rows: [], current: null, urls: [] };

function keyHeaders() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

function say(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options, headers: { ...keyHeaders(), ...(options.headers || {}) } });
  if (!response.ok) {
    let message = response.statusText;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    if (response.status === 401) { $("api-key").focus(); }
    throw new Error(`${response.status}: ${message}`);
  }
  return response;
}

function fmt(value, digits = 4) {
  return value === null || value === undefined ? "-" : Number(value).toFixed(digits);
}

async function loadModels() {
  const data = await (await api("/v1/models")).json();
  const select = $("model");
  const previous = select.value;
  select.innerHTML = "";
  for (const m of data.models) {
    const option = document.createElement("option");
    option.value = m.name;
    option.textContent = `${m.name} (${m.backbone})`;
    option.dataset.threshold = m.image_threshold;
    select.appendChild(option);
  }
  if (previous) { select.value = previous; }
}

async function loadQueue() {
  const [sort, order] = $("sort").value.split(":");
  const data = await (await api(`/v1/reviews?sort=${sort}&order=${order}&limit=200`)).json();
  state.rows = data.reviews;
  const body = $("queue").querySelector("tbody");
  body.innerHTML = "";
  for (const row of state.rows) {
    const tr = document.createElement("tr");
    tr.dataset.id = row.id;
    tr.classList.toggle("selected", state.current && state.current.id === row.id);
    for (const text of [row.id, row.filename, row.model, fmt(row.score), row.label,
                        row.verdict || row.true_label || ""]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }
    tr.addEventListener("click", () => show(row.id));
    body.appendChild(tr);
  }
}

async function blobUrl(path) {
  const url = URL.createObjectURL(await (await api(path)).blob());
  state.urls.push(url);
  return url;
}

async function show(id) {
  const row = state.rows.find((r) => r.id === id);
  if (!row) { return; }
  state.current = row;
  for (const url of state.urls.splice(0)) { URL.revokeObjectURL(url); }
  $("viewer").hidden = false;
  $("view-overlay").dataset.loaded = "";
  $("view-file").textContent = row.filename;
  $("view-score").textContent = fmt(row.score);
  $("view-calibrated").textContent = fmt(row.calibrated, 3);
  $("view-label").textContent = row.label;
  $("view-label").className = row.label;
  $("view-threshold").textContent = fmt(row.threshold);
  $("view-verdict").textContent = row.verdict
    ? `${row.verdict} (true label: ${row.true_label}${row.defect ? ", " + row.defect : ""})`
    : (row.true_label ? `true label: ${row.true_label}` : "not reviewed");
  const calibrated = row.label === "good" || row.label === "anomalous";
  $("verdict-buttons").hidden = !calibrated;
  $("truth-buttons").hidden = calibrated;
  $("view-image").src = await blobUrl(`/v1/reviews/${id}/image`);
  const overlay = $("view-overlay");
  overlay.onload = () => { overlay.dataset.loaded = "yes"; };
  overlay.src = await blobUrl(`/v1/reviews/${id}/overlay`);
  for (const tr of $("queue").querySelectorAll("tbody tr")) {
    tr.classList.toggle("selected", Number(tr.dataset.id) === id);
  }
}

async function upload(files) {
  const model = $("model").value;
  if (!model) { say("no model to score with", true); return; }
  let last = null;
  for (const file of files) {
    say(`scoring ${file.name} ...`);
    const form = new FormData();
    form.append("image", file, file.name);
    try {
      const response = await api(
        `/v1/models/${encodeURIComponent(model)}/predict?review=true`,
        { method: "POST", body: form });
      const answer = (await response.json()).predictions[0];
      last = answer.review_id;
      say(`${file.name}: ${answer.label}, score ${fmt(answer.score)}`);
    } catch (error) {
      say(`${file.name}: ${error.message}`, true);
    }
  }
  await loadQueue();
  if (last !== null) { await show(last); }
}

async function review(body) {
  if (!state.current) { return; }
  try {
    await api(`/v1/reviews/${state.current.id}`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body) });
    const id = state.current.id;
    await loadQueue();
    await show(id);
    say(`verdict saved for #${id}`);
  } catch (error) {
    say(error.message, true);
  }
}

async function download(path, name) {
  try {
    const url = URL.createObjectURL(await (await api(path)).blob());
    const a = document.createElement("a");
    a.href = url;
    a.download = name;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
    say(`exported ${name}`);
  } catch (error) {
    say(error.message, true);
  }
}

function wire() {
  $("api-key").value = sessionStorage.getItem("patchcore-key") || "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("patchcore-key", $("api-key").value.trim());
    start();
  });
  $("file-input").addEventListener("change", (e) => upload([...e.target.files]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    upload([...e.dataTransfer.files]);
  });
  $("opacity").addEventListener("input", (e) => {
    $("view-overlay").style.opacity = e.target.value / 100;
  });
  $("sort").addEventListener("change", loadQueue);
  $("queue").querySelector("th[data-sort]").addEventListener("click", () => {
    $("sort").value = $("sort").value === "score:desc" ? "score:asc" : "score:desc";
    loadQueue();
  });
  $("btn-correct").addEventListener("click", () => review(
    { verdict: "correct", defect: $("defect").value }));
  $("btn-wrong").addEventListener("click", () => review(
    { verdict: "wrong", defect: $("defect").value }));
  $("btn-good").addEventListener("click", () => review({ true_label: "good" }));
  $("btn-anomalous").addEventListener("click", () => review(
    { true_label: "anomalous", defect: $("defect").value }));
  $("export-csv").addEventListener("click", () => download("/v1/reviews/export.csv",
                                                            "reviews.csv"));
  $("export-zip").addEventListener("click", () => download("/v1/reviews/export.zip",
                                                            "reviewed_dataset.zip"));
}

async function start() {
  try {
    await loadModels();
    await loadQueue();
    say("ready");
  } catch (error) {
    say(error.message, true);
  }
}

wire();
start();
