#!/usr/bin/env python3
"""The production overlay, run as a cluster would run it, on one machine.

Renders k8s/overlays/production and runs what it declares: each pod a
process in a network namespace of its own on a bridge (its own address),
its Secret/ConfigMap volumes in a mount namespace of its own, its
environment resolved as the kubelet resolves it, its probes polled, its
preStop hook and grace period honoured; the NetworkPolicies as nftables
rules in every namespace; Service names in a hosts file per pod, rewritten
from the ready endpoints. What the operators would do is done from their
resources: certificates (cert-manager), the broker (RabbitMQ cluster
operator) with its users and permissions made through the management API
over TLS from the topology operator's own namespace, PostgreSQL
(CloudNativePG: roles, databases, parameters, TLS, the -rw Service), and an
SMTP relay with TLS at the name SMTP_URL gives.

Then traffic through the gateway's Service from the ingress controller's
namespace, faults while it runs, the checks, and a report. See
scripts/rehearse-deploy for the command line. Needs root.
"""

import argparse
import base64
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import k8s_model as km  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "orh"  # every netns, link, nft table and node name starts with it (order-system rehearsal)
NET = "10.218.0"  # a /24 nothing else here uses; .1 is the node (this host)
NODE_IP = f"{NET}.1"
BRIDGE = f"{PREFIX}br0"
NS = "order-system"
PG_BIN = Path(sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]) if Path("/usr/lib/postgresql").exists() else None
RMQ_BIN = Path("/usr/lib/rabbitmq/bin")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd, check=True, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        shown = " ".join(str(c) for c in cmd if not str(c).startswith(("RABBITMQ_", "PATH=", "HOME=")))
        raise RuntimeError(f"{shown}: exit {r.returncode}: {(r.stderr.strip() or r.stdout.strip())[-1500:]}")
    return r


class Failed(Exception):
    pass


# ====================================================================== network


class Net:
    """The bridge, the namespaces on it, their hosts files and nftables."""

    def __init__(self):
        self.hosts = {}  # netns -> Host
        self.next_ip = 20
        self.index = 0
        self.lock = threading.RLock()  # the set of hosts
        self.nft_lock = threading.Lock()  # one rules update at a time

    def up(self):
        self.down()
        run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        run(["ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE])
        run(["ip", "link", "set", BRIDGE, "up"])

    def add(self, name, namespace, labels, ports, ip_last=None):
        with self.lock:
            self.index += 1
            if ip_last is None:
                ip_last, self.next_ip = self.next_ip, self.next_ip + 1
            if ip_last > 250:
                raise Failed("out of addresses on the rehearsal's /24")
            h = Host(f"{PREFIX}-{name}"[:40], f"{NET}.{ip_last}", namespace, labels, ports, self.index, name)
            run(["ip", "netns", "add", h.netns])
            host_if, pod_if = f"{PREFIX}h{h.index}", f"{PREFIX}p{h.index}"
            run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", pod_if])
            run(["ip", "link", "set", pod_if, "netns", h.netns])
            run(["ip", "link", "set", host_if, "master", BRIDGE, "up"])
            ex = ["ip", "netns", "exec", h.netns]
            run(ex + ["ip", "link", "set", pod_if, "name", "eth0"])
            run(ex + ["ip", "addr", "add", f"{h.ip}/24", "dev", "eth0"])
            run(ex + ["ip", "link", "set", "eth0", "up"])
            run(ex + ["ip", "link", "set", "lo", "up"])
            Path(f"/etc/netns/{h.netns}").mkdir(parents=True, exist_ok=True)
            Path(f"/etc/netns/{h.netns}/hosts").write_text("127.0.0.1 localhost\n")
            self.hosts[h.netns] = h
            return h

    @staticmethod
    def _delete(netns):
        """Ends what still runs in the namespace (e.g. the epmd a RabbitMQ
        node started: it outlives the node and would keep the namespace and
        its link alive), then deletes it."""
        for _ in range(3):
            pids = run(["ip", "netns", "pids", netns], check=False).stdout.split()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            time.sleep(0.2)
        run(["ip", "netns", "del", netns], check=False)
        shutil.rmtree(f"/etc/netns/{netns}", ignore_errors=True)

    def remove(self, h):
        with self.lock:
            self.hosts.pop(h.netns, None)
        self._delete(h.netns)

    def down(self):
        for line in run(["ip", "netns", "list"], check=False).stdout.splitlines():
            name = line.split()[0] if line.strip() else ""
            if name.startswith(f"{PREFIX}-"):
                self._delete(name)
        run(["ip", "link", "del", BRIDGE], check=False)
        # A link whose namespace was already gone but still held.
        for line in run(["ip", "-br", "link"], check=False).stdout.splitlines():
            link = line.split("@")[0].split()[0] if line.strip() else ""
            if link.startswith(PREFIX):
                run(["ip", "link", "del", link], check=False)

    # ---- names
    def write_hosts(self, entries):
        """entries: name -> [ip]; every host gets them, shuffled per host so
        that clients spread over the ready pods."""
        with self.lock:
            hosts = list(self.hosts.values())
        for h in hosts:
            if True:
                lines = ["127.0.0.1 localhost", f"{h.ip} {h.name}"]
                for name, ips in sorted(entries.items()):
                    ips = list(ips)
                    random.shuffle(ips)
                    lines += [f"{ip} {name}" for ip in ips]
                path = Path(f"/etc/netns/{h.netns}/hosts")
                # In place: the file is bind-mounted into running pods.
                try:
                    with open(path, "r+") as f:
                        f.seek(0)
                        f.write("\n".join(lines) + "\n")
                        f.truncate()
                except FileNotFoundError:
                    pass  # the host is being removed

    # ---- NetworkPolicies
    def enforce(self, policies):
        """Rewrites every host's nftables from the policies: default drop
        in and out; established traffic, loopback and the node (kubelet
        probes, this orchestrator) in; then each (peer, port) the policies
        admit. Returns the number of rules."""
        with self.nft_lock:
            with self.lock:
                hosts = list(self.hosts.values())
            total = 0
            for h in hosts:
                me = h.endpoint()
                inbound, outbound = [], []
                for other in hosts:
                    if other is h:
                        continue
                    peer = other.endpoint()
                    for port in h.ports.values():
                        if km.admits(policies, peer, me, port, "Ingress"):
                            inbound.append(f"ip saddr {other.ip} tcp dport {port} accept")
                    for port in other.ports.values():
                        if km.admits(policies, me, peer, port, "Egress"):
                            outbound.append(f"ip daddr {other.ip} tcp dport {port} accept")
                total += len(inbound) + len(outbound)
                ruleset = f"""table inet {PREFIX}
delete table inet {PREFIX}
table inet {PREFIX} {{
  chain input {{
    type filter hook input priority 0; policy drop;
    ct state established,related accept
    iif lo accept
    ip saddr {NODE_IP} accept
    {chr(10).join('    ' + r for r in inbound)}
  }}
  chain output {{
    type filter hook output priority 0; policy drop;
    ct state established,related accept
    oif lo accept
    {chr(10).join('    ' + r for r in outbound)}
  }}
}}
"""
                r = subprocess.run(["ip", "netns", "exec", h.netns, "nft", "-f", "-"], input=ruleset, text=True,
                                   capture_output=True)
                if r.returncode != 0 and h.netns in self.hosts:
                    raise Failed(f"nft in {h.netns}: {r.stderr}")
            return total


class Host:
    def __init__(self, netns, ip, namespace, labels, ports, index, name):
        self.netns, self.ip, self.namespace, self.labels = netns, ip, namespace, labels
        self.ports = ports  # name -> number
        self.index, self.name = index, name

    def endpoint(self):
        if self.namespace is None:
            return km.Endpoint(ip=self.ip, ports=self.ports)
        return km.Endpoint(namespace=self.namespace, labels=self.labels, ip=self.ip, ports=self.ports)

    def exec(self, cmd):
        return ["ip", "netns", "exec", self.netns] + cmd


def tcp_open(net, src, ip, port, timeout=1.5):
    """Whether a TCP connection from host `src` to ip:port is accepted."""
    code = (f"import socket,sys\ns=socket.socket()\ns.settimeout({timeout})\n"
            f"try:\n s.connect(('{ip}',{port}));print('open')\nexcept Exception as e:\n print('closed',type(e).__name__)")
    r = run(src.exec([sys.executable, "-c", code]), check=False)
    return r.stdout.startswith("open"), r.stdout.strip()


# ====================================================================== certificates (cert-manager's work)


class CA:
    def __init__(self, work, name):
        self.dir = work / "pki" / name
        self.dir.mkdir(parents=True)
        self.key, self.crt = self.dir / "ca.key", self.dir / "ca.crt"
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", self.key, "-out", self.crt, "-days", "30", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"])

    def issue(self, name, dns_names):
        """A certificate for dns_names: {tls.crt, tls.key, ca.crt} as cert-manager writes its Secret."""
        key, csr, crt = self.dir / f"{name}.key", self.dir / f"{name}.csr", self.dir / f"{name}.crt"
        ext = self.dir / f"{name}.ext"
        ext.write_text("subjectAltName=" + ",".join(f"DNS:{d}" for d in dns_names) + "\n"
                       "extendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n")
        run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key,
             "-out", csr, "-subj", f"/CN={dns_names[0]}"])
        run(["openssl", "x509", "-req", "-in", csr, "-CA", self.crt, "-CAkey", self.key, "-CAcreateserial",
             "-out", crt, "-days", "30", "-extfile", ext])
        return {"tls.crt": crt.read_text(), "tls.key": key.read_text(), "ca.crt": self.crt.read_text()}


# ====================================================================== the rehearsal


class Pod:
    def __init__(self, rh, dep, n):
        self.rh, self.dep = rh, dep
        self.name = f"{dep.name}-{dep.revision}-{n}"
        self.host = None
        self.proc = None
        self.ready = False
        self.started = False  # startup probe passed
        self.terminating = False
        self.gone = False
        self.restarts = 0
        self.created = time.time()
        self.ready_after = None
        self.lock = threading.Lock()

    # ---- lifecycle
    def start(self):
        c = self.dep.container
        ports = {p.get("name", str(p["containerPort"])): p["containerPort"] for p in c.get("ports", [])}
        self.host = self.rh.net.add(self.name, NS, self.dep.labels, ports)
        self.rh.reconcile_network()
        self.dir = self.rh.work / "pods" / self.name
        self.dir.mkdir(parents=True)
        self._spawn()
        threading.Thread(target=self._kubelet, daemon=True, name=f"kubelet {self.name}").start()

    def _volumes(self):
        """Prepares each volume as a directory; returns the mount commands."""
        spec = self.dep.pod_spec
        c = self.dep.container
        script = []
        vols = {v["name"]: v for v in spec.get("volumes", [])}
        for m in c.get("volumeMounts", []):
            v = vols[m["name"]]
            target = m["mountPath"]
            if "emptyDir" in v:
                size = v["emptyDir"].get("sizeLimit", "64Mi").replace("Mi", "m").replace("Gi", "g")
                script.append(f"mkdir -p {target} && mount -t tmpfs -o size={size},mode=1777 tmpfs {target}")
                continue
            src = self.dir / "volumes" / m["name"]
            src.mkdir(parents=True, exist_ok=True)
            src_spec = v.get("secret") or v.get("configMap")
            optional = bool(src_spec.get("optional"))
            if "secret" in v:
                data = self.rh.secret(v["secret"]["secretName"])
                if data is None and not optional:
                    raise Failed(f"{self.name}: volume {m['name']}: Secret {v['secret']['secretName']} does not exist")
            else:
                data = self.rh.configmap(v["configMap"]["name"])
            # As the kubelet does: an optional source that is missing (or
            # lacks a key) gives an empty directory (or leaves the file out).
            data = data or {}
            items = src_spec.get("items") or [{"key": k, "path": k} for k in data]
            for it in items:
                if it["key"] not in data:
                    if optional:
                        continue
                    raise Failed(f"{self.name}: volume {m['name']}: key {it['key']} missing")
                f = src / it["path"]
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_text(data[it["key"]])
                f.chmod(0o644)
            os.chmod(src, 0o755)
            if not Path(target).exists():
                Path(target).mkdir(parents=True)
                self.rh.made_mountpoints.append(target)
            ro = ",ro" if m.get("readOnly") else ""
            script.append(f"mount --bind {src} {target} && mount -o remount,bind{ro} {target}")
        return script

    def _spawn(self):
        c = self.dep.container
        env, problems = km.resolve_env(c, self.rh.docs, self.rh.secret)
        if problems:
            raise Failed(f"{self.name}: the kubelet would refuse or mis-expand its environment: {problems}")
        literal = [k for k, v in env.items() if "$(" in v]
        if literal:
            raise Failed(f"{self.name}: $(VAR) left literal in {literal}")
        env["HOSTNAME"] = self.name
        env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
        self.env = env
        mounts = self._volumes()
        sc = {**self.dep.pod_spec.get("securityContext", {}), **c.get("securityContext", {})}
        uid, gid = sc.get("runAsUser", 0), sc.get("runAsGroup", 0)
        binary = self.rh.binary(c["image"])
        argv = [str(binary)] + list(c.get("command", [])[1:] if c.get("command") else []) + list(c.get("args", []))
        drop = "--inh-caps=-all --bounding-set=-all" if "ALL" in (sc.get("capabilities", {}).get("drop") or []) else ""
        nnp = "--no-new-privs" if sc.get("allowPrivilegeEscalation") is False else ""
        ro_root = "mount -o remount,bind,ro / 2>/dev/null || true" if sc.get("readOnlyRootFilesystem") else ":"
        script = " && ".join(mounts + [ro_root]) + \
            f" && exec setpriv --reuid={uid} --regid={gid} --clear-groups {nnp} {drop} \"$@\""
        self.log = open(self.dir / f"log.{self.restarts}", "w")
        self.proc = subprocess.Popen(
            self.host.exec(["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script, "pod"] + argv),
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.spawned = time.time()

    def _get(self, probe):
        h = probe["httpGet"]
        port = h["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in self.dep.container["ports"] if p.get("name") == port)
        try:
            with urllib.request.urlopen(f"http://{self.host.ip}:{port}{h['path']}", timeout=probe.get("timeoutSeconds", 1)) as r:
                return 200 <= r.status < 400
        except urllib.error.HTTPError as e:
            return 200 <= e.code < 400
        except Exception:
            return False

    def _kubelet(self):
        """The kubelet's probe loop for this pod's one container."""
        c = self.dep.container
        startup, live, ready = c.get("startupProbe"), c.get("livenessProbe"), c.get("readinessProbe")
        fails = {"startup": 0, "live": 0, "ready": 0}
        due = {"startup": 0.0, "live": 0.0, "ready": 0.0}
        while not self.gone:
            now = time.time()
            if self.proc.poll() is not None and not self.terminating:
                # restartPolicy Always: the container starts again in the same pod.
                self.rh.event(self, f"container exited ({self.proc.returncode}); restarting")
                self._set_ready(False)
                self.started = False
                self.restarts += 1
                time.sleep(1)
                if self.terminating or self.gone:
                    break
                self._spawn()
                fails = {k: 0 for k in fails}
                continue
            if self.terminating:
                time.sleep(0.2)
                continue
            if not self.started:
                if startup is None:
                    self.started = True
                elif now >= due["startup"]:
                    due["startup"] = now + startup.get("periodSeconds", 10)
                    if self._get(startup):
                        self.started = True
                    else:
                        fails["startup"] += 1
                        if fails["startup"] >= startup.get("failureThreshold", 3):
                            self.rh.event(self, "startup probe failed: killing the container")
                            self.kill(signal.SIGKILL)
                            fails["startup"] = 0
            if self.started:
                if live and now >= due["live"]:
                    due["live"] = now + live.get("periodSeconds", 10)
                    if self._get(live):
                        fails["live"] = 0
                    else:
                        fails["live"] += 1
                        if fails["live"] >= live.get("failureThreshold", 3):
                            self.rh.event(self, "liveness probe failed: restarting the container")
                            self.kill(signal.SIGTERM)
                            fails["live"] = 0
                if ready and now >= due["ready"]:
                    due["ready"] = now + ready.get("periodSeconds", 10)
                    if self._get(ready):
                        fails["ready"] = 0
                        self._set_ready(True)
                    else:
                        fails["ready"] += 1
                        if fails["ready"] >= ready.get("failureThreshold", 3) or not self.ready_after:
                            self._set_ready(False)
            time.sleep(0.2)

    def _set_ready(self, value):
        with self.lock:
            if self.terminating:
                value = False
            if value == self.ready:
                return
            self.ready = value
            if value and self.ready_after is None:
                self.ready_after = time.time() - self.created
        self.rh.event(self, "ready" if value else "not ready")
        self.rh.endpoints_changed()

    def kill(self, sig):
        if self.proc and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self):
        """Deletion: out of the endpoints at once, the preStop hook, then
        SIGTERM, and SIGKILL once the grace period (counted from deletion)
        is over."""
        t0 = time.time()
        self.terminating = True
        self.ready = False
        self.rh.event(self, "deleted: out of the endpoints, preStop")
        self.rh.endpoints_changed()
        grace = self.dep.pod_spec.get("terminationGracePeriodSeconds", 30)
        pre = (self.dep.container.get("lifecycle") or {}).get("preStop") or {}
        if "sleep" in pre:
            time.sleep(min(pre["sleep"]["seconds"], grace))
        elif pre:
            self.rh.event(self, f"preStop {sorted(pre)} not supported here")
        self.kill(signal.SIGTERM)
        try:
            self.proc.wait(timeout=max(0.0, grace - (time.time() - t0)))
            outcome = f"ended {self.proc.returncode} after SIGTERM"
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)
            self.proc.wait()
            outcome = "SIGKILLed at the end of its grace period"
            self.rh.problems.append(f"{self.name}: did not end within terminationGracePeriodSeconds {grace}")
        self.gone = True
        self.rh.event(self, f"{outcome} ({time.time() - t0:.1f} s after deletion)")
        self.rh.net.remove(self.host)
        self.rh.reconcile_network()


class Deployment:
    def __init__(self, rh, doc):
        self.rh, self.doc = rh, doc
        self.name = doc["metadata"]["name"]
        self.pod_spec = doc["spec"]["template"]["spec"]
        self.labels = doc["spec"]["template"]["metadata"].get("labels", {})
        self.container = self.pod_spec["containers"][0]
        self.strategy = doc["spec"].get("strategy")
        hpa = km.hpa_for(rh.docs, self.name)
        self.replicas = max(rh.args.replicas, hpa["spec"].get("minReplicas", 1) if hpa else 1)
        self.pods = []
        self.revision = 1
        self.counter = 0

    def new_pod(self):
        self.counter += 1
        p = Pod(self.rh, self, self.counter)
        self.pods.append(p)
        self.rh.all_pods.append(p)
        p.start()
        return p

    def ready_pods(self):
        return [p for p in self.pods if p.ready and not p.terminating]

    def scale_up(self):
        for _ in range(self.replicas):
            self.new_pod()

    def rollout(self, timeout=180):
        """A rolling update with the declared maxSurge and maxUnavailable."""
        self.revision += 1
        self.counter = 0
        surge = km.surge(self.strategy, self.replicas)
        unavailable = km.unavailable(self.strategy, self.replicas)
        if surge == 0 and unavailable == 0:
            raise Failed(f"{self.name}: maxSurge and maxUnavailable are both 0")
        old = [p for p in self.pods if not p.terminating]
        new = []
        deadline = time.time() + timeout
        stopping = []
        while old or len([p for p in new if p.ready]) < self.replicas:
            if time.time() > deadline:
                raise Failed(f"{self.name}: rollout not done within {timeout} s")
            live = [p for p in self.pods if not p.terminating]
            if len(new) < self.replicas and len(live) < self.replicas + surge:
                new.append(self.new_pod())
                continue
            available = len([p for p in live if p.ready])
            # Not-ready old pods go first; a ready one only while enough stay available.
            victim = next((p for p in old if not p.ready), None)
            if victim is None and old and available - 1 >= self.replicas - unavailable:
                victim = old[0]
            if victim:
                old.remove(victim)
                t = threading.Thread(target=victim.terminate, daemon=True)
                t.start()
                stopping.append(t)
                continue
            time.sleep(0.2)
        for t in stopping:
            t.join()
        self.pods = [p for p in self.pods if not p.gone]


class Rehearsal:
    def __init__(self, args):
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="order-system-rehearse.", dir="/var/tmp"))
        os.chmod(self.work, 0o755)
        self.net = Net()
        self.servers = []  # cleanup callables
        self.made_mountpoints = []
        self.problems = []
        self.events = []
        self.kinds = {}  # kind -> (honoured, how)
        self.checks = []  # (name, ok, detail)
        self.secrets = {}
        self.endpoint_lock = threading.Lock()
        self.endpoints_dirty = threading.Event()
        self.stopping = False
        threading.Thread(target=self.endpoints_controller, daemon=True, name="endpoints").start()
        self.deployments = []
        self.all_pods = []  # every pod that ever ran, for the report
        self.figures = {}

    # ---- bookkeeping
    def event(self, pod, what):
        line = f"{pod.name}: {what}"
        self.events.append((time.time(), line))
        with open(self.work / "events.log", "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d} {line}\n")
        if self.args.verbose:
            log(line)

    def check(self, name, ok, detail=""):
        self.checks.append((name, bool(ok), detail))
        log(f"{'PASS' if ok else 'FAIL'}  {name}{': ' + detail if detail else ''}")
        return ok

    def kind(self, kind, honoured, how):
        self.kinds[kind] = (honoured, how)

    # ---- objects
    def secret(self, name):
        if name in self.secrets:
            return self.secrets[name]
        d = km.named(self.docs, "Secret", name)
        if d is None:
            return None
        data = {k: base64.b64decode(v).decode() for k, v in (d.get("data") or {}).items()}
        data.update(d.get("stringData") or {})
        return data

    def configmap(self, name):
        d = km.named(self.docs, "ConfigMap", name)
        return None if d is None else dict(d.get("data") or {})

    def binary(self, image):
        """The image's binary, copied once into the work directory as an
        image layer would be: a pod mounts its own tmpfs on /tmp, which
        would hide a checkout (and its target/) under /tmp."""
        name = image.rsplit("@", 1)[0].rsplit("/", 1)[-1].split(":")[0]
        built = ROOT / "target" / self.args.profile / name
        if not built.exists():
            raise Failed(f"no binary {built} for image {image} (cargo build first)")
        layer = self.work / "bin"
        layer.mkdir(exist_ok=True)
        os.chmod(layer, 0o755)
        path = layer / name
        if not path.exists():
            shutil.copy2(built, path)
            os.chmod(path, 0o755)
        return path

    # ---- render
    def render(self):
        out = run(["kubectl", "kustomize", str(ROOT / "k8s" / "overlays" / "production")]).stdout
        (self.work / "rendered.yaml").write_text(out)
        self.docs = km.load_docs(self.work / "rendered.yaml")
        self.by_kind = km.by_kind(self.docs)
        counts = {k: len(v) for k, v in sorted(self.by_kind.items())}
        log(f"rendered k8s/overlays/production: {sum(counts.values())} objects {counts}")

    # ---- step 7 of the overlay's notes: the gateway's key pair
    def internal_keys(self):
        r = run([str(self.binary("order-system")), "internal-keys"])
        pair = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
        cm = km.named(self.docs, "ConfigMap", next(d["metadata"]["name"] for d in self.by_kind["ConfigMap"]
                                                    if d["metadata"]["name"].startswith("internal-verify-key")))
        cm["data"]["INTERNAL_VERIFY_KEY"] = pair["INTERNAL_VERIFY_KEY"]
        sec = next(d for d in self.by_kind["Secret"] if d["metadata"]["name"].startswith("gateway-internal-key"))
        sec["data"] = {"INTERNAL_SIGNING_KEY": base64.b64encode(pair["INTERNAL_SIGNING_KEY"].encode()).decode()}
        log("the gateway's assertion key pair generated into its Secret and the internal-verify-key ConfigMap (overlay step 7)")

    # ---- cert-manager
    def certificates(self):
        self.internal_ca = CA(self.work, "order-system-internal-ca")
        for cert in self.by_kind.get("Certificate", []):
            spec = cert["spec"]
            issuer = spec["issuerRef"]["name"]
            if issuer != "order-system-internal-ca":
                raise Failed(f"Certificate/{cert['metadata']['name']}: issuer {issuer} unknown here")
            self.secrets[spec["secretName"]] = self.internal_ca.issue(spec["secretName"], spec["dnsNames"])
        self.kind("Certificate", True, "signed by a local CA standing in for the ClusterIssuer order-system-internal-ca; "
                                       "Secret with tls.crt, tls.key, ca.crt")
        log(f"cert-manager: {len(self.by_kind.get('Certificate', []))} certificate(s) issued by the local internal CA")

    # ---- PostgreSQL (CloudNativePG's work)
    def postgres(self):
        cl = self.by_kind["Cluster"][0]
        name = cl["metadata"]["name"]
        params = cl["spec"].get("postgresql", {}).get("parameters", {})
        self.pg_host = self.net.add("pg-1", NS, {"cnpg.io/cluster": name, "cnpg.io/instanceRole": "primary"},
                                    {"postgresql": 5432, "metrics": 9187, "status": 8000}, ip_last=2)
        ca = CA(self.work, f"{name}-ca")
        self.secrets[f"{name}-ca"] = {"ca.crt": ca.crt.read_text(), "ca.key": ca.key.read_text()}
        svc_names = [f"{name}-{s}{suffix}" for s in ("rw", "ro", "r") for suffix in ("", f".{NS}", f".{NS}.svc", f".{NS}.svc.cluster.local")]
        server = ca.issue(f"{name}-server", svc_names)
        d = self.work / "pg"
        d.mkdir()
        shutil.chown(d, "postgres", "postgres")
        (d / "server.crt").write_text(server["tls.crt"])
        (d / "server.key").write_text(server["tls.key"])
        for f in ("server.crt", "server.key"):
            shutil.chown(d / f, "postgres", "postgres")
            os.chmod(d / f, 0o600)
        data = d / "data"
        run(["runuser", "-u", "postgres", "--", str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"])
        # The services over TLS with their passwords; the node (this
        # orchestrator: the operator's and the audit's seat) as superuser.
        (data / "pg_hba.conf").write_text(
            "local all all trust\n"
            f"host all postgres {NODE_IP}/32 trust\n"
            f"hostssl all all {NET}.0/24 scram-sha-256\n")
        conf = [f"listen_addresses = '{self.pg_host.ip}'", "port = 5432", f"unix_socket_directories = '{d}'",
                "ssl = on", f"ssl_cert_file = '{d}/server.crt'", f"ssl_key_file = '{d}/server.key'"]
        honoured, skipped = [], []
        for k, v in params.items():
            if k in ("max_connections", "work_mem", "maintenance_work_mem"):
                conf.append(f"{k} = '{v}'")
                honoured.append(f"{k}={v}")
            else:
                skipped.append(k)
        conf.append("shared_buffers = '128MB'")
        with open(data / "postgresql.conf", "a") as f:
            f.write("\n" + "\n".join(conf) + "\n")
        self.pg_data, self.pg_dir = data, d
        self.pg_start()
        self.servers.append(self.pg_stop)
        roles = cl["spec"].get("managed", {}).get("roles", [])
        for role in roles:
            sec = self.secret(role["passwordSecret"]["name"])
            if sec is None:
                raise Failed(f"Cluster/{name}: role {role['name']}: Secret {role['passwordSecret']['name']} missing")
            if sec.get("username") != role["name"]:
                raise Failed(f"Cluster/{name}: role {role['name']}: its Secret's username is {sec.get('username')!r}")
            pw = sec["password"].replace("'", "''")
            self.psql(f"CREATE ROLE \"{role['name']}\" LOGIN PASSWORD '{pw}'")
        for db in self.by_kind.get("Database", []):
            s = db["spec"]
            self.psql(f"CREATE DATABASE \"{s['name']}\" OWNER \"{s['owner']}\"")
        sync = cl["spec"].get("postgresql", {}).get("synchronous")
        self.kind("Cluster", True,
                  f"one PostgreSQL {PG_BIN.parent.name} instance, not {cl['spec']['instances']} (no standby here: "
                  f"failover and synchronous replication {'(' + sync['method'] + ' ' + str(sync['number']) + ', ' + sync.get('dataDurability', 'required') + ')' if sync else ''} "
                  f"are not exercised); TLS from {name}-ca; roles from managed.roles with their Secrets' passwords; "
                  f"parameters {', '.join(honoured)} (not {', '.join(skipped)}: sized for a 4 GiB instance); Services {name}-rw/-ro/-r")
        self.kind("Database", True, f"{len(self.by_kind.get('Database', []))} databases created with their owners")
        self.secrets.update({f"{name}-server": server, f"{name}-replication": server})
        log(f"PostgreSQL: {name} at {self.pg_host.ip}:5432 (TLS), {len(roles)} roles, "
            f"{len(self.by_kind.get('Database', []))} databases, {', '.join(honoured)}")

    def pg_start(self):
        run(self.pg_host.exec(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(self.pg_data), "-w",
                               "-t", "60", "-l", str(self.pg_dir / "server.log"), "start"]))

    def pg_stop(self):
        run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(self.pg_data), "-m", "fast", "-w", "stop"],
            check=False)

    def psql(self, sql):
        return run(["runuser", "-u", "postgres", "--", str(PG_BIN / "psql"), "-h", str(self.pg_dir), "-U", "postgres",
                    "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-qAtc", sql]).stdout

    # ---- RabbitMQ (the cluster operator's work, one node)
    def rabbitmq(self):
        mq = self.by_kind["RabbitmqCluster"][0]
        name = mq["metadata"]["name"]
        spec = mq["spec"]
        self.mq_name = name
        tls = (spec.get("tls") or {}).get("secretName")
        self.mq_host = self.net.add("mq-0", NS, {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "rabbitmq"},
                                    {"amqp": 5672, "amqps": 5671, "management": 15672, "management-tls": 15671,
                                     "prometheus": 15692}, ip_last=3)
        d = self.work / "mq"
        (d / "mnesia").mkdir(parents=True)
        (d / "log").mkdir()
        admin = {"username": f"default_user_{secrets.token_hex(4)}", "password": secrets.token_urlsafe(16)}
        self.secrets[f"{name}-default-user"] = {**admin, "host": f"{name}.{NS}.svc", "port": "5672"}
        self.mq_admin = admin
        conf = ["listeners.tcp.default = 5672", "loopback_users = none",
                f"default_user = {admin['username']}", f"default_pass = {admin['password']}",
                "management.tcp.port = 15672"]
        if tls:
            t = self.secret(tls)
            if t is None:
                raise Failed(f"RabbitmqCluster/{name}: TLS Secret {tls} missing")
            for k in ("tls.crt", "tls.key", "ca.crt"):
                (d / k).write_text(t[k])
            conf += ["listeners.ssl.default = 5671", f"ssl_options.cacertfile = {d}/ca.crt",
                     f"ssl_options.certfile = {d}/tls.crt", f"ssl_options.keyfile = {d}/tls.key",
                     "ssl_options.verify = verify_none", "ssl_options.fail_if_no_peer_cert = false",
                     "management.ssl.port = 15671", f"management.ssl.cacertfile = {d}/ca.crt",
                     f"management.ssl.certfile = {d}/tls.crt", f"management.ssl.keyfile = {d}/tls.key"]
        extra = (spec.get("rabbitmq") or {}).get("additionalConfig", "")
        conf += [line for line in extra.splitlines() if line.strip() and not line.strip().startswith("#")]
        (d / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        (d / "rabbitmq-env.conf").write_text("")
        (d / "enabled_plugins").write_text("[rabbitmq_management,rabbitmq_prometheus].\n")
        self.mq_env = {
            "RABBITMQ_NODENAME": f"{PREFIX}mq@localhost", "RABBITMQ_NODE_PORT": "5672",
            "RABBITMQ_MNESIA_BASE": f"{d}/mnesia", "RABBITMQ_LOG_BASE": f"{d}/log", "RABBITMQ_PID_FILE": f"{d}/pid",
            "RABBITMQ_CONFIG_FILE": f"{d}/rabbitmq.conf", "RABBITMQ_CONF_ENV_FILE": f"{d}/rabbitmq-env.conf",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{d}/enabled_plugins", "RABBITMQ_PLUGINS_EXPAND_DIR": f"{d}/plugins-expand",
            "HOME": "/var/lib/rabbitmq", "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        }
        run(["chown", "-R", "rabbitmq:", str(d)])
        self.mq_dir = d
        self.mq_start()
        self.servers.append(self.mq_stop)
        # What ships is RabbitMQ 4: every quorum queue has a delivery limit
        # of 20 there. The same limit, by policy, on this 3.10 node (lowest
        # priority: a policy of the services' own wins).
        self.mq_ctl("-q", "set_policy", "--priority", "0", "--apply-to", "queues", "rabbitmq4-delivery-limit", ".*",
                    '{"delivery-limit": 20}')
        self.kind("RabbitmqCluster", True,
                  f"one RabbitMQ node (Debian's {self.mq_version}), not {spec.get('replicas', 1)}, and not the image's "
                  f"{spec.get('image')} (RabbitMQ 4 needs Erlang 26, which Debian 12 lacks); configured from the spec: "
                  f"AMQP 5672, AMQPS 5671 and management 15671 with the {tls} certificate, additionalConfig, "
                  f"the {name}-default-user Secret; quorum queues on one node, with RabbitMQ 4's default delivery limit "
                  f"(20) set by policy")
        log(f"RabbitMQ: {name} at {self.mq_host.ip} (5672, TLS 5671, management TLS 15671)")

    def mq_ctl(self, *args, check=True):
        return run(self.mq_host.exec(["runuser", "-u", "rabbitmq", "--", "env"] + [f"{k}={v}" for k, v in self.mq_env.items()]
                                     + [str(RMQ_BIN / "rabbitmqctl"), "-n", self.mq_env["RABBITMQ_NODENAME"]] + list(args)),
                   check=check, cwd="/var/lib/rabbitmq")

    def mq_start(self):
        subprocess.run(self.mq_host.exec(["runuser", "-u", "rabbitmq", "--", "env"] + [f"{k}={v}" for k, v in self.mq_env.items()]
                                         + [str(RMQ_BIN / "rabbitmq-server"), "-detached"]),
                       cwd="/var/lib/rabbitmq", capture_output=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.mq_ctl("-q", "--timeout", "30", "await_startup", check=False).returncode == 0:
                break
            time.sleep(1)
        else:
            raise Failed("RabbitMQ did not start: " + "".join(p.read_text()[-2000:] for p in (self.mq_dir / "log").glob("*.log")))
        self.mq_version = self.mq_ctl("-q", "version", check=False).stdout.strip()
        for port in (5671, 15671):
            for _ in range(120):
                if tcp_open(self.net, self.mq_host, self.mq_host.ip, port, 0.5)[0]:
                    break
                time.sleep(0.5)

    def mq_stop(self):
        self.mq_ctl("-q", "stop", check=False)

    # ---- the messaging topology operator's work, from its own namespace
    def topology(self):
        self.topo_host = self.net.add("topology-operator", "rabbitmq-system",
                                      {"app.kubernetes.io/name": "messaging-topology-operator"}, {}, ip_last=5)
        self.reconcile_network()
        mq = self.by_kind["RabbitmqCluster"][0]
        tls = bool((mq["spec"].get("tls") or {}).get("secretName"))
        api = f"https://{self.mq_name}.{NS}.svc:15671/api" if tls else f"http://{self.mq_name}.{NS}.svc:15672/api"
        users = self.by_kind.get("User", [])
        calls = []
        for u in users:
            username = f"{u['metadata']['name']}-{secrets.token_hex(4)}"
            password = secrets.token_urlsafe(18)
            self.secrets[f"{u['metadata']['name']}-user-credentials"] = {"username": username, "password": password}
            calls.append(("PUT", f"/users/{username}", {"password": password, "tags": ",".join(u["spec"].get("tags") or [])}))
        for p in self.by_kind.get("Permission", []):
            user = self.secrets[f"{p['spec']['userReference']['name']}-user-credentials"]["username"]
            vhost = urllib.request.quote(p["spec"]["vhost"], safe="")
            calls.append(("PUT", f"/permissions/{vhost}/{user}", p["spec"]["permissions"]))
        job = self.work / "topology.json"
        job.write_text(json.dumps({"api": api, "user": self.mq_admin["username"], "password": self.mq_admin["password"],
                                   "ca": str(self.internal_ca.crt), "calls": calls}))
        r = run(self.topo_host.exec([sys.executable, __file__, "topology-operator", str(job)]), check=False)
        if r.returncode != 0:
            raise Failed(f"the topology operator could not create the users: {r.stdout}{r.stderr}")
        self.kind("User", True, f"{len(users)} users created through {api} from the rabbitmq-system namespace, verifying "
                                f"the broker against the internal CA; credentials Secrets <name>-user-credentials")
        self.kind("Permission", True, f"{len(self.by_kind.get('Permission', []))} permissions set with the resources' regexes")
        log(f"topology operator: {r.stdout.strip()}")

    # ---- the mail relay
    def smtp(self):
        url = None
        for d in self.by_kind.get("ConfigMap", []):
            url = (d.get("data") or {}).get("SMTP_URL") or url
        import urllib.parse
        u = urllib.parse.urlparse(url)
        host = u.hostname
        parts = host.split(".")
        namespace = parts[1] if len(parts) > 1 else NS
        self.smtp_host = self.net.add("smtp-relay", namespace, {"app.kubernetes.io/name": parts[0]},
                                      {"smtp": u.port or (465 if u.scheme == "smtps" else 25)}, ip_last=4)
        self.relay_name = host
        cert = self.internal_ca.issue("smtp-relay", [host, parts[0]])
        d = self.work / "smtp"
        d.mkdir()
        (d / "tls.crt").write_text(cert["tls.crt"])
        (d / "tls.key").write_text(cert["tls.key"])
        self.maildir = d / "mail"
        mode = ["--smtps", str(d / "tls.crt"), str(d / "tls.key")] if u.scheme == "smtps" else []
        p = subprocess.Popen(self.smtp_host.exec([sys.executable, str(ROOT / "tools" / "smtp-sink.py"), "--listen",
                                                  f"0.0.0.0:{u.port or 465}", "--maildir", str(self.maildir)] + mode),
                             stdout=open(d / "log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.servers.append(lambda: (p.terminate(), p.wait()))
        for _ in range(60):
            if tcp_open(self.net, self.smtp_host, self.smtp_host.ip, u.port or 465, 0.5)[0]:
                break
            time.sleep(0.5)
        log(f"SMTP relay: {host}:{u.port} ({u.scheme}, certificate of the internal CA) at {self.smtp_host.ip}")

    # ---- names and policies
    def service_entries(self):
        entries = {}

        def names(svc, ns=NS):
            return [svc, f"{svc}.{ns}", f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.cluster.local"]

        for svc in self.by_kind.get("Service", []):
            sel = svc["spec"].get("selector") or {}
            ips = [p.host.ip for dep in self.deployments for p in dep.pods
                   if p.ready and not p.terminating and sel and all(p.dep.labels.get(k) == v for k, v in sel.items())]
            for n in names(svc["metadata"]["name"]):
                entries[n] = ips
        cl = self.by_kind["Cluster"][0]["metadata"]["name"]
        for s in ("rw", "ro", "r"):
            for n in names(f"{cl}-{s}"):
                entries[n] = [self.pg_host.ip]
        for n in names(self.mq_name) + names(f"{self.mq_name}-nodes"):
            entries[n] = [self.mq_host.ip]
        short = self.relay_name.split(".")[0]
        entries[self.relay_name] = [self.smtp_host.ip]
        for n in names(short, self.relay_name.split(".")[1] if "." in self.relay_name else NS):
            entries[n] = [self.smtp_host.ip]
        return entries

    def endpoints_changed(self):
        """Asks the endpoints controller to rewrite the hosts files (it
        coalesces changes; no caller waits for it, as no kubelet waits for
        the endpoints to be updated)."""
        self.endpoints_dirty.set()

    def sync_endpoints(self):
        with self.endpoint_lock:
            self.net.write_hosts(self.service_entries())

    def endpoints_controller(self):
        while not self.stopping:
            if self.endpoints_dirty.wait(0.5):
                self.endpoints_dirty.clear()
                try:
                    self.sync_endpoints()
                except Exception as e:
                    log(f"endpoints controller: {e}")

    def reconcile_network(self):
        n = self.net.enforce(self.by_kind.get("NetworkPolicy", []))
        self.sync_endpoints()
        return n

    # ---- pods
    def start_deployments(self):
        order = ["identity", "billing", "ordering", "notification", "push-service", "gateway"]
        docs = sorted(self.by_kind["Deployment"], key=lambda d: order.index(d["metadata"]["name"]) if d["metadata"]["name"] in order else 99)
        self.deployments = [Deployment(self, d) for d in docs]
        for dep in self.deployments:
            dep.scale_up()
        self.wait_ready(300)
        times = ", ".join(f"{p.name} {p.ready_after:.1f} s" for dep in self.deployments for p in dep.pods)
        log(f"all {sum(len(d.pods) for d in self.deployments)} pods ready: {times}")

    def wait_ready(self, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            missing = [p.name for dep in self.deployments for p in dep.pods if not p.ready]
            if not missing:
                return
            time.sleep(0.5)
        tails = []
        for dep in self.deployments:
            for p in dep.pods:
                if not p.ready:
                    logf = sorted(p.dir.glob("log.*"))[-1]
                    tails.append(f"--- {p.name}\n" + "\n".join(logf.read_text().splitlines()[-15:]))
        raise Failed(f"pods not ready within {timeout} s: {missing}\n" + "\n".join(tails))

    # ---- paths
    def paths(self):
        """Every path the services need is open; paths that must stay closed are refused."""
        pods = {dep.name: dep.pods[0] for dep in self.deployments}
        ingress = self.ingress_host
        needed = [(ingress, pods["gateway"].host.ip, 8080, "ingress controller -> gateway:8080")]
        for name, port in (("identity", 8081), ("billing", 8082), ("ordering", 8083), ("notification", 8084), ("push-service", 8085)):
            needed.append((pods["gateway"].host, pods[name].host.ip, port, f"gateway -> {name}:{port}"))
        for name in ("identity", "billing", "ordering", "notification"):
            needed.append((pods[name].host, self.pg_host.ip, 5432, f"{name} -> {self.by_kind['Cluster'][0]['metadata']['name']}-rw:5432"))
        for name in ("identity", "billing", "ordering", "notification", "push-service"):
            needed.append((pods[name].host, self.mq_host.ip, 5671, f"{name} -> {self.mq_name}:5671 (AMQPS)"))
        needed.append((pods["notification"].host, self.smtp_host.ip, list(self.smtp_host.ports.values())[0],
                       f"notification -> {self.relay_name} (SMTPS)"))
        needed.append((self.topo_host, self.mq_host.ip, 15671, "messaging topology operator -> management API 15671"))
        closed = [
            (pods["gateway"].host, self.pg_host.ip, 5432, "gateway -> PostgreSQL"),
            (pods["push-service"].host, self.pg_host.ip, 5432, "push-service -> PostgreSQL"),
            (pods["identity"].host, self.mq_host.ip, 15671, "identity -> the broker's management API (15671)"),
            (pods["billing"].host, self.mq_host.ip, 15672, "billing -> the broker's management API (15672)"),
            (pods["billing"].host, pods["ordering"].host.ip, 8083, "billing -> ordering:8083 (only the gateway may)"),
            (pods["notification"].host, self.internet_host.ip, 443, "notification -> the internet (443)"),
            (pods["gateway"].host, self.internet_host.ip, 443, "gateway -> the internet (443)"),
            (ingress, pods["identity"].host.ip, 8081, "ingress controller -> identity directly"),
            (pods["ordering"].host, self.smtp_host.ip, list(self.smtp_host.ports.values())[0], "ordering -> the mail relay"),
        ]
        bad_open, bad_closed = [], []
        for src, ip, port, what in needed:
            ok, how = tcp_open(self.net, src, ip, port)
            if not ok:
                bad_closed.append(f"{what} ({how})")
        for src, ip, port, what in closed:
            ok, how = tcp_open(self.net, src, ip, port)
            if ok:
                bad_open.append(what)
        self.check(f"NetworkPolicies: {len(needed)} needed paths open", not bad_closed, "; ".join(bad_closed))
        self.check(f"NetworkPolicies: {len(closed)} paths that must stay closed are refused", not bad_open, "; ".join(bad_open))
        self.kind("NetworkPolicy", True, f"{len(self.by_kind.get('NetworkPolicy', []))} policies as nftables rules in every "
                                         f"namespace (default deny in and out as declared; the node's probes admitted, as CNIs do; "
                                         f"no kube-dns: names come from hosts files)")

    # ---- traffic
    def seed_scenario(self):
        job = {"url": "http://gateway:8080/api/v1", "maildir": str(self.maildir), "xff": "203.0.113.7"}
        r = run(self.ingress_host.exec([sys.executable, __file__, "seed-scenario", json.dumps(job)]), check=False)
        self.check("the seed's scenario (register -> deposit -> order 600 succeeds, 400 left, e-mail; order 500 fails; "
                   "events on the stream over HTTP/2)", r.returncode == 0, (r.stdout + r.stderr).strip().splitlines()[-1] if r.returncode else r.stdout.strip().splitlines()[-1])

    def loadgen(self, duration, clients):
        out = self.work / "loadgen.json"
        cmd = self.ingress_host.exec([str(self.binary("loadgen")), "--url", "http://gateway:8080/api/v1",
                                      "--clients", str(clients), "--duration", str(duration), "--json", "--quiet",
                                      "--forwarded-for", "198.18.0.0/16", "--order-timeout", "60"])
        return subprocess.Popen(cmd, stdout=open(out, "w"), stderr=open(self.work / "loadgen.log", "w")), out

    # ---- faults
    def faults(self, short):
        if short:
            dep = next(d for d in self.deployments if d.name == "ordering")
            victim = next(d for d in self.deployments if d.name == "billing").pods[0]
            log(f"fault: SIGKILL {victim.name}")
            victim.kill(signal.SIGKILL)
            t0 = time.time()
            log(f"fault: rolling restart of {dep.name}")
            dep.rollout()
            self.wait_ready(120)
            self.figures["rollout"] = f"{dep.name} in {time.time() - t0:.1f} s"
            return
        t0 = time.time()
        log("fault: rolling restart of every Deployment (at once, each with its maxSurge/maxUnavailable)")
        threads = [threading.Thread(target=self._rollout, args=(d,)) for d in self.deployments]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.wait_ready(120)
        self.figures["rollout"] = f"every Deployment in {time.time() - t0:.1f} s"
        log("fault: one replica of each Deployment SIGKILLed")
        for dep in self.deployments:
            dep.pods[-1].kill(signal.SIGKILL)
        time.sleep(2)
        self.wait_ready(120)
        log("fault: the broker restarted behind its Service name")
        self.mq_stop()
        time.sleep(3)
        self.mq_start()
        self.wait_ready(120)
        log("fault: the database restarted behind its Service name")
        self.pg_stop()
        time.sleep(3)
        self.pg_start()
        self.wait_ready(120)

    def _rollout(self, dep):
        try:
            dep.rollout()
        except Exception as e:
            self.problems.append(f"rollout {dep.name}: {e}")

    # ---- checks
    def audit(self):
        cl = self.by_kind["Cluster"][0]["metadata"]["name"]
        env = {**os.environ, "POSTGRES_URL": f"postgres://postgres@{self.pg_host.ip}:5432",
               "AMQP_URL": f"amqp://{self.mq_admin['username']}:{self.mq_admin['password']}@{self.mq_host.ip}:5672/%2f",
               "AUDIT_NOTIFICATION_GRACE_SECS": "0"}
        api = f"http://{self.mq_admin['username']}:{self.mq_admin['password']}@{self.mq_host.ip}:15672/api"
        r = run([str(self.binary("order-system")), "audit", "--rabbitmq-api", api], check=False, env=env)
        (self.work / "audit.txt").write_text(r.stdout + r.stderr)
        self.check(f"order-system audit clean ({cl})", r.returncode == 0, r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:])
        return r.stdout

    # ---- main
    def rehearse(self):
        self.render()
        self.net.up()
        self.internal_keys()
        self.certificates()
        self.internet_host = self.net.add("internet", None, {}, {"https": 443}, ip_last=8)
        p = subprocess.Popen(self.internet_host.exec([sys.executable, "-m", "http.server", "443", "--bind", "0.0.0.0"]),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.servers.append(lambda: (p.terminate(), p.wait()))
        self.ingress_host = self.net.add("ingress-nginx", "ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"}, {}, ip_last=6)
        self.postgres()
        self.rabbitmq()
        self.smtp()
        self.reconcile_network()
        self.topology()
        self.start_deployments()
        self.paths()
        self.seed_scenario()
        duration = 60 if self.args.short else 240
        lg, out = self.loadgen(duration, self.args.clients)
        time.sleep(8)
        self.faults(self.args.short)
        log("faults done; waiting for the load to end and its checks")
        rc = lg.wait(timeout=duration + 300)
        report = {}
        try:
            report = json.loads(out.read_text() or "{}")
        except json.JSONDecodeError:
            pass
        self.figures["loadgen"] = report
        result = report.get("result") or {}
        lg_log = (self.work / "loadgen.log").read_text()
        self.check("loadgen: every order final, balances right, every event on the streams exactly once", rc == 0,
                   "" if rc == 0 else lg_log.strip().splitlines()[-1] if lg_log.strip() else f"exit {rc}")
        errors = result.get("errors") or {}
        # loadgen names an answer "<what>: HTTP <status>", and a 503 without
        # Retry-After "... HTTP 503 without Retry-After".
        bad = {k: v for k, v in errors.items()
               if re.search(r"HTTP 5\d\d", k) and (not re.search(r"HTTP 503$|HTTP 503 \(retried\)$", k))}
        self.check("no 5xx but shed 503s with Retry-After", bool(result) and not bad,
                   f"errors by kind: {json.dumps(errors)}" if errors else "no errors at all")
        self.seed_scenario()
        time.sleep(2)
        self.audit()
        self.check("no pod outlived its grace period", not self.problems, "; ".join(self.problems))


def topology_operator(job_file):
    """Runs inside the topology operator's namespace: the management API
    over TLS, verified against the internal CA."""
    import ssl
    job = json.loads(Path(job_file).read_text())
    ctx = ssl.create_default_context(cafile=job["ca"])
    auth = base64.b64encode(f"{job['user']}:{job['password']}".encode()).decode()
    for method, path, body in job["calls"]:
        req = urllib.request.Request(job["api"] + path, data=json.dumps(body).encode(), method=method,
                                     headers={"content-type": "application/json", "authorization": f"Basic {auth}"})
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            if r.status not in (200, 201, 204):
                raise SystemExit(f"{method} {path}: {r.status}")
    print(f"{len(job['calls'])} management API calls over TLS to {job['api']}, certificate verified")


def seed_scenario(job_json):
    """Runs inside the ingress controller's namespace: the seed's flow
    through the gateway's Service, with the header the ingress sets; the
    event stream over HTTP/2 (h2c with prior knowledge, as the Gateway API
    data plane speaks to the gateway)."""
    job = json.loads(job_json)
    url = job["url"]
    xff = {"x-forwarded-for": job["xff"]}
    email = f"seed-{secrets.token_hex(4)}@example.com"

    def call(method, path, body=None, token=None, expect=(200, 201, 202, 204)):
        h = {"content-type": "application/json", **xff}
        if token:
            h["authorization"] = f"Bearer {token}"
        req = urllib.request.Request(url + path, data=json.dumps(body).encode() if body is not None else None,
                                     method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        if status not in expect:
            raise SystemExit(f"{method} {path}: {status} {text}")
        return json.loads(text) if text else None

    call("POST", "/identity/register", {"email": email, "password": "correct horse battery", "name": "Seed"})
    token = call("POST", "/identity/login", {"email": email, "password": "correct horse battery"})["accessToken"]
    stream = subprocess.Popen(["curl", "-svN", "--http2-prior-knowledge", "--max-time", "60", "-H", f"authorization: Bearer {token}",
                               "-H", f"x-forwarded-for: {job['xff']}", url + "/push/orders"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1)
    deadline = time.time() + 30
    while True:  # the account appears once billing consumed UserCreated
        try:
            call("POST", "/billing/account/deposit", {"amount": 1000}, token)
            break
        except SystemExit:
            if time.time() > deadline:
                raise
            time.sleep(0.5)

    def settle(order):
        deadline = time.time() + 60
        while time.time() < deadline:
            o = call("GET", f"/ordering/orders/{order['id']}", token=token)
            if o["status"] != "pending":
                return o
            time.sleep(0.3)
        raise SystemExit(f"order {order['id']} still pending after 60 s")

    ok = settle(call("POST", "/ordering/orders", {"price": 600}, token))
    if ok["status"] != "succeeded":
        raise SystemExit(f"order 600: {ok}")
    balance = call("GET", "/billing/account", token=token)
    if float(balance.get("amount", balance.get("balance", -1))) != 400:
        raise SystemExit(f"balance after 600 of 1000: {balance}")
    ko = settle(call("POST", "/ordering/orders", {"price": 500}, token))
    if ko["status"] != "failed":
        raise SystemExit(f"order 500 with 400 left: {ko}")
    deadline = time.time() + 60
    while time.time() < deadline:
        notes = call("GET", "/notifications", token=token)
        items = notes if isinstance(notes, list) else notes.get("items", notes.get("notifications", []))
        mails = [p for p in Path(job["maildir"], "new").glob("*")] if Path(job["maildir"], "new").exists() else []
        mine = [m for m in mails if email in m.read_text(errors="replace")]
        if len(items) >= 2 and len(mine) >= 2:
            break
        time.sleep(0.5)
    else:
        raise SystemExit(f"notifications {len(items)}, e-mails at the relay {len(mine)}: 2 expected")
    time.sleep(1)
    stream.terminate()
    body, trace = stream.communicate(timeout=10)
    events = [line for line in body.splitlines() if line.startswith("event:")]
    if not any("OrderCreated" in e for e in events) or not any("OrderFailed" in e for e in events):
        raise SystemExit(f"the stream showed {events}; OrderCreated and OrderFailed expected")
    # curl -v shows the response line: "< HTTP/2 200".
    status = next((line[2:].strip() for line in trace.splitlines() if line.startswith("< HTTP/")), "?")
    if not status.startswith("HTTP/2 200"):
        raise SystemExit(f"the stream was answered {status!r}, not HTTP/2 200")
    version = status.split()[0].split("/")[1]
    print(f"order 600 succeeded (400 left), order 500 failed, 2 notifications, 2 e-mails over SMTPS, "
          f"stream events {[e.split(':', 1)[1].strip() for e in events]} over HTTP/{version}")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("run")
    r.add_argument("--short", action="store_true", help="one replica kill and one rolling restart (CI)")
    r.add_argument("--replicas", type=int, default=2)
    r.add_argument("--clients", type=int, default=20)
    r.add_argument("--profile", default="debug")
    r.add_argument("--keep", action="store_true", help="keep the work directory")
    r.add_argument("--verbose", action="store_true")
    t = sub.add_parser("topology-operator")
    t.add_argument("job")
    s = sub.add_parser("seed-scenario")
    s.add_argument("job")
    c = sub.add_parser("cleanup")
    args = p.parse_args()
    if args.cmd == "topology-operator":
        return topology_operator(args.job)
    if args.cmd == "seed-scenario":
        return seed_scenario(args.job)
    if args.cmd == "cleanup":
        Net().down()
        return 0
    if os.geteuid() != 0:
        raise SystemExit("rehearse-deploy: run as root (network and mount namespaces, nftables)")
    rh = Rehearsal(args)
    interrupted = []

    def on_signal(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM both end the run with the cleanup (SIGINT explicitly:
    # a shell that starts us in the background leaves it ignored).
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    t0 = time.time()
    ok = False
    try:
        rh.rehearse()
        ok = all(c[1] for c in rh.checks)
    except (Failed, RuntimeError) as e:
        rh.check("rehearsal ran to the end", False, str(e))
    except KeyboardInterrupt:
        rh.check("rehearsal ran to the end", False, "interrupted")
    except Exception:
        rh.check("rehearsal ran to the end", False, traceback.format_exc())
    finally:
        cleanup(rh)
    report(rh, time.time() - t0)
    return 0 if ok and all(c[1] for c in rh.checks) else 1


def cleanup(rh):
    log("cleaning up: pods, servers, namespaces, bridge, nftables")
    rh.stopping = True
    for dep in rh.deployments:
        for p in dep.pods:
            p.gone = True
            p.kill(signal.SIGKILL)
            if p.proc:
                try:
                    p.proc.wait(timeout=10)
                except Exception:
                    pass
    for stop in reversed(rh.servers):
        try:
            stop()
        except Exception as e:
            log(f"cleanup: {e}")
    rh.net.down()
    for m in reversed(rh.made_mountpoints):
        try:
            os.rmdir(m)
        except OSError:
            pass
    if rh.args.keep:
        log(f"work directory kept: {rh.work}")
    else:
        shutil.rmtree(rh.work, ignore_errors=True)


def report(rh, secs):
    print("\n==== rehearse-deploy report")
    print("\nKinds of k8s/overlays/production:")
    cannot = {
        "HorizontalPodAutoscaler": "not honoured: no metrics server; each Deployment runs its minReplicas (at least 2); "
                                   "its maxReplicas is used by .ci/validate-deploy's connection budget",
        "PodDisruptionBudget": "not honoured: no evictions happen here (the rollouts follow maxUnavailable instead)",
        "PodMonitor": "not honoured: no Prometheus scrapes here (scripts/check-monitoring and scripts/alert-e2e cover the rules)",
        "ServiceMonitor": "not honoured: as PodMonitor",
        "PrometheusRule": "not honoured: as PodMonitor",
        "Ingress": "not honoured: no ingress controller; traffic enters from its namespace (labels of ingress-nginx) with the "
                   "X-Forwarded-For it would set, over HTTP/1.1 and h2c; TLS at the edge is not rehearsed",
        "HTTPRoute": "not honoured: as Ingress",
        "ScheduledBackup": "not honoured: no object storage here",
        "ObjectStore": "not honoured: no object storage here",
        "Namespace": "honoured: every pod's NetworkPolicy peer is in it",
        "ServiceAccount": "not needed: no pod talks to the Kubernetes API (automountServiceAccountToken false)",
        "Service": "honoured: each Service name (short and .svc.cluster.local) resolves to its ready pods (hosts file per pod, "
                   "rewritten on every readiness change); no virtual IP, so a client picks among the ready addresses",
        "Deployment": "honoured: pods as processes (netns, mount namespace with their volumes, kubelet env, probes, preStop, grace "
                      "period, runAsUser/Group, no_new_privs, capabilities dropped), rolling updates with maxSurge/maxUnavailable",
        "ConfigMap": "honoured: envFrom, keys and volumes",
        "Secret": "honoured: env and volumes; operator-made ones made by the steps standing in for the operators",
    }
    for kind in sorted(rh.by_kind if hasattr(rh, "by_kind") else {}):
        if kind in rh.kinds:
            honoured, how = rh.kinds[kind]
            print(f"  {kind:<24} {'honoured' if honoured else 'not honoured'}: {how}")
        else:
            print(f"  {kind:<24} {cannot.get(kind, 'not honoured: not rehearsed')}")
    print("\nChecks:")
    for name, ok, detail in rh.checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}" + (f"\n        {detail}" if detail and not ok else ""))
    print("\nFigures:")
    lg = (rh.figures.get("loadgen") or {}).get("result") or {}
    if lg:
        print(f"  orders: {json.dumps(lg.get('orders'))}")
        print(f"  errors by kind: {json.dumps(lg.get('errors') or {})}")
        ver = (rh.figures.get("loadgen") or {}).get("verification")
        if ver:
            print(f"  loadgen verification: {json.dumps(ver)}")
    if "rollout" in rh.figures:
        print(f"  rolling restart: {rh.figures['rollout']}")
    ready = [f"{p.name} {p.ready_after:.1f}s" for p in rh.all_pods if p.ready_after]
    restarts = [f"{p.name} {p.restarts}" for p in rh.all_pods if p.restarts]
    print(f"  time to ready per pod: {', '.join(ready) or '-'}")
    print(f"  container restarts: {', '.join(restarts) or 'none'}")
    verdict = "PASSED" if rh.checks and all(c[1] for c in rh.checks) else "FAILED"
    print(f"\nrehearse-deploy: {verdict} in {secs:.0f} s ({sum(c[1] for c in rh.checks)} of {len(rh.checks)} checks passed)")


if __name__ == "__main__":
    sys.exit(main() or 0)
