"""deploy/ checked without a cluster or a Docker engine.

Every kustomization (the base and each overlay) is rendered with kustomize,
validated strictly against the Kubernetes schemas of the oldest version with
native sidecars (1.29) and of the newest the validator ships, and then read for
what no schema can see: that the sidecar, the addon and the shared volume agree
on the socket, that the probes hit the port the sidecar serves health on, that
every container is hardened, and that the NetworkPolicy admits only consumers
to the API. deploy/Dockerfile is linted with hadolint and checked against the
manifests.

The tools come from .tools/bin; a missing one fails the test with the fix:
run scripts/install-deploy-tools.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from connmeta.server import Config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
TOOLS = ROOT / ".tools"
INSTALL = "scripts/install-deploy-tools"

# 1.29: native sidecars (an init container's restartPolicy) on by default.
# 1.37: the newest schema kubernetes-validate ships, so it runs offline.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")

OVERLAYS = sorted(p.parent for p in (DEPLOY / "overlays").glob("*/kustomization.yaml"))
KUSTOMIZATIONS = [DEPLOY / "base", *OVERLAYS]

SIDECAR = "connmeta"
PROXY = "mitmproxy"
HEALTH_SERVICES = {"", "connmeta.v1.ConnectionService"}
CONSUMER_LABELS = {"connmeta.io/consumer": "true"}

Obj = dict[str, Any]

_YAML_TO_JSON = (
    "import json, sys, yaml; "
    "json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)"
)


def _tool(*parts: str) -> Path:
    path = TOOLS.joinpath(*parts)
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run {INSTALL}", pytrace=False)
    return path


def _run(argv: list[str | Path], stdin: str | None = None) -> str:
    proc = subprocess.run(
        [str(a) for a in argv], input=stdin, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        cmd = " ".join(str(a) for a in argv)
        pytest.fail(f"{cmd} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}", pytrace=False)
    return proc.stdout


class Rendered:
    """One kustomization's output: its YAML text and the objects in it."""

    def __init__(self, directory: Path) -> None:
        self.name = directory.relative_to(DEPLOY).as_posix()
        self.yaml = _run([_tool("bin", "kustomize"), "build", directory])
        self.objects: list[Obj] = json.loads(
            _run([_tool("deploy-venv", "bin", "python"), "-c", _YAML_TO_JSON], self.yaml)
        )

    def of_kind(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> Obj:
        found = [o for o in self.of_kind(kind) if name in (None, o["metadata"]["name"])]
        assert len(found) == 1, f"{self.name}: expected one {kind} {name or ''}, got {found}"
        return found[0]

    @property
    def pod(self) -> Obj:
        spec: Obj = self.one("Deployment")["spec"]["template"]
        return spec

    def container(self, name: str) -> Obj:
        spec = self.pod["spec"]
        everything = spec.get("initContainers", []) + spec["containers"]
        found = [c for c in everything if c["name"] == name]
        assert len(found) == 1, f"{self.name}: expected one container {name!r}"
        container: Obj = found[0]
        return container


@pytest.fixture(
    scope="module", params=KUSTOMIZATIONS, ids=lambda p: p.relative_to(DEPLOY).as_posix()
)
def rendered(request: pytest.FixtureRequest) -> Rendered:
    directory: Path = request.param
    return Rendered(directory)


# -- helpers that read a container the way the program inside it will ----------


def _flag(container: Obj, flag: str) -> str | None:
    """A ``connmeta serve`` setting: ``--flag VALUE``/``--flag=VALUE``, else its env var."""
    args = [str(a) for a in container.get("command", []) + container.get("args", [])]
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    env_name = "CONNMETA_" + flag.removeprefix("--").replace("-", "_").upper()
    for var in container.get("env", []):
        if var["name"] == env_name:
            value: str = var["value"]
            return value
    return None


def _mitm_options(container: Obj) -> dict[str, str]:
    """The ``--set NAME=VALUE`` options given to mitmdump."""
    args = [str(a) for a in container.get("args", [])]
    return dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--set")


def _port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def _host_of(listen: str) -> str:
    return listen.rsplit(":", 1)[0].strip("[]")


def _container_ports(container: Obj) -> dict[str, int]:
    return {p.get("name", str(p["containerPort"])): p["containerPort"] for p in container["ports"]}


def _mounts(container: Obj) -> dict[str, str]:
    """mountPath -> volume name."""
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


def _effective(pod_spec: Obj, container: Obj, key: str) -> Any:
    """A securityContext field as the kubelet applies it: the container's, else the pod's."""
    own = container.get("securityContext", {})
    return own[key] if key in own else pod_spec.get("securityContext", {}).get(key)


def _all_containers(pod_spec: Obj) -> list[Obj]:
    containers: list[Obj] = pod_spec.get("initContainers", []) + pod_spec["containers"]
    return containers


# -- the rendered manifests -----------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rendered_manifests_validate_strictly_against_kubernetes_schema(
    rendered: Rendered, version: str, tmp_path: Path
) -> None:
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(rendered.yaml)
    _run([_tool("bin", "kubernetes-validate"), "--strict", "--quiet", "-k", version, manifest])


def test_sidecar_is_a_native_sidecar_that_gates_the_proxy_on_its_startup_probe(
    rendered: Rendered,
) -> None:
    spec = rendered.pod["spec"]
    init = {c["name"]: c for c in spec.get("initContainers", [])}
    assert SIDECAR in init, "connmeta must be an init container (a native sidecar)"
    assert init[SIDECAR].get("restartPolicy") == "Always"
    assert "startupProbe" in init[SIDECAR], "without it the proxy may start before the socket"
    assert PROXY in {c["name"] for c in spec["containers"]}
    assert init[SIDECAR].get("args", [None])[0] == "serve"


def test_socket_path_agrees_between_sidecar_addon_and_shared_volume(rendered: Rendered) -> None:
    spec = rendered.pod["spec"]
    sidecar, proxy = rendered.container(SIDECAR), rendered.container(PROXY)
    socket_path = _flag(sidecar, "--unix-socket")
    assert socket_path, "the sidecar must serve a Unix socket for the addon"
    assert posixpath.isabs(socket_path)
    assert len(socket_path.encode()) < 108, "sun_path holds at most 107 bytes"

    target = _mitm_options(proxy).get("connmeta_target")
    assert target == f"unix://{socket_path}", f"addon target {target!r} != sidecar socket"

    # The sidecar creates the socket's directory 0700 inside the shared volume:
    # an emptyDir is world-writable, which it refuses as the socket's directory.
    directory = posixpath.dirname(posixpath.dirname(socket_path))
    volume = _mounts(sidecar).get(directory)
    assert volume, f"the sidecar does not mount a volume at {directory}"
    assert _mounts(proxy).get(directory) == volume, f"the proxy does not share {volume}"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[volume], f"{volume} must be an emptyDir shared by the pod"


def test_sidecar_keeps_its_state_on_a_disk_backed_emptydir_of_its_own(
    rendered: Rendered,
) -> None:
    spec = rendered.pod["spec"]
    sidecar, proxy = rendered.container(SIDECAR), rendered.container(PROXY)
    state_dir = _flag(sidecar, "--state-dir")
    assert state_dir, "without --state-dir a container restart loses the store"
    assert posixpath.isabs(state_dir)
    # The root filesystem is read-only: the directory must be a volume, one
    # that lives as long as the pod (an emptyDir outlives container restarts).
    volume = _mounts(sidecar).get(state_dir)
    assert volume, f"the sidecar does not mount a volume at {state_dir}"
    empty_dir = {v["name"]: v for v in spec["volumes"]}[volume].get("emptyDir")
    assert empty_dir is not None, f"{volume} must be an emptyDir"
    assert empty_dir.get("medium", "") != "Memory", "a tmpfs would count against the memory limit"
    assert volume not in _mounts(proxy).values(), "only the sidecar writes its state"


def test_proxy_runs_as_the_sidecar_user_so_it_can_open_the_0600_socket(
    rendered: Rendered,
) -> None:
    spec = rendered.pod["spec"]
    sidecar, proxy = rendered.container(SIDECAR), rendered.container(PROXY)
    assert _effective(spec, proxy, "runAsUser") == _effective(spec, sidecar, "runAsUser")


def test_sidecar_probes_check_health_over_the_unix_socket(rendered: Rendered) -> None:
    # The kubelet's grpc probes cannot present a client certificate, and every
    # TCP listener requires one: the probes run `connmeta health` on the socket.
    sidecar = rendered.container(SIDECAR)
    assert not _flag(sidecar, "--health-listen"), "a health port would need mTLS too"
    socket_path = _flag(sidecar, "--unix-socket")
    for kind in ("startupProbe", "livenessProbe"):
        probe = sidecar.get(kind)
        assert probe, f"the sidecar has no {kind}"
        command = probe["exec"]["command"]
        assert command[:2] == ["connmeta", "health"], command
        assert _flag({"args": command}, "--target") == f"unix://{socket_path}"
        assert (_flag({"args": command}, "--service") or "") in HEALTH_SERVICES
        timeout = float(_flag({"args": command}, "--timeout") or "nan")
        assert timeout < probe.get("timeoutSeconds", 1), f"{kind}: the call must end first"


def _volume_file(rendered: Rendered, container: Obj, path: str) -> tuple[Obj, str]:
    """The volume that holds ``path`` in ``container``, and the file's key in it."""
    for mount_path, name in _mounts(container).items():
        if path.startswith(mount_path.rstrip("/") + "/"):
            volume: Obj = {v["name"]: v for v in rendered.pod["spec"]["volumes"]}[name]
            return volume, path[len(mount_path.rstrip("/")) + 1 :]
    raise AssertionError(f"{path} is on no volume of {container['name']}")


def test_tcp_api_requires_mtls_with_certificates_from_a_secret(rendered: Rendered) -> None:
    sidecar = rendered.container(SIDECAR)
    assert not _flag(sidecar, "--insecure-listen"), "the API must not be plaintext"
    secrets = set()
    for flag, key in (
        ("--tls-cert", "tls.crt"),
        ("--tls-key", "tls.key"),
        ("--client-ca", "ca.crt"),
    ):
        path = _flag(sidecar, flag)
        assert path, f"{flag} is not set: the API on 0.0.0.0 would be refused (plaintext)"
        volume, file = _volume_file(rendered, sidecar, path)
        assert file == key, f"{flag}: {file} is not the Secret key {key} cert-manager writes"
        assert "secret" in volume, f"{flag} must come from a Secret"
        assert volume["secret"].get("defaultMode", 0o644) & 0o007 == 0, "keys not world-readable"
        secrets.add(volume["secret"]["secretName"])
    assert len(secrets) == 1
    proxy_volumes = set(_mounts(rendered.container(PROXY)).values())
    assert not proxy_volumes & {
        v["name"] for v in rendered.pod["spec"]["volumes"] if "secret" in v
    }, "the proxy does not need the sidecar's key"


def test_cert_manager_example_issues_the_secret_the_sidecar_mounts(rendered: Rendered) -> None:
    (certificate,) = json.loads(
        _run(
            [_tool("deploy-venv", "bin", "python"), "-c", _YAML_TO_JSON],
            (DEPLOY / "cert-manager" / "certificate.yaml").read_text(),
        )
    )
    assert certificate["kind"] == "Certificate"
    spec = certificate["spec"]
    mounted = {v["secret"]["secretName"] for v in rendered.pod["spec"]["volumes"] if "secret" in v}
    assert spec["secretName"] in mounted
    assert "server auth" in spec["usages"]
    service = rendered.one("Service", "connmeta")["metadata"]["name"]
    assert service in spec["dnsNames"]


def test_authz_policy_from_a_configmap_keeps_report_and_route_off_tcp(
    rendered: Rendered,
) -> None:
    from connmeta.policy import Peer, Policy

    sidecar = rendered.container(SIDECAR)
    path = _flag(sidecar, "--authz-policy")
    assert path, "without a policy every certificate from the CA may call everything"
    volume, key = _volume_file(rendered, sidecar, path)
    assert "configMap" in volume, "the policy must come from a ConfigMap"
    config_map = rendered.one("ConfigMap", volume["configMap"]["name"])
    policy = Policy.parse(config_map["data"][key], key)
    writer = Peer(tls=True, names=("spiffe://connmeta.local/writer",))
    for method in ("/connmeta.v1.ReportService/Report", "/connmeta.v1.RouterService/Route"):
        assert not policy.decide(writer, method, {}).allowed, f"{method} over TCP"
    assert policy.decide(writer, "/connmeta.v1.ConnectionService/WatchConnections", {}).allowed
    assert policy.decide(writer, "/grpc.health.v1.Health/Check", {}).allowed


def test_proxy_loads_the_addon_and_listens_on_its_declared_port(rendered: Rendered) -> None:
    proxy = rendered.container(PROXY)
    command = proxy["command"]
    assert command[:2] == ["/bin/sh", "-c"]
    assert command[2] == 'exec mitmdump -s "$(python -m connmeta addon-path)" "$@"'
    args = proxy["args"]
    port = int(args[args.index("--listen-port") + 1])
    assert _container_ports(proxy).get("proxy") == port


def test_proxy_writes_only_to_its_volumes(rendered: Rendered) -> None:
    proxy = rendered.container(PROXY)
    mounts = _mounts(proxy)
    assert _mitm_options(proxy).get("confdir") in mounts, "mitmproxy writes its CA to confdir"
    assert "/tmp" in mounts


def test_every_container_is_hardened_and_runs_as_non_root(rendered: Rendered) -> None:
    spec = rendered.pod["spec"]
    assert spec.get("automountServiceAccountToken") is False
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(key), key
    pod = spec.get("securityContext", {})
    assert pod.get("runAsNonRoot") is True
    assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}
    for key in ("runAsUser", "runAsGroup", "fsGroup"):
        assert isinstance(pod.get(key), int), f"pod {key} must be numeric"
        assert pod[key] != 0, f"pod {key} is root"
    for c in _all_containers(spec):
        where = f"{rendered.name}: container {c['name']}"
        assert _effective(spec, c, "runAsNonRoot") is True, where
        for key in ("runAsUser", "runAsGroup"):
            value = _effective(spec, c, key)
            assert isinstance(value, int), f"{where}: {key} must be numeric"
            assert value != 0, f"{where}: {key} is root"
        own = c.get("securityContext", {})
        assert own.get("readOnlyRootFilesystem") is True, where
        assert own.get("allowPrivilegeEscalation") is False, where
        assert own.get("privileged") is not True, where
        assert own.get("capabilities") == {"drop": ["ALL"]}, where
        assert _effective(spec, c, "seccompProfile") == {"type": "RuntimeDefault"}, where


def test_every_container_has_resource_requests_and_limits(rendered: Rendered) -> None:
    for c in _all_containers(rendered.pod["spec"]):
        for bound in ("requests", "limits"):
            assert set(c.get("resources", {}).get(bound, {})) >= {"cpu", "memory"}, (
                f"{rendered.name}: container {c['name']} lacks {bound}"
            )


_MEMORY_UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
# What the sidecar holds besides its bounded history and closed connections:
# the interpreter, grpcio and the protobuf runtime (53 MiB resident
# when idle) and the open connections a busy proxy keeps (about 600 B each,
# 100k of them ~60 MiB).
_PROCESS_AND_LIVE_RECORDS = 128 << 20


def _memory(quantity: str) -> int:
    for suffix, factor in _MEMORY_UNITS.items():
        if quantity.endswith(suffix):
            return int(float(quantity.removesuffix(suffix)) * factor)
    return int(quantity)


def test_sidecar_memory_limit_holds_the_byte_bounds_with_headroom(rendered: Rendered) -> None:
    # The history and the closed connections are bounded by bytes so that a
    # TLS-heavy load cannot push the sidecar past its limit (an OOM kill loses
    # the whole store); bench/store_bench.py measures the bounds holding.
    sidecar = rendered.container(SIDECAR)
    defaults = Config()
    history = int(_flag(sidecar, "--history-bytes") or defaults.history_bytes)
    closed = int(_flag(sidecar, "--closed-retention-bytes") or defaults.closed_retention_bytes)
    limit = _memory(sidecar["resources"]["limits"]["memory"])
    assert history + closed + _PROCESS_AND_LIVE_RECORDS <= limit, (
        f"{rendered.name}: {limit >> 20} MiB does not hold the {history >> 20} MiB history, "
        f"{closed >> 20} MiB of closed connections and {_PROCESS_AND_LIVE_RECORDS >> 20} MiB more"
    )


def test_sidecar_does_not_gate_the_pods_readiness(rendered: Rendered) -> None:
    # A native sidecar's readiness is the pod's: a readinessProbe on it would
    # take the proxy out of its Service whenever the sidecar is slow or
    # restarting, though the addon proxies on without it (deploy/README.md).
    sidecar = rendered.container(SIDECAR)
    assert "readinessProbe" not in sidecar, "the sidecar must not decide the proxy's readiness"
    assert "readinessProbe" in rendered.container(PROXY), "the proxy's own readiness gates it"


def _prestop_seconds(container: Obj) -> float:
    """The delay a preStop hook gives before the container gets SIGTERM."""
    hook = container.get("lifecycle", {}).get("preStop")
    assert hook, f"container {container['name']} has no preStop hook"
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook["exec"]["command"]
    assert len(command) == 2, f"expected [sleep, SECONDS], got {command}"
    assert posixpath.basename(command[0]) == "sleep", command
    return float(command[1])


def test_proxy_waits_in_pre_stop_for_endpoint_removal_to_propagate(rendered: Rendered) -> None:
    assert _prestop_seconds(rendered.container(PROXY)) >= 5, "kube-proxy needs seconds"


def test_termination_grace_outlasts_pre_stop_and_the_sidecar_shutdown_grace(
    rendered: Rendered,
) -> None:
    # The proxy's preStop, then its exit, then the sidecar's graceful stop
    # (native sidecars stop after the main containers): one budget for all.
    spec = rendered.pod["spec"]
    grace = float(_flag(rendered.container(SIDECAR), "--shutdown-grace") or "nan")
    pre_stop = _prestop_seconds(rendered.container(PROXY))
    assert spec["terminationGracePeriodSeconds"] > pre_stop + grace


def test_images_are_pinned_to_a_tag_or_digest(rendered: Rendered) -> None:
    for c in _all_containers(rendered.pod["spec"]):
        image: str = c["image"]
        name, _, tag = image.rpartition(":")
        assert "@sha256:" in image or (name and "/" not in tag and tag != "latest"), image


def test_services_select_the_pod_and_target_declared_ports(rendered: Rendered) -> None:
    labels = rendered.pod["metadata"]["labels"]
    ports: dict[str, int] = {}
    for c in _all_containers(rendered.pod["spec"]):
        ports |= _container_ports(c)
    for svc in rendered.of_kind("Service"):
        selector = svc["spec"]["selector"]
        assert selector.items() <= labels.items(), f"{svc['metadata']['name']} selects no pod"
        for p in svc["spec"]["ports"]:
            target = p["targetPort"]
            assert target in ports or target in ports.values(), f"no container port {target}"

    api = rendered.one("Service", "connmeta")["spec"]["ports"]
    assert [(p["port"], ports[p["targetPort"]], p.get("appProtocol")) for p in api] == [
        (50051, _port_of(_flag(rendered.container(SIDECAR), "--listen") or ":0"), "grpc")
    ]
    proxy = rendered.one("Service", "connmeta-proxy")["spec"]["ports"]
    assert [ports[p["targetPort"]] for p in proxy] == [
        _container_ports(rendered.container(PROXY))["proxy"]
    ]


def test_network_policy_admits_only_consumers_to_the_api(rendered: Rendered) -> None:
    policy = rendered.one("NetworkPolicy")["spec"]
    labels = rendered.pod["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert "Ingress" in policy["policyTypes"]

    sidecar, proxy = rendered.container(SIDECAR), rendered.container(PROXY)
    api = _port_of(_flag(sidecar, "--listen") or ":0")
    proxy_port = _container_ports(proxy)["proxy"]
    names = _container_ports(sidecar) | _container_ports(proxy)

    admitted: set[int] = set()
    for rule in policy["ingress"]:
        assert rule.get("ports"), "a rule without ports admits every port, health included"
        rule_ports = {names.get(p["port"], p["port"]) for p in rule["ports"]}
        assert all("endPort" not in p for p in rule["ports"])
        admitted |= rule_ports
        if api in rule_ports:
            assert rule_ports == {api}, "the API rule must not open other ports"
            assert rule.get("from") == [{"podSelector": {"matchLabels": CONSUMER_LABELS}}]
    assert api in admitted
    assert admitted == {api, proxy_port}, f"unexpected ports admitted: {admitted}"


# -- the Dockerfile ---------------------------------------------------------------


def _dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its instructions, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if m := re.fullmatch(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE):
            current = stages.setdefault(m.group(1), [])
        current.append(line)
    return stages


def _instruction(stage: list[str], keyword: str) -> str:
    found = [line.split(None, 1)[1] for line in stage if line.split(None, 1)[0] == keyword]
    assert len(found) == 1, f"expected one {keyword} in {stage[0]}"
    return found[0]


def test_dockerfile_passes_hadolint() -> None:
    _run(
        [
            _tool("bin", "hadolint"),
            "--config",
            DEPLOY / ".hadolint.yaml",
            DEPLOY / "Dockerfile",
        ]
    )


def test_dockerfile_targets_run_as_the_manifests_user() -> None:
    stages = _dockerfile_stages()
    rendered = Rendered(DEPLOY / "base")
    spec = rendered.pod["spec"]
    for target, container in (("sidecar", SIDECAR), ("proxy", PROXY)):
        c = rendered.container(container)
        user = f"{_effective(spec, c, 'runAsUser')}:{_effective(spec, c, 'runAsGroup')}"
        assert _instruction(stages[target], "USER") == user, target


def test_manifest_proxy_command_is_the_image_entrypoint() -> None:
    entrypoint = json.loads(_instruction(_dockerfile_stages()["proxy"], "ENTRYPOINT"))
    assert Rendered(DEPLOY / "base").container(PROXY)["command"] == entrypoint


def test_dockerfile_installs_the_version_pyproject_builds() -> None:
    with (ROOT / "pyproject.toml").open("rb") as f:
        version = tomllib.load(f)["project"]["version"]
    pins = re.findall(r"connmeta(?:\[[\w,]+\])?==([\w.+-]+)", (DEPLOY / "Dockerfile").read_text())
    assert pins, "the Dockerfile pins no connmeta version"
    assert set(pins) == {version}, f"Dockerfile pins {pins}, pyproject.toml builds {version}"
