"""``kmsg webhooks`` through click's runner, on SQLite and PostgreSQL, against a loopback receiver."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.test_cli import env, one_error_line, run  # noqa: F401 - env is a fixture
from tests.webhook_receiver import Receiver, start_receiver

__all__ = ["env"]


@pytest.fixture
def receiver(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:  # noqa: F811
    monkeypatch.setenv("KMSG_WEBHOOK_ALLOW_HTTP_LOOPBACK", "1")
    r = start_receiver(Receiver())
    yield r
    assert r.server is not None
    r.server.shutdown()


def test_an_endpoint_from_add_to_remove(receiver: Receiver) -> None:
    added = run(
        "webhooks", "add", receiver.url, "--tenant", "shop-a", "--event", "message.sent", "--event", "message.failed"
    )
    assert added.exit_code == 0, added.output
    secret = added.stdout.strip()
    assert secret.startswith("whsec_") and "not shown again" in added.stderr
    receiver.secret = secret
    [listed] = json.loads(run("webhooks", "list", "--json").stdout)
    assert listed["events"] == ["message.failed", "message.sent"] and secret not in run("webhooks", "list").stdout
    # A test event arrives signed with that secret
    tested = run("webhooks", "test", listed["id"], "--json")
    assert tested.exit_code == 0, tested.output
    assert json.loads(tested.stdout)["delivered"] is True
    [event] = receiver.events()
    assert event["type"] == "webhook.test" and receiver.bad_signatures == 0
    # After a rotation the receiver still verifies (old secret, during the overlap)
    rotated = run("webhooks", "rotate", listed["id"])
    assert rotated.exit_code == 0 and rotated.stdout.strip() != secret
    assert run("webhooks", "test", listed["id"]).exit_code == 0 and receiver.bad_signatures == 0
    shown = json.loads(run("webhooks", "show", listed["id"], "--json").stdout)
    assert shown["events_count"] == {"pending": 0, "delivered": 0, "expired": 0}
    assert run("webhooks", "replay", "--since", "1h", "--endpoint", listed["id"]).exit_code == 0
    assert run("webhooks", "remove", listed["id"]).exit_code == 0
    assert json.loads(run("webhooks", "list", "--json").stdout) == []
    gone = run("webhooks", "remove", listed["id"])
    assert gone.exit_code == 3  # not found, as for `kmsg get`
    assert "whe_" in one_error_line(gone, "kmsg webhooks remove")


def test_a_receiver_that_is_down_fails_the_test_with_exit_1(receiver: Receiver) -> None:
    added = json.loads(
        run("webhooks", "add", receiver.url, "--tenant", "shop-a", "--event", "message.sent", "--json").stdout
    )
    receiver.down = True
    tested = run("webhooks", "test", added["id"], "--json")
    assert tested.exit_code == 1
    assert json.loads(tested.stdout)["http_status"] == 503


def test_a_private_destination_is_refused_in_one_line(receiver: Receiver) -> None:
    refused = run("webhooks", "add", "https://10.0.0.1/hook", "--tenant", "shop-a", "--event", "message.sent")
    assert refused.exit_code == 2
    assert "url" in one_error_line(refused, "kmsg webhooks add")
