// Runtimes: every instance with its live health (a gRPC health check the manager makes
// when listing), the models and versions each runtime serves, and the pipeline stages using them.
import { api } from "../api.js";
import { h, ago, tensorLines } from "../dom.js";

const REFRESH_MS = 5000;

function usedBy(pipelines, runtime, model) {
  const uses = [];
  for (const p of pipelines) {
    p.stages.forEach((st, i) => {
      if (st.runtime === runtime && (model === undefined || st.model === model)) uses.push({ pipeline: p.name, stage: i, name: st.name });
    });
  }
  return uses;
}

function useLinks(uses) {
  if (!uses.length) return h("span", { class: "muted" }, "unused");
  return uses.map((u, i) => [i ? ", " : "", h("a", { href: `#/pipelines/${encodeURIComponent(u.pipeline)}` }, `${u.pipeline}`), ` stage ${u.stage}`]);
}

function runtimeCard(r, pipelines) {
  const healthy = r.instances.filter((i) => i.healthy).length;
  const state = !r.instances.length ? ["bad", "no instances"] : healthy === r.instances.length ? ["ok", `${healthy} healthy`] : ["warn", `${healthy} of ${r.instances.length} healthy`];
  return h("section", { class: "panel runtime-card", dataset: { runtime: r.name } },
    h("h3", {}, r.name, " ", h("span", { class: `badge ${state[0]}` }, state[1]), h("span", { class: "muted" }, `  kind ${r.kind}`)),
    h("div", { class: "scroll" }, h("table", {},
      h("thead", {}, h("tr", {}, ["instance", "address", "health", "last heartbeat"].map((t) => h("th", {}, t)))),
      h("tbody", {}, r.instances.map((i) => h("tr", { class: "instance", dataset: { healthy: String(i.healthy) } },
        h("td", { class: "mono" }, i.id), h("td", { class: "mono" }, `${i.host}:${i.port}`),
        h("td", {}, h("span", { class: `badge ${i.healthy ? "ok" : "bad"}` }, i.healthy ? "SERVING" : "not serving")),
        h("td", {}, ago(i.last_seen))))))),
    h("div", { class: "scroll" }, h("table", {},
      h("thead", {}, h("tr", {}, ["model", "versions", "platform", "inputs", "outputs", "used by"].map((t) => h("th", {}, t)))),
      h("tbody", {}, r.models.map((m) => h("tr", { dataset: { model: m.name } },
        h("td", {}, m.name), h("td", {}, m.versions.join(", ") || "–"), h("td", {}, m.platform),
        h("td", {}, tensorLines(m.inputs)), h("td", {}, tensorLines(m.outputs)),
        h("td", {}, useLinks(usedBy(pipelines, r.name, m.name)))))))));
}

async function fill(main) {
  const [runtimes, pipelines] = await Promise.all([api("/api/v1/runtimes"), api("/api/v1/pipelines")]);
  main.replaceChildren(h("h1", {}, "Runtimes"),
    runtimes.length ? h("div", { class: "grid" }, runtimes.map((r) => runtimeCard(r, pipelines)))
      : h("p", { class: "muted" }, "No runtime has registered."),
    h("p", { class: "muted" }, `Health is checked live by the manager (gRPC health, through each instance's sidecar) every ${REFRESH_MS / 1000} s while this page is open.`));
}

export async function render(main) {
  await fill(main);
  let stopped = false;
  const loop = async () => {
    if (stopped) return;
    try { await fill(main); } catch { /* the next round tries again */ }
    if (!stopped) timer = setTimeout(loop, REFRESH_MS);
  };
  let timer = setTimeout(loop, REFRESH_MS);
  return () => { stopped = true; clearTimeout(timer); };
}
