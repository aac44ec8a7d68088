// Validates the custom resources in rendered Kubernetes YAML (kubectl kustomize output)
// against their published schemas: Prometheus Operator's ServiceMonitor and
// PrometheusRule, KEDA's ScaledObject (the kubernetes-models packages carry the CRDs'
// OpenAPI schemas as validators). Prints one line per resource; exits 1 on any invalid
// one. Usage: node validate-crds.mjs RENDERED.yaml (run from the folder that holds
// node_modules, or with NODE_PATH pointing at it).
import { readFileSync } from "node:fs";
import yaml from "js-yaml";
import { ServiceMonitor, PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1";

const models = { ServiceMonitor, PrometheusRule, ScaledObject };
let failed = 0;
for (const doc of yaml.loadAll(readFileSync(process.argv[2], "utf8"))) {
  if (!doc || !models[doc.kind]) continue;
  const name = `${doc.kind}/${doc.metadata?.name}`;
  try {
    new models[doc.kind](doc).validate();
    console.log(`valid ${name} (${doc.apiVersion})`);
  } catch (e) {
    failed += 1;
    console.log(`INVALID ${name}: ${e.message}`);
  }
}
process.exit(failed ? 1 : 0);
