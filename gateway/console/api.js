// The gateway's public API (/api/v1) with the operator's bearer token, and its errors as
// messages a person can act on.

const TOKEN_KEY = "fieldgate.token";

export const session = {
  get token() {
    return sessionStorage.getItem(TOKEN_KEY);
  },
  set(token) {
    sessionStorage.setItem(TOKEN_KEY, token);
  },
  clear() {
    sessionStorage.removeItem(TOKEN_KEY);
  },
};

// The API's error body is {"error": {"code", "message", "details"}}; status 0 is a network error.
export class ApiError extends Error {
  constructor(status, code, message, details = [], retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
    this.retryAfter = retryAfter;
  }
}

let unauthorized = () => {};

// `handler(error)` runs on every 401: the token is no longer good, sign in again.
export function onUnauthorized(handler) {
  unauthorized = handler;
}

export function apiUrl(path, query = {}) {
  const url = new URL("/api/v1" + path, location.origin);
  for (const [key, value] of Object.entries(query)) {
    for (const item of [].concat(value)) {
      if (item !== undefined && item !== null && item !== "") url.searchParams.append(key, item);
    }
  }
  return url;
}

export function authHeaders(extra = {}) {
  return { Authorization: `Bearer ${session.token || ""}`, ...extra };
}

export async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's page): the status says enough
  }
  const error = (body && body.error) || {};
  const failure = new ApiError(
    response.status,
    error.code || `http_${response.status}`,
    error.message || response.statusText || `HTTP ${response.status}`,
    error.details || [],
    response.headers.get("Retry-After"),
  );
  if (response.status === 401) unauthorized(failure);
  return failure;
}

export function networkError() {
  return new ApiError(0, "network_error", "the gateway could not be reached (network error)");
}

// One API call: the parsed JSON answer (null for 204), or an ApiError thrown.
export async function api(method, path, { query, body, signal } = {}) {
  const headers = authHeaders({ Accept: "application/json" });
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(apiUrl(path, query), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw networkError();
  }
  if (!response.ok) throw await errorFrom(response);
  if (response.status === 204) return null;
  return response.json();
}

// What to tell the operator about `error`.
export function describe(error) {
  if (!(error instanceof ApiError)) return `Something went wrong: ${error.message || error}`;
  switch (error.status) {
    case 0:
      return "The gateway could not be reached (network error). Is it running?";
    case 401:
      return `The gateway refused the token (401): ${error.message}. Sign in again.`;
    case 403:
      return `Not allowed (403): ${error.message}. This needs an admin token.`;
    case 404:
      return `Not found (404): ${error.message}`;
    case 503: {
      const wait = error.retryAfter ? ` Retry in ${error.retryAfter} s.` : "";
      return `The gateway is unavailable (503): ${error.message}.${wait}`;
    }
    default:
      return `Error ${error.status} (${error.code}): ${error.message}`;
  }
}
