// Validates rendered Kubernetes objects against the API's JSON schemas, offline, with the
// kubernetes-models packages (core API, prometheus-operator, KEDA) that scripts/bootstrap puts
// in .cache/chart-tools.
//   node validate_objects.mjs TOOLS_DIR < objects.json
// objects.json: [{"source": "values file / template", "object": {...}}, ...]
// Prints one line per invalid object and exits 1 when any is invalid or of an unknown kind.
import { readFileSync, existsSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const tools = process.argv[2];
const modules = join(tools, "node_modules");
const packages = {
  "monitoring.coreos.com": "@kubernetes-models/prometheus-operator",
  "keda.sh": "@kubernetes-models/keda",
};

function modulePath(apiVersion, kind) {
  const [group, version] = apiVersion.includes("/") ? apiVersion.split("/") : ["", apiVersion];
  const pkg = packages[group] ?? "kubernetes-models";
  return join(modules, pkg, ...(group ? [group, version] : [version]), `${kind}.js`);
}

const items = JSON.parse(readFileSync(0, "utf8"));
let bad = 0;
const kinds = new Set();
for (const { source, object } of items) {
  const what = `${source}: ${object.kind} ${object.metadata?.name}`;
  const file = modulePath(object.apiVersion, object.kind);
  if (!existsSync(file)) {
    console.log(`${what}: no schema for ${object.apiVersion} ${object.kind}`);
    bad++;
    continue;
  }
  const mod = await import(pathToFileURL(file).href);
  const Model = mod[object.kind] ?? mod.default;
  try {
    new Model(object).validate();
    kinds.add(`${object.apiVersion}/${object.kind}`);
  } catch (e) {
    console.log(`${what}: ${e.message}`);
    bad++;
  }
}
console.log(`validated ${items.length} objects (${[...kinds].sort().join(", ")}): ${bad} invalid`);
process.exit(bad ? 1 : 0);
