"""The fakes stage faults like an operator would: rules by type, per-message counts at every fake.

Real HTTP between the adapters and the fakes; rules set through ``POST /_fake/rules`` as another
process would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from kmsg_worker.message import Message, normalize
from kmsg_worker.providers.base import Provider
from kmsg_worker.providers.base_http import make_http_client
from kmsg_worker.providers.registry import provider_class
from kmsg_worker.settings import Settings
from kmsg_worker.testing import FAULTS_HELP
from kmsg_worker.testing.fakeserver import FakeProviderServer
from kmsg_worker.testing.servers import SENDER, fake_env, start_fakes

NUMBER = "01077778888"


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeProviderServer]]:
    servers = start_fakes()
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture
def providers(fakes: dict[str, FakeProviderServer]) -> Iterator[dict[str, Provider]]:
    for server in fakes.values():
        httpx.post(server.url + "/_fake/reset").raise_for_status()
    settings = Settings.from_env({**fake_env(fakes), "KMSG_PROVIDERS": "solapi,iwinv,aligo"})
    client = make_http_client()
    yield {
        name: provider_class(name)(settings.provider_config(name), client)  # type: ignore[call-arg]
        for name in fakes
    }
    client.close()


def alimtalk(**extra: Any) -> Message:
    fields: dict[str, Any] = {
        "to": NUMBER,
        "type": "ALIMTALK",
        "template_id": "TPL-1",
        "text": "[kmsg] 주문이 접수되었습니다",
        "sender": SENDER,
    }
    fields.update(extra)
    return normalize(fields)


def sms(text: str = "[kmsg] 주문이 접수되었습니다") -> Message:
    return normalize({"to": NUMBER, "type": "SMS", "text": text, "sender": SENDER})


def test_a_rule_for_alimtalk_leaves_the_sms_to_the_same_number_alone(
    fakes: dict[str, FakeProviderServer], providers: dict[str, Provider]
) -> None:
    solapi = fakes["solapi"]
    rule = {"to": NUMBER, "type": "ALIMTALK", "final": "FAILED", "code": "3104"}
    httpx.post(solapi.url + "/_fake/rules", json={"rules": [rule]}).raise_for_status()
    provider = providers["solapi"]

    kakao, text = provider.send(alimtalk()), provider.send(sms())

    assert kakao.accepted and text.accepted
    entries = {e.type: e for e in solapi.ledger.entries.values()}
    assert entries["ATA"].rule.final == "FAILED" and entries["ATA"].rule.code == "3104"
    assert entries["SMS"].rule.final == "DELIVERED"
    # the older, untargeted form still applies to every type
    httpx.post(solapi.url + "/_fake/rules", json={"recipients": {NUMBER: {"final": "FAILED"}}}).raise_for_status()
    provider.send(sms())
    assert [e.rule.final for e in solapi.ledger.entries.values() if e.type == "SMS"] == ["DELIVERED", "FAILED"]


@pytest.mark.parametrize("name", ["solapi", "iwinv", "aligo"])
def test_every_fake_counts_acceptances_per_message(
    name: str, fakes: dict[str, FakeProviderServer], providers: dict[str, Provider]
) -> None:
    provider = providers[name]
    once, twice = sms("[kmsg] 첫 번째 안내"), sms("[kmsg] 두 번째 안내")
    provider.send(once)
    provider.send(twice)
    provider.send(twice)  # the same message sent again: a duplicate the fake must show

    stats = httpx.get(fakes[name].url + "/_fake/stats").json()

    assert stats["accepted"] == 3 and stats["messages"] == 2
    assert list(stats["duplicate_messages"].values()) == [2]
    assert stats["max_per_recipient"] == 3  # the per-recipient count cannot tell these apart
    assert NUMBER not in str(stats["per_message"])  # keys are digests or our ids, never the number
    assert stats["peak_in_flight"] >= 1  # every fake, Solapi's own extras included, reports its peak


def test_the_help_text_names_every_fault_knob_and_control_action() -> None:
    from dataclasses import fields

    from kmsg_worker.testing.fakeserver import DeliveryRule, Faults, RuleTarget

    names = [f.name for cls in (Faults, DeliveryRule, RuleTarget) for f in fields(cls)]
    missing = [n for n in names if n not in FAULTS_HELP]
    assert missing == []
    for action in ("/_fake/faults", "/_fake/rules", "/_fake/reset", "/_fake/stats"):
        assert action in FAULTS_HELP


def test_the_operator_docs_carry_the_same_text() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    body = FAULTS_HELP.split("\n", 2)[2].rstrip("\n")
    docs = [root / "README.md", root / "docs" / "OPERATIONS.md"]
    assert any(body in path.read_text(encoding="utf-8") for path in docs)
