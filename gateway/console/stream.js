// Server-Sent Events over fetch: EventSource cannot send an Authorization header, and a token
// must not go in a URL (it would end up in logs). Reconnects after a drop with Last-Event-ID,
// with backoff (or the server's Retry-After), until closed.

import { authHeaders, errorFrom } from "./api.js";

const FIRST_DELAY_MS = 500;
const MAX_DELAY_MS = 30_000;
// Answers that another try will not change: stop and say why.
const FINAL = new Set([400, 401, 403, 404, 405]);

export class EventStream {
  // onEvent({type, id, data}) for each event; onState(state, error) with state one of
  // "connecting", "open", "retrying", "failed", "closed".
  constructor(url, { onEvent, onState = () => {} }) {
    this.url = url;
    this.onEvent = onEvent;
    // Nothing is reported after close() (a request still settling says nothing more).
    this.onState = (state, error) => (this.closed && state !== "closed" ? null : onState(state, error));
    this.lastId = null;
    this.closed = false;
    this.controller = null;
    this.timer = null;
    this.wake = null;
  }

  start() {
    this.run();
    return this;
  }

  close() {
    this.closed = true;
    if (this.controller) this.controller.abort();
    clearTimeout(this.timer);
    if (this.wake) this.wake();
    this.onState("closed", null);
  }

  async run() {
    let delay = FIRST_DELAY_MS;
    while (!this.closed) {
      this.controller = new AbortController();
      const headers = authHeaders({ Accept: "text/event-stream" });
      if (this.lastId !== null) headers["Last-Event-ID"] = this.lastId;
      let retryAfterS = null;
      this.onState("connecting", null);
      try {
        const response = await fetch(this.url, {
          headers,
          signal: this.controller.signal,
          cache: "no-store",
        });
        if (!response.ok) {
          const error = await errorFrom(response);
          if (FINAL.has(response.status)) {
            this.onState("failed", error);
            return;
          }
          retryAfterS = Number(error.retryAfter) || null;
          this.onState("retrying", error);
        } else {
          this.onState("open", null);
          delay = FIRST_DELAY_MS;
          await this.read(response.body);
          if (this.closed) return;
          this.onState("retrying", null);
        }
      } catch (error) {
        if (this.closed) return;
        this.onState("retrying", error);
      }
      const wait = retryAfterS ? retryAfterS * 1000 : delay * (1 + Math.random() * 0.3);
      delay = Math.min(delay * 2, MAX_DELAY_MS);
      await new Promise((resolve) => {
        this.wake = resolve;
        this.timer = setTimeout(resolve, wait);
      });
    }
  }

  // Reads the body until it ends: lines of `field: value`, a blank line ends an event,
  // lines starting with ':' are comments (the server's heartbeat).
  async read(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let event = { id: null, type: "", data: [] };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        let line = buffer.slice(0, end);
        buffer = buffer.slice(end + 1);
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line === "") {
          if (event.id !== null) this.lastId = event.id;
          if (event.data.length) {
            this.onEvent({
              type: event.type || "message",
              id: event.id ?? this.lastId,
              data: event.data.join("\n"),
            });
          }
          event = { id: null, type: "", data: [] };
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "id" && !text.includes("\0")) event.id = text;
        else if (field === "event") event.type = text;
        else if (field === "data") event.data.push(text);
      }
    }
  }
}
