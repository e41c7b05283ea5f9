// Shared helpers: the CSRF token for fetch() calls.
"use strict";
window.ainode = {
  csrf: () => document.querySelector('meta[name="csrf-token"]').content,
  post: (url, data) => fetch(url, {
    method: "POST", credentials: "same-origin",
    headers: {"X-CSRFToken": window.ainode.csrf(), "Content-Type": "application/json"},
    body: JSON.stringify(data || {}),
  }),
};
