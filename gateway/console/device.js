// One device's page: its facts and admin actions, the latest value per metric, a chart per
// metric of aggregated windows (range pickers, `auto` window) with the live stream folded in,
// and its rejected messages.

import { api, apiUrl, ApiError, describe } from "./api.js";
import { MetricChart } from "./charts.js";
import { confirmAction, count, failure, formatValue, h, showNotice, showToken, when } from "./dom.js";
import { EventStream } from "./stream.js";

const RANGES = { "1h": "1 hour", "24h": "24 hours", "7d": "7 days", "30d": "30 days", custom: "Custom" };
// The range chosen, kept while the console is open (the next device opens on it too).
const view = { range: "24h", start: "", end: "" };

export class DevicePage {
  // `shared`: window.fieldgate, where the charts and the stream's state are shown to tests.
  constructor(main, id, shared) {
    this.id = id;
    this.path = `/devices/${encodeURIComponent(id)}`;
    this.shared = shared;
    this.controller = new AbortController();
    this.stream = null;
    this.device = null;
    this.latestValues = {};
    this.pendingLive = null; // stream points that came while the history loaded
    this.header = h("div", { id: "device-header" }, h("p", { text: "Loading…" }));
    this.latest = h("section", { id: "latest", "aria-labelledby": "latest-title" });
    this.charts = h("section", { id: "charts", "aria-labelledby": "charts-title" });
    this.rejected = h("section", { id: "rejected", "aria-labelledby": "rejected-title" });
    this.live = h("p", { id: "live-state", class: "hint", "aria-live": "polite" });
    main.append(
      h("p", {}, h("a", { href: "#/devices" }, "← Devices")),
      this.header,
      this.latest,
      this.charts,
      this.rejected,
    );
  }

  get signal() {
    return this.controller.signal;
  }

  async load() {
    try {
      this.device = await api("GET", this.path, { signal: this.signal });
    } catch (error) {
      if (error.name !== "AbortError") this.header.replaceChildren(failure(error, () => this.load()));
      return;
    }
    this.renderHeader();
    this.loadLatest();
    this.renderCharts();
    this.loadRejected();
  }

  close() {
    this.controller.abort();
    this.stopStream();
    this.destroyCharts();
  }

  // --- the device and its admin actions ---

  renderHeader() {
    const device = this.device;
    this.header.replaceChildren(
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
        h("dd", {}, count(device.rejected_24h)),
      ),
      this.adminActions(),
    );
  }

  adminActions() {
    const message = h("p", { class: "message", id: "admin-message", role: "status" });
    const act = (work) => async () => {
      message.textContent = "";
      message.className = "message";
      try {
        await work();
      } catch (error) {
        message.className = "message error";
        message.textContent = describe(error);
      }
    };
    const button = (id, label, work, extra = {}) =>
      h("button", { type: "button", id, onclick: act(work), ...extra }, label);
    return h(
      "div",
      { class: "admin", role: "group", "aria-label": "Admin actions" },
      button("toggle-enabled", this.device.enabled ? "Disable" : "Enable", () => this.toggle()),
      button("rotate-token", "Rotate token", () => this.rotate()),
      button("delete-device", "Delete", () => this.remove(), { class: "danger" }),
      message,
    );
  }

  async toggle() {
    this.device = await api("PATCH", this.path, { body: { enabled: !this.device.enabled } });
    this.renderHeader();
    showNotice(`${this.device.id} is ${this.device.enabled ? "enabled" : "disabled"}.`, "info");
  }

  async rotate() {
    const sure = await confirmAction(
      `Rotate ${this.id}'s token?`,
      "Its current token stops working at once; the device needs the new one.",
      "Rotate token",
    );
    if (!sure) return;
    const answer = await api("POST", `${this.path}/token`);
    showToken(this.id, answer.token);
  }

  async remove() {
    const sure = await confirmAction(
      `Delete ${this.id}?`,
      "This deletes the device with its tokens and all its readings. It cannot be undone.",
      "Delete device",
    );
    if (!sure) return;
    await api("DELETE", this.path);
    location.hash = "#/devices";
    showNotice(`Deleted ${this.id}.`, "info");
  }

  // --- latest values ---

  async loadLatest() {
    try {
      const answer = await api("GET", `${this.path}/telemetry/latest`, { signal: this.signal });
      this.latestValues = answer.values;
      this.renderLatest();
    } catch (error) {
      if (error.name === "AbortError") return;
      this.latest.replaceChildren(
        h("h2", { id: "latest-title" }, "Latest values"),
        failure(error, () => this.loadLatest()),
      );
    }
  }

  renderLatest() {
    const names = Object.keys(this.latestValues).sort();
    const row = (metric) => {
      const v = this.latestValues[metric];
      return h(
        "tr",
        { "data-metric": metric },
        h("td", { "data-label": "Metric" }, metric),
        h("td", { "data-label": "Value" }, `${formatValue(v.value)}${v.unit ? " " + v.unit : ""}`),
        h("td", { "data-label": "At" }, when(v.ts)),
      );
    };
    const head = h("tr", {}, ["Metric", "Value", "At"].map((t) => h("th", { scope: "col" }, t)));
    this.latest.replaceChildren(
      h("h2", { id: "latest-title" }, "Latest values"),
      names.length
        ? h("table", { class: "latest", id: "latest-table" }, h("thead", {}, head), h("tbody", {}, names.map(row)))
        : h("p", { class: "message" }, "No readings yet."),
    );
  }

  // --- charts ---

  rangeControls() {
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
    select.addEventListener("change", () => {
      view.range = select.value;
      custom.hidden = view.range !== "custom";
      if (view.range !== "custom") this.renderCharts();
    });
    const form = h("form", { class: "range", id: "range-form" }, h("label", { for: "range" }, "Range"), select, custom);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      view.start = start.value;
      view.end = end.value;
      this.renderCharts();
    });
    return form;
  }

  rangeQuery() {
    if (view.range !== "custom") return { start: `-${view.range}` };
    const iso = (local) => (local ? new Date(local).toISOString() : undefined);
    return { start: iso(view.start), end: iso(view.end) };
  }

  destroyCharts() {
    for (const chart of Object.values(this.shared.charts)) chart.destroy();
    this.shared.charts = {};
  }

  // The history of every metric (one aggregate request), then the live stream on top.
  async renderCharts() {
    this.destroyCharts();
    this.stopStream();
    const metrics = Object.keys(this.device.metrics || {}).sort();
    const body = h("div", { class: "chart-list", "aria-busy": "true" });
    const summary = h("p", { class: "hint", id: "window-summary" });
    this.charts.replaceChildren(
      h("h2", { id: "charts-title" }, "History"),
      this.rangeControls(),
      summary,
      this.live,
      body,
    );
    const waiting = [];
    this.startStream(metrics.length ? waiting : null);
    if (!metrics.length) {
      body.replaceChildren(h("p", { class: "message" }, "No readings yet: nothing to chart."));
      body.removeAttribute("aria-busy");
      return;
    }
    let answer;
    try {
      answer = await api("GET", `${this.path}/telemetry/aggregate`, {
        query: { metric: metrics, window: "auto", agg: "avg,min,max", ...this.rangeQuery() },
        signal: this.signal,
      });
    } catch (error) {
      if (error.name === "AbortError") return;
      this.pendingLive = null;
      body.replaceChildren(failure(error, () => this.renderCharts()));
      body.removeAttribute("aria-busy");
      return;
    }
    const live = view.range !== "custom";
    summary.replaceChildren(
      view.range === "custom" ? "Custom range" : `Last ${RANGES[view.range]}`,
      ` (${localTime(answer.start)} to ${localTime(answer.end)}), windows of ${answer.window}`,
      live ? "" : "; not live: the range is fixed",
    );
    summary.title = `${answer.start} to ${answer.end} (UTC)`;
    this.drawCharts(body, answer);
    // What the stream brought while the history loaded: only what the history could not hold.
    const endMs = Date.parse(answer.end);
    this.pendingLive = null;
    for (const point of waiting) if (Date.parse(point.ts) >= endMs) this.applyPoint(point);
  }

  drawCharts(body, answer) {
    // One metric asked answers `buckets`; several answer `series`.
    const series = answer.series || [{ metric: answer.metric, unit: answer.unit, buckets: answer.buckets }];
    const startMs = Date.parse(answer.start);
    const endMs = Date.parse(answer.end);
    body.replaceChildren();
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
      this.shared.charts[s.metric] = new MetricChart(plot, {
        metric: s.metric,
        unit: s.unit,
        buckets: s.buckets,
        window: answer.window,
        startMs,
        endMs,
      });
    }
    body.removeAttribute("aria-busy");
  }

  // --- live ---

  applyPoint(point) {
    const chart = this.shared.charts[point.metric];
    if (chart) chart.add(Date.parse(point.ts), point.value);
  }

  onReadings(message) {
    const points = message.points || [];
    this.shared.stream.points += points.length;
    for (const point of points) {
      const known = this.latestValues[point.metric];
      if (!known || Date.parse(known.ts) <= Date.parse(point.ts)) {
        this.latestValues[point.metric] = { ts: point.ts, value: point.value, unit: known ? known.unit : null };
      }
      if (this.pendingLive) this.pendingLive.push(point);
      else this.applyPoint(point);
    }
    if (!points.length) return;
    this.renderLatest();
    const metrics = this.device.metrics || (this.device.metrics = {});
    const fresh = points.filter((p) => !(p.metric in metrics));
    if (fresh.length && !this.pendingLive) {
      for (const p of fresh) metrics[p.metric] = {};
      this.renderCharts(); // a metric the page had no chart for
    }
  }

  onEvent(event) {
    this.shared.stream.events += 1;
    this.shared.stream.lastId = event.id;
    if (event.type === "readings") {
      try {
        this.onReadings(JSON.parse(event.data));
      } catch (error) {
        console.error("a stream event that is not readings JSON", error);
      }
    } else if (event.type === "reset") {
      // The server no longer holds what this page missed: load the history again.
      this.renderCharts();
      this.loadLatest();
    }
  }

  onStreamState(state, error) {
    this.shared.stream.state = state;
    const why = error instanceof ApiError ? describe(error) : error ? "connection lost" : "";
    const text = {
      connecting: "Live: connecting…",
      open: "Live: new readings appear as they are stored.",
      retrying: `Live: reconnecting…${why ? ` (${why})` : ""}`,
      failed:
        error && error.status === 404
          ? "Live updates are not available on this gateway."
          : `Live updates stopped: ${why}`,
      closed: "",
    }[state];
    this.live.textContent = text || "";
  }

  startStream(waiting) {
    this.pendingLive = waiting;
    if (view.range === "custom") return; // a range that ends in the past: nothing to append
    this.stream = new EventStream(apiUrl(`${this.path}/telemetry/stream`), {
      onEvent: (event) => this.onEvent(event),
      onState: (state, error) => this.onStreamState(state, error),
    }).start();
  }

  stopStream() {
    if (this.stream) this.stream.close();
    this.stream = null;
  }

  // --- rejected messages ---

  async loadRejected(cursor = null, rows = []) {
    const title = h("h2", { id: "rejected-title" }, "Rejected messages");
    let answer;
    try {
      answer = await api("GET", "/rejected", { query: { device: this.id, limit: 20, cursor }, signal: this.signal });
    } catch (error) {
      if (error.name !== "AbortError") this.rejected.replaceChildren(title, failure(error, () => this.loadRejected()));
      return;
    }
    rows = rows.concat(answer.rejected);
    const more = answer.next_cursor
      ? h("button", { type: "button", onclick: () => this.loadRejected(answer.next_cursor, rows) }, "Show more")
      : null;
    this.rejected.replaceChildren(...[title, rejectedTable(rows), more].filter(Boolean));
  }
}

function localTime(iso) {
  return new Date(iso).toLocaleString("en", { dateStyle: "medium", timeStyle: "short" });
}

function rejectedTable(rows) {
  if (!rows.length) return h("p", { class: "message" }, "No rejected messages.");
  const head = ["Received", "Transport", "Reason", "Message"];
  const row = (r) =>
    h(
      "tr",
      {},
      h("td", { "data-label": head[0] }, when(r.received_at)),
      h("td", { "data-label": head[1] }, r.transport),
      h("td", { "data-label": head[2] }, h("code", {}, r.reason)),
      h("td", { "data-label": head[3], title: r.payload }, r.message),
    );
  return h(
    "table",
    { class: "rejected", id: "rejected-table" },
    h("thead", {}, h("tr", {}, head.map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, rows.map(row)),
  );
}
