// The search page. Every value from the server is put into the page with textContent or as
// an attribute value set through the DOM, never as HTML: a camera named <img onerror=...> is
// shown as that text.
"use strict";

const state = { info: null, offset: 0, lastKey: null, file: null };
const PRECISION_KEY = "strongreid.precision";
const $ = (id) => document.getElementById(id);

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function status(text, isError) {
  const s = $("status");
  s.textContent = text;
  s.className = isError ? "error" : "";
}

async function getJSON(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const error = new Error((body && body.detail ? String(body.detail) : "request failed") + " (HTTP " + response.status + ")");
    error.status = response.status;
    throw error;
  }
  return body;
}

function localInput(seconds) {
  // datetime-local wants local wall-clock time without a zone.
  const d = new Date(seconds * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + "T" +
    pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
}

function selectedCameras() {
  return Array.from(document.querySelectorAll("#cameras input:checked")).map((c) => c.value);
}

async function loadInfo() {
  const info = await getJSON("/api/info");
  state.info = info;
  $("info").textContent = info.count + " crops from " + info.cameras.length + " cameras" +
    (info.model ? " - model " + info.model : "");
  const box = $("cameras");
  for (const cam of info.cameras) {
    const label = el("label");
    const input = el("input", { type: "checkbox", value: cam, "data-camera": cam });
    input.checked = true;
    label.appendChild(input);
    label.appendChild(document.createTextNode(" " + cam));
    box.appendChild(label);
  }
  if (info.start !== null && info.start > 946684800) {
    $("start").value = localInput(Math.floor(info.start));
    $("end").value = localInput(Math.ceil(info.end));
  }
  setupPrecision(info.calibration);
}

function storedPrecision() {
  try { return window.localStorage.getItem(PRECISION_KEY); } catch (e) { return null; }
}

function setupPrecision(calibration) {
  // The precisions the model's calibration reaches; the choice comes from the address
  // (?precision=0.99), else from this browser's last choice, else the server's default.
  const box = $("same-person"), select = $("precision");
  select.replaceChildren();
  box.hidden = !calibration;
  if (!calibration) return;
  for (const p of calibration.points) {
    select.appendChild(el("option", { value: String(p.precision) }, p.precision + " (score \u2265 " +
      p.threshold.toFixed(3) + ", finds " + Math.round(p.recall * 100) + "%)"));
  }
  const offered = calibration.points.map((p) => String(p.precision));
  const asked = new URLSearchParams(window.location.search).get("precision");
  const wanted = [asked === null ? null : String(Number(asked)), storedPrecision(),
    calibration.default === null ? null : String(calibration.default)];
  const pick = wanted.find((p) => p !== null && offered.includes(p));
  if (pick !== undefined) select.value = pick;
  select.disabled = offered.length === 0;
  $("calibration-note").textContent = offered.length
    ? "Green cards are judged the same person: on the calibration pairs, that share of such " +
      "judgements was right. The % on a card is P(same person)."
    : "This model's calibration reaches precision " + calibration.max_precision +
      " at most: cards show P(same person) only.";
}

function precisionChanged() {
  const value = $("precision").value;
  try { window.localStorage.setItem(PRECISION_KEY, value); } catch (e) { /* private mode */ }
  const url = new URL(window.location.href);
  url.searchParams.set("precision", value);
  window.history.replaceState(null, "", url.pathname + url.search);
  return rerun();
}

async function loadGallery() {
  const data = await getJSON("/api/gallery?limit=60&offset=" + state.offset);
  for (const item of data.items) {
    const button = el("button", { type: "button", class: "gallery-item", "data-key": item.key,
      "data-camera": item.camera, "data-track": item.track, title: item.camera + " " + item.time });
    button.appendChild(el("img", { src: item.thumb, alt: item.camera + " " + item.time }));
    button.addEventListener("click", () => searchKey(item.key, item.thumb));
    $("gallery").appendChild(button);
  }
  state.offset += data.items.length;
  $("more").hidden = data.items.length === 0;
}

function formData() {
  const form = new FormData();
  form.append("k", $("k").value || "20");
  const cams = selectedCameras();
  if (state.info && cams.length < state.info.cameras.length) form.append("cameras", cams.join(","));
  for (const id of ["start", "end"]) {
    if ($(id).value) form.append(id, new Date($(id).value).toISOString());
  }
  form.append("rerank", $("rerank").checked ? "true" : "false");
  form.append("exclude_camera", $("exclude-camera").checked ? "true" : "false");
  if (!$("same-person").hidden && $("precision").value) form.append("precision", $("precision").value);
  return form;
}

async function run(form, file) {
  if (state.info && selectedCameras().length === 0) {
    render({ hits: [], timeline: [] });
    status("select at least one camera", true);
    return;
  }
  status("searching...");
  let url = "/api/search", request = { method: "POST", body: form };
  if (file && /^image\/[a-z0-9.+-]+$/i.test(file.type)) {
    // The picture itself as the body and the parameters in the query string: the server
    // parses no multipart form. A file the browser gives no image type goes as a form.
    url += "?" + new URLSearchParams(form).toString();
    request = { method: "POST", body: file, headers: { "Content-Type": file.type } };
  } else if (file) {
    form.append("image", file);
  }
  try {
    const result = await getJSON(url, request);
    render(result);
    const same = result.hits.filter((h) => h.same_person).length;
    status(result.hits.length + " hits in " + result.timeline.length + " cameras (" + result.took_ms + " ms" +
      (result.reranked ? ", re-ranked" : "") + ")" +
      (result.decision ? ", " + same + " same person at precision " + result.decision.precision : ""));
  } catch (e) {
    render({ hits: [], timeline: [] });
    status(e.message, true);
  }
}

function searchKey(key, thumb) {
  state.lastKey = key;
  state.file = null;
  const preview = $("query-preview");
  preview.src = thumb;
  preview.hidden = false;
  const form = formData();
  form.append("key", key);
  return run(form);
}

function searchFile(file) {
  state.lastKey = null;
  state.file = file;
  const preview = $("query-preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  return run(formData(), file);
}

function shortTime(time) {
  const t = time.indexOf("T");
  return t >= 0 ? time.slice(t + 1).replace("Z", "") : time;
}

function select(key) {
  for (const fig of document.querySelectorAll("#hits figure.hit")) {
    fig.classList.toggle("selected", fig.dataset.key === key);
  }
}

function render(result) {
  // The ranked hits: a grid, one card each (rank, score, camera, time), never overlapping.
  // The timeline below is a summary: one lane per camera, a numbered marker per hit at its time.
  const hits = $("hits"), timeline = $("timeline");
  hits.replaceChildren();
  timeline.replaceChildren();
  $("axis").replaceChildren();
  $("hits-title").hidden = $("timeline-title").hidden = !result.hits.length;
  if (!result.hits.length) return;
  let rank = 0;
  const rankOf = new Map(result.hits.map((h) => [h.key, ++rank]));
  for (const h of result.hits) {
    const r = rankOf.get(h.key);
    const fig = el("figure", { class: "hit", "data-key": h.key, "data-camera": h.camera,
      "data-track": h.track, "data-rank": r, title: h.time + " " + h.source + " frame " + h.frame });
    const img = el("img", { src: h.thumb, alt: "#" + r + " " + h.camera + " " + h.time });
    img.addEventListener("click", () => searchKey(h.key, h.thumb));
    fig.appendChild(img);
    const caption = el("figcaption");
    caption.appendChild(el("span", { class: "rank" }, "#" + r));
    caption.appendChild(document.createTextNode(" "));
    caption.appendChild(el("span", { class: "score" }, h.score.toFixed(3)));
    if (typeof h.probability === "number") {
      fig.setAttribute("data-probability", h.probability);
      caption.appendChild(document.createTextNode(" "));
      caption.appendChild(el("span", { class: "probability", title: "P(same person) " + h.probability },
        (100 * h.probability).toFixed(1) + "%"));
    }
    caption.appendChild(el("span", { class: "camera" }, h.camera));
    // The time of day fits a card; the full time is the card's tooltip.
    caption.appendChild(el("span", { class: "time", title: h.time }, shortTime(h.time)));
    if (h.same_person) {
      fig.classList.add("same-person");
      caption.appendChild(el("span", { class: "badge" }, "same person"));
    }
    fig.appendChild(caption);
    const item = el("li");
    item.appendChild(fig);
    hits.appendChild(item);
  }
  const times = result.hits.map((h) => h.timestamp);
  const lo = Math.min(...times), hi = Math.max(...times);
  const span = hi > lo ? hi - lo : 1;
  $("axis").appendChild(el("span", {}, result.hits.find((h) => h.timestamp === lo).time));
  $("axis").appendChild(el("span", {}, result.hits.find((h) => h.timestamp === hi).time));
  for (const row of result.timeline) {
    const section = el("div", { class: "camera-row", "data-camera": row.camera });
    section.appendChild(el("h3", { title: row.camera }, row.camera + " - best " + row.best.toFixed(3) + " - " + row.hits.length + " hits"));
    const lane = el("div", { class: "lane" });
    // Drawn worst rank first, so the best markers are on top where they crowd.
    const ordered = row.hits.slice().sort((a, b) => rankOf.get(b.key) - rankOf.get(a.key));
    for (const h of ordered) {
      const r = rankOf.get(h.key);
      const marker = el("button", { type: "button",
        class: (r === 1 ? "marker top" : "marker") + (h.same_person ? " same-person" : ""),
        "data-key": h.key, "data-rank": r, title: "#" + r + " " + h.score.toFixed(3) + " " + h.time },
        r <= 99 ? r : "");
      marker.style.left = (1 + 98 * (h.timestamp - lo) / span) + "%";
      marker.addEventListener("click", () => {
        select(h.key);
        const fig = document.querySelector("#hits figure.hit[data-rank='" + r + "']");
        if (fig) fig.scrollIntoView({ block: "nearest" });
      });
      lane.appendChild(marker);
    }
    section.appendChild(lane);
    timeline.appendChild(section);
  }
}

function rerun() {
  if (state.lastKey) {
    const thumb = $("query-preview").src;
    return searchKey(state.lastKey, thumb);
  }
  if (state.file) return searchFile(state.file);
  return null;
}

async function login(event) {
  event.preventDefault();
  const form = new FormData();
  form.append("token", $("token").value);
  try {
    await getJSON("/api/login", { method: "POST", body: form });
  } catch (e) {
    status(e.message, true);
    return;
  }
  $("token").value = "";
  $("login").hidden = true;
  status("");
  await start();
}

async function logout() {
  await fetch("/api/logout", { method: "POST" });
  window.location.reload();
}

async function ingest(event) {
  event.preventDefault();
  const request = { detections: $("ingest-detections").value };
  request[$("ingest-kind").value] = [$("ingest-folder").value];
  const bar = $("ingest-progress"), text = $("ingest-status");
  let job;
  try {
    job = await getJSON("/api/ingest", { method: "POST", body: JSON.stringify(request),
      headers: { "Content-Type": "application/json" } });
  } catch (e) {
    text.textContent = e.message;
    return;
  }
  bar.hidden = false;
  for (;;) {
    bar.max = Math.max(1, job.total);
    bar.value = job.done;
    text.textContent = job.state + ": " + job.done + " / " + job.total + " crops, " + job.added + " added" +
      (job.error ? " - " + job.error : "");
    text.dataset.state = job.state;
    if (job.state === "done" || job.state === "failed") break;
    await new Promise((resolve) => setTimeout(resolve, 500));
    job = await getJSON("/api/ingest/" + encodeURIComponent(job.id));
  }
  if (job.state === "done") {
    $("cameras").replaceChildren(el("legend", {}, "Cameras"));
    $("gallery").replaceChildren();
    state.offset = 0;
    await loadInfo();
    await loadGallery();
  }
}

async function start() {
  try {
    await loadInfo();
  } catch (e) {
    if (e.status === 401) {
      $("login").hidden = false;
      $("token").focus();
      status("sign in with your access token");
      return;
    }
    status(e.message, true);
    return;
  }
  $("logout").hidden = !state.info.auth;
  $("ingest").hidden = !state.info.ingest;
  try {
    await loadGallery();
    document.body.setAttribute("data-ready", "1");
  } catch (e) {
    status(e.message, true);
  }
}

window.addEventListener("DOMContentLoaded", () => {
  $("image").addEventListener("change", (e) => { if (e.target.files.length) searchFile(e.target.files[0]); });
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); rerun(); });
  $("cameras").addEventListener("change", rerun);
  $("precision").addEventListener("change", precisionChanged);
  $("more").addEventListener("click", loadGallery);
  $("login").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  $("ingest").addEventListener("submit", ingest);
  return start();
});
