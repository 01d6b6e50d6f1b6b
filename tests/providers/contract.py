"""Cases every provider adapter must pass, run against its fake server over real HTTP.

A vendor test module subclasses :class:`ProviderContract` and provides two fixtures:

* ``fake``: a started fake server (``kmsg_worker.testing.fake_<vendor>``), stopped afterwards;
* ``make_provider``: a factory ``make_provider(credentials=None, timeout=None) -> Provider`` that
  builds the adapter pointed at ``fake.url`` with a fresh shared ``httpx.Client`` (``credentials``
  replaces the valid ones; ``timeout`` is the read timeout in seconds).

It may override :meth:`ProviderContract.message` to build a message its vendor accepts.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from kmsg_worker.errors import (
    ErrorCode,
    ProviderConnectionError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    ProviderTransientError,
)
from kmsg_worker.message import Message, normalize
from kmsg_worker.providers.base import DeliveryState, Provider, StatusQuery
from kmsg_worker.testing.fakeserver import DeliveryRule, FakeProviderServer

SECRET_MARKERS: tuple[str, ...] = ()


class ProviderContract:
    """Shared contract; see the module docstring for the fixtures a subclass provides."""

    #: Credentials the subclass's valid configuration uses (checked to stay out of reprs/errors).
    secrets: tuple[str, ...] = ()

    def message(self, to: str = "01012345678", **extra: Any) -> Message:
        fields: dict[str, Any] = {
            "to": to,
            "text": "인증번호 [123456] 입니다",
            "type": "SMS",
            "sender": "0212345678",
        }
        fields.update(extra)
        return normalize(fields)

    # -- sending ----------------------------------------------------------------------------------

    def test_send_one_is_accepted_and_counted_once(self, fake: FakeProviderServer, make_provider: Any) -> None:
        provider: Provider = make_provider()
        outcome = provider.send(self.message())
        assert outcome.accepted, outcome.error
        assert outcome.provider_message_id
        assert fake.ledger.per_recipient["01012345678"] == 1

    def test_batch_uses_one_request_when_the_vendor_has_bulk(
        self, fake: FakeProviderServer, make_provider: Any
    ) -> None:
        provider: Provider = make_provider()
        messages = [self.message(to=f"0101000{i:04d}") for i in range(5)]
        before = fake.ledger.requests
        outcomes = provider.send_batch(messages)
        assert [o.message_id for o in outcomes] == [m.id for m in messages]
        assert all(o.accepted for o in outcomes)
        if provider.capabilities.bulk_limit >= 5:
            assert fake.ledger.requests - before == 1
        assert sum(fake.ledger.per_recipient[m.to] for m in messages) == 5

    # -- status ------------------------------------------------------------------------------------

    def _query(self, provider: Provider, message: Message, pmid: str) -> Any:
        return provider.query_status([StatusQuery(message.id, pmid, message.type, message.to, datetime.now(UTC))])

    def test_status_delivered_and_failed_keep_the_code(self, fake: FakeProviderServer, make_provider: Any) -> None:
        provider: Provider = make_provider()
        if not provider.capabilities.status_query:
            with pytest.raises(ProviderRejected) as info:
                provider.query_status([])
            assert info.value.code is ErrorCode.UNSUPPORTED
            return
        ok, bad = self.message(to="01011112222"), self.message(to="01033334444")
        fake.ledger.set_rule(bad.to, DeliveryRule(final="FAILED", code=self.failed_code()))
        outcomes = provider.send_batch([ok, bad])
        reports = {
            r.message_id: r
            for m, o in zip([ok, bad], outcomes, strict=True)
            for r in self._query(provider, m, o.provider_message_id or "")
        }
        assert reports[ok.id].state is DeliveryState.DELIVERED
        assert reports[bad.id].state is DeliveryState.FAILED
        assert reports[bad.id].code == self.failed_code()

    def failed_code(self) -> str:
        """A vendor failure status code the fake can report."""
        return "3059"

    # -- errors ------------------------------------------------------------------------------------

    def test_5xx_is_transient(self, fake: FakeProviderServer, make_provider: Any) -> None:
        fake.set_faults(error_rate=1.0, error_status=503)
        with pytest.raises(ProviderTransientError) as info:
            make_provider().send(self.message())
        assert info.value.status_code == 503
        assert fake.ledger.per_recipient["01012345678"] == 0

    def test_429_is_rate_limited_with_retry_after(self, fake: FakeProviderServer, make_provider: Any) -> None:
        fake.set_faults(rate_limit_rate=1.0, retry_after=7)
        with pytest.raises(ProviderRateLimited) as info:
            make_provider().send(self.message())
        assert info.value.retry_after == 7

    def test_bad_credentials_are_rejected_as_auth(self, fake: FakeProviderServer, make_provider: Any) -> None:
        provider: Provider = make_provider(credentials=self.bad_credentials())
        with pytest.raises(ProviderRejected) as info:
            provider.send(self.message())
        assert info.value.code is ErrorCode.AUTHENTICATION_FAILED
        assert info.value.blame == "provider"

    def bad_credentials(self) -> dict[str, str]:
        raise NotImplementedError

    def test_slow_response_times_out_as_unknown_outcome(self, fake: FakeProviderServer, make_provider: Any) -> None:
        fake.set_faults(slow_rate=1.0, slow_ms=800)
        with pytest.raises(ProviderTimeout):
            make_provider(timeout=0.2).send(self.message())

    def test_lost_response_is_an_unknown_outcome(self, fake: FakeProviderServer, make_provider: Any) -> None:
        fake.set_faults(lost_response_rate=1.0)
        with pytest.raises(ProviderTimeout):
            make_provider().send(self.message())
        # The fake did accept it: this is why a timeout must be reconciled before a resend.
        assert fake.ledger.per_recipient["01012345678"] == 1

    def test_connection_reset_is_transient(self, fake: FakeProviderServer, make_provider: Any) -> None:
        fake.set_faults(reset_rate=1.0)
        with pytest.raises((ProviderTimeout, ProviderConnectionError)):
            make_provider().send(self.message())
        assert fake.ledger.per_recipient["01012345678"] == 0

    def test_one_client_is_reused_across_calls(self, fake: FakeProviderServer, make_provider: Any) -> None:
        provider: Provider = make_provider()
        client = provider.client  # type: ignore[attr-defined]
        assert isinstance(client, httpx.Client)
        for i in range(3):
            assert provider.send(self.message(to=f"0102222{i:04d}")).accepted
        assert provider.client is client  # type: ignore[attr-defined]

    def test_secrets_stay_out_of_reprs_and_errors(self, fake: FakeProviderServer, make_provider: Any) -> None:
        provider: Provider = make_provider()
        fake.set_faults(error_rate=1.0)
        with pytest.raises(ProviderTransientError) as info:
            provider.send(self.message())
        texts = [repr(provider), repr(provider.config), str(info.value), repr(info.value)]
        for secret in self.secrets:
            for text in texts:
                assert secret not in text
