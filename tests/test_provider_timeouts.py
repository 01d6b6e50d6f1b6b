"""Per-provider HTTP timeouts (``KMSG_<NAME>_TIMEOUT``, ``_TIMEOUT_CONNECT``, ``_TIMEOUT_READ``)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from kmsg_worker.errors import ConfigurationError, ProviderTimeout
from kmsg_worker.message import normalize
from kmsg_worker.providers.base_http import DEFAULT_TIMEOUT, HttpProvider, make_http_client
from kmsg_worker.providers.registry import provider_class
from kmsg_worker.settings import Settings
from kmsg_worker.testing.fakeserver import FakeProviderServer
from kmsg_worker.testing.servers import SENDER, fake_env, start_fakes


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeProviderServer]]:
    servers = start_fakes()
    yield servers
    for server in servers.values():
        server.stop()


def build(fakes: dict[str, FakeProviderServer], name: str, **env: str) -> HttpProvider:
    settings = Settings.from_env({**fake_env(fakes), "KMSG_PROVIDERS": name, **env})
    provider = provider_class(name)(settings.provider_config(name), make_http_client())  # type: ignore[call-arg]
    assert isinstance(provider, HttpProvider)
    return provider


def test_a_provider_waits_no_longer_than_its_own_timeout(fakes: dict[str, FakeProviderServer]) -> None:
    solapi = fakes["solapi"]
    solapi.set_faults(slow_rate=1.0, slow_ms=3000)
    try:
        provider = build(fakes, "solapi", KMSG_SOLAPI_TIMEOUT="0.5")
        started = time.monotonic()
        with pytest.raises(ProviderTimeout):
            provider.send(normalize({"to": "01012345678", "text": "[kmsg] timeout", "sender": SENDER}))
        waited = time.monotonic() - started
    finally:
        solapi.set_faults()
    print(f"gave up after {waited:.2f} s")
    # the shared client's default would have waited the full 3 s (its read timeout is 10 s)
    assert 0.4 < waited < 2.0, waited


def test_each_phase_can_be_set_and_unset_phases_keep_the_defaults(fakes: dict[str, FakeProviderServer]) -> None:
    iwinv = build(fakes, "iwinv", KMSG_IWINV_TIMEOUT="20", KMSG_IWINV_TIMEOUT_CONNECT="1.5")
    assert iwinv.timeout is not None
    assert (iwinv.timeout.connect, iwinv.timeout.read, iwinv.timeout.write) == (1.5, 20.0, 20.0)
    assert iwinv.timeout.pool == DEFAULT_TIMEOUT.pool
    aligo = build(fakes, "aligo", KMSG_ALIGO_TIMEOUT_READ="4")
    assert aligo.timeout is not None and (aligo.timeout.connect, aligo.timeout.read) == (DEFAULT_TIMEOUT.connect, 4.0)
    assert build(fakes, "solapi").timeout is None  # nothing set: the shared client's own timeouts


@pytest.mark.parametrize("value", ["abc", "0", "-1", "601"])
def test_an_invalid_timeout_stops_the_worker_at_start_naming_the_variable(
    fakes: dict[str, FakeProviderServer], value: str
) -> None:
    settings = Settings.from_env({**fake_env(fakes), "KMSG_PROVIDERS": "iwinv", "KMSG_IWINV_TIMEOUT_READ": value})
    with pytest.raises(ConfigurationError) as info:
        settings.check_providers()
    assert info.value.variable == "KMSG_IWINV_TIMEOUT_READ"
