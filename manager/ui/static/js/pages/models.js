// Models: what the repository holds, each version's framework, signature and files,
// and the runtimes that have the version loaded.
import { api } from "../api.js";
import { h, tensorLines } from "../dom.js";

function size(bytes) {
  return bytes >= 1 << 20 ? `${(bytes / (1 << 20)).toFixed(1)} MiB` : bytes >= 1024 ? `${(bytes / 1024).toFixed(1)} KiB` : `${bytes} B`;
}

function modelCard(m) {
  return h("section", { class: "panel model-card", dataset: { model: m.name } },
    h("h3", {}, m.name, h("span", { class: "muted" }, `  ${m.framework} · ${m.layout} layout · latest ${m.latest} · default ${m.default_version ?? "refused: " + m.policy_error}`)),
    h("div", { class: "scroll" }, h("table", {},
      h("thead", {}, h("tr", {}, ["version", "framework", "inputs", "outputs", "files", "served by"].map((t) => h("th", {}, t)))),
      h("tbody", {}, m.versions.map((v) => h("tr", { dataset: { version: v.version } },
        h("td", {}, v.version), h("td", {}, v.framework),
        h("td", {}, tensorLines(v.inputs)), h("td", {}, tensorLines(v.outputs)),
        h("td", {}, h("details", {}, h("summary", {}, `${v.files.length} files, ${size(v.files.reduce((n, f) => n + f.size, 0))}`),
          v.files.map((f) => h("div", { class: "mono nowrap", title: `sha256 ${f.sha256}` }, `${f.path} (${size(f.size)})`)))),
        h("td", {}, v.served_by.length ? v.served_by.map((s, i) => [i ? ", " : "", `${s.runtime} (${s.instances})`]) : h("span", { class: "muted" }, "not loaded"))))))));
}

export async function render(main) {
  const models = await api("/api/v1/models");
  main.replaceChildren(h("h1", {}, "Models"),
    models.length ? h("div", { class: "grid" }, models.map(modelCard)) : h("p", { class: "muted" }, "The repository holds no model."));
  return null;
}
