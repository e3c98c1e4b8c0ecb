// Traces: the last requests of a pipeline, from Zipkin, each with its trace id linking to
// Zipkin's own trace view, and its spans drawn as a waterfall (gateway, Envoy hops, stages).
import { api, session } from "../api.js";
import { h, errorBox } from "../dom.js";

const REFRESH_MS = 5000;

function waterfall(trace) {
  const total = Math.max(trace.duration_us, 1);
  const depth = new Map();
  for (const span of trace.spans) depth.set(span.id, span.parent_id && depth.has(span.parent_id) ? depth.get(span.parent_id) + 1 : 0);
  return h("div", { class: "waterfall" }, trace.spans.map((span) => h("div", { class: "span" },
    h("div", { class: "label", title: `${span.service}: ${span.name}`, style: { paddingLeft: `${depth.get(span.id) * 10}px` } },
      h("strong", {}, span.service), " ", span.name),
    h("div", { class: "bar-track", title: `${(span.duration_us / 1000).toFixed(2)} ms` },
      h("div", { class: `bar${span.error ? " error" : ""}`,
        style: { left: `${(100 * span.offset_us / total).toFixed(2)}%`, width: `${(100 * span.duration_us / total).toFixed(2)}%` } })))));
}

function traceRows(trace, open) {
  const detail = h("tr", { hidden: !open.has(trace.trace_id) }, h("td", { colspan: 5 }, waterfall(trace)));
  const label = () => (detail.hidden ? "spans" : "hide");
  const toggle = h("button", { type: "button", class: "toggle-spans", onclick: () => {
    detail.hidden = !detail.hidden;
    if (detail.hidden) open.delete(trace.trace_id); else open.add(trace.trace_id);
    toggle.textContent = label();
  } }, label());
  const ok = !trace.status || trace.status.startsWith("2");
  return [h("tr", { class: "trace", dataset: { trace: trace.trace_id } },
    h("td", {}, new Date(trace.started_us / 1000).toLocaleTimeString()),
    h("td", { class: "mono" }, h("a", { href: trace.link, target: "_blank", rel: "noopener noreferrer", class: "trace-link" }, trace.trace_id)),
    h("td", {}, h("span", { class: `badge ${ok ? "ok" : "bad"}` }, trace.status || "?"), trace.revision ? ` rev ${trace.revision}` : ""),
    h("td", { class: "num" }, `${(trace.duration_us / 1000).toFixed(2)} ms · ${trace.spans.length} spans`),
    h("td", {}, toggle)), detail];
}

async function fill(box, pipeline, open) {
  const out = await api(`/ui/api/traces/${encodeURIComponent(pipeline)}?limit=20`);
  box.replaceChildren(out.traces.length ? h("table", { id: "traces-table" },
    h("thead", {}, h("tr", {}, ["time", "trace id (opens Zipkin)", "status", "duration", ""].map((t) => h("th", { class: t === "duration" ? "num" : undefined }, t)))),
    h("tbody", {}, out.traces.map((t) => traceRows(t, open))))
    : h("p", { class: "muted" }, `No trace of ${pipeline} in Zipkin in the last hour.`));
}

export async function render(main, [pipeline]) {
  const pipelines = await api("/api/v1/pipelines");
  const chosen = pipeline || (pipelines[0] && pipelines[0].name);
  const select = h("select", { id: "trace-pipeline", onchange: () => { location.hash = `#/traces/${encodeURIComponent(select.value)}`; } },
    pipelines.map((p) => h("option", { value: p.name, selected: p.name === chosen }, p.name)));
  const box = h("div", { class: "panel scroll" });
  main.replaceChildren(h("h1", {}, "Traces"), h("div", { class: "row" }, h("label", {}, "pipeline ", select)), box);
  if (!session.config.tracing) {
    box.replaceChildren(h("div", { class: "note" }, "Tracing is off: this manager has no Zipkin (SLUICE_ZIPKIN_URL). Start the mesh with tracing to see requests here."));
    return null;
  }
  if (!chosen) { box.replaceChildren(h("p", { class: "muted" }, "No pipelines.")); return null; }
  let stopped = false, timer = null;
  const open = new Set(); // the traces whose spans are shown, kept across refreshes
  const loop = async () => {
    try { await fill(box, chosen, open); } catch (error) { box.replaceChildren(errorBox(error)); }
    if (!stopped) timer = setTimeout(loop, REFRESH_MS);
  };
  await loop();
  return () => { stopped = true; clearTimeout(timer); };
}
