"""What one ``send_batch`` call takes (``send_batch_limit``), against what one request takes (``batch_limit``).

A bulk chunk is one call. An adapter that splits a call into requests itself and runs them through
its in-flight window takes a window of full requests per call; one that sends a call as one
request takes one request's worth. The operator's ``batch_limit`` caps a request, and the window
with it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import httpx
import pytest

from kmsg_worker.message import Message, MessageType, normalize
from kmsg_worker.providers.aligo import SEND_BATCH_LIMIT, SMS_BATCH_LIMIT, AligoProvider
from kmsg_worker.providers.base import Capabilities, Provider, ProviderConfig, SendOutcome
from kmsg_worker.providers.base_http import DEFAULT_MAX_IN_FLIGHT
from kmsg_worker.providers.iwinv import IwinvProvider
from kmsg_worker.providers.solapi import SolapiProvider


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client() as made:
        yield made


def aligo(client: httpx.Client, **options: Any) -> AligoProvider:
    config = ProviderConfig(name="aligo", credentials={"api_key": "k"}, options={"user_id": "u", **options})
    return AligoProvider(config, client)


def test_aligo_takes_a_window_of_requests_per_call(client: httpx.Client) -> None:
    # One request carries 1,000; a call carries max_in_flight requests' worth
    assert aligo(client).batch_limit == SMS_BATCH_LIMIT
    assert aligo(client, max_in_flight="3").send_batch_limit == 3_000
    assert aligo(client, max_in_flight="8").send_batch_limit == 8_000
    # no window: a call is one request again
    assert aligo(client, max_in_flight="1").send_batch_limit == SMS_BATCH_LIMIT
    # a wide window stops at the adapter's cap
    assert aligo(client, max_in_flight="20").send_batch_limit == SEND_BATCH_LIMIT
    assert SMS_BATCH_LIMIT * DEFAULT_MAX_IN_FLIGHT > SEND_BATCH_LIMIT == aligo(client).send_batch_limit


def test_the_operators_request_cap_lowers_the_window_with_it(client: httpx.Client) -> None:
    provider = aligo(client, batch_limit="200", max_in_flight="4")
    assert (provider.batch_limit, provider.send_batch_limit) == (200, 800)


def test_adapters_that_send_a_call_as_one_request_keep_the_request_limit(client: httpx.Client) -> None:
    keys = {"api_key": "k", "api_secret": "s"}
    assert SolapiProvider(ProviderConfig(name="solapi", credentials=keys), client).send_batch_limit == 10_000
    lowered = ProviderConfig(name="solapi", credentials=keys, options={"batch_limit": 300})
    assert SolapiProvider(lowered, client).send_batch_limit == 300
    # IWINV runs its requests through a window too, but personalised SMS are one request per
    # message there: a larger call would only lengthen a chunk
    iwinv = IwinvProvider(ProviderConfig(name="iwinv", credentials={"api_key": "k"}), client)
    assert iwinv.max_in_flight == DEFAULT_MAX_IN_FLIGHT
    assert iwinv.send_batch_limit == iwinv.batch_limit == 1_000


class Splitting(Provider):
    """A provider without HTTP that declares it splits calls: no window, so one request per call."""

    name: ClassVar[str] = "splitting"
    capabilities: ClassVar[Capabilities] = Capabilities(
        types=frozenset({MessageType.SMS}), bulk_limit=10, send_batch_limit=100
    )

    def _send_batch(self, messages: Sequence[Message]) -> list[SendOutcome]:
        return [SendOutcome(m.id, True, provider_message_id=m.id) for m in messages]


def test_a_call_over_the_limit_is_refused_before_anything_is_sent() -> None:
    provider = Splitting(ProviderConfig(name="splitting"))
    assert provider.send_batch_limit == 10  # max_in_flight 1
    provider.max_in_flight = 4
    assert provider.send_batch_limit == 40
    messages = [normalize({"to": f"010{i:08d}", "text": "안내", "type": "SMS"}) for i in range(41)]
    assert len(provider.send_batch(messages[:40])) == 40
    with pytest.raises(ValueError, match="send_batch limit 40"):
        provider.send_batch(messages)
