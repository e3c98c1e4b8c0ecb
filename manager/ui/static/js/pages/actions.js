// Actions (deploy scope): create or replace a pipeline from a JSON or YAML editor, with the
// manager's 422 placed on the stage and tensor it names; delete with a confirmation; and
// a slider per variant of every stage that splits its traffic (a pipeline replace underneath).
import { api, ApiError, session } from "../api.js";
import { h, errorBox } from "../dom.js";
import { splitStages, trafficControls } from "../traffic.js";

const CHAIN_ENTRY = /^([A-Za-z0-9][A-Za-z0-9_.-]*)\/([A-Za-z0-9][A-Za-z0-9_.-]*)(?::([A-Za-z0-9_.-]+))?$/;

/** The stages a definition names, in order (whatever is readable of them). */
function stagesOf(spec) {
  if (!spec || typeof spec !== "object") return [];
  if (Array.isArray(spec.stages)) {
    return spec.stages.map((st) => ({ runtime: st?.runtime, model: st?.model, version: st?.version, name: st?.name || st?.id, inputs: st?.inputs }));
  }
  if (Array.isArray(spec.chain)) {
    return spec.chain.map((entry) => {
      const m = CHAIN_ENTRY.exec(String(entry));
      return m ? { runtime: m[1], model: m[2], version: m[3] } : { name: String(entry) };
    });
  }
  return [];
}

/** The text as a definition: JSON here, YAML through the manager (/ui/api/yaml). */
async function parse(text) {
  const trimmed = text.trim();
  if (!trimmed) throw new Error("the editor is empty");
  try {
    return JSON.parse(trimmed);
  } catch (error) {
    if (trimmed.startsWith("{")) throw new Error(`not JSON: ${error.message}`);
  }
  return api("/ui/api/yaml", { method: "POST", body: { text } });
}

/** Every problem in an error answer, as {stage, tensor, message}: the manager's own 422s
 * name a stage index (and a tensor); request validation names a location (…, stages|chain, i, …). */
function problemsOf(error) {
  const found = [];
  const fromLoc = (loc) => {
    const at = loc.findIndex((part) => part === "stages" || part === "chain");
    return at >= 0 && /^\d+$/.test(String(loc[at + 1])) ? Number(loc[at + 1]) : null;
  };
  const add = (message, details) => {
    details = details || {};
    if (Array.isArray(details.problems) && details.problems.length && details.problems[0].loc) {
      for (const p of details.problems) {
        found.push({ stage: fromLoc(p.loc), tensor: null, message: `${p.loc.filter((x) => x !== "body").join(".")}: ${p.msg}` });
      }
      return;
    }
    found.push({ stage: Number.isInteger(details.stage) ? details.stage : null, tensor: details.tensor || null, message });
  };
  if (error.code === "invalid_apply") for (const p of error.details.problems || []) add(p.message, p.details);
  else add(error.message, error.details);
  return found;
}

export async function render(main, [editing]) {
  const [pipelines, runtimes] = await Promise.all([api("/api/v1/pipelines"), api("/api/v1/runtimes")]);
  const names = new Set(pipelines.map((p) => p.name));
  const splits = pipelines.filter((p) => splitStages(p).length && (!editing || p.name === editing));
  const models = new Map(); // "runtime/model" -> signature
  for (const r of runtimes) for (const m of r.models) models.set(`${r.name}/${m.name}`, m);

  const editor = h("textarea", { class: "editor", id: "editor", spellcheck: "false", "aria-label": "pipeline definition (JSON or YAML)" });
  const preview = h("div", { id: "preview" });
  const result = h("div", { id: "result" });
  const submit = h("button", { type: "button", class: "primary", id: "submit" }, "Create");
  const validate = h("button", { type: "button", id: "validate" }, "Validate");

  const current = editing && pipelines.find((p) => p.name === editing);
  if (current) editor.value = JSON.stringify(current.definition, null, 2);
  else {
    const first = runtimes.find((r) => r.models.length);
    editor.value = JSON.stringify({ name: "new-pipeline", transportType: "http",
      stages: first ? [{ runtime: first.name, model: first.models[0].name }] : [] }, null, 2);
  }

  let spec = null;
  function drawPreview(stages) {
    preview.replaceChildren(...(stages.length ? stages.map((st, i) => {
      const model = models.get(`${st.runtime}/${st.model}`);
      const tensors = (list, kind) => (list || []).map((t) => h("span", { class: "tensor mono", dataset: { tensor: t.name, kind } }, `${t.name}: ${t.datatype}[${t.shape.join(",")}]`));
      return h("div", { class: "stage-card", dataset: { stage: i } },
        h("strong", {}, `${i}. ${st.name || `${st.runtime}/${st.model}${st.version ? `:${st.version}` : ""}`}`),
        h("div", { class: "muted" }, `runtime ${st.runtime ?? "?"} · model ${st.model ?? "?"} · ${st.version ? `version ${st.version}` : "default version"}`),
        model ? [h("div", {}, "in: ", tensors(model.inputs, "input").flatMap((x, k) => (k ? [", ", x] : [x]))),
          h("div", {}, "out: ", tensors(model.outputs, "output").flatMap((x, k) => (k ? [", ", x] : [x])))]
          : h("div", { class: "muted" }, "no such model on that runtime (yet)"),
        st.inputs && typeof st.inputs === "object" ? h("div", { class: "mono" }, "bindings: ",
          Object.entries(st.inputs).map(([input, source], k) => [k ? ", " : "", h("span", { class: "tensor", dataset: { tensor: input } }, `${input} ← ${source}`)])) : null);
    }) : [h("p", { class: "muted" }, "No stages to show.")]));
  }

  async function refresh() {
    try {
      spec = await parse(editor.value);
      drawPreview(stagesOf(spec));
      const name = spec && spec.name;
      submit.textContent = name && names.has(name) ? `Replace ${name}` : "Create";
      return spec;
    } catch (error) {
      spec = null;
      result.replaceChildren(errorBox(error));
      return null;
    }
  }

  function showErrors(error) {
    const general = [];
    for (const problem of problemsOf(error)) {
      const card = problem.stage !== null ? preview.querySelector(`.stage-card[data-stage="${problem.stage}"]`) : null;
      if (!card) { general.push(problem.message); continue; }
      card.classList.add("has-error");
      let named = problem.tensor ? card.querySelector(`.tensor[data-tensor="${CSS.escape(problem.tensor)}"]`) : null;
      if (problem.tensor && !named) {
        named = h("span", { class: "tensor mono", dataset: { tensor: problem.tensor } }, problem.tensor);
        card.append(h("div", {}, "tensor ", named));
      }
      if (named) named.classList.add("named");
      card.append(h("div", { class: "stage-error", role: "alert" }, problem.tensor ? `tensor ${problem.tensor}: ${problem.message}` : problem.message));
    }
    result.replaceChildren(h("div", { class: "error-box", role: "alert" },
      `${error.status} ${error.code}: ${general.length ? general.join("\n") : "see the stage marked in the preview"}`));
  }

  async function send(dryRun) {
    result.replaceChildren();
    const parsed = await refresh();
    if (!parsed) return;
    try {
      if (dryRun) {
        const out = await api("/api/v1/pipelines:apply?dry_run=true", { method: "POST", body: { pipelines: [parsed] } });
        const what = out.created.length ? "would be created" : out.replaced.length ? "would replace the served revision" : "is what is served already";
        result.replaceChildren(h("div", { class: "ok-box" }, `Valid: ${parsed.name} ${what}.`));
        return;
      }
      const replacing = names.has(parsed.name);
      const out = replacing
        ? await api(`/api/v1/pipelines/${encodeURIComponent(parsed.name)}`, { method: "PUT", body: parsed })
        : await api("/api/v1/pipelines", { method: "POST", body: parsed });
      names.add(out.name);
      submit.textContent = `Replace ${out.name}`;
      result.replaceChildren(h("div", { class: "ok-box", id: "deployed" },
        `${replacing ? "Replaced" : "Created"} ${out.name}, revision ${out.revision}: serving at POST ${session.config.gateway_url}/serve/${out.name} `,
        h("a", { href: `#/pipelines/${encodeURIComponent(out.name)}` }, "view")));
      fillDelete();
    } catch (error) {
      if (error instanceof ApiError) showErrors(error);
      else result.replaceChildren(errorBox(error));
    }
  }
  submit.addEventListener("click", () => send(false));
  validate.addEventListener("click", () => send(true));
  let typing = null;
  editor.addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(() => { result.replaceChildren(); refresh(); }, 400); });

  // delete, with a confirmation
  const target = h("select", { id: "delete-pipeline", "aria-label": "pipeline to delete" });
  const dialogText = h("p", {});
  const dialog = h("dialog", { id: "confirm-delete" }, h("form", { method: "dialog" },
    h("h3", {}, "Delete pipeline?"), dialogText,
    h("div", { class: "row" }, h("button", { value: "cancel" }, "Cancel"), h("button", { value: "delete", class: "danger", id: "confirm-delete-button" }, "Delete"))));
  const deleted = h("div", {});
  async function fillDelete() {
    const list = await api("/api/v1/pipelines");
    target.replaceChildren(...list.map((p) => h("option", { value: p.name }, p.name)));
  }
  const remove = h("button", { type: "button", class: "danger", id: "delete", onclick: () => {
    if (!target.value) return;
    dialogText.textContent = `${target.value} stops being served (the gateway answers 404 first), then its routes and clusters go. This cannot be undone.`;
    dialog.returnValue = "";
    dialog.showModal();
  } }, "Delete…");
  dialog.addEventListener("close", async () => {
    if (dialog.returnValue !== "delete") return;
    const name = target.value;
    try {
      await api(`/api/v1/pipelines/${encodeURIComponent(name)}`, { method: "DELETE" });
      names.delete(name);
      deleted.replaceChildren(h("div", { class: "ok-box" }, `Deleted ${name}.`));
      await fillDelete();
    } catch (error) {
      deleted.replaceChildren(errorBox(error));
    }
  });
  pipelines.forEach((p) => target.append(h("option", { value: p.name, selected: p.name === editing }, p.name)));

  main.replaceChildren(
    h("h1", {}, "Actions"),
    h("div", { class: "split" },
      h("section", { class: "panel" }, h("h2", {}, "Create or replace a pipeline"),
        h("p", { class: "muted" }, "JSON or YAML: the seed's ", h("code", {}, "chain"), " form or the ", h("code", {}, "stages"),
          " form. A replace is blue/green: the new revision is routed before it is served."),
        editor, h("div", { class: "row" }, validate, submit), result),
      h("section", { class: "panel" }, h("h2", {}, "Stages"), h("p", { class: "muted" }, "As the definition names them, with the signatures the runtimes report; the manager's errors are placed on the stage and tensor they name."), preview)),
    h("div", { class: "split" },
      h("section", { class: "panel" }, h("h2", {}, "Delete a pipeline"), h("div", { class: "row" }, target, remove), deleted, dialog),
      h("section", { class: "panel", id: "traffic-split" }, h("h2", {}, "Traffic split"),
        h("p", { class: "muted" }, "Stages that split traffic between runtimes or versions. Releasing a slider replaces the pipeline with the new weights (make-before-break, as every replace)."),
        splits.length ? splits.map((p) => trafficControls(p, null))
          : h("p", { class: "muted", id: "no-splits" }, "No pipeline has a stage with a traffic split of two or more variants (a stage's ", h("code", {}, "traffic"), " list)."))));
  await refresh();
  return () => clearTimeout(typing);
}
