// Sign in with an operator or admin token, kept in this tab's sessionStorage.

import { api, describe, session } from "./api.js";
import { h } from "./dom.js";

// `reason`: why the sign-in shows ({text, error}: a 401, a sign-out); `signedIn()` once the
// token is good.
export function signInPage(main, reason, signedIn) {
  const message = h("p", { id: "signin-message", class: "message", role: "alert" });
  if (reason) {
    message.textContent = reason.text;
    if (reason.error) message.classList.add("error");
  }
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
    signedIn();
  });
  main.append(h("section", { class: "signin" }, h("h1", { text: "Sign in" }), form, message));
  input.focus();
}
