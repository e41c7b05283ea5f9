// Queue dashboard: refresh the counts, ages and workers every 5 s in place (no reload), say
// when the lists below changed, and ask before a destructive action (forms with
// data-confirm). Text is always set with textContent, never as HTML.
"use strict";
(() => {
  const POLL_MS = 5000;
  const notice = document.getElementById("dashboard-notice");
  const updated = document.getElementById("dashboard-updated");
  const workersBody = document.getElementById("workers-body");

  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }

  function set(id, text) {
    const cell = document.getElementById(id);
    if (!cell || cell.textContent === text) return;
    cell.textContent = text;
    cell.classList.remove("changed");
    void cell.offsetWidth;  // restart the animation
    cell.classList.add("changed");
  }

  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }

  function showWorkers(workers) {
    const rows = workers.map((worker) => {
      const tr = document.createElement("tr");
      tr.dataset.worker = worker.name;
      if (worker.stale) tr.className = "stale";
      const heartbeat = cell(worker.silent_for + " ago", "heartbeat");
      if (worker.stale) {
        const tag = document.createElement("span");
        tag.className = "tag stale-tag";
        tag.textContent = "stale";
        heartbeat.append(" ", tag);
      }
      tr.append(cell(worker.name), cell(worker.host), cell(worker.queues),
                cell(worker.model || "—"), heartbeat);
      return tr;
    });
    if (!rows.length) {
      const tr = document.createElement("tr");
      tr.className = "none";
      const td = cell("No worker has reported yet.", "muted");
      td.colSpan = 5;
      tr.append(td);
      rows.push(tr);
    }
    workersBody.replaceChildren(...rows);
  }

  function listsChanged(lists) {
    return Object.entries(lists).some(([name, size]) => {
      const section = document.getElementById(name);
      return section && Number(section.dataset.rows) !== Math.min(size, 100);
    });
  }

  function apply(data) {
    for (const row of data.statuses) {
      set("count-" + row.status, String(row.count));
      set("age-" + row.status, row.oldest_age);
    }
    showWorkers(data.workers);
    updated.textContent = data.now.replace("T", " ").replace(/\.\d+/, "").replace("+00:00", " UTC");
    const changed = listsChanged(data.lists);
    notice.textContent = changed ? "The lists below changed: reload the page to see them." : "";
    notice.hidden = !changed;
  }

  async function poll() {
    try {
      const answer = await fetch("/dashboard.json", {credentials: "same-origin"});
      if (answer.ok) apply(await answer.json());
    } catch (error) {
      // the node is restarting or the network dropped: the next poll tries again
    }
    window.setTimeout(poll, POLL_MS);
  }

  window.setTimeout(poll, POLL_MS);
})();
