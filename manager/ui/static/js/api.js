// Calls to the manager: the REST API and the console's own views, with the session's token.
const KEY = "sluice.console.token";

export const session = {
  token: sessionStorage.getItem(KEY) || "",
  config: null, // /ui/api/config once it answered
};

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || "error";
    this.details = error.details || {};
  }
}

export async function api(path, { method = "GET", body } = {}) {
  const headers = { accept: "application/json" };
  if (session.token) headers.authorization = `Bearer ${session.token}`;
  if (body !== undefined) headers["content-type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (response.status === 204) return null;
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { error: { code: "bad_response", message: `${response.status}: ${text.slice(0, 300)}` } };
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

export function setToken(token) {
  session.token = token.trim();
  if (session.token) sessionStorage.setItem(KEY, session.token);
  else sessionStorage.removeItem(KEY);
}

/** The scopes a token claims (read from its payload, for what to show: the sidecar checks them). */
export function tokenScopes(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const payload = JSON.parse(atob(part + "=".repeat((4 - (part.length % 4)) % 4)));
    return Array.isArray(payload.scopes) ? payload.scopes : [];
  } catch {
    return [];
  }
}

/** Whether the console shows its actions: dev mode (no tokens), or a deploy or admin token. */
export function canDeploy() {
  if (session.config && !session.config.secure) return true;
  const scopes = tokenScopes(session.token);
  return scopes.includes("admin") || scopes.includes("deploy");
}
