"""Offline checks of the Sluice chart; `cargo xtask chart` runs this in its venv.

For each variant of the values below: render the chart (Helm v4 as a library,
no cluster), lint it strictly, validate every rendered object against the
Kubernetes schemas (strict: unknown fields are errors), and check what the
variant promises (which objects exist, what the arguments say, that RBAC
stays read-only); then check that values.schema.json refuses wrong values.
Every problem is printed with the variant, the template and the object;
the exit code is 1 if there was any.

usage: python check.py CHART_DIR KUBE_VERSION
"""

import collections
import sys

import helm_python as helm
import kubernetes_validate
import yaml

CHART_DIR, KUBE_VERSION = sys.argv[1], sys.argv[2]

# What the default install creates.
ALL_KINDS = {
    "DaemonSet": 1,
    "Deployment": 1,
    "Service": 1,
    "IngressClass": 1,
    "ServiceAccount": 2,
    "ClusterRole": 2,
    "ClusterRoleBinding": 2,
}
PROXY_KINDS = {"DaemonSet": 1, "ServiceAccount": 1, "ClusterRole": 1, "ClusterRoleBinding": 1}
INGRESS_KINDS = {
    "Deployment": 1,
    "Service": 1,
    "IngressClass": 1,
    "ServiceAccount": 1,
    "ClusterRole": 1,
    "ClusterRoleBinding": 1,
}

# Most values changed from their defaults, so that every optional branch of
# the templates renders.
EVERYTHING = {
    "commonLabels": {"team": "net"},
    "apiServer": {"host": "kind-control-plane", "port": 6443},
    "proxy": {
        "image": {"repository": "registry.example/sluice-proxy", "tag": "dev"},
        "imagePullSecrets": [{"name": "pull"}],
        "serviceCIDRs": ["10.96.0.0/16", "10.97.0.0/16"],
        "devices": ["eth0", "eth1"],
        "maps": {"serviceEntries": 131072, "policyAddresses": 1024},
        "logFormat": "text",
        "statusFile": False,
        "cgroupHostPath": "/sys/fs/cgroup/unified",
        "bpffs": {"enabled": False},
        "extraCapabilities": ["SYS_PTRACE"],
        "seLinuxOptions": {"level": "s0", "type": "spc_t"},
        "dnsPolicy": "ClusterFirstWithHostNet",
        "priorityClassName": "",
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "sluice", "operator": "Exists"}]}
                    ]
                }
            }
        },
        "resources": {"limits": {"memory": "512Mi"}},
        "podAnnotations": {"a": "b"},
        "podLabels": {"c": "d"},
        "serviceAccount": {"name": "agent", "annotations": {"e": "f"}},
        "extraArgs": ["--settle-ms=20"],
        "metricsPort": 0,
        "extraEnv": [{"name": "X", "value": "y"}],
    },
    "ingress": {
        "replicas": 3,
        "ingressClass": {"name": "edge", "controllerName": "example.com/edge", "isDefaultClass": True},
        "service": {
            "type": "NodePort",
            "nodePorts": {"http": 30080, "https": 30443},
            "externalTrafficPolicy": "Local",
            "annotations": {"g": "h"},
        },
        "defaultCertificateSecret": "wildcard-tls",
        "logJson": False,
        "requestHeadTimeoutSeconds": 20,
        "keepaliveTimeoutSeconds": 30,
        "clientBodyTimeoutSeconds": 40,
        "tolerations": [{"key": "edge", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {},
        "podAnnotations": {"i": "j"},
        "serviceAccount": {"name": "edge", "annotations": {"k": "l"}},
        "extraArgs": ["--settle-ms=50"],
        "extraEnv": [{"name": "Y", "value": "z"}],
    },
}


def find(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def container(objects, kind):
    return find(objects, kind)[0]["spec"]["template"]["spec"]["containers"][0]


def expect(condition, message):
    return [] if condition else [message]


def default_expectations(objects):
    args = container(objects, "DaemonSet")["args"]
    return (
        expect("--max-policy-addresses=65536" in args, f"proxy args lack the map sizes: {args}")
        + expect("--metrics-listen=0.0.0.0:9963" in args, f"proxy args lack the metrics port: {args}")
        + expect(
            container(objects, "DaemonSet").get("livenessProbe", {}).get("httpGet", {}).get("path") == "/healthz",
            "no liveness probe on /healthz",
        )
        + expect(
            not any(e["name"] == "KUBERNETES_SERVICE_HOST" for e in container(objects, "DaemonSet")["env"]),
            "KUBERNETES_SERVICE_HOST set without apiServer.host",
        )
        + expect(
            {"--request-head-timeout=60", "--keepalive-timeout=75", "--client-body-timeout=60"}
            <= set(container(objects, "Deployment")["args"]),
            f"ingress args lack the client timeouts: {container(objects, 'Deployment')['args']}",
        )
        + expect(
            find(objects, "Service")[0]["spec"]["type"] == "LoadBalancer",
            "the ingress Service is not a LoadBalancer by default",
        )
    )


def everything_expectations(objects):
    proxy = container(objects, "DaemonSet")
    ingress = container(objects, "Deployment")
    env = {e["name"]: e.get("value") for e in proxy["env"]}
    service = find(objects, "Service")[0]["spec"]
    ingress_class = find(objects, "IngressClass")[0]
    return (
        expect(
            env.get("KUBERNETES_SERVICE_HOST") == "kind-control-plane"
            and env.get("KUBERNETES_SERVICE_PORT") == "6443",
            f"API server env not set: {env}",
        )
        + expect(
            {"--device=eth0", "--device=eth1", "--service-cidr=10.97.0.0/16", "--max-service-entries=131072"}
            <= set(proxy["args"]),
            f"proxy args do not follow the values: {proxy['args']}",
        )
        + expect(
            proxy["securityContext"].get("seLinuxOptions", {}).get("type") == "spc_t", "seLinuxOptions not applied"
        )
        + expect(
            not any(a.startswith("--status-file") for a in proxy["args"]), "--status-file despite statusFile: false"
        )
        + expect(
            not any(a.startswith("--metrics-listen") for a in proxy["args"])
            and proxy["readinessProbe"].get("exec") is not None,
            "metrics port or HTTP probes despite metricsPort: 0",
        )
        + expect(
            [v["name"] for v in find(objects, "DaemonSet")[0]["spec"]["template"]["spec"]["volumes"]] == ["cgroup"],
            "bpffs mounted despite bpffs.enabled: false",
        )
        + expect(
            {
                "--default-cert=/etc/sluice-ingress/default-cert/tls.crt",
                "--class=edge",
                "--controller=example.com/edge",
                "--request-head-timeout=20",
                "--keepalive-timeout=30",
                "--client-body-timeout=40",
            }
            <= set(ingress["args"]),
            f"ingress args do not follow the values: {ingress['args']}",
        )
        + expect(
            [p.get("nodePort") for p in service["ports"]] == [30080, 30443], f"node ports not set: {service['ports']}"
        )
        + expect(
            ingress_class["metadata"].get("annotations", {}).get("ingressclass.kubernetes.io/is-default-class")
            == "true",
            "IngressClass not marked default",
        )
        + expect(ingress_class["spec"]["controller"] == "example.com/edge", "IngressClass controller not set")
    )


def renamed_expectations(objects):
    names = sorted(o["metadata"]["name"] for o in objects if o["kind"] in ("DaemonSet", "Deployment"))
    return expect(names == ["edge-sluice-ingress", "edge-sluice-proxy"], f"names not prefixed by the release: {names}")


def load_balancer_expectations(objects):
    spec = find(objects, "Service")[0]["spec"]
    return expect(
        spec.get("loadBalancerClass") == "service.k8s.aws/nlb"
        and spec.get("loadBalancerSourceRanges") == ["192.0.2.0/24"],
        f"LoadBalancer settings not applied: {spec}",
    )


def cluster_ip_expectations(objects):
    spec = find(objects, "Service")[0]["spec"]
    return expect(
        "externalTrafficPolicy" not in spec and all("nodePort" not in p for p in spec["ports"]),
        f"a ClusterIP Service with node-only fields: {spec}",
    )


def cleanup_expectations(objects):
    proxy = container(objects, "DaemonSet")
    script = " ".join(proxy.get("args", []))
    return expect(
        proxy.get("command") == ["/bin/sh", "-c"]
        and "sluice-proxy cleanup --bpffs-dir=/sys/fs/bpf/sluice" in script
        and "--kubernetes" not in script,
        f"proxy.cleanup does not run the cleanup instead of the agent: {proxy.get('command')} {script}",
    ) + expect(
        proxy["readinessProbe"].get("exec", {}).get("command") == ["test", "-f", "/run/sluice/cleaned"],
        f"the cleanup Pods are not Ready only once clean: {proxy['readinessProbe']}",
    )


# (name, release, values, kinds expected, more checks)
VARIANTS = [
    ("defaults", "sluice", {}, ALL_KINDS, default_expectations),
    ("proxy only", "sluice", {"ingress": {"enabled": False}}, PROXY_KINDS, None),
    ("ingress only", "sluice", {"proxy": {"enabled": False}}, INGRESS_KINDS, None),
    ("nothing", "sluice", {"proxy": {"enabled": False}, "ingress": {"enabled": False}}, {}, None),
    ("values changed", "sluice", EVERYTHING, ALL_KINDS, everything_expectations),
    ("another release name", "edge", {}, ALL_KINDS, renamed_expectations),
    (
        "LoadBalancer settings",
        "sluice",
        {
            "ingress": {
                "ingressClass": {"create": False},
                "service": {"loadBalancerClass": "service.k8s.aws/nlb", "loadBalancerSourceRanges": ["192.0.2.0/24"]},
            }
        },
        {k: v for k, v in ALL_KINDS.items() if k != "IngressClass"},
        load_balancer_expectations,
    ),
    ("ClusterIP Service", "sluice", {"ingress": {"service": {"type": "ClusterIP"}}}, ALL_KINDS, cluster_ip_expectations),
    ("uninstall cleanup", "sluice", {"proxy": {"cleanup": True}}, ALL_KINDS, cleanup_expectations),
]

# Values values.schema.json must refuse: a misspelt key would otherwise be
# ignored without a word, and a wrong type would render a broken object.
REFUSED = [
    {"proxy": {"serviceCIDR": ["10.0.0.0/8"]}},
    {"ingress": {"service": {"type": "LoadBalancr"}}},
    {"proxy": {"maps": {"backends": "many"}}},
    {"apiServer": {"port": 0}},
]

# Verbs a role may grant: the components only read...
READ_ONLY = {"get", "list", "watch"}
# ...but for what the Ingress controller reports: its Ingresses' status and
# Events about them, and nothing else.
INGRESS_REPORTS = {
    ("networking.k8s.io", "ingresses/status"): {"patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
}


def rbac_problems(objects):
    problems = []
    for role in find(objects, "ClusterRole"):
        name = role["metadata"]["name"]
        for rule in role["rules"]:
            allowed = set(READ_ONLY)
            if name.endswith("-ingress") and len(rule["apiGroups"]) == 1 and len(rule["resources"]) == 1:
                allowed = INGRESS_REPORTS.get((rule["apiGroups"][0], rule["resources"][0]), allowed)
            extra = set(rule["verbs"]) - allowed
            if extra or "*" in rule["resources"] or "*" in rule["apiGroups"]:
                problems.append(f"ClusterRole {name} grants more than reading: {rule}")
            if name.endswith("-proxy") and "secrets" in rule["resources"]:
                problems.append(f"ClusterRole {name}: the node agent must not read Secrets")
    return problems


def api_rule_problems(objects):
    """Rules the API server enforces that the schemas do not carry."""
    problems = []
    for obj in objects:
        if obj["kind"] not in ("DaemonSet", "Deployment"):
            continue
        for c in obj["spec"]["template"]["spec"]["containers"]:
            sc = c.get("securityContext") or {}
            caps = {a.removeprefix("CAP_") for a in (sc.get("capabilities") or {}).get("add") or []}
            if sc.get("allowPrivilegeEscalation") is False and (sc.get("privileged") or "SYS_ADMIN" in caps):
                problems.append(f"{describe(obj)}: allowPrivilegeEscalation false with privileged or SYS_ADMIN")
            for m in c.get("volumeMounts") or []:
                if m.get("mountPropagation") == "Bidirectional" and not sc.get("privileged"):
                    problems.append(f"{describe(obj)}: Bidirectional mount propagation needs a privileged container")
    return problems


def describe(obj):
    meta = obj.get("metadata") or {}
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind')} {where}{meta.get('name')}"


def check_variant(name, release, values, kinds, more):
    problems = []
    report = helm.lint(CHART_DIR, values, strict=True, kube_version=f"v{KUBE_VERSION}.0", namespace="kube-system")
    for message in report.get("messages", []):
        # 1 is info ("icon is recommended"); warnings and errors count.
        if message["severity"] >= 2:
            problems.append(f"helm lint: {message['path']}: {message['error']}")
    problems += [f"helm lint: {e}" for e in report.get("errors") or []]

    chart = helm.Chart.load(CHART_DIR)
    try:
        rendered = chart.render(values, name=release, namespace="kube-system", is_install=True)
    except helm.HelmError as e:
        return [f"render failed: {e}"]
    objects = []
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            continue
        try:
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as e:
            problems.append(f"{template}: not YAML: {e}")
            continue
        for obj in docs:
            try:
                kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path) or "(top)"
                problems.append(f"{template}: {describe(obj)}: {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.append(f"{template}: {describe(obj)}: no schema: {e}")
            except Exception as e:  # a malformed object, e.g. no apiVersion
                problems.append(f"{template}: {describe(obj)}: cannot be validated: {e!r}")
            objects.append(obj)

    found = collections.Counter(o.get("kind") for o in objects)
    if found != collections.Counter(kinds):
        problems.append(f"objects rendered {dict(found)}, expected {kinds}")
    problems += rbac_problems(objects)
    problems += api_rule_problems(objects)
    if more and not problems:
        problems += more(objects)
    print(f"chart check: {name}: {len(objects)} objects rendered, linted and validated"
          + (f", {len(problems)} problems" if problems else ""))
    return [f"{name}: {p}" for p in problems]


def refused_problems():
    chart = helm.Chart.load(CHART_DIR)
    problems = []
    for values in REFUSED:
        try:
            chart.render(values, name="sluice", namespace="kube-system", is_install=True)
            problems.append(f"values.schema.json accepts {values}")
        except helm.HelmValuesError:
            pass
    print(f"chart check: {len(REFUSED) - len(problems)} of {len(REFUSED)} wrong values refused by the schema")
    return problems


def main():
    problems = []
    for variant in VARIANTS:
        problems += check_variant(*variant)
    problems += refused_problems()
    for p in problems:
        print(f"ERROR {p}", file=sys.stderr)
    if problems:
        print(f"chart check: {len(problems)} problems", file=sys.stderr)
        sys.exit(1)
    print(f"chart check: {len(VARIANTS)} variants valid for Kubernetes {KUBE_VERSION}")


main()
