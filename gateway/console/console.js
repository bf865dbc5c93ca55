// The operator console: sign in, the device list, a device's page. Hash routes (#/devices,
// #/devices/<id>); every call goes to the public API with the operator's token.

import { api, apiUrl, ApiError, describe, onUnauthorized, session } from "./api.js";
import { MetricChart } from "./charts.js";
import { EventStream } from "./stream.js";

const PAGE_SIZE = 50;
const RANGES = { "1h": "1 hour", "24h": "24 hours", "7d": "7 days", "30d": "30 days", custom: "Custom" };

// For people debugging and for the browser tests: what the charts draw, the stream's state.
const fieldgate = { charts: {}, stream: { state: "idle", events: 0, points: 0 } };
window.fieldgate = fieldgate;

const main = document.getElementById("main");
const notice = document.getElementById("notice");
let cleanups = [];
let signInMessage = "";

// --- small DOM helpers ---

function h(tag, attributes = {}, ...children) {
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

function showNotice(text, kind = "error") {
  notice.textContent = text;
  notice.className = `notice ${kind}`;
  notice.hidden = !text;
}

function clearNotice() {
  showNotice("");
}

// A message in place of what could not be loaded (never a blank chart), with a retry.
function failure(error, retry) {
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
function when(iso) {
  if (!iso) return h("span", { title: "never" }, "never");
  return h("time", { datetime: iso, title: iso }, ago(iso));
}

function count(value) {
  return typeof value === "number" ? value.toLocaleString("en") : "—";
}

function formatValue(value) {
  return typeof value === "number" ? String(Number(value.toPrecision(8))) : "—";
}

async function confirmAction(title, text, action) {
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
function showToken(device, token) {
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

// --- routing ---

function route() {
  for (const cleanup of cleanups.splice(0)) cleanup();
  fieldgate.charts = {};
  main.replaceChildren();
  const signedIn = Boolean(session.token);
  document.getElementById("nav").hidden = !signedIn;
  if (!signedIn) return signIn();
  const hash = location.hash.replace(/^#/, "");
  const match = hash.match(/^\/devices\/(.+)$/);
  if (match) return devicePage(decodeURIComponent(match[1]));
  return devicesPage();
}

window.addEventListener("hashchange", () => {
  clearNotice();
  route();
});

onUnauthorized((error) => {
  if (!session.token) return;
  session.clear();
  signInMessage = `Signed out: the gateway refused the token (401: ${error.message}). Sign in again.`;
  route();
});

document.getElementById("sign-out").addEventListener("click", () => {
  session.clear();
  signInMessage = "Signed out.";
  clearNotice();
  location.hash = "#/devices";
  route();
});

// --- sign in ---

function signIn() {
  const message = h("p", { id: "signin-message", class: "message", role: "alert" });
  if (signInMessage) {
    message.textContent = signInMessage;
    message.classList.add("error");
  }
  signInMessage = "";
  const input = h("input", {
    id: "signin-token",
    name: "token",
    type: "password",
    autocomplete: "off",
    required: true,
    "aria-describedby": "signin-help",
  });
  const form = h(
    "form",
    { id: "signin-form", class: "card" },
    h("label", { for: "signin-token" }, "Token"),
    input,
    h(
      "p",
      { id: "signin-help", class: "hint" },
      "An operator or admin token (fieldgate serve prints a generated admin token on first start). ",
      "It is kept in this tab's session storage until you sign out.",
    ),
    h("button", { type: "submit", id: "signin-submit" }, "Sign in"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = input.value.trim();
    if (!token) return;
    session.set(token);
    message.textContent = "Checking the token…";
    message.className = "message";
    try {
      await api("GET", "/devices", { query: { limit: 1 } });
    } catch (error) {
      if (error.status === 401) return; // onUnauthorized shows the sign-in again, with why
      session.clear();
      message.className = "message error";
      message.textContent =
        error.status === 403
          ? "This token may not read devices (a device token?): sign in with an operator or admin token."
          : describe(error);
      return;
    }
    if (!location.hash.startsWith("#/devices")) location.hash = "#/devices";
    route();
  });
  main.append(h("section", { class: "signin" }, h("h1", { text: "Sign in" }), form, message));
  input.focus();
}

// --- devices ---

const list = { q: "", cursors: [null] }; // kept while the console is open: back comes back here

function devicesPage() {
  const results = h("div", { id: "device-results", "aria-live": "polite" });
  const search = h("input", {
    id: "device-search",
    type: "search",
    name: "q",
    value: list.q,
    placeholder: "id or name",
    autocomplete: "off",
  });
  let timer = null;
  const searchNow = () => {
    clearTimeout(timer);
    if (search.value.trim() === list.q) return;
    list.q = search.value.trim();
    list.cursors = [null];
    load();
  };
  search.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(searchNow, 250);
  });
  cleanups.push(() => clearTimeout(timer));
  const searchForm = h(
    "form",
    { role: "search", class: "search", onsubmit: (e) => (e.preventDefault(), searchNow()) },
    h("label", { for: "device-search" }, "Search devices"),
    search,
    h("button", { type: "submit" }, "Search"),
  );
  const create = createDeviceForm(() => load());
  main.append(
    h("div", { class: "heading" }, h("h1", { text: "Devices" })),
    searchForm,
    results,
    create,
  );

  let controller = null;
  async function load() {
    if (controller) controller.abort();
    controller = new AbortController();
    const cursor = list.cursors[list.cursors.length - 1];
    results.setAttribute("aria-busy", "true");
    try {
      const page = await api("GET", "/devices", {
        query: { limit: PAGE_SIZE, cursor, q: list.q },
        signal: controller.signal,
      });
      results.replaceChildren(deviceTable(page.devices), pager(page.next_cursor));
    } catch (error) {
      if (error.name === "AbortError") return;
      results.replaceChildren(failure(error, load));
    } finally {
      results.removeAttribute("aria-busy");
    }
  }

  function pager(next) {
    const page = list.cursors.length;
    return h(
      "nav",
      { class: "pager", "aria-label": "Device pages" },
      h(
        "button",
        {
          type: "button",
          id: "page-previous",
          disabled: page === 1,
          onclick: () => (list.cursors.pop(), load()),
        },
        "Previous",
      ),
      h("span", { text: `Page ${page}` }),
      h(
        "button",
        { type: "button", id: "page-next", disabled: !next, onclick: () => (list.cursors.push(next), load()) },
        "Next",
      ),
    );
  }

  cleanups.push(() => controller && controller.abort());
  load();
}

function deviceTable(devices) {
  if (!devices.length) {
    return h("p", { class: "message" }, list.q ? `No device matches “${list.q}”.` : "No devices yet.");
  }
  const head = ["ID", "Name", "Enabled", "Last seen", "Readings (24 h)", "Rejected (24 h)"];
  const cell = (label, ...content) => h("td", { "data-label": label }, ...content);
  return h(
    "table",
    { class: "devices", id: "device-table" },
    h("caption", { class: "visually-hidden" }, "Devices"),
    h("thead", {}, h("tr", {}, head.map((label) => h("th", { scope: "col" }, label)))),
    h(
      "tbody",
      {},
      devices.map((d) =>
        h(
          "tr",
          { "data-device": d.id },
          cell(head[0], h("a", { href: `#/devices/${encodeURIComponent(d.id)}` }, d.id)),
          cell(head[1], d.name || "—"),
          cell(head[2], d.enabled ? "yes" : h("strong", {}, "no")),
          cell(head[3], when(d.last_seen)),
          cell(head[4], count(d.readings_24h)),
          cell(head[5], count(d.rejected_24h)),
        ),
      ),
    ),
  );
}

function createDeviceForm(created) {
  const message = h("p", { class: "message", role: "status" });
  const id = h("input", {
    id: "new-device-id",
    name: "id",
    required: true,
    maxlength: 64,
    pattern: "[A-Za-z0-9_.\\-]{1,64}",
    autocomplete: "off",
    "aria-describedby": "new-device-help",
  });
  const name = h("input", { id: "new-device-name", name: "name", maxlength: 200, autocomplete: "off" });
  const form = h(
    "form",
    { class: "card", id: "create-device" },
    h("h2", { text: "New device" }),
    h("p", { id: "new-device-help", class: "hint" }, "Admin token needed. ID: 1-64 of A-Z a-z 0-9 _ . -"),
    h("label", { for: "new-device-id" }, "Device ID"),
    id,
    h("label", { for: "new-device-name" }, "Name (optional)"),
    name,
    h("button", { type: "submit", id: "new-device-submit" }, "Create device"),
    message,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    message.textContent = "";
    message.className = "message";
    try {
      const device = await api("POST", "/devices", { body: { id: id.value, name: name.value } });
      form.reset();
      message.textContent = `Created ${device.id}.`;
      showToken(device.id, device.token);
      created();
    } catch (error) {
      message.className = "message error";
      message.textContent = describe(error);
    }
  });
  return form;
}

// --- one device ---

const view = { range: "24h", start: "", end: "" };

function devicePage(id) {
  const path = `/devices/${encodeURIComponent(id)}`;
  const header = h("div", { id: "device-header" }, h("p", { text: "Loading…" }));
  const latest = h("section", { id: "latest", "aria-labelledby": "latest-title" });
  const charts = h("section", { id: "charts", "aria-labelledby": "charts-title" });
  const rejected = h("section", { id: "rejected", "aria-labelledby": "rejected-title" });
  const live = h("p", { id: "live-state", class: "hint", "aria-live": "polite" });
  main.append(
    h("p", {}, h("a", { href: "#/devices" }, "← Devices")),
    header,
    latest,
    charts,
    rejected,
  );
  const controller = new AbortController();
  const signal = controller.signal;
  let stream = null;
  let device = null;
  let latestValues = {};
  cleanups.push(() => {
    controller.abort();
    if (stream) stream.close();
    destroyCharts();
  });

  function destroyCharts() {
    for (const chart of Object.values(fieldgate.charts)) chart.destroy();
    fieldgate.charts = {};
  }

  async function loadDevice() {
    try {
      device = await api("GET", path, { signal });
    } catch (error) {
      if (error.name !== "AbortError") header.replaceChildren(failure(error, () => route()));
      return;
    }
    renderHeader();
    loadLatest();
    renderCharts();
    loadRejected();
  }

  function renderHeader() {
    const rejections = device.rejected_24h;
    header.replaceChildren(
      h("h1", {}, device.id, device.name ? h("span", { class: "subtitle" }, ` ${device.name}`) : null),
      h(
        "dl",
        { class: "facts" },
        h("dt", {}, "Enabled"),
        h("dd", { id: "device-enabled" }, device.enabled ? "yes" : "no"),
        h("dt", {}, "Last seen"),
        h("dd", {}, when(device.last_seen)),
        h("dt", {}, "Readings"),
        h("dd", {}, `${count(device.readings)} stored, ${count(device.readings_24h)} in 24 h`),
        h("dt", {}, "Rejected (24 h)"),
        h("dd", {}, count(rejections)),
      ),
      adminActions(),
    );
  }

  function adminActions() {
    const message = h("p", { class: "message", id: "admin-message", role: "status" });
    const act = async (work) => {
      message.textContent = "";
      message.className = "message";
      try {
        await work();
      } catch (error) {
        message.className = "message error";
        message.textContent = describe(error);
      }
    };
    return h(
      "div",
      { class: "admin", role: "group", "aria-label": "Admin actions" },
      h(
        "button",
        {
          type: "button",
          id: "toggle-enabled",
          onclick: () =>
            act(async () => {
              device = await api("PATCH", path, { body: { enabled: !device.enabled } });
              renderHeader();
              showNotice(`${device.id} is ${device.enabled ? "enabled" : "disabled"}.`, "info");
            }),
        },
        device.enabled ? "Disable" : "Enable",
      ),
      h(
        "button",
        {
          type: "button",
          id: "rotate-token",
          onclick: () =>
            act(async () => {
              const sure = await confirmAction(
                `Rotate ${device.id}'s token?`,
                "Its current token stops working at once; the device needs the new one.",
                "Rotate token",
              );
              if (!sure) return;
              const answer = await api("POST", `${path}/token`);
              showToken(device.id, answer.token);
            }),
        },
        "Rotate token",
      ),
      h(
        "button",
        {
          type: "button",
          id: "delete-device",
          class: "danger",
          onclick: () =>
            act(async () => {
              const sure = await confirmAction(
                `Delete ${device.id}?`,
                "This deletes the device with its tokens and all its readings. It cannot be undone.",
                "Delete device",
              );
              if (!sure) return;
              await api("DELETE", path);
              location.hash = "#/devices";
              showNotice(`Deleted ${device.id}.`, "info");
            }),
        },
        "Delete",
      ),
      message,
    );
  }

  async function loadLatest() {
    try {
      const answer = await api("GET", `${path}/telemetry/latest`, { signal });
      latestValues = answer.values;
      renderLatest();
    } catch (error) {
      if (error.name === "AbortError") return;
      latest.replaceChildren(h("h2", { id: "latest-title" }, "Latest values"), failure(error, loadLatest));
    }
  }

  function renderLatest() {
    const names = Object.keys(latestValues).sort();
    latest.replaceChildren(
      h("h2", { id: "latest-title" }, "Latest values"),
      names.length
        ? h(
            "table",
            { class: "latest", id: "latest-table" },
            h("thead", {}, h("tr", {}, ["Metric", "Value", "At"].map((t) => h("th", { scope: "col" }, t)))),
            h(
              "tbody",
              {},
              names.map((metric) => {
                const v = latestValues[metric];
                return h(
                  "tr",
                  { "data-metric": metric },
                  h("td", { "data-label": "Metric" }, metric),
                  h("td", { "data-label": "Value" }, `${formatValue(v.value)}${v.unit ? " " + v.unit : ""}`),
                  h("td", { "data-label": "At" }, when(v.ts)),
                );
              }),
            ),
          )
        : h("p", { class: "message" }, "No readings yet."),
    );
  }

  function rangeControls() {
    const select = h(
      "select",
      { id: "range", name: "range" },
      Object.entries(RANGES).map(([value, label]) => h("option", { value, selected: value === view.range }, label)),
    );
    const start = h("input", { id: "range-start", type: "datetime-local", value: view.start, step: 1 });
    const end = h("input", { id: "range-end", type: "datetime-local", value: view.end, step: 1 });
    const custom = h(
      "div",
      { class: "custom", hidden: view.range !== "custom" },
      h("label", { for: "range-start" }, "Start"),
      start,
      h("label", { for: "range-end" }, "End"),
      end,
      h("button", { type: "submit" }, "Show"),
    );
    const form = h(
      "form",
      { class: "range", id: "range-form" },
      h("label", { for: "range" }, "Range"),
      select,
      custom,
    );
    select.addEventListener("change", () => {
      view.range = select.value;
      custom.hidden = view.range !== "custom";
      if (view.range !== "custom") renderCharts();
    });
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      view.start = start.value;
      view.end = end.value;
      renderCharts();
    });
    return form;
  }

  function rangeQuery() {
    if (view.range !== "custom") return { start: `-${view.range}` };
    const iso = (local) => (local ? new Date(local).toISOString() : undefined);
    return { start: iso(view.start), end: iso(view.end) };
  }

  async function renderCharts() {
    destroyCharts();
    if (stream) {
      stream.close();
      stream = null;
    }
    const metrics = Object.keys(device.metrics || {}).sort();
    const body = h("div", { class: "chart-list", "aria-busy": "true" });
    const summary = h("p", { class: "hint", id: "window-summary" });
    charts.replaceChildren(
      h("h2", { id: "charts-title" }, "History"),
      rangeControls(),
      summary,
      live,
      body,
    );
    if (!metrics.length) {
      body.replaceChildren(h("p", { class: "message" }, "No readings yet: nothing to chart."));
      body.removeAttribute("aria-busy");
      startStream(null);
      return;
    }
    const waiting = [];
    const isLive = view.range !== "custom";
    if (isLive) startStream(waiting);
    let answer;
    try {
      answer = await api("GET", `${path}/telemetry/aggregate`, {
        query: { metric: metrics, window: "auto", agg: "avg,min,max", ...rangeQuery() },
        signal,
      });
    } catch (error) {
      if (error.name === "AbortError") return;
      pendingLive = null;
      body.replaceChildren(failure(error, renderCharts));
      body.removeAttribute("aria-busy");
      return;
    }
    const series = answer.series || [{ metric: answer.metric, unit: answer.unit, buckets: answer.buckets }];
    summary.textContent =
      `${answer.start} to ${answer.end}, windows of ${answer.window}` + (isLive ? "" : " (not live: a custom range)");
    body.replaceChildren();
    const startMs = Date.parse(answer.start);
    for (const s of series) {
      const plot = h("div", { class: "plot", id: `chart-${s.metric}`, role: "img", "aria-label": `${s.metric} chart` });
      const figure = h(
        "figure",
        { class: "chart", "data-metric": s.metric },
        h("figcaption", {}, h("h3", {}, s.metric, s.unit ? ` (${s.unit})` : "")),
        plot,
      );
      body.append(figure);
      if (!s.buckets.length) figure.append(h("p", { class: "message" }, "No readings in this range."));
      fieldgate.charts[s.metric] = new MetricChart(plot, {
        metric: s.metric,
        unit: s.unit,
        buckets: s.buckets,
        window: answer.window,
        startMs,
      });
    }
    body.removeAttribute("aria-busy");
    // What the stream brought while history loaded: only what the history could not hold.
    const endMs = Date.parse(answer.end);
    pendingLive = null;
    for (const point of waiting) if (Date.parse(point.ts) >= endMs) applyPoint(point);
  }

  let pendingLive = null;

  function applyPoint(point) {
    const chart = fieldgate.charts[point.metric];
    if (chart) chart.add(Date.parse(point.ts), point.value);
  }

  function onReadings(message) {
    const points = message.points || [];
    fieldgate.stream.points += points.length;
    for (const point of points) {
      const known = latestValues[point.metric];
      if (!known || Date.parse(known.ts) <= Date.parse(point.ts)) {
        latestValues[point.metric] = { ts: point.ts, value: point.value, unit: known ? known.unit : null };
      }
      if (pendingLive) pendingLive.push(point);
      else applyPoint(point);
    }
    if (points.length) {
      renderLatest();
      const newMetric = points.some((p) => !(p.metric in (device.metrics || {})));
      if (newMetric && !pendingLive) {
        for (const p of points) device.metrics[p.metric] = device.metrics[p.metric] || {};
        renderCharts();
      }
    }
  }

  function startStream(waiting) {
    pendingLive = waiting;
    if (view.range === "custom") return;
    const url = apiUrl(`${path}/telemetry/stream`);
    stream = new EventStream(url, {
      onEvent: (event) => {
        fieldgate.stream.events += 1;
        if (event.type === "readings") {
          try {
            onReadings(JSON.parse(event.data));
          } catch (error) {
            console.error("a stream event that is not readings JSON", error);
          }
        } else if (event.type === "reset") {
          // The server no longer holds what we missed: reload the history.
          renderCharts();
          loadLatest();
        }
      },
      onState: (state, error) => {
        fieldgate.stream.state = state;
        const text = {
          connecting: "Live: connecting…",
          open: "Live: new readings appear as they are stored.",
          retrying: "Live: reconnecting…" + (error ? ` (${error instanceof ApiError ? describe(error) : "connection lost"})` : ""),
          failed: error && error.status === 404
            ? "Live updates are not available on this gateway."
            : `Live updates stopped: ${error ? describe(error) : ""}`,
          closed: "",
        }[state];
        live.textContent = text || "";
      },
    }).start();
  }

  async function loadRejected(cursor = null, rows = []) {
    const title = h("h2", { id: "rejected-title" }, "Rejected messages");
    try {
      const answer = await api("GET", "/rejected", { query: { device: id, limit: 20, cursor }, signal });
      rows = rows.concat(answer.rejected);
      const table = rows.length
        ? h(
            "table",
            { class: "rejected", id: "rejected-table" },
            h(
              "thead",
              {},
              h("tr", {}, ["Received", "Transport", "Reason", "Message"].map((t) => h("th", { scope: "col" }, t))),
            ),
            h(
              "tbody",
              {},
              rows.map((r) =>
                h(
                  "tr",
                  {},
                  h("td", { "data-label": "Received" }, when(r.received_at)),
                  h("td", { "data-label": "Transport" }, r.transport),
                  h("td", { "data-label": "Reason" }, h("code", {}, r.reason)),
                  h("td", { "data-label": "Message", title: r.payload }, r.message),
                ),
              ),
            ),
          )
        : h("p", { class: "message" }, "No rejected messages.");
      const more = answer.next_cursor
        ? h("button", { type: "button", onclick: () => loadRejected(answer.next_cursor, rows) }, "Show more")
        : null;
      rejected.replaceChildren(...[title, table, more].filter(Boolean));
    } catch (error) {
      if (error.name === "AbortError") return;
      rejected.replaceChildren(title, failure(error, () => loadRejected()));
    }
  }

  loadDevice();
}

route();
