"""Offline checks of infra/: the KubeRay manifests against the CRD schemas, the `ray up` config against
ray's own schema, the compose file's wiring and the Dockerfile's entrypoint.

The CRD schemas are OpenAPI v3 with Kubernetes extensions that plain jsonschema ignores. `k8s_validator`
adds what the API server (with kubectl's default strict field validation) enforces: unknown fields are
errors, int-or-string and int32/int64 ranges hold, list-map entries are unique by key. CEL rules
(x-kubernetes-validations) cannot run offline, so a manifest touching one fails here instead of passing
unchecked. The `*_bites` tests break a copy of each file on purpose and require an error at the place
that was broken, so a check that silently accepts everything cannot pass.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator, FormatChecker, ValidationError, validators

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
CRDS = REPO / "tests" / "data" / "kuberay-crds"  # KubeRay's own CRDs, copied (README.md there)

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)


# --- a Kubernetes-faithful validator for CRD openAPIV3Schema ------------------------------------------


def _structural(node: Any) -> Any:
    """Copy a CRD schema, making explicit what the API server enforces but jsonschema would not."""
    if isinstance(node, list):
        return [_structural(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _structural(v) for k, v in node.items()}
    # Unknown fields: kubectl's default --validate=strict turns them into errors.
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    # int-or-string without an explicit anyOf means "integer or string".
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def _list_type(validator: Any, list_type: str, instance: Any, schema: dict) -> Iterator[ValidationError]:
    """x-kubernetes-list-type: entries of a `map` list are unique by their keys, of a `set` by value."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        seen: set[str] = set()
        for item in instance:
            key = json.dumps([item.get(k) if isinstance(item, dict) else None for k in keys])
            if key in seen:
                yield ValidationError(f"duplicate entry for list-map keys {keys}: {key}")
            seen.add(key)
    elif list_type == "set":
        dumped = [json.dumps(item, sort_keys=True) for item in instance]
        if len(set(dumped)) != len(dumped):
            yield ValidationError("duplicate entries in a list of type 'set'")


def _cel_rules(validator: Any, rules: list[dict], instance: Any, schema: dict) -> Iterator[ValidationError]:
    """CEL rules cannot be evaluated offline: fail loudly rather than pass a field that was not checked."""
    for rule in rules:
        yield ValidationError(
            f"field governed by a CEL rule this test cannot evaluate ({rule['rule']!r}: "
            f"{rule.get('message', '')}); check it with `kubectl apply --dry-run=server`"
        )


_formats = FormatChecker()


@_formats.checks("int32")
def _int32(value: Any) -> bool:
    return not isinstance(value, int) or INT32[0] <= value <= INT32[1]


@_formats.checks("int64")
def _int64(value: Any) -> bool:
    return not isinstance(value, int) or INT64[0] <= value <= INT64[1]


K8sValidator = validators.extend(
    Draft202012Validator,
    {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel_rules},
)


@functools.cache
def _crd_schema(filename: str, version: str) -> tuple[dict, dict]:
    crd = yaml.load((CRDS / filename).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    facts = {"apiVersion": f"{crd['spec']['group']}/{version}", "kind": crd["spec"]["names"]["kind"]}
    return _structural(ver["schema"]["openAPIV3Schema"]), facts


def k8s_validator(crd_file: str, version: str = "v1") -> tuple[Any, dict]:
    """A validator for one served version of a CRD, and that CRD's group/kind facts."""
    schema, facts = _crd_schema(crd_file, version)
    return K8sValidator(schema, format_checker=_formats), facts


def errors_of(validator: Any, doc: dict) -> list[ValidationError]:
    return sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))


def describe(errors: list[ValidationError]) -> str:
    return "\n".join(f"{e.json_path}: {e.message[:300]}" for e in errors) or "no errors"


def error_paths(errors: list[ValidationError]) -> list[str]:
    """Where each error sits, as dotted keys and indices ('spec.workerGroupSpecs.2.replicas'; '' = root)."""
    return [".".join(map(str, e.absolute_path)) for e in errors]


def load_yaml(rel: str) -> dict:
    return yaml.safe_load((INFRA / rel).read_text())


# --- the validator itself ----------------------------------------------------------------------------


def test_structural_schema_closes_objects_and_keeps_open_maps() -> None:
    schema = _structural(
        {
            "type": "object",
            "properties": {
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "port": {"x-kubernetes-int-or-string": True},
            },
        }
    )
    assert schema["additionalProperties"] is False
    assert schema["properties"]["labels"]["additionalProperties"] == {"type": "string"}
    v = K8sValidator(schema, format_checker=_formats)
    assert v.is_valid({"labels": {"a": "b"}, "port": 8080}) and v.is_valid({"port": "http"})
    assert not v.is_valid({"port": 1.5}) and not v.is_valid({"typo": 1})


# --- KubeRay RayCluster and RayJob -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("manifest", "crd"),
    [("kuberay/raycluster.yaml", "ray.io_rayclusters.yaml"), ("kuberay/rayjob.yaml", "ray.io_rayjobs.yaml")],
)
def test_kuberay_manifest_matches_crd_schema(manifest: str, crd: str) -> None:
    validator, facts = k8s_validator(crd)
    doc = load_yaml(manifest)
    assert doc["apiVersion"] == facts["apiVersion"] and doc["kind"] == facts["kind"]
    # metadata is checked by the API server as ObjectMeta, outside the CRD schema.
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?", doc["metadata"]["name"])
    errors = errors_of(validator, doc)
    assert not errors, describe(errors)


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def _parent(doc: dict, path: str) -> tuple[Any, str | int]:
    """The container holding `path` (dotted keys, digits index lists; a key after '/' keeps its dots)."""
    head, _, tail = path.partition("/")
    *parents, last = head.split(".")
    node: Any = doc
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if tail:
        return node[last], tail
    return node, int(last) if last.isdigit() else last


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        node, key = _parent(doc, path)
        node[key] = value

    return mutate


def _delete(path: str) -> Callable[[dict], None]:
    def mutate(doc: dict) -> None:
        node, key = _parent(doc, path)
        del node[key]

    return mutate


def _duplicate_env(doc: dict) -> None:
    env = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    env.append({"name": env[0]["name"], "value": "http://elsewhere:5000"})


HEAD = "spec.headGroupSpec"
GPU = "spec.workerGroupSpecs.1"
GPU_LIMITS = f"{GPU}.template.spec.containers.0.resources.limits"

# breakage -> (how to break a copy, where the schema check must then report an error)
RAYCLUSTER_BREAKAGES = {
    "replicas of wrong type": (_set(f"{GPU}.replicas", "two"), f"{GPU}.replicas"),
    "replicas beyond int32": (_set(f"{GPU}.maxReplicas", 2**40), f"{GPU}.maxReplicas"),
    "required headGroupSpec missing": (_delete(HEAD), "spec"),
    "required containers missing": (_delete(f"{HEAD}.template.spec.containers"), f"{HEAD}.template.spec"),
    "misspelt field": (_set(f"{HEAD}.rayStartParam", {}), HEAD),
    "rayStartParams value not a string": (
        _set(f"{HEAD}.rayStartParams.num-cpus", 0),
        f"{HEAD}.rayStartParams.num-cpus",
    ),
    "GPU limit not a quantity": (_set(f"{GPU_LIMITS}/nvidia.com/gpu", "one"), f"{GPU_LIMITS}.nvidia.com/gpu"),
    "CPU limit as a float": (_set(f"{GPU_LIMITS}.cpu", 0.5), f"{GPU_LIMITS}.cpu"),
    "duplicate env name (list-map)": (_duplicate_env, f"{HEAD}.template.spec.containers.0.env"),
    "enum value out of range": (_set("spec.authOptions.mode", "password"), "spec.authOptions.mode"),
    "CEL-governed field": (_set("spec.managedBy", "ray.io/kuberay-operator"), "spec.managedBy"),
}


@pytest.mark.parametrize("breakage", list(RAYCLUSTER_BREAKAGES))
def test_raycluster_schema_check_bites(breakage: str) -> None:
    validator, _ = k8s_validator("ray.io_rayclusters.yaml")
    mutate, where = RAYCLUSTER_BREAKAGES[breakage]
    doc = copy.deepcopy(load_yaml("kuberay/raycluster.yaml"))
    mutate(doc)
    errors = errors_of(validator, doc)
    assert errors, f"a RayCluster with {breakage} passed the schema check"
    assert where in error_paths(errors), f"expected an error at {where}, got:\n{describe(errors)}"


RAYJOB_BREAKAGES = {
    "entrypoint as a list": (_set("spec.entrypoint", ["kdflow", "run"]), "spec.entrypoint"),
    "boolean given as a string": (
        _set("spec.shutdownAfterJobFinishes", "yes"),
        "spec.shutdownAfterJobFinishes",
    ),
    "ttl beyond int32": (_set("spec.ttlSecondsAfterFinished", 2**31), "spec.ttlSecondsAfterFinished"),
    "CPU count as a word": (_set("spec.entrypointNumCpus", "two"), "spec.entrypointNumCpus"),
    "misspelt field": (_set("spec.shutdownAfterJobFinished", True), "spec"),
    "worker replicas of wrong type": (
        _set("spec.rayClusterSpec.workerGroupSpecs.0.replicas", "1"),
        "spec.rayClusterSpec.workerGroupSpecs.0.replicas",
    ),
}


@pytest.mark.parametrize("breakage", list(RAYJOB_BREAKAGES))
def test_rayjob_schema_check_bites(breakage: str) -> None:
    validator, _ = k8s_validator("ray.io_rayjobs.yaml")
    mutate, where = RAYJOB_BREAKAGES[breakage]
    doc = copy.deepcopy(load_yaml("kuberay/rayjob.yaml"))
    mutate(doc)
    errors = errors_of(validator, doc)
    assert where in error_paths(errors), f"expected an error at {where}, got:\n{describe(errors)}"


def test_rayjob_runs_mnist1d_and_cleans_up() -> None:
    spec = load_yaml("kuberay/rayjob.yaml")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["kdflow", "run", "/app/workflows/mnist1d.yaml"] and "--json" in argv
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0


def test_rayjob_cluster_is_the_raycluster() -> None:
    """The RayJob's cluster is raycluster.yaml's spec; only the token auth of the long-lived one differs."""
    standing = copy.deepcopy(load_yaml("kuberay/raycluster.yaml")["spec"])
    standing.pop("authOptions", None)
    assert load_yaml("kuberay/rayjob.yaml")["spec"]["rayClusterSpec"] == standing


@pytest.mark.parametrize("manifest", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_pods_run_kdflow_with_tracking_and_s3_settings(manifest: str) -> None:
    import ray

    spec = _cluster_spec(load_yaml(manifest))
    assert spec["rayVersion"].split(".")[:2] == ray.__version__.split(".")[:2], "image and rayVersion drift"
    secret = load_yaml("kuberay/secret.example.yaml")
    assert secret["kind"] == "Secret"
    assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        for c in group["template"]["spec"]["containers"]:
            assert c["image"] == "kdflow:latest"
            assert "MLFLOW_TRACKING_URI" in {e["name"] for e in c["env"]}
            assert {"name": secret["metadata"]["name"]} in [s.get("secretRef") for s in c["envFrom"]]
    for w in spec["workerGroupSpecs"]:
        assert 0 <= w["minReplicas"] <= w["replicas"] <= w["maxReplicas"]
    (gpu,) = [w for w in spec["workerGroupSpecs"] if w["groupName"] == "gpu"]
    assert int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert spec["enableInTreeAutoscaling"] is True


# --- ray up ------------------------------------------------------------------------------------------


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_ray_up_config_matches_ray_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_yaml("ray-up/cluster.yaml")
    errors = list(Draft202012Validator(_ray_schema()).iter_errors(config))
    assert not errors, describe(errors)
    # What `ray up` itself runs before touching the cloud: merge provider defaults, then validate
    # (also checks head_node_type and that max_workers covers the node types' min_workers).
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["available_node_types"]["gpu"]["resources"]["GPU"] >= 1
    # ray up interpolates these into shell commands: an angle-bracket placeholder would be a redirect.
    assert "<" not in json.dumps({k: config[k] for k in ("docker", "initialization_commands")})


RAY_UP_BREAKAGES = {
    "misspelt top-level key": (_set("max_worker", 3), ""),
    "fractional GPU count": (
        _set("available_node_types.gpu.resources.GPU", 0.5),
        "available_node_types.gpu.resources.GPU",
    ),
    "provider missing": (_delete("provider"), ""),
    "node type without node_config": (
        _delete("available_node_types.cpu.node_config"),
        "available_node_types.cpu",
    ),
    "docker option misspelt": (_set("docker.run_option", []), "docker"),
}


@pytest.mark.parametrize("breakage", list(RAY_UP_BREAKAGES))
def test_ray_up_schema_check_bites(breakage: str) -> None:
    mutate, where = RAY_UP_BREAKAGES[breakage]
    config = copy.deepcopy(load_yaml("ray-up/cluster.yaml"))
    mutate(config)
    errors = list(Draft202012Validator(_ray_schema()).iter_errors(config))
    assert where in error_paths(errors), f"expected an error at {where!r}, got:\n{describe(errors)}"


def test_ray_up_rejects_unknown_head_node_type() -> None:
    from ray.autoscaler._private.util import validate_config

    config = load_yaml("ray-up/cluster.yaml")
    config["head_node_type"] = "headnode"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(config)


# --- compose -----------------------------------------------------------------------------------------


def test_compose_services_are_wired() -> None:
    compose = load_yaml("compose.yaml")
    services = compose["services"]
    assert {"postgres", "minio", "createbuckets", "mlflow", "ray-head"} <= set(services)
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on undefined service {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], (
                    f"{name} waits for {dep} to be healthy; it has no check"
                )
            if cond["condition"] == "service_completed_successfully":
                assert services[dep].get("restart", "no") == "no", (
                    f"{dep} is waited on to exit; must not restart"
                )
    assert set(services["mlflow"]["depends_on"]) >= {"postgres", "minio", "createbuckets"}
    for long_running in ("postgres", "minio", "mlflow", "ray-head"):
        assert "healthcheck" in services[long_running], long_running
    for volume in ("postgres-data", "minio-data"):
        assert volume in compose["volumes"]


def test_compose_mlflow_uses_postgres_and_a_bucket_that_gets_created() -> None:
    services = load_yaml("compose.yaml")["services"]
    argv = services["mlflow"]["entrypoint"]
    assert argv[:2] == ["mlflow", "server"]
    backend = argv[argv.index("--backend-store-uri") + 1]
    assert backend.startswith("postgresql://") and "@postgres:5432/" in backend
    dest = argv[argv.index("--artifacts-destination") + 1]
    bucket = re.fullmatch(r"s3://([a-z0-9.-]{3,63})/?.*", dest).group(1)
    assert f"local/{bucket}" in " ".join(services["createbuckets"]["command"])
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert services["ray-head"]["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    for mount in services["postgres"]["volumes"]:
        src = mount.split(":")[0]
        if src.startswith("."):
            assert (INFRA / src).is_file(), f"postgres mounts missing file {src}"


def test_compose_file_is_accepted_by_docker_compose() -> None:
    docker = shutil.which("docker")
    if (
        not docker
        or subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode
    ):
        pytest.skip("docker compose is not installed here")
    res = subprocess.run(
        [docker, "compose", "-f", str(INFRA / "compose.yaml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr


# --- Dockerfile --------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (INFRA / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def test_dockerfile_entrypoint_is_the_kdflow_console_script() -> None:
    instructions = _dockerfile_instructions()
    (entrypoint,) = [arg for op, arg in instructions if op == "ENTRYPOINT"]
    argv = json.loads(entrypoint)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv == ["kdflow"] and "kdflow" in scripts
    assert [arg for op, arg in instructions if op == "FROM"] == ["python:3.11-slim"]


def test_dockerfile_installs_the_project_and_torch_from_the_chosen_index() -> None:
    instructions = _dockerfile_instructions()
    args = {arg.split("=", 1)[0]: arg for op, arg in instructions if op == "ARG"}
    assert "TORCH_VARIANT" in args
    runs = [arg for op, arg in instructions if op == "RUN"]
    assert any("download.pytorch.org/whl/${TORCH_VARIANT}" in r and " torch" in r for r in runs)
    assert any(re.search(r"pip install .*(?<=\s)\.(\s|$)", r) for r in runs), "no `pip install .`"
    copies = [arg for op, arg in instructions if op == "COPY"]
    assert any(c.split()[0] == "." for c in copies), "the source tree is never copied in"
