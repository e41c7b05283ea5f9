// Study viewer: wheel/keyboard slice navigation with preloading, window presets and custom
// C/W, the per-slice probability strip (click to jump), the key slices (jump to them) and their
// Grad-CAM overlay (toggle, opacity). Slices and overlays are rendered server-side.
"use strict";
(() => {
  const data = JSON.parse(document.getElementById("viewer-data").textContent);
  const image = document.getElementById("slice-image");
  if (!image || data.count < 1) return;
  const viewport = document.getElementById("viewport");
  const range = document.getElementById("slice-range");
  const indexLabel = document.getElementById("slice-index");
  const errorBox = document.getElementById("viewer-error");
  const preset = document.getElementById("window-preset");
  const customBox = document.getElementById("custom-window");
  const centerInput = document.getElementById("window-center");
  const widthInput = document.getElementById("window-width");
  const strip = document.getElementById("strip");
  const HU_LIMIT = 32768;
  const PRELOAD = 3;
  const preloaded = new Map();
  let current = 0;
  let windowQuery = "window=lung";

  const urlFor = (n) => `${data.url}/${n}.png?${windowQuery}&v=${encodeURIComponent(data.version)}`;

  function preload(n) {
    for (let d = 1; d <= PRELOAD; d += 1) {
      for (const k of [n + d, n - d]) {
        if (k < 0 || k >= data.count) continue;
        const url = urlFor(k);
        if (preloaded.has(url)) continue;
        const img = new Image();
        img.src = url;
        preloaded.set(url, img);
      }
    }
    if (preloaded.size > 64) {  // keep memory bounded on long series
      for (const key of [...preloaded.keys()].slice(0, preloaded.size - 64)) preloaded.delete(key);
    }
  }

  // ------------------------------------------------- key slices and the Grad-CAM overlay
  const keys = new Map((data.key_slices || []).map((key) => [key.n, key]));
  const heatmap = document.getElementById("heatmap-image");
  const heatmapToggle = document.getElementById("heatmap-toggle");
  const heatmapOpacity = document.getElementById("heatmap-opacity");
  const heatmapNote = document.getElementById("heatmap-note");
  const keyButtons = [...document.querySelectorAll(".key-slice")];

  function showHeatmap() {
    if (!heatmap) return;
    const key = keys.get(current);
    const wanted = Boolean(key && key.heatmap && heatmapToggle.checked);
    if (wanted) {
      const url = `${data.heatmap_url}/${current}.png?v=${encodeURIComponent(data.version)}`;
      if (heatmap.dataset.src !== url) { heatmap.src = url; heatmap.dataset.src = url; }
      heatmap.style.opacity = String(Number(heatmapOpacity.value) / 100);
    }
    heatmap.hidden = !wanted;
    heatmapNote.textContent = key
      ? `Key slice #${key.rank}${key.heatmap ? "" : " (no heatmap)"}`
      : "No heatmap on this slice: only key slices have one.";
    for (const button of keyButtons) {
      button.classList.toggle("current", Number(button.dataset.n) === current);
    }
  }

  if (heatmap) {
    heatmapToggle.addEventListener("change", showHeatmap);
    heatmapOpacity.addEventListener("input", showHeatmap);
    for (const button of keyButtons) {
      button.addEventListener("click", () => show(Number(button.dataset.n)));
    }
  }

  function show(n) {
    current = Math.max(0, Math.min(data.count - 1, n));
    image.src = urlFor(current);
    showHeatmap();
    image.alt = `Slice ${current + 1} of ${data.count}`;
    indexLabel.textContent = `Slice ${current + 1} / ${data.count}`;
    range.value = String(current + 1);
    drawStrip();
    preload(current);
  }

  async function explainError() {
    // The image failed: fetch it to show the server's reason (error page text).
    try {
      const answer = await fetch(urlFor(current), {credentials: "same-origin"});
      if (answer.ok) return;
      const page = new DOMParser().parseFromString(await answer.text(), "text/html");
      const message = page.querySelector(".error-message");
      errorBox.textContent = message ? message.textContent : `Error ${answer.status}`;
    } catch (err) {
      errorBox.textContent = `The slice could not be loaded (${err.message}).`;
    }
    errorBox.hidden = false;
  }

  image.addEventListener("load", () => { errorBox.hidden = true; });
  image.addEventListener("error", explainError);

  viewport.addEventListener("wheel", (event) => {
    event.preventDefault();
    if (event.deltaY !== 0) show(current + Math.sign(event.deltaY));
  }, {passive: false});

  const STEPS = {ArrowUp: -1, ArrowDown: 1, PageUp: -10, PageDown: 10};
  document.addEventListener("keydown", (event) => {
    const target = event.target;
    if (target.closest && target.closest("input, textarea, select")) return;
    if (event.key in STEPS) show(current + STEPS[event.key]);
    else if (event.key === "Home") show(0);
    else if (event.key === "End") show(data.count - 1);
    else return;
    event.preventDefault();
  });

  range.addEventListener("input", () => show(Number(range.value) - 1));

  function applyWindow() {
    if (preset.value !== "custom") {
      windowQuery = `window=${encodeURIComponent(preset.value)}`;
    } else {
      const center = Number(centerInput.value);
      const width = Number(widthInput.value);
      if (centerInput.value === "" || !Number.isFinite(center) || Math.abs(center) > HU_LIMIT) {
        errorBox.textContent = `Center must be a number between -${HU_LIMIT} and ${HU_LIMIT} HU.`;
        errorBox.hidden = false;
        return;
      }
      if (widthInput.value === "" || !Number.isFinite(width) || width <= 0 || width > 2 * HU_LIMIT) {
        errorBox.textContent = `Width must be greater than 0 and at most ${2 * HU_LIMIT} HU.`;
        errorBox.hidden = false;
        return;
      }
      windowQuery = `window=custom&center=${center}&width=${width}`;
    }
    preloaded.clear();
    show(current);
  }

  preset.addEventListener("change", () => {
    customBox.hidden = preset.value !== "custom";
    if (preset.value !== "custom") applyWindow();
  });
  document.getElementById("window-apply").addEventListener("click", applyWindow);
  for (const input of [centerInput, widthInput]) {
    input.addEventListener("keydown", (event) => { if (event.key === "Enter") applyWindow(); });
  }

  // --------------------------------------------------------------- probability strip
  const styles = getComputedStyle(document.documentElement);
  const colours = [styles.getPropertyValue("--covid").trim() || "#ff6b6b",
                   styles.getPropertyValue("--pneumonia").trim() || "#ffb547"];

  function drawStrip() {
    if (!strip) return;
    const width = strip.clientWidth || strip.width;
    if (strip.width !== width) strip.width = width;
    const ctx = strip.getContext("2d");
    const cell = strip.width / data.count;
    const row = strip.height / 2;
    ctx.clearRect(0, 0, strip.width, strip.height);
    data.strip.forEach((values, n) => {
      if (!values) return;
      values.forEach((p, k) => {
        ctx.globalAlpha = Math.max(0.08, Math.min(1, p));
        ctx.fillStyle = colours[k];
        ctx.fillRect(n * cell, k * row, Math.max(1, cell), row - 1);
      });
    });
    ctx.globalAlpha = 1;
    ctx.fillStyle = "#ffffff";
    for (const n of keys.keys()) ctx.fillRect(n * cell + Math.max(0, cell / 2 - 1), strip.height - 5, 2, 5);
    ctx.strokeStyle = "#ffffff";
    ctx.lineWidth = 2;
    ctx.strokeRect(current * cell + 1, 1, Math.max(2, cell - 2), strip.height - 2);
  }

  if (strip) {
    strip.addEventListener("click", (event) => {
      const box = strip.getBoundingClientRect();
      show(Math.floor(((event.clientX - box.left) / box.width) * data.count));
    });
    window.addEventListener("resize", drawStrip);
  }
  show(0);
})();
