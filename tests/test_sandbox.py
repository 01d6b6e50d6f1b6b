"""Test (sandbox) messages reach only the simulator, whatever the routing says."""

from __future__ import annotations

from typing import Any

import pytest

from kmsg_worker.errors import ValidationError
from kmsg_worker.message import Failover, normalize
from kmsg_worker.routing import Router
from kmsg_worker.sandbox import MAGIC_NUMBERS, SIMULATOR, is_sandbox, is_sandbox_content, sandboxed
from kmsg_worker.settings import Settings
from kmsg_worker.tracking import fallback_message


def _router() -> Router:
    # mock is not enabled, and SMS is routed to solapi: a sandbox message must still go to mock.
    return Router(["solapi", "aligo"], {"SMS": ["solapi"]}, "aligo")


def test_a_sandbox_message_goes_only_to_the_simulator_whatever_the_rules() -> None:
    router = _router()
    raw: dict[str, Any] = {"to": "010-1234-5678", "text": "hi", "sender": "0212345678", "provider_id": "solapi"}
    live = normalize(raw)
    assert router.route(live) == ["solapi"]
    test = normalize(sandboxed(raw))
    assert is_sandbox(test) and is_sandbox_content(test.content())
    assert test.provider_id == SIMULATOR
    assert router.route(test) == [SIMULATOR]
    assert not is_sandbox(live)


def test_magic_numbers_script_the_simulator_and_caller_options_survive() -> None:
    raw = {"to": "010-0000-0002", "text": "hi", "providerOptions": {"solapi": {"x": 1}}}
    message = normalize(sandboxed(raw), default_sender="0212345678")
    assert message.provider_options["mock"] == {**MAGIC_NUMBERS["01000000002"], "sandbox": True}
    assert message.provider_options["solapi"] == {"x": 1}
    # the recipient may come from a batch's defaults
    from_defaults = sandboxed({"text": "x"}, {"to": "01000000003"})
    assert from_defaults["provider_options"]["mock"]["script"] == MAGIC_NUMBERS["01000000003"]["script"]
    with pytest.raises(ValidationError):
        sandboxed({"to": "01000000001", "provider_options": "nope"})


def test_a_sandbox_alimtalks_fallback_child_stays_on_the_simulator() -> None:
    raw = {
        "type": "ALIMTALK",
        "to": "01012345678",
        "template_id": "T1",
        "text": "hello",
        "kakao": {"profile_id": "p"},
        "failover": {"content": "fallback text"},
    }
    parent = normalize(sandboxed(raw))
    assert parent.failover == Failover(content="fallback text")
    child = fallback_message(parent)
    assert child is not None and is_sandbox(child)
    assert _router().route(child) == [SIMULATOR]
    live_child = fallback_message(normalize(raw))
    assert live_child is not None and not is_sandbox(live_child)


def test_the_simulator_is_configured_with_a_shared_call_log_even_when_not_enabled(tmp_path: Any) -> None:
    settings = Settings.from_env({"KMSG_VAR_DIR": str(tmp_path), "KMSG_PROVIDERS": "solapi"})
    assert "mock" not in settings.providers
    assert settings.provider_config("mock").option("call_log") == str(tmp_path / "mock-calls.jsonl")
