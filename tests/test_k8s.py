"""The Kubernetes manifests (k8s/): every overlay builds with kustomize, validates against the Kubernetes
schemas and the Strimzi / Prometheus Operator CRD schemas, and sets only RLHF_* settings its service reads.

    .venv/bin/pytest -q tests/test_k8s.py

kustomize comes from `k8s/tools/install-kustomize.sh` (built once with `go install`, then cached). The CRDs
are read from `../shared/crds` beside the repository; without them the custom resources are reported skipped.
"""

import functools
import importlib
import json
import math
import re
import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from rlhf_online.cli import COMMANDS
from rlhf_online.config import env_names, parse_config
from rlhf_online.topics import Topics

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
CRD_DIR = ROOT.parent / "shared" / "crds"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
# Oldest Kubernetes the manifests promise to work on (docs/kubernetes.md), and the newest schema installed.
KUBERNETES_VERSIONS = ("1.29", latest_version())
SERVICES = {  # component label -> (subcommand, config dataclass)
    "inference": ("serve-inference", "rlhf_online.inference.config:InferenceConfig"),
    "reward": ("serve-reward", "rlhf_online.reward.config:RewardConfig"),
    "trainer": ("serve-trainer", "rlhf_online.trainer.config:TrainerConfig"),
}
# What inference takes from the Secret: the signing keys (one, or several while rotating) and the admin token.
SECRET_SETTINGS = {"RLHF_SIGNING_KEYS", "RLHF_ADMIN_TOKEN"}
NEVER_LITERAL = SECRET_SETTINGS | {"RLHF_SIGNING_KEY"}  # secrets: never in a ConfigMap or a literal value
TLS_FILES = ("RLHF_TLS_CERT_FILE", "RLHF_TLS_KEY_FILE", "RLHF_TLS_CLIENT_CA_FILE")
PROBE_SCRIPT = K8S / "components" / "tls" / "grpc_health_probe.py"


# ---- building ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kustomize() -> str:
    """Path of a kustomize binary, installed by k8s/tools/install-kustomize.sh on first use."""
    script = K8S / "tools" / "install-kustomize.sh"
    done = subprocess.run([str(script)], capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        reason = (
            f"KUSTOMIZE COULD NOT BE INSTALLED, k8s/ overlays NOT VALIDATED: {done.stderr.strip()[-800:]}"
        )
        warnings.warn(reason, stacklevel=1)
        pytest.skip(reason)
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def build(kustomize) -> Callable[[str], list[dict[str, Any]]]:
    """build(overlay): its `kustomize build` output, one dict per resource (built once per session)."""

    @functools.cache
    def built(overlay: str) -> list[dict[str, Any]]:
        done = subprocess.run(
            [kustomize, "build", str(K8S / "overlays" / overlay)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, f"kustomize build k8s/overlays/{overlay} failed:\n{done.stderr}"
        return [d for d in yaml.safe_load_all(done.stdout) if d]

    return built


@pytest.fixture(params=OVERLAYS)
def overlay(request) -> str:
    return request.param


@pytest.fixture
def objects(overlay, build) -> list[dict[str, Any]]:
    return build(overlay)


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name}, found {len(found)}"
    return found[0]


def deployments(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Deployments by their app.kubernetes.io/component label."""
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in of_kind(objects, "Deployment")}


def main_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def container_env(container: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, str]:
    """The environment a container starts with; values from secrets or pod fields become placeholders."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, (
            f"{container['name']}: use env with secretKeyRef, not envFrom {source}"
        )
        data = named(objects, "ConfigMap", source["configMapRef"]["name"]).get("data", {})
        env.update({source.get("prefix", "") + k: v for k, v in data.items()})
    for var in container.get("env", []):
        ref = var.get("valueFrom", {})
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "resourceFieldRef" in ref:
            env[var["name"]] = resource_field(container, ref["resourceFieldRef"])
        else:
            env[var["name"]] = f"<{next(iter(ref), 'unset')}>"
    return env


def resource_field(container: dict[str, Any], ref: dict[str, str]) -> str:
    """What the kubelet puts in a resourceFieldRef variable for a CPU limit: cores, rounded up."""
    assert ref["resource"] == "limits.cpu" and str(ref.get("divisor", "1")) == "1", ref
    cpu = str(container["resources"]["limits"]["cpu"])
    return str(math.ceil(int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)))


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines of a kustomize env file."""
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def load_class(spec: str) -> type:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


# ---- schemas -----------------------------------------------------------------------------------------------


def test_overlays_exist():
    assert {"dev", "prod"} <= set(OVERLAYS)


def test_patch_files_hold_one_resource():
    """kubectl 1.27-1.30 build with kustomize v5.0, which refuses a patch file of several documents."""
    for kustomization in K8S.rglob("kustomization.yaml"):
        for patch in yaml.safe_load(kustomization.read_text()).get("patches", []):
            if "path" in patch:
                path = kustomization.parent / patch["path"]
                docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
                assert len(docs) == 1, f"{path}: split it, one resource a file"


def test_builtin_resources_validate_against_kubernetes_schemas(objects):
    custom_groups = {"kafka.strimzi.io", "monitoring.coreos.com"}
    checked = 0
    for obj in objects:
        if obj["apiVersion"].split("/")[0] in custom_groups:
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                pytest.fail(f"no Kubernetes {version} schema for {obj['apiVersion']} {obj['kind']}")
            except kubernetes_validate.ValidationError as e:
                where = "/".join(str(p) for p in e.path)
                pytest.fail(
                    f"{obj['kind']}/{obj['metadata']['name']} at {where} (Kubernetes {version}): {e.message}"
                )
        checked += 1
    assert checked >= 15


def _strict(schema: Any) -> Any:
    """Rejects unknown fields where the API server would silently prune them (no preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        k: _strict(v) if k in ("items", "additionalProperties", "anyOf", "oneOf", "allOf", "not") else v
        for k, v in schema.items()
    }
    if "properties" in schema:
        out["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) -> validator of spec.versions[].schema.openAPIV3Schema, from the CRDs in CRD_DIR."""
    validators = {}
    for path in sorted(CRD_DIR.rglob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            for version in crd["spec"]["versions"]:
                schema = _strict(version["schema"]["openAPIV3Schema"])
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                validators[key] = jsonschema.Draft7Validator(schema)
    return validators


def crd_errors(obj: dict[str, Any], validators) -> list[str]:
    validator = validators.get((obj["apiVersion"], obj["kind"]))
    if validator is None:
        return [f"no CRD schema for {obj['apiVersion']} {obj['kind']} in {CRD_DIR}"]
    return [
        f"{obj['kind']}/{obj['metadata']['name']} at {'/'.join(map(str, e.path))}: {e.message}"
        for e in validator.iter_errors(obj)
    ]


@pytest.fixture(scope="module")
def validators():
    if not CRD_DIR.is_dir():
        pytest.skip(f"CRDs not found at {CRD_DIR}: Strimzi and ServiceMonitor resources NOT validated")
    return crd_validators()


def test_custom_resources_validate_against_crds(objects, validators):
    custom = [
        o for o in objects if o["apiVersion"].split("/")[0] in ("kafka.strimzi.io", "monitoring.coreos.com")
    ]
    assert {o["kind"] for o in custom} >= {"Kafka", "KafkaNodePool", "KafkaTopic"}
    errors = [e for obj in custom for e in crd_errors(obj, validators)]
    assert not errors, "\n".join(errors)


def test_crd_validation_rejects_bad_resources(validators):
    """The CRD check is not vacuous: a bad value and a misspelt field are both refused."""
    topic = {
        "apiVersion": "kafka.strimzi.io/v1",
        "kind": "KafkaTopic",
        "metadata": {"name": "t"},
        "spec": {"partitions": 0},
    }
    assert any("partitions" in e for e in crd_errors(topic, validators))
    topic["spec"] = {"partitions": 1, "retentionMs": 5}
    assert any("retentionMs" in e for e in crd_errors(topic, validators))
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "m"},
        "spec": {"endpoints": [{"port": "metrics", "intervall": "15s"}], "selector": {}},
    }
    assert any("intervall" in e for e in crd_errors(monitor, validators))


# ---- configuration drift -----------------------------------------------------------------------------------


def test_deployments_run_their_service(objects):
    found = deployments(objects)
    assert set(found) == set(SERVICES)
    for component, (subcommand, _) in SERVICES.items():
        assert subcommand in COMMANDS
        assert main_container(found[component])["command"] == ["rlhf-online", subcommand]


def test_env_sets_only_settings_the_services_read(objects):
    """Every RLHF_* variable set on a container is a field of that service's config, with a valid value."""
    for component, deployment in deployments(objects).items():
        config_cls = load_class(SERVICES[component][1])
        env = container_env(main_container(deployment), objects)
        rlhf = {k: v for k, v in env.items() if k.startswith("RLHF_")}
        unread = sorted(set(rlhf) - env_names(config_cls))
        assert not unread, f"{component} sets {unread}, which {config_cls.__name__} does not read"
        parse_config(config_cls, [], rlhf)  # raises on a value of the wrong type or out of range


def test_secrets_come_from_the_secret(objects):
    inference = main_container(deployments(objects)["inference"])
    from_secret = {
        v["name"]: v["valueFrom"]["secretKeyRef"]
        for v in inference.get("env", [])
        if "secretKeyRef" in v.get("valueFrom", {})
    }
    assert set(from_secret) == SECRET_SETTINGS
    for deployment in deployments(objects).values():
        literal = set(container_env(main_container(deployment), objects)) & NEVER_LITERAL - set(from_secret)
        assert not literal, f"{literal} must come from the Secret, not a ConfigMap"
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    for ref in from_secret.values():
        assert f"--from-literal={ref['key']}=" in docs, (
            f"docs/kubernetes.md must show how to create {ref['key']}"
        )
    secrets = [s for s in of_kind(objects, "Secret") if s["metadata"]["name"] == ref["name"]]
    for secret in secrets:  # dev generates it; prod expects the operator to create it
        assert {r["key"] for r in from_secret.values()} <= set(secret["data"])


def test_ports_and_grpc_probes(objects):
    """Probes call grpc.health.v1.Health on the gRPC port: the kubelet's own gRPC probe in plaintext, the TLS
    probe script (an exec probe, under the name of the pod's Service) when the port speaks TLS."""
    for component, deployment in deployments(objects).items():
        container = main_container(deployment)
        env = container_env(container, objects)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": int(env["RLHF_GRPC_PORT"]), "metrics": int(env["RLHF_METRICS_PORT"])}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if "RLHF_TLS_CERT_FILE" in env:
                python, script, server_name, ca_file = container[probe]["exec"]["command"]
                assert (python, Path(script).name) == ("python", PROBE_SCRIPT.name), f"{component} {probe}"
                assert server_name == f"rlhf-{component}" and ca_file in mounted_secret_files(deployment)
            else:
                assert container[probe]["grpc"]["port"] == ports["grpc"], f"{component} {probe}"
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in of_kind(objects, "Deployment")]
    for service in of_kind(objects, "Service"):
        matching = [labels for labels in pods if selects(service["spec"]["selector"], labels)]
        assert len(matching) == 1, f"Service {service['metadata']['name']} must select exactly one Deployment"
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= {"grpc", "metrics"}


def mounted_secret_files(deployment: dict[str, Any]) -> dict[str, str]:
    """Path in the main container -> Secret name, for every file of a mounted TLS Secret."""
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    files = {}
    for mount in main_container(deployment).get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret")
        if secret is not None:  # a kubernetes.io/tls Secret holds tls.crt and tls.key (cert-manager: ca.crt)
            for key in ("tls.crt", "tls.key", "ca.crt"):
                files[f"{mount['mountPath']}/{key}"] = secret["secretName"]
    return files


def test_tls_settings_name_files_of_a_mounted_secret(objects):
    for component, deployment in deployments(objects).items():
        env = container_env(main_container(deployment), objects)
        tls = {k: env[k] for k in TLS_FILES if env.get(k)}
        assert not tls or {"RLHF_TLS_CERT_FILE", "RLHF_TLS_KEY_FILE"} <= set(tls), f"{component}: {tls}"
        files = mounted_secret_files(deployment)
        for setting, path in tls.items():
            assert path in files, f"{component}: {setting}={path} is not a file of a mounted Secret"


def test_the_tls_overlay_turns_tls_on_everywhere(build):
    for deployment in deployments(build("prod-tls")).values():
        env = container_env(main_container(deployment), build("prod-tls"))
        assert env["RLHF_TLS_CERT_FILE"] and env["RLHF_TLS_KEY_FILE"]
    assert (
        "create secret generic rlhf-online-tls --type=kubernetes.io/tls"
        in (ROOT / "docs" / "kubernetes.md").read_text()
    )
    for overlay in ("dev", "prod"):  # plaintext inside the cluster unless an overlay asks for TLS
        for deployment in deployments(build(overlay)).values():
            assert not set(TLS_FILES) & set(container_env(main_container(deployment), build(overlay)))


def test_dev_writes_the_base_model_it_points_at(build):
    objects = build("dev")
    for deployment in deployments(objects).values():
        base_dir = container_env(main_container(deployment), objects)["RLHF_BASE_MODEL_DIR"]
        (init,) = deployment["spec"]["template"]["spec"]["initContainers"]
        assert "rlhf-online init-model --preset tiny" in init["command"][-1]
        assert f"dir={base_dir}\n" in init["command"][-1]


# ---- workload shape ----------------------------------------------------------------------------------------


def test_replicas_strategies_and_disruption_budget(objects):
    found = deployments(objects)
    for single_writer in ("reward", "trainer"):
        spec = found[single_writer]["spec"]
        assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    (hpa,) = of_kind(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == found["inference"]["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2
    assert "replicas" not in found["inference"]["spec"], "the HPA owns inference's replica count"
    (pdb,) = of_kind(objects, "PodDisruptionBudget")
    assert selects(
        pdb["spec"]["selector"]["matchLabels"], found["inference"]["spec"]["template"]["metadata"]["labels"]
    )


def all_containers(deployment: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def test_pods_are_locked_down_and_sized(objects):
    for deployment in of_kind(objects, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        for c in all_containers(deployment):
            where = f"{deployment['metadata']['name']}/{c['name']}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][bound]), f"{where} {bound}"


def test_registry_volume_is_shared_by_all_three(objects, overlay):
    (pvc,) = of_kind(objects, "PersistentVolumeClaim")
    # dev runs on one node, where ReadWriteOnce is shared by every pod (and is all kind's local-path offers)
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce" if overlay == "dev" else "ReadWriteMany"]
    for component, deployment in deployments(objects).items():
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        claims = [
            n
            for n, v in volumes.items()
            if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]
        ]
        assert len(claims) == 1, component
        mount = next(m for m in main_container(deployment)["volumeMounts"] if m["name"] == claims[0])
        env = container_env(main_container(deployment), objects)
        for setting in ("RLHF_REGISTRY_DIR", "RLHF_BASE_MODEL_DIR"):
            assert env[setting].startswith(mount["mountPath"] + "/"), f"{component} {setting}"


def test_network_policy_opens_only_inference_grpc(objects):
    """Ports open to any source, and ports open at all, for each service's pods."""
    policies = of_kind(objects, "NetworkPolicy")
    for component, deployment in deployments(objects).items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        applying = [p for p in policies if selects(p["spec"]["podSelector"].get("matchLabels", {}), labels)]
        assert applying, f"no NetworkPolicy selects {component}: all its ports would be open"
        open_to_all, open_at_all = set(), set()
        for policy in applying:
            for rule in policy["spec"].get("ingress", []):
                ports = {p["port"] for p in rule["ports"]}  # a rule without ports would open every port
                open_at_all |= ports
                if not rule.get("from"):
                    open_to_all |= ports
        assert open_to_all == ({"grpc"} if component == "inference" else set()), component
        assert open_at_all == ({"grpc", "metrics"} if component == "inference" else {"metrics"}), component


def test_prod_trainer_gets_a_gpu(build):
    objects = build("prod")
    trainer = main_container(deployments(objects)["trainer"])
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert trainer["image"].split(":")[0].endswith("-cuda")
    assert container_env(trainer, objects)["RLHF_DEVICE"] == "cuda"


# ---- Kafka -------------------------------------------------------------------------------------------------


def test_kafka_topics_match_the_design(objects):
    env = container_env(main_container(deployments(objects)["inference"]), objects)
    (kafka,) = of_kind(objects, "Kafka")
    cluster = kafka["metadata"]["name"]
    (plain,) = [li for li in kafka["spec"]["kafka"]["listeners"] if li["name"] == "plain"]
    assert env["RLHF_KAFKA_BOOTSTRAP"] == f"{cluster}-kafka-bootstrap:{plain['port']}"
    topics = {t["spec"]["topicName"]: t for t in of_kind(objects, "KafkaTopic")}
    expected = Topics(env["RLHF_TOPIC_PREFIX"])
    assert sorted(topics) == sorted(expected.all())
    assert (
        topics[expected.interactions]["spec"]["partitions"] == topics[expected.feedback]["spec"]["partitions"]
    )
    for topic in [*topics.values(), *of_kind(objects, "KafkaNodePool")]:
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == cluster
    for topic in topics.values():
        assert "retention.ms" in topic["spec"]["config"]
    config = kafka["spec"]["kafka"]["config"]
    brokers = sum(
        p["spec"]["replicas"] for p in of_kind(objects, "KafkaNodePool") if "broker" in p["spec"]["roles"]
    )
    assert any("controller" in p["spec"]["roles"] for p in of_kind(objects, "KafkaNodePool"))  # KRaft
    assert config["auto.create.topics.enable"] is False
    assert 1 <= config["min.insync.replicas"] <= config["default.replication.factor"] <= brokers
    assert config["offsets.topic.replication.factor"] <= brokers


# ---- monitoring --------------------------------------------------------------------------------------------


def defined_metrics() -> set[str]:
    """Sample names of the Prometheus metrics defined under rlhf_online/ (with their type's suffixes)."""
    suffixes = {
        "Counter": ("_total",),
        "Gauge": ("",),
        "Histogram": ("_bucket", "_sum", "_count"),
        "Summary": ("_sum", "_count", ""),
    }
    names = set()
    pattern = re.compile(r"\b(Counter|Gauge|Histogram|Summary)\(\s*\"(rlhf_\w+)\"")
    for path in (ROOT / "rlhf_online").rglob("*.py"):
        for kind, name in pattern.findall(path.read_text()):
            names |= {name.removesuffix("_total") + s for s in suffixes[kind]}
    return names


def test_monitoring_matches_services_and_metrics(build):
    objects = build("prod")  # the overlay with the monitoring component
    (monitor,) = of_kind(objects, "ServiceMonitor")
    services = [
        s
        for s in of_kind(objects, "Service")
        if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    scraped = {
        s["metadata"]["name"]
        for s in services
        if {e["port"] for e in monitor["spec"]["endpoints"]} & {p["name"] for p in s["spec"]["ports"]}
    }
    assert scraped == {d["metadata"]["name"] for d in of_kind(objects, "Deployment")}
    (dashboard_map,) = [
        c for c in of_kind(objects, "ConfigMap") if "grafana_dashboard" in c["metadata"]["labels"]
    ]
    (dashboard,) = [json.loads(v) for v in dashboard_map["data"].values()]
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {m for e in exprs for m in re.findall(r"\brlhf_\w+", e)}
    assert used, "the dashboard queries no rlhf_* metric"
    unknown = sorted(used - defined_metrics())
    assert not unknown, f"the dashboard queries metrics no service defines: {unknown}"
    for component in SERVICES:
        assert any(m.startswith(f"rlhf_{component}_") for m in used), f"no panel for {component}"


# ---- one-off jobs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((K8S / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_jobs_validate_and_write_where_the_services_read(path):
    (job,) = [d for d in yaml.safe_load_all(path.read_text()) if d]
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(job, version, strict=True)
    settings = read_env_file(K8S / "base/settings/shared.env")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    env = {v["name"]: v.get("value") for v in container["env"]}
    assert env["DIR"] == settings["RLHF_BASE_MODEL_DIR"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
