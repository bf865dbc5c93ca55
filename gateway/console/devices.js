// The devices page: a searchable list a page at a time (cursor paging), and creating a device.

import { api, describe } from "./api.js";
import { count, failure, h, showToken, when } from "./dom.js";

const PAGE_SIZE = 50;
const list = { q: "", cursors: [null] }; // kept while the console is open: back comes back here

// The device list into `main`; what it leaves running is stopped by `cleanups`.
export function devicesPage(main, cleanups) {
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
