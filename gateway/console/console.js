// The operator console: sign in, the device list, a device's page. Hash routes (#/devices,
// #/devices/<id>); every call goes to the public API (/api/v1) with the operator's token.

import { onUnauthorized, session } from "./api.js";
import { DevicePage } from "./device.js";
import { devicesPage } from "./devices.js";
import { clearNotice } from "./dom.js";
import { signInPage } from "./signin.js";

// For people debugging and for the browser tests: what the charts draw, the stream's state.
const fieldgate = { charts: {}, stream: { state: "idle", events: 0, points: 0 } };
window.fieldgate = fieldgate;

const main = document.getElementById("main");
let cleanups = []; // what the page on show left running (requests, the stream, timers)

function route(signInReason = null) {
  for (const cleanup of cleanups.splice(0)) cleanup();
  main.replaceChildren();
  const signedIn = Boolean(session.token);
  document.getElementById("nav").hidden = !signedIn;
  if (!signedIn) {
    signInPage(main, signInReason, () => {
      if (!location.hash.startsWith("#/devices")) location.hash = "#/devices";
      route();
    });
    return;
  }
  const match = location.hash.match(/^#\/devices\/(.+)$/);
  if (match) {
    const page = new DevicePage(main, decodeURIComponent(match[1]), fieldgate);
    cleanups.push(() => page.close());
    page.load();
  } else {
    devicesPage(main, cleanups);
  }
}

window.addEventListener("hashchange", () => {
  clearNotice();
  route();
});

// A 401 anywhere: the token is not good (any more); sign in again, saying why.
onUnauthorized((error) => {
  if (!session.token) return;
  session.clear();
  route({
    text: `Signed out: the gateway refused the token (401: ${error.message}). Sign in again.`,
    error: true,
  });
});

document.getElementById("sign-out").addEventListener("click", () => {
  session.clear();
  clearNotice();
  location.hash = "#/devices";
  route({ text: "Signed out.", error: false });
});

route();
