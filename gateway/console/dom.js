// Small DOM pieces the pages share: element building, times and counts as people read them,
// messages, and the two dialogs (a confirmation, a token shown once).

import { describe } from "./api.js";

export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) element.addEventListener(key.slice(2), value);
    else if (key === "text") element.textContent = value;
    else if (key === "class") element.className = value;
    else element.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

export function showNotice(text, kind = "error") {
  const notice = document.getElementById("notice");
  notice.textContent = text;
  notice.className = `notice ${kind}`;
  notice.hidden = !text;
}

export function clearNotice() {
  showNotice("");
}

// A message in place of what could not be loaded (never a blank chart), with a retry.
export function failure(error, retry) {
  return h(
    "div",
    { class: "message error", role: "alert" },
    h("p", { text: describe(error) }),
    retry ? h("button", { type: "button", onclick: retry }, "Try again") : null,
  );
}

const relative = new Intl.RelativeTimeFormat("en", { numeric: "auto" });

function ago(iso) {
  const seconds = Math.round((Date.parse(iso) - Date.now()) / 1000);
  const steps = [
    [60, "second"],
    [60, "minute"],
    [24, "hour"],
    [30, "day"],
    [12, "month"],
    [Infinity, "year"],
  ];
  let value = seconds;
  for (const [size, unit] of steps) {
    if (Math.abs(value) < size) return relative.format(Math.round(value), unit);
    value /= size;
  }
  return iso;
}

// Relative, with the exact time (UTC, as the API gives it) in a tooltip.
export function when(iso) {
  if (!iso) return h("span", { title: "never" }, "never");
  return h("time", { datetime: iso, title: iso }, ago(iso));
}

export function count(value) {
  return typeof value === "number" ? value.toLocaleString("en") : "—";
}

export function formatValue(value) {
  return typeof value === "number" ? String(Number(value.toPrecision(8))) : "—";
}

export async function confirmAction(title, text, action) {
  const dialog = document.getElementById("confirm-dialog");
  document.getElementById("confirm-title").textContent = title;
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-ok").textContent = action;
  dialog.returnValue = "";
  dialog.showModal();
  document.getElementById("confirm-cancel").focus();
  await new Promise((resolve) => dialog.addEventListener("close", resolve, { once: true }));
  return dialog.returnValue === "ok";
}

// A token shown once: cleared from the page when the dialog closes.
export function showToken(device, token) {
  const dialog = document.getElementById("token-dialog");
  const input = document.getElementById("token-value");
  const copied = document.getElementById("token-copied");
  document.getElementById("token-device").textContent = device;
  input.value = token;
  copied.textContent = "";
  dialog.addEventListener(
    "close",
    () => {
      input.value = "";
      copied.textContent = "";
    },
    { once: true },
  );
  dialog.showModal();
  input.focus();
  input.select();
}

document.getElementById("token-copy").addEventListener("click", async () => {
  const input = document.getElementById("token-value");
  const copied = document.getElementById("token-copied");
  try {
    await navigator.clipboard.writeText(input.value);
    copied.textContent = "Copied.";
  } catch {
    input.select();
    copied.textContent = "Select the token and copy it (Ctrl+C).";
  }
});
