"""What Kubernetes itself would decide about rendered manifests, for the static
checks (.ci/validate-deploy) and the rehearsal (scripts/rehearse-deploy) alike:
a container's environment as the kubelet resolves it, and which connections
the NetworkPolicies admit.

Standard library plus PyYAML only.
"""

import math
import re
from pathlib import Path

import yaml

# ---------------------------------------------------------------- documents


def load_docs(path):
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]


def by_kind(docs):
    out = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def named(docs, kind, name):
    return next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)


# ---------------------------------------------------------------- environment

_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value, defined):
    """The kubelet's $(VAR) expansion: `$$` is a literal `$`, `$(NAME)` is
    NAME's value when NAME is in `defined`, else stays as written. Returns the
    value and the names it referred to that were not defined."""
    missing = []

    def sub(m):
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        if name in defined:
            return defined[name]
        missing.append(name)
        return m.group(0)

    return _REF.sub(sub, value), missing


def references(value):
    """The names `value` refers to with $(NAME) (not $$(NAME))."""
    return [m.group(1) for m in _REF.finditer(value) if m.group(1)]


def resolve_env(container, docs, secret_data=None):
    """The container's environment as the kubelet builds it: envFrom in order
    (later sources win), then env in order, each value expanded from what
    is defined before it. `secret_data(name)` gives a Secret's decoded data
    (a dict) or None when it does not exist; ConfigMaps come from `docs`.

    Returns (env, problems): problems are the entries a kubelet would refuse
    (a missing non-optional ConfigMap/Secret or key) and the $(VAR)
    references that stay literal because VAR comes later or nowhere."""
    secret_data = secret_data or (lambda name: None)

    def configmap(name):
        d = named(docs, "ConfigMap", name)
        return None if d is None else dict(d.get("data") or {})

    env, problems = {}, []
    for ef in container.get("envFrom", []):
        if "configMapRef" in ef:
            ref, data = ef["configMapRef"], configmap(ef["configMapRef"]["name"])
        else:
            ref, data = ef["secretRef"], secret_data(ef["secretRef"]["name"])
        if data is None:
            if not ref.get("optional"):
                problems.append(f"envFrom {ref['name']}: not found")
            continue
        prefix = ef.get("prefix", "")
        env.update({prefix + k: str(v) for k, v in data.items()})
    names_later = [e["name"] for e in container.get("env", [])]
    for i, e in enumerate(container.get("env", [])):
        name = e["name"]
        if "value" in e or "valueFrom" not in e:
            value, missing = expand(str(e.get("value", "")), env)
            for m in missing:
                where = "a later entry" if m in names_later[i + 1:] else "nowhere"
                problems.append(f"env {name}: $({m}) stays literal: {m} is defined {where} (the kubelet expands only earlier entries)")
            env[name] = value
            continue
        vf = e["valueFrom"]
        if "configMapKeyRef" in vf or "secretKeyRef" in vf:
            kind = "configMapKeyRef" if "configMapKeyRef" in vf else "secretKeyRef"
            ref = vf[kind]
            data = configmap(ref["name"]) if kind == "configMapKeyRef" else secret_data(ref["name"])
            if data is None or ref["key"] not in data:
                if not ref.get("optional"):
                    problems.append(f"env {name}: {ref['name']}/{ref['key']} not found")
                continue
            env[name] = str(data[ref["key"]])
        elif "fieldRef" in vf:
            env[name] = f"<fieldRef {vf['fieldRef'].get('fieldPath')}>"
        else:
            problems.append(f"env {name}: unsupported valueFrom {sorted(vf)}")
    return env, problems


# ---------------------------------------------------------------- workloads


def surge(strategy, replicas):
    """Pods a rolling update may add beyond `replicas` (maxSurge, default 25%)."""
    ru = (strategy or {}).get("rollingUpdate") or {}
    if (strategy or {}).get("type") == "Recreate":
        return 0
    value = ru.get("maxSurge", "25%")
    if isinstance(value, str) and value.endswith("%"):
        return math.ceil(replicas * int(value[:-1]) / 100)
    return int(value)


def unavailable(strategy, replicas):
    """Pods a rolling update may take away (maxUnavailable, default 25%, rounded down)."""
    ru = (strategy or {}).get("rollingUpdate") or {}
    value = ru.get("maxUnavailable", "25%")
    if isinstance(value, str) and value.endswith("%"):
        return math.floor(replicas * int(value[:-1]) / 100)
    return int(value)


def hpa_for(docs, deployment):
    return next((h for h in docs if h["kind"] == "HorizontalPodAutoscaler"
                 and h["spec"]["scaleTargetRef"].get("kind") == "Deployment"
                 and h["spec"]["scaleTargetRef"]["name"] == deployment), None)


# ---------------------------------------------------------------- network policies


def selects(selector, labels):
    """A LabelSelector (matchLabels and matchExpressions) against labels;
    an empty selector selects everything."""
    selector = selector or {}
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for ex in selector.get("matchExpressions") or []:
        key, op, values = ex["key"], ex["operator"], ex.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


class Endpoint:
    """One side of a connection: a pod (namespace, its labels, its named
    ports) or an address outside the cluster (ip set, no labels)."""

    def __init__(self, namespace=None, labels=None, ip=None, ports=None):
        self.namespace = namespace
        self.labels = labels or {}
        self.ip = ip
        self.ports = ports or {}  # name -> number (the destination's container ports)

    def ns_labels(self):
        return {"kubernetes.io/metadata.name": self.namespace} if self.namespace else {}


def _peer_matches(peer, policy_ns, other):
    if "ipBlock" in peer:
        if other.ip is None:
            return False
        import ipaddress
        block = ipaddress.ip_network(peer["ipBlock"]["cidr"])
        ip = ipaddress.ip_address(other.ip)
        return ip in block and not any(ip in ipaddress.ip_network(e) for e in peer["ipBlock"].get("except", []))
    if other.namespace is None:
        return False  # an outside address matches ipBlock peers only
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], other.ns_labels()):
            return False
    elif other.namespace != policy_ns:
        return False
    return "podSelector" not in peer or selects(peer["podSelector"], other.labels)


def _port_matches(rule_ports, port, dst):
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != "TCP":
            continue
        if "port" not in p:
            return True
        want = p["port"]
        if isinstance(want, str):
            want = dst.ports.get(want)
        end = p.get("endPort", want)
        if want is not None and want <= port <= end:
            return True
    return False


def admits(policies, src, dst, port, direction):
    """Whether the policies of the endpoint that `direction` concerns admit a
    TCP connection src -> dst:port on that side: "Ingress" judges at dst,
    "Egress" at src. An endpoint no policy of that type selects is open."""
    owner, other = (dst, src) if direction == "Ingress" else (src, dst)
    if owner.namespace is None:
        return True  # outside the cluster: not ours to judge
    selecting = [p for p in policies if p["metadata"].get("namespace", owner.namespace) == owner.namespace
                 and direction in p["spec"].get("policyTypes", ["Ingress"])
                 and selects(p["spec"].get("podSelector"), owner.labels)]
    if not selecting:
        return True
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for p in selecting:
        ns = p["metadata"].get("namespace", owner.namespace)
        for rule in p["spec"].get(key) or []:
            peers = rule.get(peers_key)
            if peers is not None and not any(_peer_matches(peer, ns, other) for peer in peers):
                continue
            if _port_matches(rule.get("ports"), port, dst):
                return True
    return False


def allowed(policies, src, dst, port):
    """Both sides admit src -> dst:port."""
    return admits(policies, src, dst, port, "Egress") and admits(policies, src, dst, port, "Ingress")
