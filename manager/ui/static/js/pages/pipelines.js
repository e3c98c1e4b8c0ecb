// Pipelines: the list (revision, stages, last-minute p50/p99 and error rate) and each
// pipeline drawn as its graph, with per-stage figures updated live; one pipeline's page
// (#/pipelines/<name>) adds its stages' signatures, its traffic-split sliders (deploy
// scope) and its definition.
import { api, canDeploy } from "../api.js";
import { h, ms, percent, tensorLines } from "../dom.js";
import { drawPipeline, edgesOf, stageKey, updateGraph } from "../graph.js";
import { splitStages, trafficControls } from "../traffic.js";

const SPLIT_NOTE = "A stage's traffic split shows each variant's weight, share and the calls it served in the last minute; a mirror (shadow) is dashed, with its percent.";

function stagesText(p) {
  const { graph, preds } = edgesOf(p);
  if (!graph) return p.stages.map((st) => st.name).join(" → ");
  return p.stages.map((st, i) => `${preds[i].map((k) => stageKey(p.stages[k], k)).join("+") || "request"} → ${stageKey(st, i)}`).join(", ");
}

function figuresCells(name) {
  return [
    h("td", { class: "num", dataset: { figure: "rate" } }, "–"),
    h("td", { class: "num", dataset: { figure: "p50" } }, "–"),
    h("td", { class: "num", dataset: { figure: "p99" } }, "–"),
    h("td", { class: "num", dataset: { figure: "errors" } }, "–"),
  ];
}

function updateRow(row, figures) {
  const cell = (key) => row.querySelector(`[data-figure="${key}"]`);
  cell("rate").textContent = figures ? String(figures.requests) : "0";
  cell("p50").textContent = ms(figures?.p50_ms);
  cell("p99").textContent = ms(figures?.p99_ms);
  cell("errors").textContent = percent(figures?.error_rate);
}

function listView(list) {
  const rows = list.map((p) => h("tr", { dataset: { pipeline: p.name } },
    h("td", {}, h("a", { href: `#/pipelines/${encodeURIComponent(p.name)}` }, p.name)),
    h("td", { class: "num" }, String(p.revision)),
    h("td", {}, h("span", { class: "mono" }, stagesText(p))),
    figuresCells(p.name)));
  return h("div", { class: "panel scroll" },
    h("table", { id: "pipelines-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "pipeline"), h("th", { class: "num" }, "revision"), h("th", {}, "stages"),
        h("th", { class: "num" }, "requests"), h("th", { class: "num" }, "p50"), h("th", { class: "num" }, "p99"), h("th", { class: "num" }, "errors"))),
      h("tbody", {}, rows)));
}

function card(p) {
  return h("section", { class: "panel pipeline-card", dataset: { pipeline: p.name } },
    h("h3", {}, h("a", { href: `#/pipelines/${encodeURIComponent(p.name)}` }, p.name), h("span", { class: "muted" }, `  revision ${p.revision} · ${p.transportType}`)),
    drawPipeline(p));
}

function subscribe(root, live) {
  return live.subscribe((stats) => {
    for (const row of root.querySelectorAll("tr[data-pipeline]")) updateRow(row, stats.pipelines[row.dataset.pipeline]);
    for (const section of root.querySelectorAll("[data-pipeline] .graph")) {
      const name = section.querySelector("svg").dataset.pipeline;
      updateGraph(section, stats.pipelines[name]);
    }
  });
}

async function renderOne(main, name, live) {
  const p = await api(`/api/v1/pipelines/${encodeURIComponent(name)}`);
  const stages = p.stages.map((st, i) => h("tr", {},
    h("td", { class: "num" }, String(i)), h("td", {}, st.id ? `${st.id}: ${st.name}` : st.name), h("td", {}, st.runtime), h("td", {}, st.model), h("td", {}, st.version || "default version"),
    h("td", {}, tensorLines(st.inputs)), h("td", {}, tensorLines(st.outputs)), h("td", { class: "num" }, `${st.timeout_ms} ms`)));
  const summary = (q) => `revision ${q.revision} · ${q.transportType} · updated ${new Date(q.updated_at * 1000).toLocaleString()}`;
  const heading = h("span", { class: "muted", id: "pipeline-summary" }, summary(p));
  const graphPanel = h("section", { class: "panel", dataset: { pipeline: p.name } }, drawPipeline(p), h("p", { class: "muted" }, SPLIT_NOTE));
  const definition = h("pre", { class: "scroll", id: "definition" }, JSON.stringify(p.definition, null, 2));
  const applied = (q) => { // a slider replaced the pipeline: redraw it (the live figures fill in at the next poll)
    heading.textContent = summary(q);
    graphPanel.firstChild.replaceWith(drawPipeline(q));
    definition.textContent = JSON.stringify(q.definition, null, 2);
  };
  const traffic = canDeploy() && splitStages(p).length
    ? h("section", { class: "panel", id: "traffic-split" }, h("h2", {}, "Traffic split"),
      h("p", { class: "muted" }, "Releasing a slider replaces the pipeline with the new weights (make-before-break: the new revision is routed before it is served)."),
      trafficControls(p, applied))
    : null;
  main.replaceChildren(
    h("h1", {}, `Pipeline ${p.name}`),
    h("div", { class: "row" },
      heading,
      h("a", { href: `#/traces/${encodeURIComponent(p.name)}` }, "traces"),
      canDeploy() ? h("a", { href: `#/actions/${encodeURIComponent(p.name)}` }, "edit") : null),
    h("div", { class: "panel scroll" }, h("table", {},
      h("thead", {}, h("tr", {}, h("th", {}, "last minute"), h("th", { class: "num" }, "requests"), h("th", { class: "num" }, "p50"),
        h("th", { class: "num" }, "p99"), h("th", { class: "num" }, "errors"))),
      h("tbody", {}, h("tr", { dataset: { pipeline: p.name } }, h("td", {}, "whole pipeline"), figuresCells(p.name))))),
    graphPanel,
    ...(traffic ? [traffic] : []),
    h("div", { class: "panel scroll" }, h("h2", {}, "Stages"), h("table", {},
      h("thead", {}, h("tr", {}, ["#", "name", "runtime", "model", "version", "inputs", "outputs", "timeout"].map((t) => h("th", {}, t)))),
      h("tbody", {}, stages))),
    h("div", { class: "panel" }, h("h2", {}, "Definition"), definition));
  return subscribe(main, live);
}

export async function render(main, [name], { live }) {
  if (name) return renderOne(main, name, live);
  const list = await api("/api/v1/pipelines");
  if (!list.length) {
    main.replaceChildren(h("h1", {}, "Pipelines"),
      h("p", { class: "muted", id: "no-pipelines" }, "No pipelines yet.", canDeploy() ? [" ", h("a", { href: "#/actions" }, "Create one.")] : null));
    return null;
  }
  main.replaceChildren(
    h("h1", {}, "Pipelines"),
    listView(list),
    h("div", { class: "graphs" }, list.map(card)),
    h("p", { class: "muted" }, SPLIT_NOTE));
  return subscribe(main, live);
}
