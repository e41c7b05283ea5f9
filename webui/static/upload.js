// Upload & classify: show the chosen image, post it (CSRF header), show the model's answer and
// the heatmap of where it looked.
"use strict";
(() => {
  const form = document.getElementById("upload-form");
  if (!form) return;
  const input = document.getElementById("upload-file");
  const zone = document.getElementById("drop-zone");
  const button = document.getElementById("upload-recognise");
  const message = document.getElementById("upload-message");
  const figure = document.getElementById("upload-figure");
  const image = document.getElementById("upload-image");
  const answerBox = document.getElementById("upload-answer");
  const maxBytes = Number(form.dataset.maxBytes) || 0;
  let chosen = null;
  let shownUrl = null;

  const showError = (text) => { message.textContent = text || ""; message.hidden = !text; };
  const status = document.getElementById("upload-status");
  const showStatus = (text) => { status.textContent = text || ""; status.hidden = !text; };
  const POLL_MS = 400;
  const POLL_LIMIT_MS = 10 * 60 * 1000;
  const isPicture = (file) => ["image/png", "image/jpeg"].includes(file.type)
    || /\.(png|jpe?g)$/i.test(file.name);

  function show(blob, name) {
    if (shownUrl) URL.revokeObjectURL(shownUrl);
    shownUrl = URL.createObjectURL(blob);
    image.src = shownUrl;
    document.getElementById("upload-name").textContent = name;
    figure.hidden = false;
  }

  async function post(url, file, extra) {
    const data = new FormData();
    data.append("file", file, file.name);
    for (const [key, value] of Object.entries(extra || {})) data.append(key, value);
    const answer = await fetch(url, {
      method: "POST", credentials: "same-origin", body: data,
      headers: {"X-CSRFToken": window.ainode.csrf(), "X-Requested-With": "fetch"},
    });
    if (!answer.ok) {
      let body = {};
      try { body = await answer.json(); } catch (_) { body = {}; }
      throw new Error(body.error || `The server answered ${answer.status}.`);
    }
    return answer;
  }

  async function choose(file) {
    showError("");
    answerBox.hidden = true;
    figure.hidden = true;
    setHeatmap(null);
    chosen = null;
    button.disabled = true;
    if (!file) return;
    if (file.size === 0) { showError("The file is empty."); return; }
    if (maxBytes && file.size > maxBytes) {
      showError(`The file is too large: at most ${form.dataset.maxSize} may be uploaded.`);
      return;
    }
    chosen = file;
    button.disabled = false;
    try {
      if (isPicture(file)) show(file, file.name);
      else show(await (await post(form.dataset.previewUrl, file)).blob(), file.name);
    } catch (error) {
      showError(error.message);
    }
  }

  // A worker classifies the file; its answer is polled here (bounded: a stuck job says so).
  async function answerOf(url) {
    const deadline = Date.now() + POLL_LIMIT_MS;
    while (Date.now() < deadline) {
      const answer = await fetch(url, {credentials: "same-origin", cache: "no-store"});
      const body = await answer.json();
      if (!answer.ok) throw new Error(body.error || `The server answered ${answer.status}.`);
      if (body.status === "done") return body;
      if (body.status === "failed") throw new Error(body.error);
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
    throw new Error("No answer yet: the node's workers are busy or stopped. Try again later.");
  }

  // The worker's Grad-CAM map of a one-slice upload, laid over the image (toggle, opacity).
  const heatmap = document.getElementById("upload-heatmap");
  const heatmapTools = document.getElementById("upload-heatmap-tools");
  const heatmapToggle = document.getElementById("upload-heatmap-toggle");
  const heatmapOpacity = document.getElementById("upload-heatmap-opacity");

  function showHeatmap() {
    heatmap.style.opacity = String(Number(heatmapOpacity.value) / 100);
    heatmap.hidden = !heatmap.dataset.src || !heatmapToggle.checked;
  }

  function setHeatmap(url) {
    heatmap.dataset.src = url || "";
    if (url) heatmap.src = url; else heatmap.removeAttribute("src");
    heatmapTools.hidden = !url;
    showHeatmap();
  }

  heatmapToggle.addEventListener("change", showHeatmap);
  heatmapOpacity.addEventListener("input", showHeatmap);

  function showAnswer(result) {
    setHeatmap(result.heatmap_url);
    const name = document.getElementById("upload-class");
    name.textContent = result.predicted_class;
    name.className = `class-${result.predicted_class}`;
    const model = result.model;
    document.getElementById("upload-model").textContent =
      `${model.name}:${model.version}${model.demo ? " — DEMO, not for clinical use" : ""}`
      + ` · ${result.slices} slice${result.slices === 1 ? "" : "s"} (${result.kind})`;
    const rows = document.querySelector("#upload-probabilities tbody");
    rows.replaceChildren();
    for (const cls of result.classes) {
      const p = result.probabilities[cls];
      const row = document.createElement("tr");
      const label = document.createElement("td");
      label.textContent = cls;
      label.className = `class-${cls}`;
      const value = document.createElement("td");
      value.textContent = `${(100 * p).toFixed(1)} %`;
      const barCell = document.createElement("td");
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.width = `${Math.round(100 * p)}%`;
      barCell.append(bar);
      row.append(label, value, barCell);
      rows.append(row);
    }
    document.getElementById("upload-kept").textContent =
      result.kept ? `Kept on the node as ${result.kept}.` : "Not stored on the node.";
    answerBox.hidden = false;
  }

  input.addEventListener("change", () => choose(input.files[0]));
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    choose(event.dataTransfer.files[0]);
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!chosen) return;
    showError("");
    button.disabled = true;
    try {
      const keep = document.getElementById("upload-keep").checked ? {keep: "1"} : {};
      const queued = await (await post(form.dataset.classifyUrl, chosen, keep)).json();
      showStatus(queued.notice || "Classifying…");
      showAnswer(await answerOf(queued.status_url));
    } catch (error) {
      showError(error.message);
    } finally {
      showStatus("");
      button.disabled = false;
    }
  });
})();
