// The console's shell: the token (secure mode), the navigation between pages (#/<page>/<arg>),
// and the live figures, polled from /ui/api/stats while a page shows them.
import { api, ApiError, canDeploy, session, setToken, tokenScopes } from "./api.js";
import { h, errorBox } from "./dom.js";
import * as pipelines from "./pages/pipelines.js";
import * as runtimes from "./pages/runtimes.js";
import * as models from "./pages/models.js";
import * as traces from "./pages/traces.js";
import * as actions from "./pages/actions.js";

const PAGES = { pipelines, runtimes, models, traces, actions };
const main = document.getElementById("main");
let cleanup = null;

/** Live figures: every subscriber gets each answer of /ui/api/stats, polled while any listens. */
export const live = {
  listeners: new Set(),
  timer: null,
  last: null,
  subscribe(listener) {
    this.listeners.add(listener);
    if (this.last) listener(this.last);
    if (!this.timer) this.poll();
    return () => {
      this.listeners.delete(listener);
      if (!this.listeners.size && this.timer) { clearTimeout(this.timer); this.timer = null; }
    };
  },
  async poll() {
    const footer = document.getElementById("live");
    try {
      this.last = await api("/ui/api/stats");
      const window = this.last.window_s ? `last ${Math.round(this.last.window_s)} s` : "since the gateway started";
      footer.textContent = `live figures (${window}), updated ${new Date().toLocaleTimeString()}` + (this.last.error ? ` — ${this.last.error}` : "");
      for (const listener of this.listeners) listener(this.last);
    } catch (error) {
      footer.textContent = `live figures unavailable: ${error.message}`;
    }
    if (this.listeners.size) this.timer = setTimeout(() => this.poll(), session.config?.poll_interval_ms || 2000);
    else this.timer = null;
  },
};

function signOut() {
  if (cleanup) { cleanup(); cleanup = null; }
  setToken("");
  session.config = null;
  document.getElementById("who").replaceChildren();
  start();
}

function showLogin(message) {
  document.getElementById("nav").hidden = true;
  const input = h("input", { type: "password", id: "token", placeholder: "eyJ…", autocomplete: "off", "aria-label": "token" });
  const form = h("form", { class: "panel login", id: "login", onsubmit: (event) => {
    event.preventDefault();
    setToken(input.value);
    start();
  } },
    h("h1", {}, "Sign in"),
    h("p", {}, "This mesh runs in secure mode: paste a token from the manager (", h("code", {}, "sluice token create --scope deploy"),
      " or the admin token in ", h("code", {}, "$SLUICE_HOME/admin.token"), "). The console keeps it in this tab only."),
    message ? h("div", { class: "error-box" }, message) : null,
    input,
    h("div", { class: "row" }, h("button", { class: "primary", type: "submit" }, "Use token")));
  main.replaceChildren(form);
  input.focus();
}

function showWho(secure) {
  const who = document.getElementById("who");
  if (!secure) {
    who.replaceChildren(h("span", {}, "dev mode (no tokens)"));
    return;
  }
  const scopes = tokenScopes(session.token);
  who.replaceChildren(
    h("span", { id: "scopes" }, `token: ${scopes.join(", ") || "?"}`),
    h("button", { type: "button", id: "sign-out", onclick: signOut }, "Sign out"));
}

async function route() {
  if (cleanup) { cleanup(); cleanup = null; }
  const [, name = "pipelines", ...rest] = (location.hash || "#/pipelines").split("/");
  const page = PAGES[name] && (name !== "actions" || canDeploy()) ? name : "pipelines";
  for (const link of document.querySelectorAll("#nav a")) link.classList.toggle("active", link.dataset.page === page);
  main.replaceChildren(h("p", { class: "muted" }, "Loading…"));
  try {
    cleanup = (await PAGES[page].render(main, rest.map(decodeURIComponent), { live })) || null;
  } catch (error) {
    main.replaceChildren(errorBox(error));
  }
}

async function start() {
  try {
    session.config = await api("/ui/api/config");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      showLogin(session.token ? `The token was refused: ${error.message}` : "");
      return;
    }
    if (error instanceof ApiError && error.status === 403) {
      session.config = null; // nothing to show: no page renders on navigation
      showWho(true);
      document.getElementById("nav").hidden = true;
      main.replaceChildren(h("div", { class: "panel", id: "forbidden" },
        h("h1", {}, "This token cannot read the mesh"),
        h("p", {}, "Pipelines, runtimes and models need a token with the deploy (or admin) scope; ",
          "this one has: ", tokenScopes(session.token).join(", ") || "none", ". Actions are hidden."),
        h("button", { type: "button", onclick: signOut }, "Use another token")));
      return;
    }
    main.replaceChildren(errorBox(error));
    return;
  }
  document.getElementById("nav").hidden = false;
  document.getElementById("nav-actions").hidden = !canDeploy();
  showWho(session.config.secure);
  route();
}

window.addEventListener("hashchange", () => { if (session.config) route(); });
start();
