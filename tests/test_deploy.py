"""The Kubernetes deployment (deploy/): the Helm chart, its recording rules and the autoscaling path,
checked without a cluster by the tools that would refuse them on one: Helm's renderer, linter and
values schema, the Kubernetes API's OpenAPI schemas (strict), promtool and a PromQL parser."""

from __future__ import annotations

import functools
import re
import subprocess

import helm_python as helm
import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import promql_parser
import pytest
import yaml
from kubernetes_validate.utils import all_versions, latest_version

from utils import metrics, specs
from utils.docker import SERVE_IMAGE
from utils.gateway import API_KEY_ENV, DEFAULT_PORT, DEFAULT_SERVED_MODEL
from utils.layout import PROJECT_ROOT
from utils.server.access import ADMIN_APIS, ADMIN_HEADER
from utils.server.install import MEMORY_ENVIRONMENT
from utils.server.process import LOAD_ARGUMENTS, MEMORY_ARGUMENTS, METRICS_ARGUMENTS
from utils.operations.tools import tool

CHART = PROJECT_ROOT / "deploy" / "helm" / "sd-triton"
RULES_FILE = CHART / "files" / "recording-rules.yml"
RULES_TEST_FILE = CHART / "files" / "recording-rules.test.yml"
ADAPTER_VALUES = PROJECT_ROOT / "deploy" / "prometheus-adapter" / "values.yaml"
RELEASE, NAMESPACE = "sd-triton", "ml"
MONITORING_API = "monitoring.coreos.com/v1"

INIT_CONTAINER = {"modelRepository": {"source": "initContainer", "initContainer": {
    "image": "amazon/aws-cli:2.17.0",
    "command": ["aws", "s3", "sync", "s3://models/sd15-h100", "/models"],
}}}
MONITORING_OFF = {"monitoring": {"podMonitor": {"enabled": False}, "prometheusRule": {"enabled": False}}}
AUTOSCALING_ON = {"autoscaling": {"enabled": True}}
# The combinations whose manifests differ: where /models comes from, monitoring, the autoscaler,
# and an admin key Secret of the user's own.
COMBINATIONS = {
    "defaults": {},
    "init-container": INIT_CONTAINER,
    "monitoring-off": MONITORING_OFF,
    "autoscaling": AUTOSCALING_ON,
    "autoscaling-init-container": {**AUTOSCALING_ON, **INIT_CONTAINER},
    "monitoring-off-init-container": {**MONITORING_OFF, **INIT_CONTAINER},
    "own-admin-key": {"server": {"adminKeySecret": {"name": "triton-admin", "key": "key"}}},
    "own-keys": {"server": {"adminKeySecret": {"name": "triton-admin", "key": "key"}},
                 "gateway": {"apiKeySecret": {"name": "openai-keys", "key": "key"}}},
    "gateway-off": {"gateway": {"enabled": False}},
}

# The Prometheus Operator's kinds, which kubernetes-validate does not know: what their CRDs require,
# and no field this chart does not mean to set (a misspelt one would be dropped by the API server).
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {"type": "object", "required": ["name", "labels"], "properties": {
    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}, "labels": _LABELS}}
_DURATION = {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"}


def _monitoring_kind(kind: str, spec: dict) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": MONITORING_API}, "kind": {"const": kind}, "metadata": _METADATA,
                           "spec": spec}}


MONITORING_SCHEMAS = {
    "PodMonitor": _monitoring_kind("PodMonitor", {
        "type": "object", "additionalProperties": False, "required": ["selector", "podMetricsEndpoints"],
        "properties": {
            "selector": {"type": "object", "additionalProperties": False, "required": ["matchLabels"],
                         "properties": {"matchLabels": {**_LABELS, "minProperties": 1}}},
            "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["port", "path"],
                "properties": {"port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                               "interval": _DURATION}}},
        }}),
    "PrometheusRule": _monitoring_kind("PrometheusRule", {
        "type": "object", "additionalProperties": False, "required": ["groups"],
        "properties": {"groups": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "rules"],
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "interval": _DURATION,
                "rules": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["record", "expr"],
                    "properties": {"record": {"type": "string", "pattern": r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
                                   "expr": {"type": "string", "minLength": 1}, "labels": _LABELS}}},
            }}}},
    }),
}

# Triton 2.51's per-model metrics that the rules may read (counters in microseconds or counts, and
# one gauge).
TRITON_METRICS = {
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
    "nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us", "nv_inference_pending_request_count",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# The models whose queue a request waits in; the ensembles queue nothing of their own.
QUEUED_MODELS = (specs.UNET.name, specs.DENOISE.name, specs.TEXT_TO_IMAGE.name, specs.IMAGE_TO_IMAGE.name)


@pytest.fixture(scope="module", autouse=True)
def schemas_read_once():
    """kubernetes-validate reads a version's 1.8 MB of definitions again for every manifest."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kubernetes_validate.utils, "schema_contents",
                      functools.cache(kubernetes_validate.utils.schema_contents))
        yield


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart, values: dict | None = None) -> list[dict]:
    """The manifests a release of these values installs (NOTES.txt is text, not a manifest)."""
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return [document for path, text in sorted(rendered.items()) if path.endswith(".yaml")
            for document in yaml.safe_load_all(text) if document]


def by_kind(manifests: list[dict]) -> dict[str, dict]:
    kinds = [manifest["kind"] for manifest in manifests]
    assert len(kinds) == len(set(kinds)), kinds
    return {manifest["kind"]: manifest for manifest in manifests}


def container(deployment: dict, name: str = "tritonserver") -> dict:
    (found,) = [each for each in deployment["spec"]["template"]["spec"]["containers"] if each["name"] == name]
    return found


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES_FILE.read_text())["groups"] for rule in group["rules"]]


def recorded(name: str) -> dict:
    (rule,) = [rule for rule in rules() if rule.get("record") == name]
    return rule


def selectors(expression: str) -> list[promql_parser.VectorSelector]:
    found = []
    promql_parser.walk(promql_parser.parse(expression),
                       lambda node: found.append(node) if isinstance(node, promql_parser.VectorSelector) else None)
    return found


def kube_versions() -> list[str]:
    """The Kubernetes versions kubernetes-validate ships schemas for that Chart.yaml's kubeVersion
    admits (a range of >=, <, <=, > bounds)."""
    constraint = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    bounds = re.findall(r"(>=|<=|>|<)\s*v?(\d+)\.(\d+)\.(\d+)(?:-0)?", constraint)
    assert len(bounds) == len(constraint.split()), f"kubeVersion {constraint!r}: only bounds like >=1.29.0-0"
    compare = {">=": tuple.__ge__, "<=": tuple.__le__, ">": tuple.__gt__, "<": tuple.__lt__}

    def admitted(version: str) -> bool:
        parsed = tuple(map(int, version.split(".")))
        return all(compare[op](parsed, (int(major), int(minor), int(patch))) for op, major, minor, patch in bounds)

    return sorted({version for version in all_versions() if admitted(version)}, key=lambda v: tuple(map(int, v.split("."))))


# --- Helm: renders, lints, refuses bad values -------------------------------------------------------


@pytest.mark.parametrize("values", COMBINATIONS.values(), ids=COMBINATIONS.keys())
def test_each_combination_renders_and_lints_clean(chart, values):
    manifests = render(chart, values)
    assert {"Deployment", "Service"} <= set(by_kind(manifests))
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    problems = [message for message in report["messages"] if message["severity"] >= 2]  # warnings, errors
    assert not problems and not report["errors"], report


def test_kube_version_range_is_what_the_manifests_are_validated_against():
    versions = kube_versions()
    assert versions[0] == "1.29.0" and versions[-1] == latest_version()
    assert "1.28.0" not in versions


def test_the_models_volume_claim_validates_and_is_the_one_the_chart_reads():
    """docs/operations.md applies deploy/kubernetes/models-pvc.yaml before the chart: it must be a
    valid claim, shared by the pods of every node, under the name the chart's values mount."""
    claim = yaml.safe_load((PROJECT_ROOT / "deploy" / "kubernetes" / "models-pvc.yaml").read_text())
    for version in kube_versions():
        kubernetes_validate.validate(claim, version, strict=True)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert claim["metadata"]["name"] == values["modelRepository"]["pvc"]["claimName"]
    assert "deploy/kubernetes/models-pvc.yaml" in (PROJECT_ROOT / "docs" / "operations.md").read_text()


@pytest.mark.parametrize("values", COMBINATIONS.values(), ids=COMBINATIONS.keys())
def test_every_manifest_validates_strictly_for_each_kubernetes_version(chart, values):
    manifests = render(chart, values)
    for manifest in [manifest for manifest in manifests if manifest["apiVersion"] == MONITORING_API]:
        jsonschema.validate(manifest, MONITORING_SCHEMAS[manifest["kind"]])
    manifests = [manifest for manifest in manifests if manifest["apiVersion"] != MONITORING_API]
    for version in kube_versions():
        for manifest in manifests:
            try:
                kubernetes_validate.validate(manifest, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{manifest['kind']} on Kubernetes {version}: {'.'.join(map(str, error.path))}: {error.message}")


def test_strict_validation_catches_a_misplaced_field(chart):
    """The checks above can fail: a field the API does not have is refused, not dropped."""
    kinds = by_kind(render(chart))
    kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError, match="gpus"):
        kubernetes_validate.validate(kinds["Deployment"], latest_version(), strict=True)
    kinds["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["scrapeInterval"] = "15s"
    with pytest.raises(jsonschema.ValidationError, match="scrapeInterval"):
        jsonschema.validate(kinds["PodMonitor"], MONITORING_SCHEMAS["PodMonitor"])
    del kinds["PrometheusRule"]["spec"]["groups"][0]["rules"][0]["expr"]
    with pytest.raises(jsonschema.ValidationError, match="'expr' is a required property"):
        jsonschema.validate(kinds["PrometheusRule"], MONITORING_SCHEMAS["PrometheusRule"])


@pytest.mark.parametrize("values, message", [
    ({"replicaCount": -1}, r"/replicaCount.*minimum"),
    ({"replicaCont": 2}, r"additional properties 'replicaCont' not allowed"),
    ({"sharedMemory": {"sizeLimit": 1024}}, r"/sharedMemory/sizeLimit.*got number, want string"),
    ({"image": {"tag": None}}, r"/image.*missing property 'tag'"),
    ({"image": {"tag": ""}}, r"/image/tag.*minLength"),
    ({"image": {"pullPolicy": "Sometimes"}}, r"/image/pullPolicy"),
    ({"modelRepository": {"source": "s3"}}, r"/modelRepository/source"),
    ({"modelRepository": {"source": "initContainer"}}, r"/modelRepository/initContainer/image.*minLength"),
    ({"modelRepository": {"pvc": {"claimName": ""}}}, r"/modelRepository/pvc/claimName.*minLength"),
    ({"resources": {"limits": {"nvidia.com/gpu": "2"}}}, r"/resources/limits/nvidia.com~1gpu"),
    ({"server": {"extraArgs": ["--model-repository=/elsewhere"]}}, r"/server/extraArgs/0"),
    ({"autoscaling": {"targetQueueComputeRatio": 0}}, r"/autoscaling/targetQueueComputeRatio.*exclusiveMinimum"),
    ({"monitoring": {"podMonitor": {"interval": "fast"}}}, r"/monitoring/podMonitor/interval"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_bad_values_fail_the_schema_naming_the_value(chart, values, message):
    with pytest.raises(helm.HelmValuesError, match=message):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmValuesError, match=message):  # and an install renders nothing
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_the_defaults_pass_the_schema(chart):
    chart.validate_schema(None)


@pytest.mark.parametrize("values, message", [
    ({**AUTOSCALING_ON, **MONITORING_OFF}, "autoscaling.enabled needs monitoring"),
    ({"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}, r"minReplicas \(5\) is above"),
])
def test_inconsistent_values_are_refused_with_the_fix(chart, values, message):
    with pytest.raises(helm.HelmRenderError, match=message):
        render(chart, values)


# --- What the manifests say -------------------------------------------------------------------------


def test_the_deployment_serves_the_project_image_on_one_gpu_of_one_product(chart):
    deployment = by_kind(render(chart, {"server": {"extraArgs": ["--log-verbose=1"]}}))["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    tritonserver = container(deployment)
    assert tritonserver["image"] == SERVE_IMAGE  # the image scripts/build_docker_images.py builds
    assert tritonserver["command"] + tritonserver["args"][:2] == [
        "tritonserver", "--model-repository=/models", "--strict-readiness=true"]
    assert tritonserver["args"][-1] == "--log-verbose=1"
    restricted = f"{ADMIN_APIS}:{ADMIN_HEADER}=$(TRITON_ADMIN_KEY)"  # as the local launcher restricts them
    assert f"--http-restricted-api={restricted}" in tritonserver["args"]
    assert f"--grpc-restricted-protocol={restricted}" in tritonserver["args"]
    assert "TRITON_ADMIN_KEY" in {variable["name"] for variable in tritonserver["env"]}
    # As the local launcher serves its metrics and loads its models.
    assert set(METRICS_ARGUMENTS) | set(LOAD_ARGUMENTS) | set(MEMORY_ARGUMENTS) <= set(tritonserver["args"])
    assert MEMORY_ENVIRONMENT.items() <= {variable["name"]: variable.get("value") for variable in tritonserver["env"]}.items()
    assert tritonserver["resources"]["limits"]["nvidia.com/gpu"] == 1
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term["matchExpressions"] == [
        {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3"]}]
    assert {port["name"]: port["containerPort"] for port in tritonserver["ports"]} == {
        "http": 8000, "grpc": 8001, "metrics": 8002}


def test_probes_read_tritons_health_endpoints_on_the_http_port(chart):
    tritonserver = container(by_kind(render(chart))["Deployment"])
    paths = {probe: tritonserver[probe]["httpGet"]["path"]
             for probe in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert paths == {"startupProbe": "/v2/health/ready", "readinessProbe": "/v2/health/ready",
                     "livenessProbe": "/v2/health/live"}
    assert {tritonserver[probe]["httpGet"]["port"] for probe in paths} == {"http"}
    # Loading the plans takes minutes: the startup probe allows 10, the others take over after.
    startup = tritonserver["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_shared_memory_is_a_memory_backed_volume_of_the_chosen_size(chart):
    deployment = by_kind(render(chart, {"sharedMemory": {"sizeLimit": "4Gi"}}))["Deployment"]
    volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container(deployment)["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "4Gi"}


def test_the_containers_run_unprivileged(chart):
    deployment = by_kind(render(chart, INIT_CONTAINER))["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    for each in [*pod["initContainers"], *pod["containers"]]:
        context = each["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["capabilities"]["drop"] == ["ALL"]
        assert context["readOnlyRootFilesystem"] is True
        # A read-only root needs somewhere to write: /tmp is an emptyDir in every container.
        assert "/tmp" in {mount["mountPath"] for mount in each["volumeMounts"]}


def test_the_model_repository_comes_from_a_pvc(chart):
    deployment = by_kind(render(chart, {"modelRepository": {"pvc": {"claimName": "sd15-h100", "subPath": "v3"}}}))[
        "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    (mount,) = [mount for mount in container(deployment)["volumeMounts"] if mount["mountPath"] == "/models"]
    assert mount["readOnly"] is True and mount["subPath"] == "v3"
    (volume,) = [volume for volume in pod["volumes"] if volume["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"] == {"claimName": "sd15-h100", "readOnly": True}


def test_the_model_repository_comes_from_an_init_container(chart):
    deployment = by_kind(render(chart, INIT_CONTAINER))["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    settings = INIT_CONTAINER["modelRepository"]["initContainer"]
    assert init["image"] == settings["image"] and init["command"] == settings["command"]
    (written,) = [mount for mount in init["volumeMounts"] if mount["mountPath"] == "/models"]
    (served,) = [mount for mount in container(deployment)["volumeMounts"] if mount["mountPath"] == "/models"]
    assert written["name"] == served["name"] and served["readOnly"] is True
    (volume,) = [volume for volume in pod["volumes"] if volume["name"] == served["name"]]
    assert "emptyDir" in volume and "persistentVolumeClaim" not in volume


def test_the_service_reaches_the_pods_and_marks_grpc_as_h2c(chart):
    kinds = by_kind(render(chart))
    service, deployment = kinds["Service"], kinds["Deployment"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert {name: port["port"] for name, port in ports.items()} == {"http": 8000, "grpc": 8001, "metrics": 8002,
                                                                     "openai": DEFAULT_PORT}
    assert ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    container_ports = {port["name"] for each in ("tritonserver", "openai-gateway")
                       for port in container(deployment, each)["ports"]}
    assert {port["targetPort"] for port in ports.values()} <= container_ports


def test_an_admin_key_secret_is_created_unless_one_is_named(chart):
    kinds = by_kind(render(chart))
    (reference,) = [variable["valueFrom"]["secretKeyRef"] for variable in container(kinds["Deployment"])["env"]
                    if variable["name"] == "TRITON_ADMIN_KEY"]
    assert kinds["Secret"]["metadata"]["name"] == reference["name"] and reference["key"] in kinds["Secret"]["data"]
    own = by_kind(render(chart, COMBINATIONS["own-keys"]))
    assert "Secret" not in own
    (reference,) = [variable["valueFrom"]["secretKeyRef"] for variable in container(own["Deployment"])["env"]
                    if variable["name"] == "TRITON_ADMIN_KEY"]
    assert reference == {"name": "triton-admin", "key": "key"}
    # The gateway's API key: in the chart's Secret beside the admin key, or in the one named.
    (api_key,) = [variable["valueFrom"]["secretKeyRef"] for variable in
                  container(kinds["Deployment"], "openai-gateway")["env"] if variable["name"] == API_KEY_ENV]
    assert api_key["name"] == kinds["Secret"]["metadata"]["name"] and api_key["key"] in kinds["Secret"]["data"]
    (api_key,) = [variable["valueFrom"]["secretKeyRef"] for variable in
                  container(own["Deployment"], "openai-gateway")["env"] if variable["name"] == API_KEY_ENV]
    assert api_key == {"name": "openai-keys", "key": "key"}
    only_api_key = by_kind(render(chart, COMBINATIONS["own-admin-key"]))["Secret"]["data"]
    assert set(only_api_key) == {"api-key"}


def test_the_gateway_runs_beside_triton_with_its_own_probes(chart):
    from utils.gateway import IMAGE_LAUNCHER

    deployment = by_kind(render(chart))["Deployment"]
    gateway = container(deployment, "openai-gateway")
    assert gateway["image"] == SERVE_IMAGE and gateway["command"] == ["python3", IMAGE_LAUNCHER]
    assert {"--repository=/models", "--url=127.0.0.1:8001", f"--port={DEFAULT_PORT}",
            f"--served-model-name={DEFAULT_SERVED_MODEL}"} <= set(gateway["args"])  # the pod's own Triton
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "openai"}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "openai"}
    assert "nvidia.com/gpu" not in gateway["resources"].get("limits", {})  # the GPU is Triton's
    mounts = {mount["mountPath"]: mount for mount in gateway["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True  # it reads the repository's sizes
    off = by_kind(render(chart, COMBINATIONS["gateway-off"]))
    assert [each["name"] for each in off["Deployment"]["spec"]["template"]["spec"]["containers"]] == ["tritonserver"]
    assert "openai" not in {port["name"] for port in off["Service"]["spec"]["ports"]}


def test_monitoring_toggles(chart):
    assert {"PodMonitor", "PrometheusRule"} <= set(by_kind(render(chart)))
    assert not {"PodMonitor", "PrometheusRule"} & set(by_kind(render(chart, MONITORING_OFF)))


def test_the_pod_monitor_scrapes_the_metrics_port_of_these_pods(chart):
    kinds = by_kind(render(chart, {"monitoring": {"podMonitor": {"labels": {"release": "kube-prometheus-stack"}}}}))
    monitor, deployment = kinds["PodMonitor"], kinds["Deployment"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert endpoint["port"] in {port["name"] for port in container(deployment)["ports"]}


def test_the_prometheus_rule_is_the_rules_file(chart):
    rule = by_kind(render(chart))["PrometheusRule"]
    assert rule["spec"]["groups"] == yaml.safe_load(RULES_FILE.read_text())["groups"]
    # The unit tests of the rules stay out of the packaged chart (.helmignore).
    assert [file["name"] for file in chart.files if file["name"].startswith("files/")] == ["files/recording-rules.yml"]


def test_autoscaling_replaces_the_replica_count(chart):
    assert by_kind(render(chart, {"replicaCount": 3}))["Deployment"]["spec"]["replicas"] == 3
    assert "HorizontalPodAutoscaler" not in by_kind(render(chart))
    kinds = by_kind(render(chart, {**AUTOSCALING_ON, "replicaCount": 3}))
    assert "replicas" not in kinds["Deployment"]["spec"]  # an upgrade must not reset the autoscaler's count
    scaler = kinds["HorizontalPodAutoscaler"]
    assert scaler["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1", "kind": "Deployment", "name": kinds["Deployment"]["metadata"]["name"]}


def test_the_autoscaler_scales_up_quickly_and_down_slowly(chart):
    scaler = by_kind(render(chart, {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 8,
                                                    "targetQueueComputeRatio": 0.25}}))["HorizontalPodAutoscaler"]
    spec = scaler["spec"]
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 8)
    (metric,) = spec["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "0.25"}
    up, down = spec["behavior"]["scaleUp"], spec["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 600 > up["stabilizationWindowSeconds"]

    def pods_per_minute(policies):
        return max(policy["value"] * 60 / policy["periodSeconds"] for policy in policies if policy["type"] == "Pods")

    assert pods_per_minute(down["policies"]) < 1 <= pods_per_minute(up["policies"])


# --- The recording rules ----------------------------------------------------------------------------


def test_promtool_checks_the_rules_file():
    done = subprocess.run([str(tool("promtool")), "check", "rules", str(RULES_FILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout


def test_promtool_unit_tests_pass():
    done = subprocess.run([str(tool("promtool")), "test", "rules", RULES_TEST_FILE.name], cwd=RULES_TEST_FILE.parent,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_rule_has_a_unit_test():
    tests = yaml.safe_load(RULES_TEST_FILE.read_text())
    assert tests["rule_files"] == [RULES_FILE.name]
    tested = {selector.name for case in tests["tests"] for check in case["promql_expr_test"]
              for selector in selectors(check["expr"])}
    assert {rule["record"] for rule in rules()} <= tested


def test_rule_names_follow_level_metric_operations():
    names = [rule["record"] for rule in rules()]
    assert len(names) == len(set(names))
    for name in names:
        assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", name), name


def test_rules_read_only_known_metrics_and_earlier_rules():
    """Every series a rule reads is one of Triton's, one of the pipeline's own (utils/metrics.py),
    or a rule recorded before it in the same group: Prometheus evaluates a group in order, so a
    rule read from later (or from another group) would be one evaluation behind."""
    series_of = {metric.name: metric for metric in metrics.METRICS if metric.kind != "histogram"}
    series_of.update({metric.name + suffix: metric for metric in metrics.METRICS if metric.kind == "histogram"
                      for suffix in HISTOGRAM_SUFFIXES})
    read = set()
    for group in yaml.safe_load(RULES_FILE.read_text())["groups"]:
        recorded_before = set()
        for rule in group["rules"]:
            for name in {selector.name for selector in selectors(rule["expr"])} - TRITON_METRICS - recorded_before:
                assert name in series_of, f"{rule['record']} reads {name}: not a known metric or an earlier rule"
                read.add(series_of[name])
            recorded_before.add(rule["record"])
    assert read == set(metrics.METRICS)  # every metric the pipeline reports has a rule


def test_aggregations_keep_the_namespace():
    """Separate deployments (a staging and a production namespace) never merge into one figure."""
    for rule in rules():
        aggregations = []
        promql_parser.walk(promql_parser.parse(rule["expr"]), lambda node: aggregations.append(node)
                           if isinstance(node, promql_parser.AggregateExpr) else None)
        level = rule["record"].split(":")[0]
        for aggregation in aggregations:
            assert aggregation.modifier is not None and aggregation.modifier.type == promql_parser.AggModifierType.By
            assert "namespace" in aggregation.modifier.labels, rule["record"]
        if aggregations:  # the outermost one gives the rule its labels: its level
            assert set(aggregations[0].modifier.labels) - {"le"} == set(level.split("_")), rule["record"]
        else:  # arithmetic on rules of the same level keeps their labels
            assert {selector.name.split(":")[0] for selector in selectors(rule["expr"])} == {level}, rule["record"]


def test_queue_and_compute_are_read_for_the_working_models_not_the_ensembles():
    for name in ("namespace_pod_model:nv_inference_queue_duration_us:rate1m",
                 "namespace_pod_model:nv_inference_compute_infer_duration_us:rate1m"):
        (selector,) = selectors(recorded(name)["expr"])
        (matcher,) = [m for m in selector.matchers.matchers if m.name == "model"]
        assert matcher.op == promql_parser.MatchOp.Re
        served = re.compile(matcher.value)  # Prometheus anchors a label regex at both ends
        for model in QUEUED_MODELS:
            assert served.fullmatch(model) and served.fullmatch(f"{model}_gpu1"), model
        for model in [*specs.ENSEMBLES, specs.TEXT_ENCODER.name, "pipeline_text_to_image_stream"]:
            assert not served.fullmatch(model), model


def test_every_expression_parses():
    expressions = [rule["expr"] for rule in rules()]
    tests = yaml.safe_load(RULES_TEST_FILE.read_text())
    expressions += [check["expr"] for case in tests["tests"] for check in case["promql_expr_test"]]
    expressions += [series["series"] for case in tests["tests"] for series in case["input_series"]]
    for expression in expressions:
        promql_parser.parse(expression)
    with pytest.raises(ValueError):  # the parser does refuse what Prometheus would
        promql_parser.parse("sum by (model) (rate(nv_inference_count[1m])")


# --- The autoscaling path: recording rule -> prometheus-adapter -> HorizontalPodAutoscaler ------------


def adapter_rule() -> dict:
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    return rule


def adapter_query(template: str, series: str) -> str:
    """The adapter's metricsQuery as it sends it for two pods of one namespace."""
    return (template.replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"sd-a|sd-b"')
            .replace("<<.GroupBy>>", "pod"))


def test_one_metric_name_from_the_rule_to_the_autoscaler(chart):
    scaler = by_kind(render(chart, AUTOSCALING_ON))["HorizontalPodAutoscaler"]
    (metric,) = scaler["spec"]["metrics"]
    hpa_name = metric["pods"]["metric"]["name"]
    rule = adapter_rule()
    (series,) = selectors(rule["seriesQuery"])
    exposed = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series.name)
    assert hpa_name == exposed == series.name
    assert recorded(hpa_name)  # a rule records it


def test_the_adapter_serves_the_rule_per_pod():
    rule = adapter_rule()
    overrides = rule["resources"]["overrides"]
    assert {label: target["resource"] for label, target in overrides.items()} == {"namespace": "namespace", "pod": "pod"}
    (series,) = selectors(rule["seriesQuery"])
    # The rule keeps exactly the labels the adapter maps to the namespace and the pod.
    per_pod = promql_parser.parse(recorded(series.name)["expr"])
    assert isinstance(per_pod, promql_parser.BinaryExpr) and str(per_pod.op) == "or"
    for side in (per_pod.lhs, per_pod.rhs.rhs):
        assert set(side.modifier.labels) == set(overrides)
    query = promql_parser.parse(adapter_query(rule["metricsQuery"], series.name))
    assert isinstance(query, promql_parser.AggregateExpr) and query.modifier.labels == ["pod"]
    (selector,) = selectors(str(query))
    assert selector.name == series.name
    assert {(m.name, m.value) for m in selector.matchers.matchers} == {("namespace", NAMESPACE), ("pod", "sd-a|sd-b")}


def test_the_adapter_serves_nothing_else():
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    assert values["rules"]["default"] is False and len(values["rules"]["custom"]) == 1
    assert values["prometheus"]["url"].startswith("http")
