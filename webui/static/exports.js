// Exports page: preview counts, start an export, poll the jobs until none runs.
"use strict";
(() => {
  const form = document.getElementById("export-form");
  if (!form) return;
  const message = document.getElementById("export-message");
  const previewBox = document.getElementById("export-preview-result");
  const jobsBody = document.querySelector("#export-jobs tbody");
  const POLL_MS = 2000;
  let polling = null;

  const el = (tag, text, className) => {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  };

  function selection() {
    const checked = (name) => Array.from(form.querySelectorAll(`input[name="${name}"]:checked`))
      .map((box) => box.value);
    const more = form.elements.more_keywords.value.split(",").map((k) => k.trim())
      .filter((k) => k);
    return {
      keywords: checked("keywords").concat(more),
      classes: checked("classes"),
      since: form.elements.since.value || null,
      until: form.elements.until.value || null,
    };
  }

  function showError(text) {
    message.textContent = text || "";
    message.hidden = !text;
  }

  async function send(url, data) {
    const answer = await window.ainode.post(url, data);
    let body = {};
    try { body = await answer.json(); } catch (_) { body = {}; }
    if (!answer.ok) throw new Error(body.error || `The server answered ${answer.status}.`);
    return body;
  }

  function showPreview(counts) {
    const rows = previewBox.querySelector("tbody");
    rows.replaceChildren();
    for (const name of Object.keys(counts.studies)) {
      const row = el("tr");
      row.append(el("td", name, `class-${name}`), el("td", counts.studies[name]),
        el("td", counts.patients[name]), el("td", counts.instances[name]));
      rows.append(row);
    }
    const total = el("tr", null, "total");
    total.append(el("td", "All"), el("td", counts.exported), el("td", counts.patients_total),
      el("td", Object.values(counts.instances).reduce((a, b) => a + b, 0)));
    rows.append(total);
    const skipped = Object.entries(counts.not_exported)
      .map(([reason, n]) => `${n} × ${reason}`).join(", ");
    previewBox.querySelector(".not-exported").textContent =
      `${counts.selected} studies selected` + (skipped ? `; not exported: ${skipped}.` : ".");
    previewBox.hidden = false;
  }

  function selectionText(p) {
    let text = p.selection && p.selection.length ? p.selection.join(", ") : "all labelled studies";
    if (p.since || p.until) text += ` · ${p.since || "…"} – ${p.until || "…"}`;
    return text;
  }

  function countsText(counts) {
    if (!counts || !counts.studies) return "";
    const parts = Object.entries(counts.studies)
      .map(([name, n]) => `${name} ${n} (${counts.images[name]} images)`);
    return `${parts.join(", ")} · ${counts.patients} patients`;
  }

  function jobRow(job) {
    const row = el("tr");
    row.dataset.status = job.status;
    const status = el("td", null, `status-${job.status}`);
    if (job.status === "running" || job.status === "queued") {
      const bar = el("progress");
      bar.max = Math.max(job.total, 1);
      bar.value = job.done;
      status.append(el("span", `${job.status} ${job.done}/${job.total} `), bar);
    } else {
      status.append(el("span", job.status));
    }
    if (job.error) status.append(el("br"), el("span", job.error, "error-message"));
    const link = el("td");
    if (job.download) {
      const a = el("a", "Download");
      a.href = job.download;
      link.append(a);
    }
    row.append(el("td", job.id), el("td", job.requested_by), el("td", job.created_at),
      el("td", selectionText(job.parameters)), status, el("td", countsText(job.counts)), link);
    return row;
  }

  async function refreshJobs() {
    const answer = await fetch(form.dataset.jobsUrl, {credentials: "same-origin"});
    if (!answer.ok) return;
    const {jobs} = await answer.json();
    jobsBody.replaceChildren(...jobs.map(jobRow));
    const active = jobs.some((job) => job.status === "queued" || job.status === "running");
    if (active && polling === null) polling = setInterval(refreshJobs, POLL_MS);
    if (!active && polling !== null) { clearInterval(polling); polling = null; }
  }

  document.getElementById("export-preview").addEventListener("click", async () => {
    showError("");
    try { showPreview((await send(form.dataset.previewUrl, selection())).counts); }
    catch (error) { showError(error.message); }
  });

  document.getElementById("export-start").addEventListener("click", async (event) => {
    showError("");
    event.target.disabled = true;
    try {
      const started = await send(form.dataset.startUrl, selection());
      if (started.notice) showError(started.notice);  // queued; the queue is unreachable now
      await refreshJobs();
    }
    catch (error) { showError(error.message); }
    finally { event.target.disabled = false; }
  });

  if (jobsBody.querySelector('tr[data-status="queued"], tr[data-status="running"]')) {
    polling = setInterval(refreshJobs, POLL_MS);
  }
})();
