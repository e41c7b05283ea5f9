// Worklist: refresh statuses, predictions and labels every 5 s in place; row selection
// for bulk tagging. Text is always set with textContent, never as HTML.
"use strict";
(() => {
  const POLL_MS = 5000;
  const table = document.getElementById("worklist");
  const bulk = document.getElementById("bulk");
  const notice = document.getElementById("worklist-notice");

  function say(text) {
    notice.textContent = text;
    notice.hidden = !text;
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function updateStatus(cell, row) {
    const span = cell.querySelector("span.status");
    if (span.textContent === row.status) return false;
    span.textContent = row.status;
    span.className = "status status-" + row.status;
    span.title = row.status_reason || "";
    return true;
  }

  function updatePrediction(tr, row) {
    const cell = tr.querySelector("td.prediction");
    const probability = tr.querySelector("td.probability");
    const shown = row.probability === null ? "" : (row.probability * 100).toFixed(1) + "%";
    const key = [row.class, row.model, shown, row.outside_experience].join("|");
    if (cell.dataset.key === key) return false;
    cell.dataset.key = key;
    cell.replaceChildren();
    if (row.class) {
      cell.append(element("span", "class-" + row.class, row.class));
      if (row.outside_experience) {
        const mark = element("span", "ood", "outside the model's experience");
        mark.title = "Unlike the images the model was trained on: read this study without "
          + "relying on the AI answer (the study page says why)";
        cell.append(" ", mark);
      }
      const model = element("div", "model muted", row.model.replace(/ DEMO$/, ""));
      if (row.model.endsWith(" DEMO")) model.append(" ", element("span", "demo", "DEMO"));
      cell.append(model);
    }
    probability.textContent = shown;
    return true;
  }

  function updateLabels(cell, labels, classes) {
    const now = Array.from(cell.querySelectorAll(".tag"), (tag) => tag.textContent);
    if (now.join("\u001f") === labels.join("\u001f")) return false;
    cell.replaceChildren(...labels.map((keyword) => {
      const mapped = classes[keyword];
      const tag = element("span", mapped ? "tag tag-" + mapped : "tag", keyword);
      if (mapped) tag.title = "training: " + mapped;
      return tag;
    }));
    return true;
  }

  function flash(cell) {
    cell.classList.remove("changed");
    void cell.offsetWidth;  // restart the animation
    cell.classList.add("changed");
  }

  function apply(data) {
    const seen = new Set();
    let arrived = 0;
    for (const row of data.rows) {
      const tr = table.querySelector(`tr[data-study-id="${row.id}"]`);
      if (!tr) { arrived += 1; continue; }
      seen.add(String(row.id));
      tr.classList.remove("stale");
      const status = tr.querySelector("td.status");
      if (updateStatus(status, row)) flash(status);
      if (updatePrediction(tr, row)) flash(tr.querySelector("td.prediction"));
      const labels = tr.querySelector("td.labels");
      if (updateLabels(labels, row.labels, data.keyword_classes)) flash(labels);
    }
    let gone = 0;
    for (const tr of table.querySelectorAll("tbody tr")) {
      if (!seen.has(tr.dataset.studyId)) { tr.classList.add("stale"); gone += 1; }
    }
    say(arrived || gone
      ? `The worklist has changed (${arrived} new here, ${gone} moved away); reload to see it.`
      : "");
  }

  async function poll() {
    if (!document.hidden) {
      let answer;
      try {
        answer = await fetch(table.dataset.poll, {
          credentials: "same-origin", headers: {Accept: "application/json"},
        });
      } catch (error) {
        say("The node is not answering; retrying.");
        setTimeout(poll, POLL_MS);
        return;
      }
      const type = answer.headers.get("Content-Type") || "";
      if (!answer.ok || answer.redirected || !type.startsWith("application/json")) {
        say("Live refresh stopped (signed out?); reload the page.");
        return;
      }
      apply(await answer.json());
    }
    setTimeout(poll, POLL_MS);
  }

  function selection() {
    const boxes = Array.from(document.querySelectorAll("input.select-study"));
    const picked = boxes.filter((box) => box.checked);
    for (const box of boxes) box.closest("tr").classList.toggle("selected", box.checked);
    document.getElementById("selected-count").textContent = `${picked.length} selected`;
    for (const button of bulk.querySelectorAll("button")) button.disabled = !picked.length;
    const all = document.getElementById("select-all");
    if (all) {
      all.checked = picked.length > 0 && picked.length === boxes.length;
      all.indeterminate = picked.length > 0 && picked.length < boxes.length;
    }
  }

  document.addEventListener("change", (event) => {
    if (event.target.id === "select-all") {
      for (const box of document.querySelectorAll("input.select-study")) {
        box.checked = event.target.checked;
      }
    }
    if (event.target.matches("#select-all, input.select-study")) selection();
  });
  if (bulk) selection();
  if (table) setTimeout(poll, POLL_MS);
})();
