"""k8s/: every overlay renders with the real `kubectl kustomize`, every object validates against the
Kubernetes schemas offline, every workload is hardened, and the manifests agree with the code
(role specs, topology names, settings, NATS configuration accepted by the real nats-server)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from mesh.backends.tiers import load_tiers
from mesh.bus.topology import Topology
from mesh.config import MeshSettings
from mesh.embedded.natsserver import find_nats_server
from mesh.roles.spec import load_specs
from mesh.security import PermissionSet, generate
from tests.k8s_manifests import K8S, OVERLAYS, ROOT, Doc, nats_config, one, render, secrets_from, workloads

K8S_VERSION = "1.37.0"  # the schemas kubernetes-validate bundles; the manifests use only GA APIs
TARGETS = ("base", *OVERLAYS)
SPECS = load_specs(ROOT / "nodes")
NAMESPACE = "mesh"

# KEDA's CRD is not bundled with kubernetes-validate: the ScaledObject fields these manifests use,
# transcribed from KEDA's documented spec (keda.sh/v1alpha1, nats-jetstream scaler).
SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                   "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                                  "apiVersion": {"type": "string"}}},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "advanced": {"type": "object", "properties": {
                    "horizontalPodAutoscalerConfig": {"type": "object", "properties": {"behavior": {"type": "object"}}},
                }},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"],
                    "properties": {
                        "type": {"const": "nats-jetstream"},
                        "metadata": {
                            "type": "object", "additionalProperties": {"type": "string"},
                            "required": ["natsServerMonitoringEndpoint", "account", "stream", "consumer",
                                         "lagThreshold"],
                            "properties": {k: {"type": "string"} for k in (
                                "natsServerMonitoringEndpoint", "account", "stream", "consumer", "lagThreshold",
                                "activationLagThreshold", "useHttps")},
                        },
                    },
                }},
            },
        },
    },
}


def validate(doc: Doc) -> None:
    if doc["kind"] == "ScaledObject":
        jsonschema.validate(doc, SCALED_OBJECT)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def pod_spec(w: Doc) -> Doc:
    return w["spec"]["template"]["spec"]


def role_of(w: Doc) -> str | None:
    """The role a mesh workload runs (``mesh node <role>``), None for others (NATS, edge model)."""
    c = pod_spec(w)["containers"][0]
    argv = list(c.get("command") or []) + list(c.get("args") or [])
    return argv[2] if argv[:2] == ["mesh", "node"] else None


def mesh_config(docs: list[Doc]) -> dict[str, str]:
    return dict(one(docs, "ConfigMap", "mesh-config")["data"])


# --- renders and validates ---------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_renders_and_every_object_validates(target: str) -> None:
    docs = render(target)
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {NAMESPACE}
    for doc in docs:
        validate(doc)


def test_secret_templates_and_generated_secrets_validate(tmp_path: Path) -> None:
    generated = generate(tmp_path / "sec", PermissionSet(Topology(), SPECS).users(["site-a"]), cost=4)
    templates = sorted((K8S / "secrets").glob("*.yaml"))
    assert {name for t in templates for name in secrets_from(t)} == {"mesh-api-keys", "nats-leaf-remote",
                                                                     "mesh-gateway-tokens"}
    for path in [*templates, generated.out / "secrets.yaml"]:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                validate(doc)


def test_a_broken_manifest_is_caught() -> None:
    """The validation is not vacuous: an unknown field and a wrong type are refused."""
    deployment = next(d for d in render("dev") if d["kind"] == "Deployment")
    broken = {**deployment, "spec": {**deployment["spec"], "replicass": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)
    so = next(d for d in render("prod") if d["kind"] == "ScaledObject")
    with pytest.raises(jsonschema.ValidationError):
        validate({**so, "spec": {**so["spec"], "minReplicaCount": "one"}})


# --- security posture --------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_every_workload_is_hardened(target: str) -> None:
    for w in workloads(render(target)):
        name = f"{target}/{w['kind']}/{w['metadata']['name']}"
        spec = pod_spec(w)
        assert spec.get("automountServiceAccountToken") is False, name
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0, name
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc.get("privileged", False) is False, name
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), name
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{name}: {kind}"
            if w["kind"] == "Job":
                continue  # runs to completion: no server to probe
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                assert "httpGet" in c[probe], f"{name}: {probe}"
            assert c["image"] and ":" in c["image"], f"{name}: image must be pinned to a tag"


@pytest.mark.parametrize("target", TARGETS)
def test_mesh_nodes_probe_their_health_endpoint_and_can_write_only_to_volumes(target: str) -> None:
    docs = render(target)
    config = mesh_config(docs)
    for w in workloads(docs):
        if role_of(w) is None:
            continue
        c = pod_spec(w)["containers"][0]
        port = next(p for p in c["ports"] if p["name"] == "http")
        assert str(port["containerPort"]) == config["MESH_HEALTH_PORT"]
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["livenessProbe"]["httpGet"]["port"] == "http"
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        # read-only root: HOME/TMPDIR (/tmp, set by the image) and MESH_DATA_DIR are volumes
        assert {"/tmp", config["MESH_DATA_DIR"], config["MESH_NODES_DIR"]} <= mounts
        assert config["MESH_OUT_DIR"].startswith(config["MESH_DATA_DIR"] + "/")
        drain = float(config["MESH_DRAIN_SECONDS"])
        assert pod_spec(w)["terminationGracePeriodSeconds"] > drain  # drained work is handed back first


# --- the manifests agree with the code -----------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_only_the_provisioning_job_holds_the_admin_credentials(target: str) -> None:
    """Streams and buckets are the admin's: one Job runs `mesh provision` with Secret mesh-nats-admin (at an
    edge site for the site's own JetStream domain); no other workload references that Secret."""
    docs = render(target)
    job = one(docs, "Job", "mesh-provision")
    c = pod_spec(job)["containers"][0]
    argv = c["command"] + c["args"]
    if target == "edge":
        domain = re.search(r"domain: ([a-z0-9-]+)", one(docs, "ConfigMap", "nats-config")["data"]["topology.conf"])
        assert domain is not None and argv == ["mesh", "provision", "--domain", domain[1]]
    else:
        assert argv == ["mesh", "provision"]
    sources = [next(iter(e.values()))["name"] for e in c["envFrom"]]
    assert "mesh-nats-admin" in sources and any(n.startswith("mesh-config") for n in sources)
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {mesh_config(docs)["MESH_NODES_DIR"], "/tmp"}
    for w in workloads(docs):
        if w is not job:
            assert "mesh-nats-admin" not in yaml.safe_dump(w), w["metadata"]["name"]


@pytest.mark.parametrize("target", TARGETS)
def test_one_workload_per_role_with_its_own_credentials(target: str) -> None:
    docs = render(target)
    by_role = {role_of(w): w for w in workloads(docs) if role_of(w)}
    expected = {r for r, s in SPECS.items() if target != "edge" or s.kind != "recorder"}
    assert set(by_role) == expected
    for role, w in by_role.items():
        c = pod_spec(w)["containers"][0]
        secret_refs = [e["secretRef"]["name"] for e in c["envFrom"] if "secretRef" in e]
        assert f"mesh-nats-{role}" in secret_refs
        assert [s for s in secret_refs if s.startswith("mesh-nats-")] == [f"mesh-nats-{role}"]
        expect_kind = "StatefulSet" if SPECS[role].kind == "recorder" else "Deployment"
        assert w["kind"] == expect_kind, role
    if "ledger" in by_role:
        ledger = by_role["ledger"]
        assert ledger["spec"]["replicas"] == 1  # DuckDB: one writer
        claims = {t["metadata"]["name"] for t in ledger["spec"]["volumeClaimTemplates"]}
        data = next(m for m in pod_spec(ledger)["containers"][0]["volumeMounts"]
                    if m["mountPath"] == mesh_config(docs)["MESH_DATA_DIR"])
        assert data["name"] in claims  # the ledger file is on a persistent volume


@pytest.mark.parametrize("target", TARGETS)
def test_the_gateway_runs_with_its_own_nats_user_and_required_tokens(target: str, tmp_path: Path) -> None:
    docs = render(target)
    w = one(docs, "Deployment", "mesh-gateway")
    c = pod_spec(w)["containers"][0]
    assert c["command"] + c["args"] == ["mesh", "gateway", "--host", "0.0.0.0", "--port", "8080"]
    assert next(p["containerPort"] for p in c["ports"] if p["name"] == "http") == 8080  # what the probes ask
    assert [e["secretRef"]["name"] for e in c["envFrom"] if "secretRef" in e] == ["mesh-nats-gateway"]
    tokens = next(m for m in c["volumeMounts"] if m["name"] == "tokens")
    assert {e["name"]: e["value"] for e in c["env"]}["MESH_GATEWAY_TOKENS_FILE"] == tokens["mountPath"] + "/tokens.toml"
    volume = next(v for v in pod_spec(w)["volumes"] if v["name"] == "tokens")["secret"]
    assert volume["secretName"] == "mesh-gateway-tokens" and not volume.get("optional")  # no tokens, no start
    assert one(docs, "Service", "mesh-gateway")["spec"]["selector"] == w["spec"]["selector"]["matchLabels"]
    generated = generate(tmp_path / "sec", PermissionSet(Topology(), SPECS).users(), cost=4)
    assert "mesh-nats-gateway" in secrets_from(generated.out / "secrets.yaml")


def test_nodes_configmap_is_the_role_specs() -> None:
    """k8s/base/nodes/ is a copy of nodes/ (kustomize reads only below its folder).
    Re-sync: cp nodes/*.toml k8s/base/nodes/ (and list new files in k8s/base/kustomization.yaml)."""
    data = one(render("base"), "ConfigMap", "mesh-nodes")["data"]
    assert data == {p.name: p.read_text() for p in sorted((ROOT / "nodes").glob("*.toml"))}


@pytest.mark.parametrize("target", TARGETS)
def test_mesh_config_is_valid_settings_matching_the_nats_servers(target: str) -> None:
    docs = render(target)
    config = mesh_config(docs)
    settings = MeshSettings(**{k.removeprefix("MESH_").lower(): v for k, v in config.items()
                               if k.startswith("MESH_") and not k.startswith("MESH_TIER_")})
    nats = one(docs, "StatefulSet", "nats")
    assert settings.replicas == nats["spec"]["replicas"]  # R3 streams need three servers; R1 on one
    assert settings.servers == ["nats://nats:4222"]
    one(docs, "Service", "nats")
    load_tiers(settings, environ={k: v for k, v in config.items()})  # tier settings parse


@pytest.mark.parametrize("target", TARGETS)
def test_nats_configuration_is_accepted_by_nats_server(target: str, tmp_path: Path) -> None:
    docs = render(target)
    auth = generate(tmp_path / "sec", PermissionSet(Topology(), SPECS).users(), cost=4).auth_conf.read_text()
    conf = nats_config(docs, tmp_path / "etc-nats", auth)
    env = {**os.environ, "POD_NAME": "nats-0", "HUB_LEAF_URL": "nats-leaf://leaf-site-a:pw@hub.example:7422"}
    out = subprocess.run([str(find_nats_server()), "-t", "-c", str(conf)], check=False, capture_output=True,
                         text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    topology = one(docs, "ConfigMap", "nats-config")["data"]["topology.conf"]
    replicas = one(docs, "StatefulSet", "nats")["spec"]["replicas"]
    routes = re.findall(r"nats://(nats-\d+)\.nats-headless:6222", topology)
    assert routes == ([f"nats-{i}" for i in range(replicas)] if replicas > 1 else [])
    if target == "edge":
        assert re.search(r"domain: [a-z0-9-]+", topology) and "remotes" in topology


def test_prod_scales_every_role_on_its_consumer_lag() -> None:
    docs = render("prod")
    topo = Topology()
    nats_monitor = next(p["containerPort"] for p in pod_spec(one(docs, "StatefulSet", "nats"))["containers"][0]["ports"]
                        if p["name"] == "monitor")
    scaled = {d["spec"]["scaleTargetRef"]["name"]: d for d in docs if d["kind"] == "ScaledObject"}
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment" and role_of(d)}
    assert set(scaled) == set(deployments)
    # the gateway is no consumer: it scales on CPU (its HPA in base)
    gateway = one(docs, "HorizontalPodAutoscaler", "mesh-gateway")["spec"]
    assert gateway["scaleTargetRef"]["name"] == "mesh-gateway" and gateway["metrics"][0]["resource"]["name"] == "cpu"
    for name, so in scaled.items():
        role = role_of(deployments[name])
        assert role is not None
        assert "replicas" not in deployments[name]["spec"]  # the autoscaler owns it
        spec = so["spec"]
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        first = spec["triggers"][0]["metadata"]
        assert (first["stream"], first["consumer"]) == (topo.stream_for(role), topo.consumer_name(role))
        assert int(first["lagThreshold"]) == 2 * SPECS[role].concurrency
        for trigger in spec["triggers"]:
            meta = trigger["metadata"]
            assert meta["natsServerMonitoringEndpoint"] == f"nats-headless.{NAMESPACE}.svc.cluster.local:{nats_monitor}"
            assert meta["account"] == "$G"  # config-file users live in the global account
            assert (meta["stream"], meta["consumer"]) in {
                (s, c.durable_name) for s, c in topo.consumer_configs(role)}
    assert mesh_config(docs)["MESH_REPLICAS"] == "3"


def test_hpa_overlay_has_a_cpu_autoscaler_per_role() -> None:
    docs = render("hpa")
    hpas = {d["spec"]["scaleTargetRef"]["name"]: d for d in docs if d["kind"] == "HorizontalPodAutoscaler"}
    deployments = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    assert set(hpas) == deployments
    for hpa in hpas.values():
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


@pytest.mark.parametrize("target", TARGETS)
def test_disruption_budgets_and_network_policies_select_real_pods(target: str) -> None:
    docs = render(target)
    pods = [(w, w["spec"]["template"]["metadata"]["labels"]) for w in workloads(docs)]

    def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())

    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        assert any(selects(pdb["spec"]["selector"], labels) for _, labels in pods), pdb["metadata"]["name"]
    for w, labels in pods:
        if w["kind"] == "Deployment" or w["metadata"]["name"] == "nats":
            assert any(selects(p["spec"]["selector"], labels) for p in docs if p["kind"] == "PodDisruptionBudget")
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    deny = one(docs, "NetworkPolicy", "default-deny")["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    for w, labels in pods:
        assert any(selects(p["spec"]["podSelector"], labels) for p in policies if p["spec"]["podSelector"]), \
            f"{w['metadata']['name']} has only default-deny"
    nats_policy = one(docs, "NetworkPolicy", "nats")["spec"]
    client_from = next(r["from"] for r in nats_policy["ingress"] if r.get("ports") == [{"port": 4222}])
    for w, labels in pods:
        if role_of(w):
            assert any(selects(f["podSelector"], labels) for f in client_from)  # nodes may reach NATS


def test_dockerfile_runs_non_root_from_copied_specs() -> None:
    text = (ROOT / "Dockerfile").read_text()
    runtime = text[text.rindex("FROM "):]  # the last stage is the default target
    assert runtime.startswith("FROM base AS runtime")
    assert re.search(r"^USER 10001:10001$", runtime, re.MULTILINE)
    assert "COPY nodes /app/nodes" in runtime and "MESH_NODES_DIR=/app/nodes" in runtime
    assert 'ENTRYPOINT ["mesh"]' in runtime  # k8s/ runs command ["mesh"], args ["node", <role>]
    assert "install -y --no-install-recommends bubblewrap" in runtime  # the sandbox of shell.run
    assert "HOME=/tmp" in text and "TMPDIR=/tmp" in text
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for needed in ("pyproject.toml", "README.md", "mesh/", "nodes/"):
        assert f"!{needed}" in ignored and (ROOT / needed.rstrip("/")).exists()
    base = next(w for w in workloads(render("base")) if role_of(w))
    assert pod_spec(base)["securityContext"]["runAsUser"] == 10001


def test_the_userns_sandbox_component_gives_only_the_tester_bubblewrap(tmp_path: Path) -> None:
    """Default: every pod under RuntimeDefault, the tester's runs in the fallback sandbox (it says so at
    /readyz). The component: the tester in its own user namespace with what bubblewrap needs, required."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(K8S / "overlays" / "dev", tmp_path)],
        "components": [os.path.relpath(K8S / "components" / "sandbox-userns", tmp_path)]}))
    plain, docs = render("dev"), render(tmp_path)
    for doc in docs:
        validate(doc)
    by_role = {role_of(w): w for w in workloads(docs)}
    tester = pod_spec(by_role.pop("tester"))
    assert tester["hostUsers"] is False
    assert tester["securityContext"]["seccompProfile"] == {"type": "Localhost", "localhostProfile": "mesh/sandbox.json"}
    container = tester["containers"][0]
    assert container["securityContext"]["procMount"] == "Unmasked"
    assert {"name": "MESH_SANDBOX", "value": "bwrap"} in container["env"]
    assert "MESH_SANDBOX" not in mesh_config(docs)  # the other roles run no commands
    untouched = {role_of(w): w for w in workloads(plain) if role_of(w) != "tester"}
    assert by_role == untouched
