"""Solapi adapter: the shared contract, the wire format, and the fake server's own rules.

Everything runs against :class:`~kmsg_worker.testing.fake_solapi.FakeSolapiServer` over real HTTP,
except the few cases that need an answer the fake never gives (reordered lists, unreadable bodies):
those use ``httpx.MockTransport``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from kmsg_worker.errors import (
    ErrorCode,
    ProviderError,
    ProviderRejected,
    ProviderTimeout,
    ProviderTransientError,
)
from kmsg_worker.message import Message, normalize
from kmsg_worker.providers import solapi as solapi_module
from kmsg_worker.providers.base import (
    DeliveryState,
    LookupHint,
    ProviderConfig,
    ProviderLookupUndecided,
    StatusQuery,
)
from kmsg_worker.providers.base_http import make_http_client
from kmsg_worker.providers.solapi import SolapiProvider, authorization_header, map_status_code
from kmsg_worker.testing.fake_solapi import FakeSolapiServer
from kmsg_worker.testing.fakeserver import DeliveryRule, FakeRequest
from tests.providers.contract import ProviderContract

API_KEY = "NCSTESTKEY4D1F0A"
API_SECRET = "TESTSECRET9A7C3E5B1D"
SEND = "/messages/v4/send-many/detail"
AUTH = re.compile(
    r"^HMAC-SHA256 apiKey=(?P<key>[^,]+), date=(?P<date>[^,]+), salt=(?P<salt>[^,]+), "
    r"signature=(?P<signature>[0-9a-f]{64})$"
)
JPEG = b"\xff\xd8\xff\xe0" + b"fake-jpeg-bytes" * 8


@pytest.fixture
def fake() -> Iterator[FakeSolapiServer]:
    with FakeSolapiServer(api_key=API_KEY, api_secret=API_SECRET) as server:
        yield server


@pytest.fixture
def make_provider(fake: FakeSolapiServer) -> Iterator[Callable[..., SolapiProvider]]:
    clients: list[httpx.Client] = []

    def build(
        credentials: dict[str, str] | None = None, timeout: float | None = None, **options: Any
    ) -> SolapiProvider:
        client = make_http_client(timeout=httpx.Timeout(timeout or 5.0))
        clients.append(client)
        config = ProviderConfig(
            name="solapi",
            base_url=fake.url,
            credentials=credentials or {"api_key": API_KEY, "api_secret": API_SECRET},
            options={
                "kakao_pf_id": "KA01PF-TEST",
                "naver_talk_id": "WA-TEST",
                "rcs_brand_id": "BR-TEST",
                **options,
            },
        )
        return SolapiProvider(config, client)

    yield build
    for client in clients:
        client.close()


def mock_provider(handler: Callable[[httpx.Request], httpx.Response], **options: Any) -> SolapiProvider:
    """An adapter whose HTTP is answered by ``handler`` (for answers the fake never gives)."""
    config = ProviderConfig(
        name="solapi",
        base_url="https://solapi.test",
        credentials={"api_key": API_KEY, "api_secret": API_SECRET},
        options=options,
    )
    return SolapiProvider(config, make_http_client(transport=httpx.MockTransport(handler)))


def sms(to: str = "01012345678", **extra: Any) -> Message:
    fields: dict[str, Any] = {
        "to": to,
        "text": "인증번호 [123456] 입니다",
        "type": "SMS",
        "sender": "0212345678",
    }
    fields.update(extra)
    return normalize(fields)


def sent_messages(fake: FakeSolapiServer) -> list[dict[str, Any]]:
    """Wire messages of the last send request."""
    request = next(r for r in reversed(fake.recorded) if r.path == SEND)
    messages: list[dict[str, Any]] = request.json()["messages"]
    return messages


def requests_to(fake: FakeSolapiServer, path: str) -> list[FakeRequest]:
    return [r for r in fake.recorded if r.path == path]


def query(message: Message, provider_message_id: str | None) -> StatusQuery:
    return StatusQuery(message.id, provider_message_id or "", message.type, message.to, datetime.now(UTC))


def raw_post(fake: FakeSolapiServer, body: Any, header: str | None = None) -> httpx.Response:
    headers = {"Authorization": header or authorization_header(API_KEY, API_SECRET)}
    return httpx.post(fake.url + SEND, json=body, headers=headers, timeout=10)


# ------------------------------------------------------------------------------------------------
# the shared contract


class TestSolapiContract(ProviderContract):
    secrets = (API_SECRET,)

    def bad_credentials(self) -> dict[str, str]:
        return {"api_key": API_KEY, "api_secret": "not-the-secret"}

    def failed_code(self) -> str:
        return "3059"


# ------------------------------------------------------------------------------------------------
# authentication


class TestAuthentication:
    def test_send_goes_to_send_many_detail_with_a_verifiable_signature(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        make_provider().send(sms())

        request = requests_to(fake, SEND)[-1]
        assert request.method == "POST"
        assert request.headers["content-type"] == "application/json"
        match = AUTH.match(request.headers["authorization"])
        assert match, request.headers["authorization"]
        assert match["key"] == API_KEY
        signed_at = datetime.fromisoformat(match["date"])
        assert signed_at.tzinfo is not None
        assert abs((datetime.now(UTC) - signed_at).total_seconds()) < 60
        assert re.fullmatch(r"[0-9a-zA-Z]{32}", match["salt"])
        # Recomputed here, independently of the adapter and of the fake.
        expected = hmac.new(API_SECRET.encode(), (match["date"] + match["salt"]).encode(), hashlib.sha256).hexdigest()
        assert match["signature"] == expected

    def test_every_request_gets_a_fresh_salt_and_signature(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        provider = make_provider()
        outcome = provider.send(sms())
        provider.send(sms())
        provider.query_status([query(sms(), outcome.provider_message_id)])
        provider.balance()

        headers = [AUTH.match(r.headers["authorization"]) for r in fake.recorded]
        assert len(headers) == 4 and all(headers)
        salts = {m["salt"] for m in headers if m}
        signatures = {m["signature"] for m in headers if m}
        assert len(salts) == 4 and len(signatures) == 4

    def test_the_secret_is_never_sent(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        provider = make_provider()
        outcome = provider.send(sms())
        provider.query_status([query(sms(), outcome.provider_message_id)])
        for request in fake.recorded:
            wire = json.dumps(dict(request.headers)) + request.body.decode() + json.dumps(request.query)
            assert API_SECRET not in wire

    def test_a_replayed_signature_is_refused_as_duplicated(
        self,
        fake: FakeSolapiServer,
        make_provider: Callable[..., SolapiProvider],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        frozen = authorization_header(API_KEY, API_SECRET)
        monkeypatch.setattr(solapi_module, "authorization_header", lambda key, secret: frozen)
        provider = make_provider()
        assert provider.send(sms()).accepted

        with pytest.raises(ProviderRejected) as info:
            provider.send(sms())
        assert info.value.code is ErrorCode.AUTHENTICATION_FAILED
        assert info.value.provider_code == "DuplicatedSignature"
        assert info.value.status_code == 403
        assert fake.ledger.per_recipient["01012345678"] == 1

    def test_a_skewed_date_is_refused(
        self,
        fake: FakeSolapiServer,
        make_provider: Callable[..., SolapiProvider],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        old = (datetime.now(UTC) - timedelta(minutes=20)).isoformat(timespec="seconds")
        monkeypatch.setattr(
            solapi_module,
            "authorization_header",
            lambda key, secret: authorization_header(key, secret, date=old),
        )
        with pytest.raises(ProviderRejected) as info:
            make_provider().send(sms())
        assert info.value.code is ErrorCode.AUTHENTICATION_FAILED
        assert info.value.provider_code == "RequestTimeTooSkewed"
        assert info.value.blame == "provider"
        assert fake.ledger.per_recipient["01012345678"] == 0

    def test_wrong_secret_is_signature_does_not_match(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        with pytest.raises(ProviderRejected) as info:
            make_provider(credentials={"api_key": API_KEY, "api_secret": "nope"}).balance()
        assert info.value.provider_code == "SignatureDoesNotMatch"
        assert API_SECRET not in repr(info.value)

    @pytest.mark.parametrize(
        ("header", "status", "code"),
        [
            (None, 401, "InvalidAPIKey"),
            ("Bearer abc", 403, "InvalidAPIKey"),
            ("HMAC-SHA256 apiKey=x, date=2026-01-01T00:00:00Z", 403, "InvalidAPIKey"),
            ("UNKNOWN-KEY", 403, "InvalidAPIKey"),
        ],
    )
    def test_the_fake_refuses_missing_and_malformed_headers(
        self, fake: FakeSolapiServer, header: str | None, status: int, code: str
    ) -> None:
        if header == "UNKNOWN-KEY":
            header = authorization_header("someone-else", API_SECRET)
        headers = {"Authorization": header} if header else {}
        response = httpx.get(fake.url + "/cash/v1/balance", headers=headers)
        assert response.status_code == status
        assert response.json()["errorCode"] == code


# ------------------------------------------------------------------------------------------------
# building messages


class TestMessageBodies:
    def test_sms_body(self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]) -> None:
        message = sms(to="010-1234-5678", custom_fields={"campaign": "spring"})
        make_provider(app_id="APP123").send(message)

        body = requests_to(fake, SEND)[-1].json()
        assert body["showMessageList"] is True
        assert body["allowDuplicates"] is True
        assert body["agent"] == {"appId": "APP123"}
        assert "scheduledDate" not in body
        assert body["messages"] == [
            {
                "to": "01012345678",
                "type": "SMS",
                "from": "0212345678",
                "text": "인증번호 [123456] 입니다",
                "customFields": {"campaign": "spring", "kmsgId": message.id},
            }
        ]

    def test_lms_keeps_its_subject_and_default_sender(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        message = normalize({"to": "01012345678", "type": "LMS", "text": "긴 안내 " * 30, "subject": "안내"})
        assert make_provider(default_from="1588-1234").send(message).accepted
        (wire,) = sent_messages(fake)
        assert (wire["type"], wire["subject"], wire["from"]) == ("LMS", "안내", "15881234")

    def test_alimtalk_with_failover_maps_onto_solapi_replacement(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        message = normalize(
            {
                "to": "01012345678",
                "type": "ALIMTALK",
                "template_id": "KA01TP-WELCOME",
                "variables": {"name": "홍길동", "count": 3},
                "sender": "0212345678",
                "failover": {
                    "enabled": True,
                    "channel": "lms",
                    "content": " 홍길동님 환영합니다 ",
                    "title": "환영",
                },
            }
        )
        outcome = make_provider().send(message)

        (wire,) = sent_messages(fake)
        assert wire["type"] == "ATA"
        assert wire["kakaoOptions"] == {
            "pfId": "KA01PF-TEST",
            "templateId": "KA01TP-WELCOME",
            "variables": {"#{name}": "홍길동", "#{count}": "3"},
            "disableSms": False,
        }
        assert wire["text"] == "홍길동님 환영합니다"
        assert wire["subject"] == "환영"
        assert outcome.accepted and outcome.native_fallback
        (warning,) = outcome.warnings
        assert warning.code == "FAILOVER_PARTIAL_PROVIDER"
        assert warning.details == {
            "mappedFields": ["kakao.disableSms", "text", "subject"],
            "unsupportedFields": ["fallbackChannel"],
        }

    def test_alimtalk_without_failover_never_switches_on_paid_replacement(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        message = normalize(
            {"to": "01012345678", "type": "ALIMTALK", "template_id": "T1", "kakao": {"profile_id": "PF-OWN"}}
        )
        outcome = make_provider().send(message)
        (wire,) = sent_messages(fake)
        assert wire["kakaoOptions"] == {"pfId": "PF-OWN", "templateId": "T1", "disableSms": True}
        assert "text" not in wire
        assert outcome.accepted and not outcome.native_fallback and outcome.warnings == []

    def test_alimtalk_with_explicit_replacement_reports_native_fallback(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        message = normalize(
            {"to": "01012345678", "type": "ALIMTALK", "template_id": "T1", "kakao": {"disable_sms": False}}
        )
        outcome = make_provider().send(message)
        assert sent_messages(fake)[0]["kakaoOptions"]["disableSms"] is False
        assert outcome.native_fallback and outcome.warnings == []

    def test_alimtalk_failover_disabled_sets_disable_sms(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        message = normalize(
            {
                "to": "01012345678",
                "type": "ALIMTALK",
                "template_id": "T1",
                "kakao": {"disableSms": False},
                "failover": {"enabled": False},
            }
        )
        outcome = make_provider().send(message)
        assert sent_messages(fake)[0]["kakaoOptions"]["disableSms"] is True
        assert not outcome.native_fallback and outcome.warnings == []

    def test_friendtalk_text_converts_buttons(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        message = normalize(
            {
                "to": "01012345678",
                "type": "FRIENDTALK",
                "text": "신상품 안내",
                "buttons": [
                    {
                        "name": "보기",
                        "type": "WL",
                        "url_mobile": "https://m.shop.test",
                        "url_pc": "https://shop.test",
                    }
                ],
                "kakao": {"ad_flag": True},
            }
        )
        assert make_provider().send(message).accepted
        (wire,) = sent_messages(fake)
        assert wire["type"] == "CTA"
        assert wire["kakaoOptions"] == {
            "pfId": "KA01PF-TEST",
            "adFlag": True,
            "buttons": [
                {
                    "buttonName": "보기",
                    "buttonType": "WL",
                    "linkMo": "https://m.shop.test",
                    "linkPc": "https://shop.test",
                }
            ],
        }

    def test_friendtalk_image_is_uploaded_as_kakao_with_its_link(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        url = fake.host_file("promo.jpg", JPEG)
        message = normalize(
            {
                "to": "01012345678",
                "type": "FRIENDTALK",
                "text": "이미지 친구톡",
                "image_url": url,
                "kakao": {"image_link": "https://shop.test/promo"},
            }
        )
        outcome = make_provider().send(message)

        upload = requests_to(fake, "/storage/v1/files")[-1].json()
        assert upload == {
            "file": base64.b64encode(JPEG).decode(),
            "type": "KAKAO",
            "name": "promo.jpg",
            "link": "https://shop.test/promo",
        }
        (wire,) = sent_messages(fake)
        assert wire["type"] == "CTI"
        file_id = wire["kakaoOptions"]["imageId"]
        assert fake.files[file_id]["type"] == "KAKAO"
        assert outcome.accepted

    def test_friendtalk_image_without_a_link_is_refused_before_sending(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        message = normalize(
            {
                "to": "01012345678",
                "type": "FRIENDTALK",
                "text": "x",
                "image_url": fake.host_file("a.jpg", JPEG),
            }
        )
        outcome = make_provider().send(message)
        assert not outcome.accepted and outcome.error is not None
        assert outcome.error.code is ErrorCode.INVALID_REQUEST and outcome.error.blame == "message"
        assert requests_to(fake, SEND) == []

    def test_mms_bytes_are_uploaded_once_per_batch(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        data = base64.b64encode(JPEG).decode()
        messages = [
            normalize(
                {
                    "to": f"0101111000{i}",
                    "type": "MMS",
                    "text": "사진",
                    "sender": "0212345678",
                    "media": {"image": {"data_b64": data, "filename": "photo.png", "content_type": "image/png"}},
                }
            )
            for i in range(3)
        ]
        outcomes = make_provider().send_batch(messages)

        uploads = requests_to(fake, "/storage/v1/files")
        assert len(uploads) == 1
        assert uploads[0].json() == {"file": data, "type": "MMS", "name": "photo.png"}
        wires = sent_messages(fake)
        assert {w["imageId"] for w in wires} == set(fake.files)
        assert all(o.accepted for o in outcomes)

    def test_mms_with_an_existing_file_id_skips_the_upload(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        file_id = fake.add_file("MMS")
        message = normalize(
            {"to": "01012345678", "type": "MMS", "text": "사진", "sender": "0212345678", "image_url": file_id}
        )
        assert make_provider().send(message).accepted
        assert sent_messages(fake)[0]["imageId"] == file_id
        assert requests_to(fake, "/storage/v1/files") == []

    def test_nsa_body(self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]) -> None:
        message = normalize(
            {
                "to": "01012345678",
                "type": "NSA",
                "template_id": "NSA-T1",
                "variables": {"a": "1", "b": "2"},
                "naver": {"variables": {"b": "override"}},
            }
        )
        assert make_provider().send(message).accepted
        assert sent_messages(fake)[0]["naverOptions"] == {
            "talkId": "WA-TEST",
            "templateId": "NSA-T1",
            "variables": {"#{a}": "1", "#{b}": "override"},
            "disableSms": True,
        }

    def test_voice_body(self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]) -> None:
        provider = make_provider()
        plain = normalize({"to": "01012345678", "type": "VOICE", "text": "안내 음성", "sender": "0212345678"})
        custom = normalize(
            {
                "to": "01012345678",
                "type": "VOICE",
                "text": "안내",
                "sender": "0212345678",
                "voice": {"voice_type": "MALE", "reply_range": 3, "headerMessage": "안녕하세요"},
            }
        )
        assert all(o.accepted for o in provider.send_batch([plain, custom]))
        first, second = sent_messages(fake)
        assert first["voiceOptions"] == {"voiceType": "FEMALE"}
        assert second["voiceOptions"] == {"voiceType": "MALE", "headerMessage": "안녕하세요", "replyRange": 3}

    def test_fax_uploads_urls_and_keeps_file_ids(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        existing = fake.add_file("FAX", "cover.pdf")
        url = fake.host_file("invoice.pdf", b"%PDF-1.4 fake", "application/pdf")
        message = normalize(
            {
                "to": "0212349999",
                "type": "FAX",
                "sender": "0212345678",
                "fax": {"file_ids": [existing], "file_urls": [url]},
            }
        )
        assert make_provider().send(message).accepted
        uploaded = requests_to(fake, "/storage/v1/files")[-1].json()
        assert (uploaded["type"], uploaded["name"]) == ("FAX", "invoice.pdf")
        ids = sent_messages(fake)[0]["faxOptions"]["fileIds"]
        assert ids[0] == existing and fake.files[ids[1]]["name"] == "invoice.pdf"

    def test_rcs_mms_uses_the_misspelled_imagge_id(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        message = normalize(
            {
                "to": "01012345678",
                "type": "RCS_MMS",
                "text": "RCS 본문",
                "subject": "RCS 제목",
                "sender": "0212345678",
                "media": {"image": {"data_b64": base64.b64encode(JPEG).decode()}},
                "rcs": {"mms_type": "M3", "additional_body": {"description": "설명"}},
            }
        )
        assert make_provider().send(message).accepted
        (wire,) = sent_messages(fake)
        image_id = wire["imageId"]
        assert fake.files[image_id]["type"] == "RCS"
        options = wire["rcsOptions"]
        assert options["brandId"] == "BR-TEST" and options["mmsType"] == "M3" and options["disableSms"] is True
        assert options["additionalBody"] == {"title": "RCS 제목", "description": "설명", "imaggeId": image_id}

    def test_rcs_template_body(self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]) -> None:
        message = normalize(
            {
                "to": "01012345678",
                "type": "RCS_TPL",
                "template_id": "RCS-T1",
                "sender": "0212345678",
                "variables": {"code": "1234"},
                "rcs": {
                    "brand_id": "BR-OWN",
                    "additional_body": {"title": "T", "imageId": "ST01FZ-EXISTING"},
                },
            }
        )
        assert make_provider().send(message).accepted
        options = sent_messages(fake)[0]["rcsOptions"]
        assert options["brandId"] == "BR-OWN" and options["templateId"] == "RCS-T1"
        assert options["variables"] == {"#{code}": "1234"}
        assert options["additionalBody"]["imaggeId"] == "ST01FZ-EXISTING"
        assert "imageId" not in options["additionalBody"]

    def test_the_fake_refuses_the_correct_spelling_of_imagge_id(self, fake: FakeSolapiServer) -> None:
        wire = {
            "to": "01012345678",
            "from": "0212345678",
            "type": "RCS_SMS",
            "text": "x",
            "rcsOptions": {"brandId": "B", "additionalBody": {"title": "t", "imageId": "ST01"}},
        }
        failed = raw_post(fake, {"messages": [wire]}).json()["failedMessageList"]
        assert [f["statusCode"] for f in failed] == ["1011"]

    def test_international_numbers(self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]) -> None:
        provider = make_provider()
        korean = sms(to="+82 10-1234-5678")
        japanese = sms(to="+81 90 1234 5678", country="81")
        unknown = sms(to="+81 90 1234 5679")
        outcomes = provider.send_batch([korean, japanese, unknown])

        wires = sent_messages(fake)
        assert wires[0]["to"] == "01012345678" and "country" not in wires[0]
        assert (wires[1]["to"], wires[1]["country"]) == ("9012345678", "81")
        assert len(wires) == 2
        assert [o.accepted for o in outcomes] == [True, True, False]
        assert outcomes[2].error is not None and outcomes[2].error.blame == "message"

    def test_missing_sender_fails_that_message_only(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        no_sender = normalize({"to": "01011112222", "type": "SMS", "text": "x"})
        outcomes = make_provider().send_batch([no_sender, sms()])
        assert [o.message_id for o in outcomes] == [no_sender.id, outcomes[1].message_id]
        assert not outcomes[0].accepted and outcomes[0].state is DeliveryState.FAILED
        assert outcomes[0].error is not None and outcomes[0].error.code is ErrorCode.INVALID_REQUEST
        assert outcomes[0].error.blame == "message"
        assert outcomes[1].accepted
        assert [w["to"] for w in sent_messages(fake)] == ["01012345678"]
        assert fake.ledger.per_recipient["01011112222"] == 0

    def test_a_future_schedule_goes_top_level_in_korean_time(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        at = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)
        scheduled = sms(scheduled_at=at)
        now = sms(to="01099998888")
        outcomes = make_provider().send_batch([scheduled, now])

        bodies = [r.json() for r in requests_to(fake, SEND)]
        assert len(bodies) == 2  # one request per schedule
        with_date = next(b for b in bodies if "scheduledDate" in b)
        assert datetime.fromisoformat(with_date["scheduledDate"]) == at
        assert with_date["scheduledDate"].endswith("+09:00")
        assert [m["customFields"]["kmsgId"] for m in with_date["messages"]] == [scheduled.id]
        assert all(o.accepted for o in outcomes)


# ------------------------------------------------------------------------------------------------
# send results


class TestSendResults:
    def test_failed_message_list_becomes_a_per_recipient_refusal_with_the_code(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        fake.blocked.add("01033334444")
        fake.senders = {"0212345678"}
        ok = sms(to="01011112222")
        blocked = sms(to="01033334444")
        bad_sender = sms(to="01055556666", sender="0299999999")
        twin = sms(to="01011112222")  # same number again: a different message, also accepted
        outcomes = make_provider().send_batch([ok, blocked, bad_sender, twin])

        assert [o.message_id for o in outcomes] == [ok.id, blocked.id, bad_sender.id, twin.id]
        assert [o.accepted for o in outcomes] == [True, False, False, True]
        assert outcomes[0].provider_message_id != outcomes[3].provider_message_id
        blocked_error, sender_error = outcomes[1].error, outcomes[2].error
        assert blocked_error is not None and sender_error is not None
        assert (blocked_error.code, blocked_error.provider_code, blocked_error.blame) == (
            ErrorCode.RECIPIENT_BLOCKED,
            "1060",
            "message",
        )
        assert (sender_error.code, sender_error.provider_code, sender_error.blame) == (
            ErrorCode.SENDER_NOT_REGISTERED,
            "1062",
            "provider",
        )
        assert isinstance(blocked_error, ProviderRejected)
        assert outcomes[1].state is DeliveryState.FAILED
        assert fake.ledger.per_recipient["01011112222"] == 2
        assert fake.ledger.per_reference[ok.id] == 1 and fake.ledger.per_reference[twin.id] == 1
        assert fake.ledger.requests == 1

    def test_duplicates_refused_when_allow_duplicates_is_off(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        first, second = sms(), sms()
        outcomes = make_provider(allow_duplicates="false").send_batch([first, second])
        assert requests_to(fake, SEND)[-1].json()["allowDuplicates"] is False
        assert [o.accepted for o in outcomes] == [True, False]
        assert outcomes[1].error is not None and outcomes[1].error.provider_code == "1026"

    def test_no_balance_is_insufficient_balance(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        fake.balance = 0
        outcome = make_provider().send(sms())
        assert outcome.error is not None
        assert (outcome.error.code, outcome.error.blame, outcome.error.provider_code) == (
            ErrorCode.INSUFFICIENT_BALANCE,
            "provider",
            "1030",
        )

    @pytest.mark.parametrize(
        ("code", "expected", "blame"),
        [
            ("1030", ErrorCode.INSUFFICIENT_BALANCE, "provider"),
            ("2230", ErrorCode.INSUFFICIENT_BALANCE, "provider"),
            ("1062", ErrorCode.SENDER_NOT_REGISTERED, "provider"),
            ("2062", ErrorCode.SENDER_NOT_REGISTERED, "provider"),
            ("1041", ErrorCode.SENDER_NOT_REGISTERED, "provider"),
            ("3101", ErrorCode.SENDER_NOT_REGISTERED, "provider"),
            ("1042", ErrorCode.TEMPLATE_NOT_FOUND, "message"),
            ("3105", ErrorCode.TEMPLATE_NOT_FOUND, "message"),
            ("1043", ErrorCode.TEMPLATE_MISMATCH, "message"),
            ("3103", ErrorCode.TEMPLATE_MISMATCH, "message"),
            ("1060", ErrorCode.RECIPIENT_BLOCKED, "message"),
            ("1061", ErrorCode.AD_OPTED_OUT, "message"),  # 080 opt-out: goes on the suppression list
            ("2060", ErrorCode.RECIPIENT_BLOCKED, "message"),
            ("2061", ErrorCode.AD_OPTED_OUT, "message"),
            ("1064", ErrorCode.RECIPIENT_BLOCKED, "message"),
            ("2064", ErrorCode.RECIPIENT_BLOCKED, "message"),
            ("1031", ErrorCode.INVALID_REQUEST, "message"),
            ("9999", ErrorCode.PROVIDER_ERROR, "provider"),
        ],
    )
    def test_failed_codes_map_onto_the_taxonomy(self, code: str, expected: ErrorCode, blame: str) -> None:
        def handler(request: httpx.Request) -> httpx.Response:
            (wire,) = json.loads(request.content)["messages"]
            failed = {
                "messageId": "M4V-1",
                "statusCode": code,
                "statusMessage": "x",
                "customFields": wire["customFields"],
            }
            return httpx.Response(
                200, json={"groupInfo": {"groupId": "G1"}, "messageList": [], "failedMessageList": [failed]}
            )

        outcome = mock_provider(handler).send(sms())
        assert outcome.error is not None and isinstance(outcome.error, ProviderRejected)
        assert (outcome.error.code, outcome.error.blame, outcome.error.provider_code) == (
            expected,
            blame,
            code,
        )

    def test_a_platform_error_code_is_transient(self) -> None:
        def handler(request: httpx.Request) -> httpx.Response:
            (wire,) = json.loads(request.content)["messages"]
            failed = {"messageId": "M1", "statusCode": "1024", "customFields": wire["customFields"]}
            return httpx.Response(200, json={"messageList": [], "failedMessageList": [failed]})

        outcome = mock_provider(handler).send(sms())
        assert isinstance(outcome.error, ProviderTransientError)

    def test_results_are_matched_by_custom_fields_not_by_position(self) -> None:
        def handler(request: httpx.Request) -> httpx.Response:
            wires = json.loads(request.content)["messages"]
            accepted = [
                {
                    "messageId": f"M-{w['customFields']['kmsgId']}",
                    "statusCode": "2000",
                    "customFields": w["customFields"],
                }
                for w in reversed(wires[1:])
            ]
            failed = [{"messageId": "M-F", "statusCode": "1060", "customFields": wires[0]["customFields"]}]
            return httpx.Response(
                200,
                json={"groupInfo": {"groupId": "G9"}, "messageList": accepted, "failedMessageList": failed},
            )

        messages = [sms() for _ in range(4)]  # one number: only the custom field tells them apart
        outcomes = mock_provider(handler).send_batch(messages)
        assert [o.message_id for o in outcomes] == [m.id for m in messages]
        assert not outcomes[0].accepted
        for message, outcome in zip(messages[1:], outcomes[1:], strict=True):
            assert outcome.provider_message_id == f"M-{message.id}"
            assert outcome.raw is not None and outcome.raw["groupId"] == "G9"

    def test_messages_missing_from_the_answer_are_unknown_outcomes(self) -> None:
        def handler(request: httpx.Request) -> httpx.Response:
            first = json.loads(request.content)["messages"][0]
            entry = {"messageId": "M1", "statusCode": "2000", "customFields": first["customFields"]}
            return httpx.Response(200, json={"messageList": [entry], "failedMessageList": []})

        outcomes = mock_provider(handler).send_batch([sms(), sms(), sms()])
        assert outcomes[0].accepted
        for outcome in outcomes[1:]:
            assert not outcome.accepted and isinstance(outcome.error, ProviderTimeout)
            assert outcome.error.code is ErrorCode.OUTCOME_UNKNOWN

    def test_a_later_request_failing_never_fails_the_accepted_part(self) -> None:
        calls: list[dict[str, Any]] = []

        def handler(request: httpx.Request) -> httpx.Response:
            body = json.loads(request.content)
            calls.append(body)
            if len(calls) == 2:
                return httpx.Response(503, json={"errorCode": "ServiceUnavailable", "errorMessage": "busy"})
            entries = [
                {"messageId": f"M{i}", "statusCode": "2000", "customFields": w["customFields"]}
                for i, w in enumerate(body["messages"])
            ]
            return httpx.Response(200, json={"messageList": entries, "failedMessageList": []})

        later = sms(scheduled_at=datetime.now(UTC) + timedelta(hours=1))
        outcomes = mock_provider(handler).send_batch([sms(), later])
        assert len(calls) == 2
        assert outcomes[0].accepted
        assert not outcomes[1].accepted and isinstance(outcomes[1].error, ProviderTransientError)
        assert outcomes[1].error.status_code == 503

    def test_an_unreadable_success_answer_is_an_unknown_outcome_not_a_retry(self) -> None:
        provider = mock_provider(lambda request: httpx.Response(200, text="<html>gateway</html>"))
        with pytest.raises(ProviderTimeout) as info:
            provider.send(sms())
        assert info.value.code is ErrorCode.OUTCOME_UNKNOWN

    @pytest.mark.parametrize(
        ("status", "code", "expected", "blame"),
        [
            (400, "ValidationError", ErrorCode.INVALID_REQUEST, "provider"),
            (400, "RecipientsTooMany", ErrorCode.INVALID_REQUEST, "provider"),
            (403, "InvalidAPIKey", ErrorCode.AUTHENTICATION_FAILED, "provider"),
            (402, "NotEnoughBalance", ErrorCode.INSUFFICIENT_BALANCE, "provider"),
            (400, "1062", ErrorCode.SENDER_NOT_REGISTERED, "provider"),
            (404, "SomethingNew", ErrorCode.INVALID_REQUEST, "provider"),
        ],
    )
    def test_http_error_bodies_map_onto_the_taxonomy(
        self, status: int, code: str, expected: ErrorCode, blame: str
    ) -> None:
        provider = mock_provider(
            lambda request: httpx.Response(status, json={"errorCode": code, "errorMessage": "refused"})
        )
        with pytest.raises(ProviderRejected) as info:
            provider.send(sms())
        assert (info.value.code, info.value.blame, info.value.provider_code) == (expected, blame, code)
        assert info.value.status_code == status and info.value.provider_message == "refused"


# ------------------------------------------------------------------------------------------------
# delivery status


class TestStatus:
    @pytest.mark.parametrize(
        ("code", "state"),
        [
            ("2000", DeliveryState.PENDING),
            ("3000", DeliveryState.SENT),
            ("4000", DeliveryState.DELIVERED),
            (4000, DeliveryState.DELIVERED),
            ("3104", DeliveryState.FAILED),
            ("3107", DeliveryState.FAILED),
            ("1062", DeliveryState.FAILED),
            ("2230", DeliveryState.FAILED),
            ("3059", DeliveryState.FAILED),
            (None, DeliveryState.UNKNOWN),
            ("", DeliveryState.UNKNOWN),
            ("TEST1000", DeliveryState.UNKNOWN),
            ("5000", DeliveryState.UNKNOWN),
        ],
    )
    def test_status_code_table(self, code: object, state: DeliveryState) -> None:
        assert map_status_code(code) is state

    def test_statuses_from_the_list_api_in_one_request(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        provider = make_provider()
        numbers = {
            "pending": "01010000001",
            "sent": "01010000002",
            "delivered": "01010000003",
            "non_kakao": "01010000004",
            "dormant": "01010000005",
            "spoofed": "01010000006",
            "by_text": "01010000007",
        }
        fake.ledger.set_rule(numbers["pending"], DeliveryRule(sent_after=3600, final_after=7200))
        fake.ledger.set_rule(numbers["sent"], DeliveryRule(final_after=3600))
        fake.ledger.set_rule(numbers["spoofed"], DeliveryRule(final="FAILED", code="3059"))
        fake.ledger.set_rule(numbers["by_text"], DeliveryRule(final="FAILED", code="3199", message="알림톡 미사용자"))
        fake.fail_alimtalk_for([numbers["non_kakao"]])
        fake.fail_alimtalk_for([numbers["dormant"]], code="3107")  # replaces the first rule function
        fake.ledger.set_rule(numbers["non_kakao"], DeliveryRule(final="FAILED", code="3104"))
        messages = {
            key: normalize({"to": to, "type": "ALIMTALK", "template_id": "T1"})
            if key in ("non_kakao", "dormant")
            else sms(to=to)
            for key, to in numbers.items()
        }
        outcomes = provider.send_batch(list(messages.values()))
        before = len(requests_to(fake, "/messages/v4/list"))

        reports = provider.query_status(
            [query(m, o.provider_message_id) for m, o in zip(messages.values(), outcomes, strict=True)]
        )

        lists = requests_to(fake, "/messages/v4/list")[before:]
        assert len(lists) == 1
        assert sorted(lists[0].query["messageIds"]) == sorted(o.provider_message_id or "" for o in outcomes)
        by_key = {key: next(r for r in reports if r.message_id == m.id) for key, m in messages.items()}
        assert (by_key["pending"].state, by_key["pending"].code) == (DeliveryState.PENDING, "2000")
        assert by_key["pending"].sent_at is None
        assert (by_key["sent"].state, by_key["sent"].code) == (DeliveryState.SENT, "3000")
        assert by_key["sent"].sent_at is not None and by_key["sent"].delivered_at is None
        delivered = by_key["delivered"]
        assert (delivered.state, delivered.code) == (DeliveryState.DELIVERED, "4000")
        assert delivered.delivered_at is not None and delivered.delivered_at.tzinfo is not None
        for key, code in (("non_kakao", "3104"), ("dormant", "3107")):
            report = by_key[key]
            assert (report.state, report.code, report.not_kakao_user) == (DeliveryState.FAILED, code, True)
            assert report.failed_at is not None
        assert (by_key["spoofed"].state, by_key["spoofed"].not_kakao_user) == (DeliveryState.FAILED, False)
        assert by_key["by_text"].not_kakao_user and by_key["by_text"].code == "3199"
        assert by_key["by_text"].raw is not None and "to" not in by_key["by_text"].raw

    def test_a_single_status_uses_message_id(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        provider = make_provider()
        message = sms()
        outcome = provider.send(message)
        (report,) = provider.query_status([query(message, outcome.provider_message_id)])
        request = requests_to(fake, "/messages/v4/list")[-1]
        assert request.query["messageId"] == [outcome.provider_message_id]
        assert report.state is DeliveryState.DELIVERED

    def test_many_statuses_are_chunked(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        provider = make_provider()
        messages = [sms(to=f"0102000{i:04d}") for i in range(130)]
        outcomes = provider.send_batch(messages)
        reports = provider.query_status(
            [query(m, o.provider_message_id) for m, o in zip(messages, outcomes, strict=True)]
        )
        assert len(requests_to(fake, "/messages/v4/list")) == 2
        assert {r.message_id for r in reports} == {m.id for m in messages}

    def test_unknown_messages_are_absent_and_missing_codes_are_unknown(self) -> None:
        def handler(request: httpx.Request) -> httpx.Response:
            return httpx.Response(
                200, json={"messageList": {"M1": {"messageId": "M1"}}, "nextKey": None, "startKey": None}
            )

        provider = mock_provider(handler)
        message = sms()
        reports = provider.query_status([query(message, "M1"), query(sms(), "M2")])
        assert [(r.message_id, r.state) for r in reports] == [(message.id, DeliveryState.UNKNOWN)]

    @staticmethod
    def _listing(failures: dict[str, int], asked: list[str]) -> Callable[[httpx.Request], httpx.Response]:
        """Answer each status request with its ids; one whose first id is in ``failures`` gets a 503
        that many times first (``-1``: always)."""

        def answer(request: httpx.Request) -> httpx.Response:
            ids = request.url.params.get_list("messageIds") or [request.url.params["messageId"]]
            asked.append(ids[0])
            if failures.get(ids[0], 0):
                failures[ids[0]] -= 1
                return httpx.Response(503, json={"errorCode": "Unknown", "errorMessage": "busy"})
            entries = {i: {"messageId": i, "statusCode": "4000"} for i in ids}
            return httpx.Response(200, json={"messageList": entries, "nextKey": None})

        return answer

    def test_a_status_poll_keeps_what_was_answered_when_a_later_request_keeps_failing(self) -> None:
        messages = [sms(to=f"0102200{i:04d}") for i in range(250)]
        queries = [query(m, f"M{i}") for i, m in enumerate(messages)]
        asked: list[str] = []

        reports = mock_provider(self._listing({"M100": -1}, asked)).query_status(queries)

        # The first hundred are reported; the poll stops at the failing request (the rest are "not
        # known yet", asked again by a later sweep) instead of losing the answers it had.
        assert {r.message_id for r in reports} == {m.id for m in messages[:100]}
        assert asked == ["M0", "M100"]
        # When nothing was answered, the error is the caller's (tracking backs those rows off).
        with pytest.raises(ProviderTransientError):
            mock_provider(self._listing({"M0": -1}, [])).query_status(queries)

    def test_the_fake_list_pages_with_next_key(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        outcomes = make_provider().send_batch([sms(to=f"0103000{i:04d}") for i in range(5)])
        header = {"Authorization": authorization_header(API_KEY, API_SECRET)}
        first = httpx.get(fake.url + "/messages/v4/list", params={"limit": 3}, headers=header).json()
        header = {"Authorization": authorization_header(API_KEY, API_SECRET)}
        second = httpx.get(
            fake.url + "/messages/v4/list", params={"limit": 3, "startKey": first["nextKey"]}, headers=header
        ).json()
        assert len(first["messageList"]) == 3 and len(second["messageList"]) == 2 and second["nextKey"] is None
        assert set(first["messageList"]) | set(second["messageList"]) == {o.provider_message_id for o in outcomes}


# ------------------------------------------------------------------------------------------------
# lookup, balance


class TestLookupAndBalance:
    def test_lookup_finds_a_message_whose_answer_was_lost(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        provider = make_provider()
        fake.blocked.add("01044445555")
        lost = [sms(to="01011112222"), sms(to="01044445555")]
        fake.set_faults(lost_response_rate=1.0)
        with pytest.raises(ProviderTimeout):
            provider.send_batch(lost)
        fake.set_faults()

        found = provider.lookup([m.id for m in lost] + ["never-sent"])

        assert set(found) == {m.id for m in lost}
        accepted, refused = found[lost[0].id], found[lost[1].id]
        assert accepted.accepted and accepted.provider_message_id in fake.ledger.entries
        assert not refused.accepted and refused.error is not None
        assert refused.error.code is ErrorCode.RECIPIENT_BLOCKED
        lookup_query = requests_to(fake, "/messages/v4/list")[-1].query
        assert lookup_query["dateType"] == ["CREATED"] and "startDate" in lookup_query

    def test_lookup_that_cannot_finish_raises_instead_of_reporting_absence(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        provider = make_provider(lookup_max_pages=1)
        provider.send_batch([sms(to=f"0104{i:07d}") for i in range(501)])
        with pytest.raises(ProviderTransientError) as info:
            provider.lookup(["not-there"])
        assert info.value.code is ErrorCode.OUTCOME_UNKNOWN

    def test_a_lookup_page_that_fails_is_asked_again_without_rereading_the_others(self) -> None:
        from kmsg_worker.providers.solapi import REFERENCE_FIELD

        asked: list[str | None] = []
        second_page_failures = [2]

        def answer(request: httpx.Request) -> httpx.Response:
            start = request.url.params.get("startKey")
            asked.append(start)
            if start is None:
                entry = {"messageId": "M1", "statusCode": "2000", "customFields": {REFERENCE_FIELD: "other"}}
                return httpx.Response(200, json={"messageList": {"M1": entry}, "nextKey": "K2"})
            if second_page_failures[0]:
                second_page_failures[0] -= 1
                return httpx.Response(503, json={"errorCode": "Unknown", "errorMessage": "busy"})
            entry = {"messageId": "M2", "statusCode": "2000", "customFields": {REFERENCE_FIELD: "wanted"}}
            return httpx.Response(200, json={"messageList": {"M2": entry}, "nextKey": None})

        found = mock_provider(answer).lookup(["wanted"])
        assert found["wanted"].accepted and found["wanted"].provider_message_id == "M2"
        assert asked == [None, "K2", "K2", "K2"]  # the first page once, the second until it answered
        # and with fewer tries than failures, the scan still ends in an error, not in "absent"
        asked.clear()
        second_page_failures[0] = 2
        with pytest.raises(ProviderTransientError):
            mock_provider(answer, lookup_page_tries=2).lookup(["wanted"])
        assert asked == [None, "K2", "K2"]

    def test_a_hinted_lookup_after_a_20000_message_campaign_takes_one_request_per_recipient(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        provider = make_provider(timeout=30.0)
        lost_to, dropped_to = "01099990001", "01099990002"

        def campaign(first: int) -> None:
            # Three of the campaign's messages go to the same number as the lost one: the recipient
            # query must pick ours out by its reference, not by the number.
            batch = [sms(to=f"0104{first + i:07d}") for i in range(9_997)] + [sms(to=lost_to) for _ in range(3)]
            assert all(o.accepted for o in provider.send_batch(batch))

        campaign(0)
        attempted_at = datetime.now(UTC)
        lost, dropped = sms(to=lost_to), sms(to=dropped_to)
        fake.set_faults(lost_response_rate=1.0)  # accepted, then the reply is lost
        with pytest.raises(ProviderTimeout):
            provider.send(lost)
        fake.set_faults(reset_rate=1.0)  # the connection is dropped before Solapi sees the request
        with pytest.raises(ProviderTimeout, match="connection dropped before the response"):
            provider.send(dropped)
        fake.set_faults()
        ended_at = datetime.now(UTC)
        campaign(10_000)
        assert len(fake.ledger.entries) == 20_001
        hints = {m.id: LookupHint.for_message(m, attempted_at, ended_at) for m in (lost, dropped)}
        before = fake.ledger.per_endpoint["GET /messages/v4/list"]

        found = provider.lookup([lost.id, dropped.id], hints)

        assert fake.ledger.per_endpoint["GET /messages/v4/list"] - before == 2  # one per recipient
        assert set(found) == {lost.id} and found[lost.id].accepted
        assert fake.ledger.get(str(found[lost.id].provider_message_id)) is not None
        wire = [r.query for r in requests_to(fake, "/messages/v4/list")[-2:]]
        assert {q["to"][0] for q in wire} == {lost_to, dropped_to}
        assert all(q["from"] == ["0212345678"] and q["type"] == ["SMS"] and "endDate" in q for q in wire)

    def test_an_unhinted_lookup_after_the_same_campaign_is_undecided_within_its_page_bound(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        # Without hints the lookup can only scan the recent window: after 20,001 messages it stops
        # at lookup_max_pages and says "undecided" (never "absent", which would mean a resend).
        provider = make_provider(timeout=30.0, lookup_max_pages=40)
        provider.send(found_one := sms(to="01099990003"))
        for first in (0, 10_000):
            provider.send_batch([sms(to=f"0104{first + i:07d}") for i in range(10_000)])
        before = fake.ledger.per_endpoint["GET /messages/v4/list"]

        with pytest.raises(ProviderLookupUndecided) as info:
            provider.lookup(["never-sent", found_one.id])

        assert fake.ledger.per_endpoint["GET /messages/v4/list"] - before == 40
        assert info.value.code is ErrorCode.OUTCOME_UNKNOWN and info.value.retryable
        assert info.value.undecided == ("never-sent",)
        assert info.value.found[found_one.id].accepted  # what was found is kept: safe to record

    def test_many_recipients_are_looked_up_with_one_window_scan(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        provider = make_provider(timeout=30.0, lookup_max_recipient_queries=50)
        chunk = [sms(to=f"0105{i:07d}") for i in range(600)]
        attempted_at = datetime.now(UTC)
        fake.set_faults(lost_response_rate=1.0)
        with pytest.raises(ProviderTimeout):
            provider.send_batch(chunk)
        fake.set_faults()
        never = sms(to="01099990004")
        hints = {m.id: LookupHint.for_message(m, attempted_at) for m in [*chunk, never]}
        before = fake.ledger.per_endpoint["GET /messages/v4/list"]

        found = provider.lookup([m.id for m in [*chunk, never]], hints)

        assert set(found) == {m.id for m in chunk}
        assert fake.ledger.per_endpoint["GET /messages/v4/list"] - before == 2  # 600 entries, 500 a page
        last = requests_to(fake, "/messages/v4/list")[-1].query
        assert "to" not in last and last["from"] == ["0212345678"] and "startDate" in last and "endDate" in last

    def test_a_lookup_window_excludes_messages_created_outside_the_attempt(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        provider = make_provider()
        message = sms(to="01099990005")
        assert provider.send(message).accepted
        # An attempt that started well after the message was created cannot have created it.
        later = datetime.now(UTC) + timedelta(minutes=10)
        assert provider.lookup([message.id], {message.id: LookupHint.for_message(message, later)}) == {}
        earlier = datetime.now(UTC) - timedelta(seconds=5)
        assert message.id in provider.lookup([message.id], {message.id: LookupHint.for_message(message, earlier)})

    def test_the_fake_replaces_a_failed_alimtalk_by_sms_like_solapi(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        provider = make_provider()
        fake.fail_alimtalk_for(["01066667777"])
        replaced, kept = (
            normalize(
                {
                    "to": to,
                    "type": "ALIMTALK",
                    "template_id": "T1",
                    "text": "주문이 접수되었습니다",
                    "sender": "0212345678",
                    "failover": {"enabled": enabled},
                }
            )
            for to, enabled in (("01066667777", True), ("01066667777", False))
        )
        first, second = provider.send(replaced), provider.send(kept)
        assert first.native_fallback and not second.native_fallback

        listed = httpx.get(
            fake.url + "/messages/v4/list",
            params={"limit": 500},
            headers={"Authorization": authorization_header(API_KEY, API_SECRET)},
        ).json()
        rows: dict[str, Any] = listed["messageList"]
        original = rows[str(first.provider_message_id)]
        assert (original["type"], original["statusCode"], original["replacement"]) == ("ATA", "3104", False)
        (link,) = original["replacements"]
        replacement = rows[link["messageId"]]
        assert (replacement["type"], replacement["statusCode"], replacement["replacement"]) == ("SMS", "4000", True)
        assert replacement["customFields"] == {"kmsgId": replaced.id} and replacement["to"] == "01066667777"
        assert rows[str(second.provider_message_id)]["replacements"] == []  # disableSms: true, no replacement
        # a replacement is Solapi's, not a second acceptance of our message
        assert fake.ledger.per_reference[replaced.id] == 1 and len(fake.replacements) == 1
        assert httpx.get(fake.url + "/_fake/stats").json()["replacements"] == 1
        # and a lookup by our id finds the AlimTalk we sent, not its replacement
        found = provider.lookup([replaced.id], {replaced.id: LookupHint.for_message(replaced, datetime.now(UTC))})
        assert found[replaced.id].provider_message_id == original["messageId"]

    def test_a_replacement_ends_by_its_own_rule(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        fake.fail_alimtalk_for(suffix="7")
        fake.ledger.add_rule(DeliveryRule(final="FAILED", code="3059"), type="SMS", to="01066667777")
        message = normalize(
            {
                "to": "01066667777",
                "type": "ALIMTALK",
                "template_id": "T1",
                "text": "주문이 접수되었습니다",
                "sender": "0212345678",
                "failover": {"enabled": True},
            }
        )
        outcome = make_provider().send(message)
        replacement = fake.replacements[str(outcome.provider_message_id)]
        assert (replacement.type, replacement.rule.final, replacement.rule.code) == ("SMS", "FAILED", "3059")

    def test_balance(self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]) -> None:
        fake.balance = 12_345.5
        provider = make_provider()
        balance = provider.balance()
        assert (balance.amount, balance.currency) == (12_345.5, "KRW")
        assert requests_to(fake, "/cash/v1/balance")
        health = provider.health()
        assert health.ok and "12345.5" in health.detail

    def test_balance_falls_back_to_points(self) -> None:
        provider = mock_provider(lambda request: httpx.Response(200, json={"balance": None, "point": 700}))
        assert provider.balance().amount == 700.0

    def test_provider_declares_its_capabilities_and_secrets(self) -> None:
        caps = SolapiProvider.capabilities
        assert caps.bulk_limit == 10_000 and caps.bulk_status and caps.lookup_by_reference
        assert caps.alimtalk_fallback == "partial" and caps.file_upload and caps.balance
        assert SolapiProvider.credential_keys == SolapiProvider.required_credentials == {"api_key", "api_secret"}
        assert SolapiProvider.default_base_url == "https://api.solapi.com"


# ------------------------------------------------------------------------------------------------
# the fake's own rules


class TestFakeServer:
    def test_bad_shapes_are_validation_errors(self, fake: FakeSolapiServer) -> None:
        bodies: list[Any] = [{}, {"messages": []}, {"messages": ["x"]}, {"messages": [{}], "unknownField": 1}, [1]]
        for body in bodies:
            response = raw_post(fake, body)
            assert response.status_code == 400, body
            assert response.json()["errorCode"] == "ValidationError"

    def test_more_than_ten_thousand_is_recipients_too_many(self, fake: FakeSolapiServer) -> None:
        wire = {"to": "01012345678", "from": "0212345678", "text": "x"}
        response = raw_post(fake, {"messages": [wire] * 10_001})
        assert response.status_code == 400 and response.json()["errorCode"] == "RecipientsTooMany"
        assert fake.ledger.entries == {}

    def test_intake_codes(self, fake: FakeSolapiServer) -> None:
        base = {"to": "01012345678", "from": "0212345678", "type": "SMS", "text": "x"}
        cases = [
            ({**base, "from": None}, "1010"),
            ({**base, "to": "12-ab"}, "1011"),
            ({**base, "subject": "제목"}, "1013"),
            ({**base, "type": "XMS"}, "1025"),
            ({**base, "text": "가" * 46}, "1031"),
            ({**base, "customFields": {"k": 1}}, "1032"),
            ({**base, "kakaoOptions": {"pfId": "P"}}, "1033"),
            ({**base, "type": "MMS", "imageId": "ST01-missing"}, "1034"),
            ({**base, "type": "ATA", "kakaoOptions": {"pfId": "P"}}, "1010"),
            ({**base, "type": "CTA", "kakaoOptions": {"pfId": "P", "buttons": [{}] * 6}}, "1050"),
            ({**base, "type": "VOICE", "voiceOptions": {"voiceType": "ROBOT"}}, "1011"),
        ]
        body = {"messages": [case for case, _ in cases], "showMessageList": True}
        answer = raw_post(fake, body).json()
        assert [f["statusCode"] for f in answer["failedMessageList"]] == [code for _, code in cases]
        assert answer["messageList"] == []
        assert answer["groupInfo"]["count"]["registeredFailed"] == len(cases)
        assert fake.ledger.rejected == len(cases)

    def test_auto_detected_type_and_group_info(self, fake: FakeSolapiServer) -> None:
        wire = {
            "to": "01012345678",
            "from": "0212345678",
            "text": "가" * 46,
            "customFields": {"kmsgId": "ref-1"},
        }
        answer = raw_post(fake, {"messages": [wire], "showMessageList": True}).json()
        (entry,) = answer["messageList"]
        assert fake.ledger.entries[entry["messageId"]].type == "LMS"
        assert answer["groupInfo"]["count"]["registeredSuccess"] == 1
        assert re.fullmatch(r"M4V\d{14}[A-Z0-9]{15}", entry["messageId"])
        assert fake.ledger.per_reference["ref-1"] == 1

    def test_reset_forgets_everything(
        self, fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
    ) -> None:
        make_provider().send(sms())
        assert httpx.post(fake.url + "/_fake/reset").status_code == 200
        assert fake.ledger.entries == {} and not fake.groups and not fake.recorded

    def test_throughput_of_bulk_sends(self, fake: FakeSolapiServer) -> None:
        # A generous floor only (the real figure is measured outside the test suite): the fake must
        # never be what limits a benchmark.
        per_request, requests = 5_000, 3
        bodies = [
            json.dumps(
                {
                    "messages": [
                        {
                            "to": f"010{r:02d}{i:06d}",
                            "from": "0212345678",
                            "type": "SMS",
                            "text": "인증번호 [123456] 입니다",
                            "customFields": {"kmsgId": f"{r}-{i}"},
                        }
                        for i in range(per_request)
                    ],
                    "allowDuplicates": True,
                    "showMessageList": True,
                },
                ensure_ascii=False,
            ).encode()
            for r in range(requests)
        ]
        with httpx.Client(timeout=30) as client:
            started = time.perf_counter()
            for body in bodies:
                headers = {
                    "Content-Type": "application/json",
                    "Authorization": authorization_header(API_KEY, API_SECRET),
                }
                assert client.post(fake.url + SEND, content=body, headers=headers).status_code == 200
            rate = per_request * requests / (time.perf_counter() - started)
        print(f"fake solapi: {rate:,.0f} msgs/s")
        assert len(fake.ledger.entries) == per_request * requests
        assert rate > 5_000


# ------------------------------------------------------------------------------------------------
# registered sender numbers


def test_registered_senders_come_from_the_sender_id_api(
    fake: FakeSolapiServer, make_provider: Callable[..., SolapiProvider]
) -> None:
    provider = make_provider()
    # A fake without a configured list cannot tell (404): the adapter raises, the registry reads
    # that as "not known" and does not refuse anything
    with pytest.raises(ProviderError):
        provider.registered_senders()
    fake.senders = {"0212345678", "0311112222"}
    assert provider.registered_senders() == frozenset({"0212345678", "0311112222"})
    request = requests_to(fake, "/senderid/v1/numbers")[-1]
    assert request.method == "GET" and request.headers["authorization"].startswith("HMAC-SHA256")


# ------------------------------------------------------------------------------------------------
# live (opt-in)

LIVE_KEY = os.environ.get("KMSG_SOLAPI_LIVE_API_KEY")
LIVE_SECRET = os.environ.get("KMSG_SOLAPI_LIVE_API_SECRET")


@pytest.mark.skipif(
    not (LIVE_KEY and LIVE_SECRET),
    reason="live Solapi: set KMSG_SOLAPI_LIVE_API_KEY and KMSG_SOLAPI_LIVE_API_SECRET to run (balance only)",
)
class TestLiveSolapi:
    def test_balance_against_the_real_api(self) -> None:
        assert LIVE_KEY and LIVE_SECRET
        with make_http_client() as client:
            config = ProviderConfig(name="solapi", credentials={"api_key": LIVE_KEY, "api_secret": LIVE_SECRET})
            balance = SolapiProvider(config, client).balance()
        assert balance.amount >= 0 and balance.currency == "KRW"
