// Traffic-split sliders (deploy scope): one slider per variant of a stage whose `traffic`
// splits between two or more runtimes or versions. Releasing a slider replaces the pipeline
// (PUT /api/v1/pipelines/<name> with its stored definition and the new weights: a replace
// is make-before-break in the manager), and shows the manager's answer or its error.
// With two variants the sliders are linked (their weights keep their sum, 100 as a rule).
import { api, ApiError } from "./api.js";
import { h, errorBox } from "./dom.js";
import { stageKey, trafficOf, variantLabel } from "./graph.js";

/** Stages of a pipeline whose split has two or more variants: [{index, key, stage, variants}]. */
export function splitStages(pipeline) {
  return pipeline.stages.map((stage, index) => ({ index, key: stageKey(stage, index), stage, variants: trafficOf(pipeline, index).variants }))
    .filter((st) => st.variants.length >= 2);
}

/** The stored definition with new weights for stage ``index`` (a deep copy). */
export function withWeights(definition, index, weights) {
  const copy = JSON.parse(JSON.stringify(definition));
  copy.stages[index].traffic.forEach((variant, k) => { variant.weight = weights[k]; });
  return copy;
}

function shares(weights) {
  const total = weights.reduce((a, b) => a + b, 0);
  return weights.map((w) => (total ? `${Math.round((w / total) * 100)}%` : "–"));
}

/** The sliders of every split stage of ``pipeline``; ``onApplied(newPipeline)`` after a replace. */
export function trafficControls(pipeline, onApplied) {
  let current = pipeline;
  const box = h("div", { class: "traffic-controls", dataset: { pipeline: pipeline.name } });
  const draw = () => {
    const stages = splitStages(current);
    if (!stages.length) {
      box.replaceChildren(h("p", { class: "muted" }, `No stage of ${current.name} splits its traffic between two or more variants: add a `,
        h("code", {}, "traffic"), " list to a stage (runtimes or versions, with weights) to get a slider here."));
      return;
    }
    box.replaceChildren(...stages.map(({ index, key, stage, variants }) => {
      const weights = variants.map((v) => v.weight);
      // two variants: linked sliders whose weights keep their sum (100 unless the definition's differ)
      const sum = weights.reduce((a, b) => a + b, 0) || 100;
      const max = Math.max(100, ...(variants.length === 2 ? [sum] : weights));
      const result = h("div", { class: "split-result" });
      const share = variants.map(() => h("span", { class: "mono share" }));
      const sliders = variants.map((v, k) => h("input", {
        type: "range", min: 0, max, step: 1, value: v.weight, class: "split-slider",
        "aria-label": `weight of ${variantLabel(stage, v)} in stage ${key} of ${current.name}`, dataset: { variant: k },
      }));
      const show = () => {
        const text = shares(weights);
        share.forEach((span, k) => { span.textContent = `w ${weights[k]} · ${text[k]}`; });
      };
      sliders.forEach((slider, k) => {
        slider.addEventListener("input", () => {
          weights[k] = Number(slider.value);
          if (sliders.length === 2) { // linked: the other takes the rest of 100
            weights[k] = Math.min(weights[k], sum);
            slider.value = String(weights[k]);
            weights[1 - k] = sum - weights[k];
            sliders[1 - k].value = String(weights[1 - k]);
          }
          show();
        });
        slider.addEventListener("change", () => apply());
      });
      async function apply() {
        sliders.forEach((sl) => { sl.disabled = true; });
        result.replaceChildren(h("div", { class: "muted" }, "replacing…"));
        try {
          const body = withWeights(current.definition, index, weights);
          const out = await api(`/api/v1/pipelines/${encodeURIComponent(current.name)}`, { method: "PUT", body });
          current = out;
          result.replaceChildren(h("div", { class: "ok-box", dataset: { revision: out.revision } },
            `Replaced ${out.name}, revision ${out.revision}: stage ${key} weights `,
            variants.map((v, k) => `${variantLabel(stage, v)} ${weights[k]}`).join(" · "), "."));
          if (onApplied) onApplied(out);
        } catch (error) {
          result.replaceChildren(error instanceof ApiError ? h("div", { class: "error-box", role: "alert" }, `${error.status} ${error.code}: ${error.message}`) : errorBox(error));
        } finally {
          sliders.forEach((sl) => { sl.disabled = false; });
        }
      }
      show();
      return h("div", { class: "traffic-stage", dataset: { stage: index, stageId: key } },
        h("strong", {}, `${current.name} · stage ${key}`), h("span", { class: "muted" }, `  ${stage.model} · split between ${variants.length} variants`),
        variants.map((v, k) => h("div", { class: "variant-row", dataset: { variant: k } },
          h("span", { class: "mono" }, variantLabel(stage, v)), sliders[k], share[k])),
        result);
    }));
  };
  draw();
  return box;
}
