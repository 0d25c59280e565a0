"""gRFC A43 policies without a server: parsing, validation and matching."""

from __future__ import annotations

import json
from typing import Any

import pytest

from connmeta import devcerts
from connmeta.policy import Pattern, Peer, Policy, PolicyError

WRITER = Peer(tls=True, names=(devcerts.role_principal("writer"), "CN=connmeta writer"))
PLAIN = Peer(tls=False)


def parse(data: Any) -> Policy:
    return Policy.parse(json.dumps(data), "test.json")


@pytest.mark.parametrize(
    ("pattern", "yes", "no"),
    [
        ("abc", ["abc"], ["abcd", "xabc", ""]),
        ("abc*", ["abc", "abcd"], ["xabc"]),
        ("*abc", ["abc", "xabc"], ["abcd"]),
        ("*", ["a"], [""]),
    ],
)
def test_patterns_are_exact_prefix_suffix_or_presence(
    pattern: str, yes: list[str], no: list[str]
) -> None:
    assert all(Pattern(pattern).matches(v) for v in yes)
    assert not any(Pattern(pattern).matches(v) for v in no)


def test_a_deny_rule_wins_over_an_allow_rule() -> None:
    policy = parse(
        {
            "name": "p",
            "allow_rules": [{"name": "all"}],
            "deny_rules": [{"name": "no-secret", "request": {"paths": ["*/Secret"]}}],
        }
    )
    assert policy.decide(PLAIN, "/a.B/Get", {}).allowed
    decision = policy.decide(WRITER, "/a.B/Secret", {})
    assert (decision.allowed, decision.rule) == (False, "no-secret")


def test_principals_match_uri_dns_or_subject_and_never_without_tls() -> None:
    policy = parse(
        {
            "name": "p",
            "allow_rules": [
                {"name": "dns", "source": {"principals": ["*.svc.local"]}},
                {"name": "subject", "source": {"principals": ["CN=legacy*"]}},
            ],
        }
    )
    assert policy.decide(Peer(True, ("a.svc.local", "CN=x")), "/m", {}).rule == "dns"
    assert policy.decide(Peer(True, ("other", "CN=legacy-1")), "/m", {}).rule == "subject"
    assert not policy.decide(Peer(True, ("other", "CN=x")), "/m", {}).allowed
    refused = policy.decide(PLAIN, "/m", {})
    assert not refused.allowed
    assert refused.needs_identity


def test_headers_must_all_match_and_multiple_values_are_joined() -> None:
    policy = parse(
        {
            "name": "p",
            "allow_rules": [
                {"name": "h", "request": {"headers": [{"key": "X-Team", "values": ["a,b"]}]}}
            ],
        }
    )
    assert policy.decide(PLAIN, "/m", {"x-team": "a,b"}).allowed
    assert not policy.decide(PLAIN, "/m", {"x-team": "a"}).allowed


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"allow_rules": []}, "name: is required"),
        ({"name": "p"}, "allow_rules: is required"),
        ({"name": "p", "allow_rules": [{"name": "r", "sorce": {}}]}, "unknown field 'sorce'"),
        ({"name": "p", "allow_rules": [{"source": {}}]}, r"allow_rules\[0\].name: is required"),
        (
            {"name": "p", "allow_rules": [{"name": "r", "request": {"paths": "/a"}}]},
            "paths: must be a list",
        ),
        (
            {
                "name": "p",
                "allow_rules": [
                    {"name": "r", "request": {"headers": [{"key": ":path", "values": ["x"]}]}}
                ],
            },
            "cannot be matched",
        ),
    ],
)
def test_an_invalid_policy_names_the_file_and_the_field(data: Any, problem: str) -> None:
    with pytest.raises(PolicyError, match=f"test.json: .*{problem}"):
        parse(data)


def test_invalid_json_is_a_policy_error() -> None:
    with pytest.raises(PolicyError, match="not valid JSON"):
        Policy.parse("{", "test.json")


def test_the_example_policy_is_valid_and_gives_each_role_its_one_write() -> None:
    policy = parse(devcerts.example_policy())
    update = "/connmeta.v1.ConnectionService/UpdateServerConnection"
    for role in devcerts.ROLES:
        peer = Peer(True, (devcerts.role_principal(role),))
        assert policy.decide(peer, "/grpc.health.v1.Health/Watch", {}).allowed
        assert policy.decide(peer, update, {}).allowed == (role == "writer")
