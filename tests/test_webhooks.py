"""Webhooks on SQLite and PostgreSQL: the outbox rows written by the transitions, the dispatcher
delivering them signed to a real loopback receiver, retries, Retry-After, disabling, rotation, and
the destination guard."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from kmsg_worker.delivery import deliver, process_chunk
from kmsg_worker.errors import ValidationError
from kmsg_worker.producer import KMsg
from kmsg_worker.runtime import Runtime
from kmsg_worker.settings import WebhookPolicy
from kmsg_worker.storage.models import MessageRow, WebhookAttempt, WebhookEndpoint, WebhookEvent
from kmsg_worker.tracking import poll_statuses
from kmsg_worker.webhooks import endpoints
from kmsg_worker.webhooks.dispatch import dispatch_webhooks
from kmsg_worker.webhooks.guard import check_destination
from kmsg_worker.webhooks.signing import SignatureError, sign, verify
from tests.conftest import Clock, RecordingDispatcher
from tests.webhook_receiver import Receiver, start_receiver

SENDER = "0212345678"


@pytest.fixture
def rt(backend_url: str, settings_factory: Any, dispatcher: RecordingDispatcher) -> Iterator[Runtime]:
    settings = settings_factory(
        backend_url,
        KMSG_WEBHOOK_ALLOW_HTTP_LOOPBACK="1",
        KMSG_WEBHOOK_BATCH_SIZE="10",
        KMSG_WEBHOOK_BACKOFF_BASE_SECONDS="10",
        KMSG_WEBHOOK_DISABLE_AFTER_SECONDS="7200",
        KMSG_TRACKING_FIRST_CHECK_SECONDS="30",
    )
    runtime = Runtime(settings, dispatcher=dispatcher)
    yield runtime
    runtime.close()


@pytest.fixture
def clock(rt: Runtime) -> Clock:
    c = Clock()
    rt.now = c
    return c


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = start_receiver(Receiver())
    yield r
    assert r.server is not None
    r.server.shutdown()


def subscribe(rt: Runtime, receiver: Receiver, tenant: str, *events: str, **kw: Any) -> dict[str, Any]:
    made = endpoints.add_endpoint(rt, tenant, receiver.url, events, **kw)
    receiver.secret = made["secret"]
    return made


def events_of(rt: Runtime, **where: Any) -> list[WebhookEvent]:
    with rt.store.sessions() as s:
        stmt = select(WebhookEvent).order_by(WebhookEvent.id)
        for key, value in where.items():
            stmt = stmt.where(getattr(WebhookEvent, key) == value)
        return list(s.scalars(stmt))


def endpoint_row(rt: Runtime, endpoint_id: str) -> WebhookEndpoint:
    with rt.store.sessions() as s:
        row = s.get(WebhookEndpoint, endpoint_id)
        assert row is not None
        return row


def bulk(kmsg: KMsg, n: int, tenant: str, dispatcher: RecordingDispatcher, **defaults: Any) -> str:
    items = [{"to": f"0109{tenant[-1] == 'a' and 1 or 2}{i:06d}"} for i in range(n)]
    receipt = kmsg.send_many(
        items, defaults={"text": "세일 안내", "sender": SENDER, "tenant": tenant, **defaults}, tenant=tenant
    )
    for batch_id, chunk, _ in list(dispatcher.chunks):
        if batch_id == receipt.batch_id:
            process_chunk(kmsg.runtime, batch_id, chunk)
    assert receipt.batch_id is not None
    return receipt.batch_id


# -- the outbox ----------------------------------------------------------------------------------


def test_transitions_write_one_event_per_change_only_for_subscribed_tenants(
    rt: Runtime, clock: Clock, receiver: Receiver, dispatcher: RecordingDispatcher
) -> None:
    # Given tenant shop-a subscribed to sent and delivered (not failed), and shop-b with no endpoint
    kmsg = KMsg(runtime=rt)
    made = subscribe(rt, receiver, "shop-a", "message.sent", "message.delivered")
    # When each tenant sends a single message and a bulk of 25, and tracking settles them
    a1 = kmsg.send(to="01011110000", text="주문 확인", sender=SENDER, tenant="shop-a").message_id
    b1 = kmsg.send(to="01022220000", text="주문 확인", sender=SENDER, tenant="shop-b").message_id
    assert deliver(rt, a1).action == "sent" and deliver(rt, b1).action == "sent"
    batch_a = bulk(kmsg, 25, "shop-a", dispatcher)
    bulk(kmsg, 25, "shop-b", dispatcher)
    # Then one message.sent per shop-a message exists, for its endpoint, and none for shop-b
    sent = events_of(rt, type="message.sent")
    assert len(sent) == 26 and {e.tenant for e in sent} == {"shop-a"}
    assert {e.endpoint_id for e in sent} == {made["id"]}
    assert sum(e.batch_id == batch_a for e in sent) == 25
    assert all(e.status == "sent" and e.provider == "mock" for e in sent)
    # When tracking sees every message delivered
    clock.advance(31)
    poll_statuses(rt)
    delivered = events_of(rt, type="message.delivered")
    assert Counter(e.tenant for e in delivered) == {"shop-a": 26}
    assert {e.message_id for e in delivered} == {e.message_id for e in sent}
    # And a second sweep changes nothing, so it writes no event either
    clock.advance(3600)
    poll_statuses(rt)
    assert len(events_of(rt)) == 52


def test_a_rolled_back_transition_leaves_no_event(rt: Runtime, receiver: Receiver) -> None:
    kmsg = KMsg(runtime=rt)
    subscribe(rt, receiver, "shop-a", "message.cancelled")
    mid = kmsg.send(to="01011110001", text="취소", sender=SENDER, tenant="shop-a").message_id
    from kmsg_worker.status import MessageStatus

    with rt.store.sessions() as s:
        assert rt.store.transition(mid, MessageStatus.CANCELLED, now=rt.now(), session=s) == 1
        s.rollback()
    assert events_of(rt) == []
    assert rt.store.transition(mid, MessageStatus.CANCELLED, now=rt.now()) == 1
    [event] = events_of(rt)
    assert (event.type, event.message_id, event.status) == ("message.cancelled", mid, "cancelled")


def test_failures_cancels_and_fallbacks_have_their_events(
    rt: Runtime, clock: Clock, receiver: Receiver, dispatcher: RecordingDispatcher
) -> None:
    kmsg = KMsg(runtime=rt)
    subscribe(rt, receiver, "shop-a", "message.failed", "message.cancelled", "message.fallback_created")
    # An AlimTalk to a number without KakaoTalk, with an SMS fallback asked for
    parent = kmsg.send(
        type="ALIMTALK",
        to="01011110002",
        sender=SENDER,
        tenant="shop-a",
        template_id="T_ORDER",
        variables={"name": "김민준"},
        text="주문이 출고되었습니다",
        failover={"content": "주문이 출고되었습니다"},
        provider_id="mock",
        provider_options={"mock": {"deliver": "FAILED:3104"}},
    ).message_id
    assert deliver(rt, parent).action == "sent"
    # and a batch cancelled before it went out
    receipt = kmsg.send_many(
        [{"to": f"010333{i:05d}"} for i in range(5)],
        defaults={"text": "취소될 안내", "sender": SENDER, "tenant": "shop-a"},
    )
    assert receipt.batch_id is not None
    kmsg.cancel_batch(receipt.batch_id)
    clock.advance(31)
    poll_statuses(rt)
    by_type = Counter(e.type for e in events_of(rt))
    assert by_type == {"message.failed": 1, "message.fallback_created": 1, "message.cancelled": 5}
    [created] = events_of(rt, type="message.fallback_created")
    assert (created.message_id, created.child_id) == (parent, f"{parent}:fallback")
    [failed] = events_of(rt, type="message.failed")
    assert (failed.provider_code, failed.error_code) == ("3104", "NOT_KAKAO_USER")


# -- the dispatcher ------------------------------------------------------------------------------


def test_events_arrive_signed_in_batches_and_survive_a_receiver_outage(
    rt: Runtime, clock: Clock, receiver: Receiver, dispatcher: RecordingDispatcher
) -> None:
    kmsg = KMsg(runtime=rt)
    made = subscribe(rt, receiver, "shop-a", "message.sent")
    bulk(kmsg, 25, "shop-a", dispatcher)
    # Given the receiver is down: the first POST fails and nothing is marked delivered
    receiver.down = True
    report = dispatch_webhooks(rt)
    assert (report.requests, report.failed_requests, report.delivered) == (1, 1, 0)
    ep = endpoint_row(rt, made["id"])
    assert ep.failures == 1 and ep.next_attempt_at is not None and ep.next_attempt_at > clock.now
    # Not due yet: a run sends nothing
    assert dispatch_webhooks(rt).requests == 0
    # When it is back and the next try is due
    receiver.down = False
    clock.advance(3600)
    report = dispatch_webhooks(rt)
    # Then every event arrives once, in batches of at most 10, each batch validly signed
    assert (report.requests, report.delivered) == (3, 25)
    assert receiver.bad_signatures == 0
    ids = receiver.event_ids()
    assert len(ids) == 25 and len(set(ids)) == 25
    assert [len(r["body"]["events"]) for r in receiver.requests] == [10, 10, 5]
    first = receiver.events()[0]
    assert first["type"] == "message.sent" and first["tenant"] == "shop-a"
    # no message text, and the number masked (no opt-in)
    assert "text" not in first["data"] and first["data"]["to"] != "01091000000" and "*" in first["data"]["to"]
    # And every delivery attempt is recorded; the endpoint is healthy again
    with rt.store.sessions() as s:
        attempts = list(s.scalars(select(WebhookAttempt).order_by(WebhookAttempt.id)))
    assert [a.ok for a in attempts] == [False, True, True, True]
    assert endpoint_row(rt, made["id"]).failures == 0
    assert dispatch_webhooks(rt).requests == 0


def test_a_replay_delivers_again_with_the_same_ids(
    rt: Runtime, clock: Clock, receiver: Receiver, dispatcher: RecordingDispatcher
) -> None:
    kmsg = KMsg(runtime=rt)
    made = subscribe(rt, receiver, "shop-a", "message.sent", include_phone=True)
    bulk(kmsg, 3, "shop-a", dispatcher)
    dispatch_webhooks(rt)
    first = receiver.event_ids()
    assert receiver.events()[0]["data"]["to"].startswith("0109")  # opted in: the full number
    assert endpoints.replay_events(rt, since=clock.now - timedelta(minutes=1), endpoint_id=made["id"]) == 3
    dispatch_webhooks(rt)
    assert receiver.event_ids() == first + first


def test_retry_after_is_honoured(
    rt: Runtime, clock: Clock, receiver: Receiver, dispatcher: RecordingDispatcher
) -> None:
    kmsg = KMsg(runtime=rt)
    made = subscribe(rt, receiver, "shop-a", "message.sent")
    bulk(kmsg, 1, "shop-a", dispatcher)
    receiver.down, receiver.retry_after = True, "900"
    dispatch_webhooks(rt)
    ep = endpoint_row(rt, made["id"])
    assert ep.next_attempt_at is not None
    assert ep.next_attempt_at >= clock.now + timedelta(seconds=900)


def test_an_endpoint_failing_for_hours_is_disabled(
    rt: Runtime, clock: Clock, receiver: Receiver, dispatcher: RecordingDispatcher
) -> None:
    kmsg = KMsg(runtime=rt)
    made = subscribe(rt, receiver, "shop-a", "message.sent")
    bulk(kmsg, 1, "shop-a", dispatcher)
    receiver.down = True
    disabled = 0
    for _ in range(30):
        disabled += dispatch_webhooks(rt).disabled
        clock.advance(3600)
    ep = endpoint_row(rt, made["id"])
    assert disabled == 1 and ep.disabled_at is not None and "failing since" in (ep.disabled_reason or "")
    # a disabled endpoint gets no new events
    bulk(kmsg, 2, "shop-a", dispatcher)
    assert len(events_of(rt)) == 1


def test_a_rotated_secret_keeps_signing_during_the_overlap(
    rt: Runtime, clock: Clock, receiver: Receiver, dispatcher: RecordingDispatcher
) -> None:
    kmsg = KMsg(runtime=rt)
    made = subscribe(rt, receiver, "shop-a", "message.sent")
    old = made["secret"]
    rotated = endpoints.rotate_secret(rt, made["id"], "shop-a")
    assert rotated["secret"] != old and "secret" not in endpoints.list_endpoints(rt, "shop-a")[0]
    bulk(kmsg, 1, "shop-a", dispatcher)
    dispatch_webhooks(rt)  # the receiver still verifies with the old secret
    assert receiver.bad_signatures == 0 and len(receiver.event_ids()) == 1
    clock.advance(rt.settings.webhooks.secret_overlap + 1)
    bulk(kmsg, 1, "shop-a", dispatcher)
    dispatch_webhooks(rt)
    assert receiver.bad_signatures == 1  # the old secret no longer signs
    receiver.secret = rotated["secret"]
    clock.advance(3600)
    dispatch_webhooks(rt)
    assert len(receiver.event_ids()) == 2


def test_a_redirect_is_not_followed(rt: Runtime, clock: Clock, receiver: Receiver) -> None:
    made = subscribe(rt, receiver, "shop-a", "message.sent")
    with rt.store.sessions.begin() as s:
        s.get(WebhookEndpoint, made["id"]).url = receiver.url.replace("/hooks", "/moved")  # type: ignore[union-attr]
    receiver.handle = lambda headers, body: (302, {"Location": "http://169.254.169.254/"})  # type: ignore[method-assign]
    result = endpoints.test_endpoint(rt, made["id"], "shop-a")
    assert result["delivered"] is False and result["http_status"] == 302


def test_a_delivery_connects_to_the_address_the_guard_checked(
    rt: Runtime, clock: Clock, receiver: Receiver, dispatcher: RecordingDispatcher
) -> None:
    # A name only our resolver knows: were the POST to resolve it again (where a rebinding DNS
    # server could answer differently), it would fail; it must go to the address that was checked.
    made = subscribe(rt, receiver, "shop-a", "message.sent")
    port = receiver.url.split(":")[2].split("/")[0]
    named = f"http://hooks.kmsg-test.invalid:{port}/hooks"
    with rt.store.sessions.begin() as s:
        s.get(WebhookEndpoint, made["id"]).url = named  # type: ignore[union-attr]
    bulk(KMsg(runtime=rt), 3, "shop-a", dispatcher)
    report = dispatch_webhooks(rt, resolve=_resolver("127.0.0.1"))
    assert (report.requests, report.delivered) == (1, 3)
    [request] = receiver.requests
    assert request["headers"]["host"] == f"hooks.kmsg-test.invalid:{port}"  # the name, for the receiver
    # and an address the guard refuses is never connected to, whatever the name
    bulk(KMsg(runtime=rt), 1, "shop-a", dispatcher)
    clock.advance(60)
    refused = dispatch_webhooks(rt, resolve=_resolver("10.0.0.7"))
    assert refused.delivered == 0 and len(receiver.requests) == 1


def test_no_endpoint_means_no_event_rows(rt: Runtime, clock: Clock, dispatcher: RecordingDispatcher) -> None:
    bulk(KMsg(runtime=rt), 10, "shop-a", dispatcher)
    with rt.store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(WebhookEvent)) == 0
        assert s.scalar(select(func.count()).select_from(MessageRow).where(MessageRow.status == "sent")) == 10


# -- signatures and the destination guard (no database) ------------------------------------------


def test_standard_webhooks_signature_round_trip_and_refusals() -> None:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    # The Standard Webhooks specification's own example (msg_p5jXN8AQM9LWM0D4loKWxJek, 1614265330)
    entry = sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert entry == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    headers = {"webhook-id": "msg_p5jXN8AQM9LWM0D4loKWxJek", "webhook-timestamp": "1614265330"}
    assert (
        verify(secret, {**headers, "webhook-signature": f"v1,bogus {entry}"}, body, now=1614265331)
        == headers["webhook-id"]
    )
    with pytest.raises(SignatureError):
        verify(secret, {**headers, "webhook-signature": entry}, body + b" ", now=1614265331)
    with pytest.raises(SignatureError):
        verify(secret, {**headers, "webhook-signature": entry}, body, now=1614265330 + 301)
    with pytest.raises(SignatureError):
        verify(secret, headers, body, now=1614265331)


def _resolver(*addresses: str) -> Any:
    return lambda host, port: list(addresses)


@pytest.mark.parametrize(
    ("url", "addresses", "rule"),
    [
        ("https://hooks.example.com/x", ["10.1.2.3"], "public_address"),
        ("https://hooks.example.com/x", ["93.184.216.34", "192.168.0.5"], "public_address"),
        ("https://metadata.example.com/x", ["169.254.169.254"], "public_address"),
        ("https://localhost/x", ["127.0.0.1"], "public_address"),
        ("https://v6.example.com/x", ["::1"], "public_address"),
        ("https://v6.example.com/x", ["fe80::1"], "public_address"),
        ("https://v6.example.com/x", ["fd00::1"], "public_address"),
        ("https://v6.example.com/x", ["::ffff:10.0.0.1"], "public_address"),
        ("https://zero.example.com/x", ["0.0.0.0"], "public_address"),
        ("https://cgnat.example.com/x", ["100.64.0.1"], "public_address"),
        ("http://hooks.example.com/x", ["93.184.216.34"], "scheme"),
        ("http://127.0.0.1:8080/x", ["127.0.0.1"], "scheme"),  # loopback http needs the setting
        ("ftp://hooks.example.com/x", ["93.184.216.34"], "scheme"),
        ("https://user:pw@hooks.example.com/x", ["93.184.216.34"], "no_userinfo"),
    ],
)
def test_refused_destinations(url: str, addresses: list[str], rule: str) -> None:
    with pytest.raises(ValidationError) as caught:
        check_destination(url, WebhookPolicy(), _resolver(*addresses))
    assert (caught.value.field, caught.value.rule) == ("url", rule)


def test_allowed_destinations() -> None:
    check_destination("https://hooks.example.com/x", WebhookPolicy(), _resolver("93.184.216.34"))
    check_destination("http://127.0.0.1:8080/x", WebhookPolicy(allow_http_loopback=True), _resolver("127.0.0.1"))
    check_destination("https://intranet/x", WebhookPolicy(allow_private=True), _resolver("10.0.0.7"))
    # http to a private (not loopback) address stays refused even with the loopback setting
    with pytest.raises(ValidationError):
        check_destination("http://intranet/x", WebhookPolicy(allow_http_loopback=True), _resolver("10.0.0.7"))


def test_adding_a_refused_endpoint_stores_nothing(rt: Runtime) -> None:
    with pytest.raises(ValidationError) as caught:
        endpoints.add_endpoint(rt, "shop-a", "https://x.example/", ["message.sent"], resolve=_resolver("10.0.0.1"))
    assert caught.value.field == "url"
    with pytest.raises(ValidationError) as caught:
        endpoints.add_endpoint(rt, "shop-a", "https://x.example/", ["message.read"], resolve=_resolver("8.8.8.8"))
    assert (caught.value.field, caught.value.rule) == ("events", "known_type")
    assert endpoints.list_endpoints(rt) == []


def test_batch_completed_is_written_once_when_every_message_is_final(
    rt: Runtime, clock: Clock, receiver: Receiver, dispatcher: RecordingDispatcher
) -> None:
    kmsg = KMsg(runtime=rt)
    subscribe(rt, receiver, "shop-a", "batch.completed")
    batch_id = bulk(kmsg, 5, "shop-a", dispatcher)
    cancelled = kmsg.send_many(
        [{"to": "01077770000"}], defaults={"text": "취소", "sender": SENDER}, tenant="shop-a"
    ).batch_id
    assert cancelled is not None
    kmsg.cancel_batch(cancelled)
    # The first batch's messages are only sent: not complete yet; the cancelled one is
    dispatch_webhooks(rt)
    assert [(e["data"]["batch_id"], e["data"]["status"]) for e in receiver.events()] == [(cancelled, "cancelled")]
    # Once tracking settles every message, the batch completes, once
    clock.advance(31)
    poll_statuses(rt)
    dispatch_webhooks(rt)
    dispatch_webhooks(rt)
    completed = [e for e in receiver.events() if e["data"]["batch_id"] == batch_id]
    assert [(e["type"], e["data"]["status"]) for e in completed] == [("batch.completed", "completed")]
    assert len(events_of(rt, type="batch.completed")) == 2
