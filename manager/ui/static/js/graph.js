// A pipeline drawn as its graph in SVG: stages as nodes (runtime, model and version) laid
// out in columns by depth (a fan-out's branches one above the other, a join after them),
// edges as arrows labelled with the tensors they carry and the condition (`when`) that
// guards them, a `default` branch marked; a stage's traffic split (weights per runtime or
// version, and the calls each variant served) and its mirror (dashed, with its percent)
// in its node; live figures in each node.
import { h, s, ms, percent } from "./dom.js";

const NODE_W = 220, BASE_H = 92, LINE_H = 16, BASE_GAP = 96, GUARD_GAP = 190, VGAP = 26, IO_W = 110, PAD = 12, TOP = 10;

function clip(text, max) {
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

/** A stage's id as the graph names it: its id in a graph, its index in a chain. */
export function stageKey(stage, index) {
  return stage.id || String(index);
}

/** The traffic part of stage ``index`` of the stored definition (``traffic``, ``mirror``):
 * the manager's stage view carries the plan, the definition what the user wrote. */
export function trafficOf(pipeline, index) {
  const defs = pipeline.definition && Array.isArray(pipeline.definition.stages) ? pipeline.definition.stages : null;
  const def = defs && defs.length === pipeline.stages.length ? defs[index] : null;
  const variants = def && Array.isArray(def.traffic) ? def.traffic.map((v) => ({ runtime: v.runtime || null, version: v.version || null, weight: Number(v.weight) || 0 })) : [];
  const mirror = def && def.mirror && typeof def.mirror === "object" ? { runtime: def.mirror.runtime || null, version: def.mirror.version || null, percent: def.mirror.percent ?? 100 } : null;
  return { variants, mirror };
}

/** A variant's name as the split shows it: runtime, version, or both. */
export function variantLabel(stage, variant) {
  const runtime = variant.runtime || stage.runtime;
  if (variant.version && variant.runtime) return `${runtime}:v${variant.version}`;
  return variant.version ? `v${variant.version}` : runtime;
}

/** Nodes and edges of a pipeline: a graph's ``after`` (which holds every stage a stage
 * waits for: named, read by its inputs or its condition), a chain's previous stage. */
export function edgesOf(pipeline) {
  const stages = pipeline.stages;
  const keys = stages.map(stageKey);
  const position = new Map(keys.map((k, i) => [k, i]));
  const graph = stages.some((st) => st.id);
  const preds = stages.map((st, i) => (graph ? (st.after || []).filter((a) => position.has(a)).map((a) => position.get(a)) : i ? [i - 1] : []));
  const succs = stages.map(() => []);
  preds.forEach((list, to) => list.forEach((from) => succs[from].push(to)));
  return { keys, preds, succs, graph };
}

function columns(preds) {
  const depth = [];
  const visit = (i, seen) => {
    if (depth[i] !== undefined) return depth[i];
    if (seen.has(i)) return 0; // a cycle cannot be stored; guard anyway
    seen.add(i);
    depth[i] = preds[i].length ? 1 + Math.max(...preds[i].map((p) => visit(p, seen))) : 0;
    return depth[i];
  };
  preds.forEach((_, i) => visit(i, new Set()));
  const cols = [];
  depth.forEach((d, i) => (cols[d] = cols[d] || []).push(i));
  return { depth, cols };
}

function edgeLabel(pipeline, from, to, keys) {
  const stage = pipeline.stages[to];
  const bindings = Object.entries(stage.bindings || {});
  if (from === null) { // from the request
    const own = bindings.filter(([, source]) => !source.includes("."));
    return (own.length ? own.map(([input, source]) => (input === source ? input : `${source} → ${input}`)) : stage.inputs.map((t) => t.name)).join(", ");
  }
  const prefix = `${keys[from]}.`;
  const parts = bindings.filter(([, source]) => source.startsWith(prefix) || !source.includes("."))
    .map(([input, source]) => {
      const output = source.startsWith(prefix) ? source.slice(prefix.length) : source;
      return output === input ? input : `${output} → ${input}`;
    });
  return parts.join(", ");
}

function curve(x1, y1, x2, y2) {
  const dx = Math.max(30, (x2 - x1) / 2);
  return `M${x1},${y1} C${x1 + dx},${y1} ${x2 - dx},${y2} ${x2 - 2},${y2}`;
}

function edge(attrs, x1, y1, x2, y2, label, guard) {
  const mx = (x1 + x2) / 2, my = (y1 + y2) / 2;
  const chars = Math.max(8, Math.floor((x2 - x1 - 8) / 6.2)); // what fits between the two boxes
  return s("g", attrs,
    s("path", { d: curve(x1, y1, x2, y2), "marker-end": "url(#arrow)" }),
    label ? s("text", { x: mx, y: my - 6, "text-anchor": "middle" }, clip(label, chars), s("title", {}, label)) : null,
    guard ? s("text", { class: guard.cls, x: mx, y: my + 13, "text-anchor": "middle" }, clip(guard.text, chars), s("title", {}, guard.text)) : null);
}

function ioNode(x, y, height, title, tensors, kind) {
  const names = tensors.map((t) => t.name).join(", ");
  return s("g", { class: `node io ${kind}`, transform: `translate(${x},${y})` },
    s("rect", { width: IO_W, height, rx: 8 }),
    s("text", { class: "title", x: 10, y: 22 }, title),
    s("text", { class: "sub", x: 10, y: 42 }, clip(names, 15), s("title", {}, names)));
}

function stageNode(pipeline, stage, index, key, x, y, height) {
  const version = stage.version ? `v${stage.version}` : "default version";
  const where = `${stage.runtime} · ${stage.model} ${version}`;
  const { variants, mirror } = trafficOf(pipeline, index);
  const total = variants.reduce((sum, v) => sum + v.weight, 0);
  const label = key === String(index) ? `${index}. ${stage.name}` : `${key}: ${stage.name}`;
  const node = s("g", { class: `node stage${stage.default ? " default" : ""}`, transform: `translate(${x},${y})`,
    dataset: { stage: index, stageId: key, model: stage.model } },
  s("title", {}, `stage ${index}${stage.id ? ` (${stage.id})` : ""}: ${stage.name}\nruntime ${stage.runtime}, model ${stage.model}, ${version}\ntimeout ${stage.timeout_ms} ms` +
    (stage.when ? `\nwhen ${stage.when}` : "") + (stage.default ? "\ndefault branch" : "")),
  s("rect", { width: NODE_W, height, rx: 8 }),
  s("text", { class: "title", x: 10, y: 20 }, clip(label, 30)),
  stage.default ? s("text", { class: "default-mark", x: NODE_W - 10, y: 20, "text-anchor": "end" }, "default") : null,
  s("text", { class: "sub", x: 10, y: 38 }, clip(where, 34)),
  s("text", { class: "live stage-latency", x: 10, y: 60 }, "p50 –  p99 –"),
  s("text", { class: "live stage-errors", x: 10, y: 78 }, "errors –  calls –"));
  let line = 78 + LINE_H;
  variants.forEach((v, k) => {
    const share = total ? Math.round((v.weight / total) * 100) : 0;
    node.append(s("text", { class: "variant", x: 10, y: line, dataset: { variant: k, weight: v.weight, runtime: v.runtime || stage.runtime, version: v.version || "" } },
      s("tspan", { class: "split-weight" }, clip(`${variantLabel(stage, v)} ${share}% (w ${v.weight})`, 24)),
      s("tspan", { class: "served", dx: 6 }, "")));
    line += LINE_H;
  });
  if (mirror) {
    const text = `mirror ${mirror.runtime || stage.runtime}${mirror.version ? `:v${mirror.version}` : ""} ${mirror.percent}%`;
    node.append(s("g", { class: "mirror", dataset: { percent: mirror.percent } },
      s("line", { x1: 10, y1: line - 4, x2: 30, y2: line - 4 }),
      s("text", { x: 36, y: line }, clip(text, 30), s("title", {}, `${text} (shadow: answers are dropped)`))));
  }
  return node;
}

function extraLines(pipeline) {
  return Math.max(0, ...pipeline.stages.map((_, i) => {
    const { variants, mirror } = trafficOf(pipeline, i);
    return variants.length + (mirror ? 1 : 0);
  }));
}

/** The pipeline's graph: a scrollable box holding one SVG. */
export function drawPipeline(pipeline) {
  const stages = pipeline.stages;
  const { keys, preds, succs } = edgesOf(pipeline);
  const { cols } = columns(preds);
  const nodeH = BASE_H + LINE_H * extraLines(pipeline);
  // a switch's conditions are written on its edges: wider gaps where there are any
  const GAP = stages.some((st) => st.when || st.default) ? GUARD_GAP : BASE_GAP;
  const rows = Math.max(...cols.map((c) => c.length));
  const width = PAD * 2 + IO_W * 2 + cols.length * NODE_W + (cols.length + 1) * GAP;
  const height = TOP * 2 + rows * nodeH + (rows - 1) * VGAP;
  const svg = s("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `pipeline ${pipeline.name}`,
    class: "pipeline-graph", dataset: { pipeline: pipeline.name, revision: pipeline.revision } },
  s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
    s("path", { class: "arrowhead", d: "M0,0 L10,5 L0,10 z" }))));
  // positions: each column centred vertically
  const pos = [];
  cols.forEach((col, c) => {
    const colH = col.length * nodeH + (col.length - 1) * VGAP;
    const y0 = TOP + (height - TOP * 2 - colH) / 2;
    col.forEach((i, r) => (pos[i] = { x: PAD + IO_W + GAP + c * (NODE_W + GAP), y: y0 + r * (nodeH + VGAP) }));
  });
  const midY = (i) => pos[i].y + nodeH / 2;
  const ioY = TOP + (height - TOP * 2 - nodeH) / 2;
  const responseX = PAD + IO_W + GAP + cols.length * (NODE_W + GAP);
  const guard = (i) => (stages[i].when ? { cls: "when", text: `when ${stages[i].when}` } : stages[i].default ? { cls: "default-edge", text: "default" } : null);
  const edges = [];
  stages.forEach((_, i) => {
    if (!preds[i].length) {
      edges.push(edge({ class: "edge io-edge", dataset: { from: "request", to: keys[i] } }, PAD + IO_W, ioY + nodeH / 2, pos[i].x, midY(i), edgeLabel(pipeline, null, i, keys), guard(i)));
    }
    for (const from of preds[i]) {
      edges.push(edge({ class: `edge stage-edge${stages[i].when ? " conditional" : ""}`, dataset: { from: keys[from], to: keys[i] } },
        pos[from].x + NODE_W, midY(from), pos[i].x, midY(i), edgeLabel(pipeline, from, i, keys), guard(i)));
    }
  });
  const sinks = stages.map((_, i) => i).filter((i) => !succs[i].length);
  const outputs = sinks.flatMap((i) => stages[i].outputs);
  for (const i of sinks) {
    edges.push(edge({ class: "edge io-edge", dataset: { from: keys[i], to: "response" } }, pos[i].x + NODE_W, midY(i), responseX, ioY + nodeH / 2,
      stages[i].outputs.map((t) => t.name).join(", ")));
  }
  svg.append(...edges);
  svg.append(ioNode(PAD, ioY, nodeH, "request", preds.some((p) => p.length) ? stages.filter((_, i) => !preds[i].length).flatMap((st) => st.inputs) : stages[0].inputs, "request"));
  stages.forEach((stage, i) => svg.append(stageNode(pipeline, stage, i, keys[i], pos[i].x, pos[i].y, nodeH)));
  svg.append(ioNode(responseX, ioY, nodeH, "response", outputs, "response"));
  svg.dataset.columns = String(cols.length);
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
    // calls each variant of a split served in the window (sluice_gateway_stage_served_total)
    const served = (stats && stats.served ? stats.served : []).filter((sv) => sv.stage === node.dataset.stageId || sv.stage === String(index));
    for (const variant of node.querySelectorAll("text.variant")) {
      const { runtime, version } = variant.dataset;
      const n = served.filter((sv) => sv.runtime === runtime && (!version || sv.version === version)).reduce((sum, sv) => sum + sv.requests, 0);
      variant.querySelector(".served").textContent = stats ? `served ${n}` : "";
      variant.dataset.served = String(n);
    }
  }
}
