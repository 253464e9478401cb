"""The cluster deployment files (docs/cluster.md): deploy/docker-compose.cluster.yml,
deploy/haproxy/haproxy.cfg and the Kubernetes directory deploy/kubernetes/cluster/.

The Kubernetes directory is rendered with kustomize (`kubectl kustomize` or `kustomize build`)
when one is installed. Without one, its resources are read as they are: the directory holds
complete manifests only (kustomize refuses an overlay inside its own base, deploy/kubernetes),
so reading them is the whole rendering; a test checks the kustomization uses nothing else, and
another that both ways give the same result where kustomize exists. Each cluster manifest is
compared with its single-instance counterpart so the two cannot drift apart.
kubernetes-validate (strict) checks every manifest, the real haproxy checks the HAProxy
configuration, a real redis-server takes the store's arguments. A missing tool skips its test
with the reason, except under CI=true where it fails.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml  # type: ignore[import-untyped]

from tests.deploy.test_deploy_files import (
    DEPLOY,
    K8S,
    assert_known,
    k8s_validate,
    load_yaml,
    missing,
    tool,
)
from tests.redis_server import RedisServer, find_redis_server

CLUSTER = K8S / "cluster"
SECRET_EXAMPLE = CLUSTER / "store-secret.example.yaml"
COMPOSE = DEPLOY / "docker-compose.cluster.yml"
HAPROXY_CFG = DEPLOY / "haproxy" / "haproxy.cfg"
REPLICAS = ["trackingproxy-1", "trackingproxy-2", "trackingproxy-3"]
STATE_DIR = "/var/lib/trackingproxy"


# -- Kubernetes: rendering -----------------------------------------------------------------
def kustomize_command() -> list[str] | None:
    """The installed kustomize, as an argv prefix, or None."""
    if kubectl := shutil.which("kubectl"):
        return [kubectl, "kustomize"]
    if kustomize := shutil.which("kustomize"):
        return [kustomize, "build"]
    return None


def read_resources() -> list[dict[str, Any]]:
    """The documents of every file kustomization.yaml lists, in order: the rendering, since
    the directory holds complete manifests (test_kustomization_is_plain_resources)."""
    documents = []
    for name in load_yaml(CLUSTER / "kustomization.yaml")["resources"]:
        documents += [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]
    return documents


def kustomize_render(command: list[str]) -> list[dict[str, Any]]:
    done = subprocess.run([*command, str(CLUSTER)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def rendered() -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/kubernetes/cluster/` applies."""
    command = kustomize_command()
    return read_resources() if command is None else kustomize_render(command)


def by_kind(documents: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in documents}


def find(kind: str, name: str) -> dict[str, Any]:
    return by_kind(rendered())[(kind, name)]


def pod_spec(kind: str, name: str) -> dict[str, Any]:
    return find(kind, name)["spec"]["template"]["spec"]


def container(kind: str, name: str) -> dict[str, Any]:
    (only,) = pod_spec(kind, name)["containers"]
    return only


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


# -- Kubernetes: the directory -------------------------------------------------------------
def test_kustomization_is_plain_resources() -> None:
    """The kustomization only lists resources (no patches, generators or transformers), so
    reading the listed files is the whole rendering, and it lists every manifest in the
    directory except the example Secret."""
    kustomization = load_yaml(CLUSTER / "kustomization.yaml")
    assert set(kustomization) == {"apiVersion", "kind", "resources"}
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in CLUSTER.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - {SECRET_EXAMPLE.name}
    assert all("/" not in name for name in listed), "only files of this directory"


def test_reading_the_files_equals_kustomize() -> None:
    """Where kustomize is installed, its rendering equals reading the listed files."""
    command = kustomize_command()
    if command is None:
        pytest.skip("neither kubectl nor kustomize is installed (the files are read instead)")
    assert by_kind(kustomize_render(command)) == by_kind(read_resources())


def test_every_rendered_manifest_validates() -> None:
    """kubernetes-validate (strict: unknown fields are errors) accepts every manifest that
    `kubectl apply -k deploy/kubernetes/cluster/` applies."""
    documents = rendered()
    kinds = sorted(d["kind"] for d in documents)
    assert kinds == ["ConfigMap", "Deployment", "NetworkPolicy", "PodDisruptionBudget",
                     "Service", "Service", "StatefulSet"]
    for document in documents:
        k8s_validate(document)


def test_example_secret_validates_and_is_a_marked_placeholder() -> None:
    """The example Secret is a valid manifest, says it is an example with placeholders, and is
    not applied by the kustomization."""
    text = SECRET_EXAMPLE.read_text()
    assert "EXAMPLE ONLY, NOT APPLIED" in text.splitlines()[0]
    secret = yaml.safe_load(text)
    k8s_validate(secret)
    assert secret["metadata"]["name"] == "trackingproxy-store"
    assert set(secret["stringData"]) == {"url", "redis-password"}
    password = secret["stringData"]["redis-password"]
    assert password.startswith("CHANGE-ME")
    url = urlsplit(secret["stringData"]["url"])
    assert url.scheme == "redis" and url.password == password
    assert ("Secret", "trackingproxy-store") not in by_kind(rendered())


# -- Kubernetes: the replicas --------------------------------------------------------------
def test_deployment_runs_three_replicas_rolled_one_at_a_time() -> None:
    """Three replicas; RollingUpdate that never goes below three (maxUnavailable 0)."""
    spec = find("Deployment", "trackingproxy")["spec"]
    assert spec["replicas"] == 3
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert spec["strategy"]["rollingUpdate"]["maxSurge"] >= 1


def test_replicas_spread_over_nodes() -> None:
    """A hard topology spread over kubernetes.io/hostname that selects the replicas."""
    deployment = find("Deployment", "trackingproxy")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (spread,) = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["maxSkew"] == 1 and spread["whenUnsatisfiable"] == "DoNotSchedule"
    assert spread["labelSelector"]["matchLabels"].items() <= labels.items()


def test_disruption_budget_keeps_two_replicas() -> None:
    """A PodDisruptionBudget keeps at least two of the replicas through voluntary evictions."""
    pdb = find("PodDisruptionBudget", "trackingproxy")["spec"]
    assert pdb["minAvailable"] == 2
    labels = find("Deployment", "trackingproxy")["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()


def test_store_url_from_secret_and_node_id_from_pod_name() -> None:
    """TRACKINGPROXY_STORE comes from the Secret (secretKeyRef), TRACKINGPROXY_NODE_ID from the
    pod's name (fieldRef), and every variable set is one an option reads."""
    c = container("Deployment", "trackingproxy")
    env = env_of(c)
    assert env["TRACKINGPROXY_STORE"]["valueFrom"] == {
        "secretKeyRef": {"name": "trackingproxy-store", "key": "url"}}
    assert env["TRACKINGPROXY_NODE_ID"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.name"}}
    assert all("value" not in e for e in env.values()), "no literal values, no password"
    configmap = find("ConfigMap", "trackingproxy")
    assert_known(set(env) | set(configmap["data"]), "deploy/kubernetes/cluster")
    assert "TRACKINGPROXY_STORE" not in configmap["data"], "the URL holds a password"


def test_state_directory_is_an_empty_dir_and_no_claim_is_left() -> None:
    """The state directory is an emptyDir (each replica's local copy); no manifest claims a
    persistent volume for the replicas."""
    pod = pod_spec("Deployment", "trackingproxy")
    mounts = {m["mountPath"]: m["name"] for m in container("Deployment", "trackingproxy")[
        "volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    state = volumes[mounts[STATE_DIR]]
    assert set(state) == {"name", "emptyDir"}
    assert all("persistentVolumeClaim" not in v for v in pod["volumes"])
    assert not [d for d in rendered() if d["kind"] == "PersistentVolumeClaim"]


def strip(document: dict[str, Any], *paths: str) -> dict[str, Any]:
    """A copy without the fields at the dotted paths (a list step picks the only item)."""
    result = copy.deepcopy(document)
    for path in paths:
        *parents, last = path.split(".")
        node: Any = result
        for step in parents:
            node = node[step]
            if isinstance(node, list):
                (node,) = node
        node.pop(last, None)
    return result


def test_cluster_manifests_differ_from_the_single_instance_only_where_needed() -> None:
    """The Deployment is ../deployment.yaml but for replicas, strategy, topology spread, env
    and the state volume; the ConfigMap and Service are the single instance's."""
    cluster = by_kind(read_resources())
    differences = ("spec.replicas", "spec.strategy",
                   "spec.template.spec.topologySpreadConstraints",
                   "spec.template.spec.containers.env", "spec.template.spec.volumes")
    base = load_yaml(K8S / "deployment.yaml")
    assert strip(cluster[("Deployment", "trackingproxy")], *differences) == strip(
        base, *differences)
    base_volumes = [v for v in base["spec"]["template"]["spec"]["volumes"] if v["name"] != "state"]
    assert [v for v in cluster[("Deployment", "trackingproxy")]["spec"]["template"]["spec"][
        "volumes"] if v["name"] != "state"] == base_volumes
    assert "env" not in base["spec"]["template"]["spec"]["containers"][0]
    for name in ("configmap.yaml", "service.yaml"):
        single = load_yaml(K8S / name)
        assert cluster[(single["kind"], single["metadata"]["name"])] == single, name


# -- Kubernetes: the store -----------------------------------------------------------------
def server_args(argv: list[str]) -> dict[str, str]:
    """``--name value`` pairs of a redis/valkey-server command line."""
    pairs = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            pairs[arg[2:]] = argv[i + 1]
    return pairs


def statefulset_argv() -> list[str]:
    redis = container("StatefulSet", "trackingproxy-redis")
    return [*redis["command"], *redis["args"]]


def test_redis_statefulset_keeps_everything() -> None:
    """One Valkey pod with appendonly yes and maxmemory-policy noeviction, its data directory
    on a volumeClaimTemplate, its password from the same Secret."""
    statefulset = find("StatefulSet", "trackingproxy-redis")
    assert statefulset["spec"]["replicas"] == 1
    redis = container("StatefulSet", "trackingproxy-redis")
    assert redis["command"] == ["valkey-server"]
    args = server_args(statefulset_argv())
    assert args["appendonly"] == "yes"
    assert args["maxmemory-policy"] == "noeviction"
    assert args["requirepass"] == "$(REDISCLI_AUTH)"
    assert env_of(redis)["REDISCLI_AUTH"]["valueFrom"] == {
        "secretKeyRef": {"name": "trackingproxy-store", "key": "redis-password"}}
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    mounts = {m["mountPath"]: m["name"] for m in redis["volumeMounts"]}
    assert mounts[args["dir"]] == claim["metadata"]["name"]


def test_redis_service_is_headless_and_only_selects_redis() -> None:
    """The StatefulSet's governing Service is headless and named in the example URL; neither
    Service selects the other's pods."""
    statefulset = find("StatefulSet", "trackingproxy-redis")
    service = find("Service", statefulset["spec"]["serviceName"])["spec"]
    assert service["clusterIP"] == "None"
    assert [p["port"] for p in service["ports"]] == [6379]
    redis_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    proxy_labels = find("Deployment", "trackingproxy")["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= redis_labels.items()
    assert not service["selector"].items() <= proxy_labels.items()
    proxy_service = find("Service", "trackingproxy")["spec"]
    assert not proxy_service["selector"].items() <= redis_labels.items()
    url = urlsplit(yaml.safe_load(SECRET_EXAMPLE.read_text())["stringData"]["url"])
    assert (url.hostname, url.port) == (statefulset["spec"]["serviceName"], 6379)


def test_only_the_replicas_may_reach_redis() -> None:
    """The NetworkPolicy admits only trackingproxy pods to Redis's port."""
    policy = find("NetworkPolicy", "trackingproxy-redis")["spec"]
    redis_labels = find("StatefulSet", "trackingproxy-redis")["spec"]["template"]["metadata"][
        "labels"]
    assert policy["podSelector"]["matchLabels"].items() <= redis_labels.items()
    (rule,) = policy["ingress"]
    proxy_labels = find("Deployment", "trackingproxy")["spec"]["template"]["metadata"]["labels"]
    (source,) = rule["from"]
    assert source["podSelector"]["matchLabels"].items() <= proxy_labels.items()
    assert rule["ports"] == [{"port": 6379}]


# -- compose -------------------------------------------------------------------------------
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def interpolate(value: str) -> str:
    """Compose's ``${NAME...}`` replaced by ``<NAME>``."""
    return re.sub(r"\$\{(\w+)[^}]*\}", r"<\1>", value)


def test_compose_replicas_share_one_store() -> None:
    """Three replicas built from deploy/Dockerfile with one store URL (the redis service),
    distinct node ids, PROXY-protocol listeners, their own state volume, and only variables
    that options read."""
    services = compose()["services"]
    assert sorted(n for n in services if n.startswith("trackingproxy")) == REPLICAS
    stores, node_ids, volumes = set(), set(), set()
    for name in REPLICAS:
        service = services[name]
        env = service["environment"]
        assert_known(set(env), f"{COMPOSE.name} {name}")
        stores.add(env["TRACKINGPROXY_STORE"])
        node_ids.add(env["TRACKINGPROXY_NODE_ID"])
        assert env["TRACKINGPROXY_HTTP_PORT"] == "haproxy:tcp:80"
        assert env["TRACKINGPROXY_HTTPS_PORT"] == "haproxy:tcp:443"
        assert env["TRACKINGPROXY_ADMIN_PORT"] == "tcp:9180"
        context = (DEPLOY / service["build"]["context"]).resolve()
        assert (context / service["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
        (volume,) = service["volumes"]
        assert volume.endswith(f":{STATE_DIR}")
        volumes.add(volume)
        assert all(p.startswith("127.0.0.1:") for p in service.get("ports", []))
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert len(stores) == 1 and len(node_ids) == 3 and len(volumes) == 3
    url = urlsplit(interpolate(stores.pop()))
    assert url.scheme == "redis" and (url.hostname, url.port) == ("redis", 6379)
    assert url.password == "<REDIS_PASSWORD>"


def test_compose_redis_keeps_everything() -> None:
    """The store runs with appendonly yes and maxmemory-policy noeviction on a named volume,
    with the password the replicas' URL carries, and publishes no port."""
    data = compose()
    redis = data["services"]["redis"]
    args = server_args(redis["command"])
    assert args["appendonly"] == "yes"
    assert args["maxmemory-policy"] == "noeviction"
    assert interpolate(args["requirepass"]) == "<REDIS_PASSWORD>"
    (volume,) = redis["volumes"]
    assert volume.split(":")[0] in data["volumes"] and volume.endswith(":/data")
    assert "ports" not in redis


def test_compose_haproxy_fronts_the_replicas() -> None:
    """HAProxy alone publishes 80 and 443, with deploy/haproxy/haproxy.cfg mounted."""
    services = compose()["services"]
    haproxy = services["haproxy"]
    assert set(haproxy["ports"]) == {"80:80", "443:443"}
    (mount,) = haproxy["volumes"]
    source, target, _ = mount.split(":")
    assert (DEPLOY / source).resolve() == HAPROXY_CFG
    assert target == "/usr/local/etc/haproxy/haproxy.cfg"
    assert sorted(haproxy["depends_on"]) == REPLICAS
    match = re.fullmatch(r"haproxy:(\d+)\.(\d+)", haproxy["image"])
    assert match and (int(match[1]), int(match[2])) >= (2, 6)


# -- HAProxy -------------------------------------------------------------------------------
def haproxy_sections() -> dict[str, list[str]]:
    """Section header ("backend https_ready") -> its lines, comments and blanks dropped."""
    sections: dict[str, list[str]] = {}
    current = ""
    for raw in HAPROXY_CFG.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = line.strip()
            sections[current] = []
        else:
            sections[current].append(line.strip())
    return sections


def test_haproxy_sends_proxy_v2_to_every_replica() -> None:
    """TCP mode; 80 and 443 go round robin to the three compose replicas' same port, each
    server with send-proxy-v2 and a health check on the admin port (/readyz for the backends
    used while a replica is ready, /healthz for the fallback)."""
    sections = haproxy_sections()
    assert "mode tcp" in sections["defaults"]
    assert "init-addr last,libc,none" in " ".join(sections["defaults"])
    for port, name in ((80, "http"), (443, "https")):
        assert f"bind :{port}" in sections[f"frontend {name}"]
        for kind, path in (("ready", "/readyz"), ("live", "/healthz")):
            lines = sections[f"backend {name}_{kind}"]
            assert "balance roundrobin" in lines
            assert f"option httpchk GET {path}" in lines
            servers = [ln.split() for ln in lines if ln.startswith("server ")]
            assert [s[2] for s in servers] == [f"{r}:{port}" for r in REPLICAS]
            for server in servers:
                assert "send-proxy-v2" in server
                assert server[server.index("port") + 1] == "9180"


def haproxy_check(path: Path) -> subprocess.CompletedProcess[str]:
    haproxy = tool("haproxy", "apt-get install haproxy")
    return subprocess.run([haproxy, "-c", "-f", str(path)], capture_output=True, text=True,
                          timeout=60, check=False)


def test_haproxy_config_is_valid() -> None:
    """`haproxy -c` accepts the configuration offline; its only warnings are the replica names
    that do not resolve here (they start down and are resolved at run time)."""
    done = haproxy_check(HAPROXY_CFG)
    assert done.returncode == 0, done.stdout + done.stderr
    warnings = [ln for ln in (done.stdout + done.stderr).splitlines() if "[WARNING]" in ln]
    assert all("could not resolve address" in w for w in warnings), warnings


def test_haproxy_check_would_notice_a_mistake(tmp_path: Path) -> None:
    """The check is not vacuous: a misspelt server keyword is rejected."""
    broken = tmp_path / "haproxy.cfg"
    broken.write_text(HAPROXY_CFG.read_text().replace("send-proxy-v2", "send-proxy-v9"))
    done = haproxy_check(broken)
    assert done.returncode != 0
    assert "send-proxy-v9" in done.stdout + done.stderr


# -- the store's arguments, on a real server -----------------------------------------------
@pytest.mark.parametrize("where", ["compose", "kubernetes"])
def test_redis_arguments_take_effect(where: str) -> None:
    """A real redis-server started with the deployment's arguments (its own password, address
    and directory instead) reports appendonly yes and maxmemory-policy noeviction."""
    binary = find_redis_server()
    if binary is None:
        missing("redis-server is not installed (apt-get install redis-server)")
    assert binary is not None
    argv = compose()["services"]["redis"]["command"] if where == "compose" else statefulset_argv()
    args = {k: v for k, v in server_args(argv).items() if k not in {"requirepass", "dir", "port"}}
    extra = tuple(item for name, value in args.items() for item in (f"--{name}", value))
    server = RedisServer(binary, password="test-password", extra=(*extra, "--save", ""))
    try:
        server.start()
        client = server.client()
        try:
            config = client.config_get("appendonly") | client.config_get("maxmemory-policy")
        finally:
            client.close()
    finally:
        server.close()
    assert config == {"appendonly": "yes", "maxmemory-policy": "noeviction"}


def test_missing_tools_fail_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under CI=true a missing tool fails the test instead of skipping it."""
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install haproxy"):
        missing("haproxy is not installed (apt-get install haproxy)")
