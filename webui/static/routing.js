// Routing rules editor: the ↑/↓ buttons move a rule within its list and renumber the order.
"use strict";
document.querySelectorAll("table.rules").forEach((table) => {
  const renumber = () => {
    table.querySelectorAll("tbody tr.rule").forEach((row, index) => {
      row.querySelector("input.position").value = index + 1;
    });
  };
  table.addEventListener("click", (event) => {
    const button = event.target.closest("button.move");
    if (!button) return;
    const row = button.closest("tr");
    if (button.dataset.move === "-1" && row.previousElementSibling) {
      row.parentNode.insertBefore(row, row.previousElementSibling);
    } else if (button.dataset.move === "1" && row.nextElementSibling) {
      row.parentNode.insertBefore(row.nextElementSibling, row);
    }
    renumber();
  });
});
