"""deploy/overlays/otlp and deploy/otel-collector, checked without a cluster.

The overlay is one of the kustomizations test_manifests.py renders and
checks like every other; here, what only the pair can show: the sidecar's
OTLP endpoint is the gateway Service's port, which leads to the port the
collector's OTLP receiver listens on; the gateway admits the sidecar pods;
the pod's identity reaches the resource attributes; and the gateway's
manifests validate strictly and are hardened. Its config.yaml is checked by
the collector itself in tests/otelcol.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.deploy.test_manifests import (
    DEPLOY,
    KUBERNETES_VERSIONS,
    SIDECAR,
    Obj,
    Rendered,
    _flag,
    _run,
    _tool,
)

OVERLAY = DEPLOY / "overlays" / "otlp"
GATEWAY = DEPLOY / "otel-collector"


@pytest.fixture(scope="module")
def overlay() -> Rendered:
    return Rendered(OVERLAY)


@pytest.fixture(scope="module")
def gateway() -> Rendered:
    return Rendered(GATEWAY)


def _env(container: Obj) -> dict[str, Obj]:
    return {var["name"]: var for var in container.get("env", [])}


def _receiver_port(config: str) -> int:
    """The OTLP/gRPC receiver's port in the collector's config.yaml."""
    match = re.search(r"grpc:\s*\n\s*endpoint:\s*\S*:(\d+)", config)
    assert match, "the gateway's config has no OTLP/gRPC receiver endpoint"
    return int(match.group(1))


def test_sidecar_exports_to_the_port_the_gateway_receives_otlp_on(
    overlay: Rendered, gateway: Rendered
) -> None:
    endpoint = _flag(overlay.container(SIDECAR), "--otlp-endpoint")
    assert endpoint, "the overlay does not turn OTLP export on"
    url = urlsplit(endpoint)
    assert url.scheme == "http", "plaintext inside the cluster needs http:// for the SDK"
    service_name, namespace, *_ = (url.hostname or "").split(".")
    service = gateway.one("Service", service_name)
    assert service["metadata"]["namespace"] == namespace
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
    deployment = gateway.one("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    target = port["targetPort"]
    container_port = container_ports[target] if isinstance(target, str) else target
    config_map = gateway.one("ConfigMap")
    assert _receiver_port(config_map["data"]["config.yaml"]) == container_port
    selector = service["spec"]["selector"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()


def test_gateway_admits_otlp_from_the_sidecar_pods(overlay: Rendered, gateway: Rendered) -> None:
    policy = gateway.one("NetworkPolicy")
    pod_labels = overlay.pod["metadata"]["labels"]
    admitted = [
        rule
        for rule in policy["spec"]["ingress"]
        for peer in rule["from"]
        if peer.get("podSelector", {}).get("matchLabels", {}).items() <= pod_labels.items()
        and "namespaceSelector" in peer  # the gateway lives in its own namespace
    ]
    assert admitted, "no ingress rule admits the connmeta pods from their namespace"
    assert any(p["port"] == "otlp-grpc" for rule in admitted for p in rule["ports"])


def test_events_carry_the_pod_identity_in_their_resource(overlay: Rendered) -> None:
    env = _env(overlay.container(SIDECAR))
    attributes = env["OTEL_RESOURCE_ATTRIBUTES"]["value"]
    for key, variable, field in (
        ("k8s.pod.name", "K8S_POD_NAME", "metadata.name"),
        ("k8s.namespace.name", "K8S_NAMESPACE_NAME", "metadata.namespace"),
        ("k8s.node.name", "K8S_NODE_NAME", "spec.nodeName"),
    ):
        assert f"{key}=$({variable})" in attributes
        assert env[variable]["valueFrom"]["fieldRef"]["fieldPath"] == field
        # $(VAR) expands only from variables defined before it.
        assert list(env).index(variable) < list(env).index("OTEL_RESOURCE_ATTRIBUTES")
    assert env["OTEL_SERVICE_NAME"]["value"] == "connmeta"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_gateway_manifests_validate_strictly(
    gateway: Rendered, version: str, tmp_path: Path
) -> None:
    manifest = tmp_path / "gateway.yaml"
    manifest.write_text(gateway.yaml)
    _run([_tool("bin", "kubernetes-validate"), "--strict", "--quiet", "-k", version, manifest])


def test_gateway_is_hardened_with_bounded_resources(gateway: Rendered) -> None:
    spec = gateway.one("Deployment")["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    for c in spec["containers"]:
        own = c["securityContext"]
        assert own["readOnlyRootFilesystem"] is True
        assert own["allowPrivilegeEscalation"] is False
        assert own["capabilities"] == {"drop": ["ALL"]}
        assert set(c["resources"]["limits"]) >= {"cpu", "memory"}
