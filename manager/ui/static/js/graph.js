// A pipeline drawn as its graph in SVG: stages as nodes (runtime, model and version),
// edges as arrows labelled with the tensors they carry, live figures in each node.
import { h, s, ms, percent } from "./dom.js";

const NODE_W = 220, NODE_H = 92, GAP = 96, IO_W = 110, PAD = 12, TOP = 10;

function clip(text, max) {
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

function edgeLabel(stage, index) {
  if (index === 0) return stage.inputs.map((t) => t.name).join(", ");
  const parts = Object.entries(stage.bindings || {}).map(([input, source]) => (input === source ? input : `${source} → ${input}`));
  return parts.join(", ");
}

function arrow(x1, x2, y, label) {
  return s("g", { class: "edge" },
    s("path", { d: `M${x1},${y} L${x2 - 2},${y}`, "marker-end": "url(#arrow)" }),
    s("text", { x: (x1 + x2) / 2, y: y - 8, "text-anchor": "middle" }, clip(label, 16), s("title", {}, label)));
}

function ioNode(x, y, title, tensors) {
  const names = tensors.map((t) => t.name).join(", ");
  return s("g", { class: "node io", transform: `translate(${x},${y})` },
    s("rect", { width: IO_W, height: NODE_H, rx: 8 }),
    s("text", { class: "title", x: 10, y: 22 }, title),
    s("text", { class: "sub", x: 10, y: 42 }, clip(names, 15), s("title", {}, names)));
}

function stageNode(stage, index, x, y) {
  const version = stage.version ? `v${stage.version}` : "latest loaded";
  const where = `${stage.runtime} · ${stage.model} ${version}`;
  return s("g", { class: "node stage", transform: `translate(${x},${y})`, dataset: { stage: index, model: stage.model } },
    s("title", {}, `stage ${index}: ${stage.name}\nruntime ${stage.runtime}, model ${stage.model}, ${version}\ntimeout ${stage.timeout_ms} ms`),
    s("rect", { width: NODE_W, height: NODE_H, rx: 8 }),
    s("text", { class: "title", x: 10, y: 20 }, clip(`${index}. ${stage.name}`, 30)),
    s("text", { class: "sub", x: 10, y: 38 }, clip(where, 34)),
    s("text", { class: "live stage-latency", x: 10, y: 60 }, "p50 –  p99 –"),
    s("text", { class: "live stage-errors", x: 10, y: 78 }, "errors –  calls –"));
}

/** The pipeline's graph: a scrollable box holding one SVG. */
export function drawPipeline(pipeline) {
  const stages = pipeline.stages;
  const width = PAD * 2 + IO_W * 2 + stages.length * NODE_W + (stages.length + 1) * GAP;
  const height = TOP * 2 + NODE_H;
  const y = TOP, mid = TOP + NODE_H / 2;
  const svg = s("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `pipeline ${pipeline.name}`,
    class: "pipeline-graph", dataset: { pipeline: pipeline.name, revision: pipeline.revision } },
    s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
      s("path", { class: "arrowhead", d: "M0,0 L10,5 L0,10 z" }))));
  let x = PAD;
  svg.append(ioNode(x, y, "request", stages[0].inputs));
  x += IO_W;
  stages.forEach((stage, index) => {
    svg.append(arrow(x, x + GAP, mid, edgeLabel(stage, index)));
    x += GAP;
    svg.append(stageNode(stage, index, x, y));
    x += NODE_W;
  });
  const last = stages[stages.length - 1];
  svg.append(arrow(x, x + GAP, mid, last.outputs.map((t) => t.name).join(", ")));
  x += GAP;
  svg.append(ioNode(x, y, "response", last.outputs));
  return h("div", { class: "graph" }, svg);
}

/** Put a pipeline's live figures (``/ui/api/stats``) into its drawn graph. */
export function updateGraph(root, stats) {
  for (const node of root.querySelectorAll("g.node.stage")) {
    const index = Number(node.dataset.stage);
    const figures = stats && stats.stages.find((st) => st.index === index && st.model === node.dataset.model);
    const latency = node.querySelector(".stage-latency");
    const errors = node.querySelector(".stage-errors");
    latency.textContent = figures ? `p50 ${ms(figures.p50_ms)}  p99 ${ms(figures.p99_ms)}` : "p50 –  p99 –";
    errors.textContent = figures ? `errors ${percent(figures.error_rate)}  calls ${figures.requests}` : "errors –  calls 0";
    const failing = Boolean(figures && figures.error_rate);
    node.classList.toggle("failing", failing);
    errors.classList.toggle("bad", failing);
  }
}
