"""Personal data and secrets stay where they belong.

Phone numbers and message text live only in the system of record: never in task arguments (what
the broker and Flower show), never unmasked in logs at INFO and above, never in exception messages.
Provider credentials and database passwords appear nowhere: not in logs, errors or reprs.

The end-to-end test seeds distinctive numbers, a distinctive text and distinctive secrets, runs a
single send, two failing sends (a provider answering 503, an unknown AlimTalk template), a bulk
batch and producer-side validation errors through real worker processes against the fake
providers, and searches everything that leaves the database: broker payloads (snapshotted before
and while the workers consume), worker and beat logs, the producer's log output, exception texts
and reprs.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from kmsg_worker import KMsg, ValidationError
from kmsg_worker.dispatch import NullDispatcher
from kmsg_worker.logging import get_logger
from kmsg_worker.pii import mask_phone
from kmsg_worker.runtime import Runtime
from kmsg_worker.settings import Settings
from kmsg_worker.storage.db import make_engine
from kmsg_worker.storage.repo import Store
from kmsg_worker.storage.rows import new_message_row
from kmsg_worker.testing.fake_aligo import FakeAligoServer
from kmsg_worker.testing.fake_iwinv import FakeIwinvServer
from kmsg_worker.testing.fake_solapi import FakeSolapiServer
from kmsg_worker.testing.fakeserver import FakeProviderServer
from kmsg_worker.testing.servers import fake_env
from tests.conftest import Cluster, truncate, wait_until

# -- the seeds ---------------------------------------------------------------------------------------

#: Seeded numbers as callers write them; each one's middle and last four digits are distinctive.
PHONES = {
    "single": "010-7391-4826",
    "failing": "+82 10-5528-6139",
    "template": "01063057214",
    "bulk1": "010 8462 1937",
    "bulk2": "010.2746.3851",
    "bulk3": "+821094173268",
    "invalid": "010-4518-22970",  # one digit too many: a validation error
    "log": "010-3817-6624",
}
TEXT = "PIIcanary 비밀문구입니다 zq7x"
NAME = "NAMEcanary"
SECRETS = {
    "KMSG_SOLAPI_API_KEY": "solkey-canary-Q1w2E3r4",
    "KMSG_SOLAPI_API_SECRET": "solsecret-canary-T5y6U7i8",
    "KMSG_IWINV_API_KEY": "iwkey-canary-A9s8D7f6",
    "KMSG_IWINV_SMS_API_KEY": "iwsmskey-canary-G5h4J3k2",
    "KMSG_IWINV_SMS_AUTH_KEY": "iwsmsauth-canary-L1z2X3c4",
    "KMSG_ALIGO_API_KEY": "aligokey-canary-V5b6N7m8",
}
DB_PASSWORD = "dbpass-canary-P0o9I8u7"


def _digits(number: str) -> str:
    return re.sub(r"\D", "", number)


def phone_patterns(number: str) -> re.Pattern[str]:
    """The middle and last four digits with any separator: every spelling (hyphens, spaces, +82, bare)."""
    digits = _digits(number)[-8:]
    return re.compile(rf"{digits[:4]}[\s\-.)]{{0,2}}{digits[4:]}")


def text_needles(text: str) -> list[str]:
    """A text's distinctive pieces, raw and as JSON escapes (JSON logs escape non-ASCII)."""
    pieces = [p for p in text.split() if len(p) >= 4]
    escaped = [json.dumps(p)[1:-1] for p in pieces]
    return pieces + escaped + [e.upper().replace("\\U", "\\u") for e in escaped]


def secret_needles(secrets: Iterable[str]) -> list[str]:
    out = []
    for secret in secrets:
        out += [secret, base64.b64encode(secret.encode()).decode().rstrip("=")]
    return out


def find_leaks(haystack: str, *, phones: Iterable[str], texts: Iterable[str], secrets: Iterable[str]) -> list[str]:
    """Every seeded value found in ``haystack``, with a little context."""
    leaks = []
    for number in phones:
        for m in phone_patterns(number).finditer(haystack):
            leaks.append(f"phone {number!r}: ...{haystack[max(0, m.start() - 80) : m.end() + 40]}...")
    for needle in [*(n for t in texts for n in text_needles(t)), *secret_needles(secrets)]:
        at = haystack.find(needle)
        if at >= 0:
            leaks.append(f"{needle!r}: ...{haystack[max(0, at - 80) : at + len(needle) + 40]}...")
    return leaks


# -- the configured log chain (in-process) -----------------------------------------------------------


def render(method: str, **event: Any) -> str:
    """Run one event through the configured structlog processors, renderer included."""
    get_logger("kmsg.test")  # configures the defaults on first use
    result: Any = dict(event)
    try:
        for processor in structlog.get_config()["processors"]:
            result = processor(None, method, result)
    except structlog.DropEvent:
        return ""
    return result if isinstance(result, str) else json.dumps(result, default=str)


def test_logs_mask_numbers_in_every_spelling_and_place() -> None:
    numbers = ["010-3817-6624", "01038176624", "010 3817 6624", "010.3817.6624", "(010) 3817-6624"]
    international = ["+821038176624", "+82 10-3817-6624", "+82 10 3817 6624", "+8201038176624", "821038176624"]
    lines = []
    for number in numbers + international:
        lines += [
            render("info", event="message.test", to=number),
            render("warning", event="message.test", error=f"provider said: invalid receiver {number}"),
            render("info", event="message.test", note=f"수신번호{number}확인"),  # Hangul right against it
            render("info", event="message.test", note=f"to_{number}_x"),
            render("error", event="message.test", payload={"to": number, "list": [number, (number,)]}),
        ]
        try:
            raise RuntimeError(f"could not send to {number}")
        except RuntimeError:
            lines.append(render("error", event="message.test", exc_info=True))
    output = "\n".join(lines)
    assert not find_leaks(output, phones=["010-3817-6624"], texts=[], secrets=[]), output
    # the masked forms are there, so the events themselves were not dropped
    assert "010****6624" in output and "could not send to 010****6624" in output and "to_010****6624_x" in output
    assert json.dumps("수신번호010****6624확인") in output


def test_library_log_records_are_masked_too() -> None:
    """Celery's, kombu's and httpx's records go through the standard library, not structlog."""
    import io
    import logging

    from kmsg_worker.logging import stdlib_formatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(stdlib_formatter())
    library = logging.getLogger("tests.pii.library")
    library.addHandler(handler)
    library.propagate = False
    try:
        library.warning("HTTP Request: GET https://api.example/list?to=%s", "+82 10-3817-6624")
        try:
            raise ValueError("receiver 010-3817-6624 rejected")
        except ValueError:
            library.exception("Task kmsg.send_message[abc] raised unexpected")
    finally:
        library.removeHandler(handler)
    output = stream.getvalue()
    assert not find_leaks(output, phones=["010-3817-6624"], texts=[], secrets=[]), output
    records = [json.loads(line) for line in output.splitlines()]
    assert [r["level"] for r in records] == ["warning", "error"]
    assert records[0]["logger"] == "tests.pii.library" and "6624" in records[0]["event"]  # masked, still there
    assert "receiver 010****6624 rejected" in records[1]["exception"]


def test_masking_leaves_ids_and_timestamps_alone() -> None:
    message_id = "f64a64fbddf64253afb8f5c7ecf6f887"
    line = render(
        "info", event="message.test", message_id=message_id, at="2026-11-23T15:06:09.726757+00:00", count="12345"
    )
    assert message_id in line and "2026-11-23T15:06:09.726757+00:00" in line and "12345" in line
    assert mask_phone("01038176624") == "010****6624"


def _seeded_settings(tmp_path: Path, url: str) -> Settings:
    env = {
        "KMSG_VAR_DIR": str(tmp_path / "var"),
        "KMSG_DATABASE_URL": url,
        "KMSG_PROVIDERS": "solapi,iwinv,aligo",
        "KMSG_DEFAULT_SENDER": "0212345678",
        "KMSG_ALIGO_USER_ID": "fakeuser",
        "KMSG_IWINV_SMS_COMPANY_ID": "fake-company",
        **SECRETS,
    }
    return Settings.from_env(env)


def _with_password(url: str, password: str) -> str:
    """``url`` with a password in it (the test PostgreSQL trusts local connections and ignores it)."""
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user.split(':')[0]}:{password}@{host}"


def _producer_errors(kmsg: KMsg) -> list[ValidationError]:
    bad: list[dict[str, Any]] = [
        {"to": PHONES["invalid"], "text": TEXT},
        {"to": PHONES["single"], "type": "SMS", "text": TEXT * 10},
        {"to": PHONES["single"], "text": TEXT, "sender": PHONES["invalid"] + "#"},
        {"to": PHONES["single"], "text": TEXT, "scheduled_at": "not a time " + TEXT},
        {"to": PHONES["single"], "text": TEXT, "type": "ALIMTALK"},
        {"to": PHONES["single"], "text": TEXT, "provider_id": "nope"},
        {"to": PHONES["single"], "text": TEXT, "idempotency_key": "k" * 300},
        {"to": PHONES["single"], "text": TEXT, "kakao": {"a": b"\x00" + TEXT.encode()}},
    ]
    errors = []
    for raw in bad:
        with pytest.raises(ValidationError) as info:
            kmsg.send(raw)
        errors.append(info.value)
    return errors


def _describe(errors: Iterable[BaseException]) -> str:
    return "\n".join(f"{e!s} | {e!r} | {getattr(e, 'as_dict', dict)()}" for e in errors)


@pytest.mark.integration
def test_errors_and_reprs_hold_no_numbers_text_or_secrets(tmp_path: Path, pg_url: str) -> None:
    truncate(pg_url)
    settings = _seeded_settings(tmp_path, _with_password(pg_url, DB_PASSWORD))
    rt = Runtime(settings, dispatcher=NullDispatcher())
    try:
        kmsg = KMsg(runtime=rt)
        errors: list[BaseException] = list(_producer_errors(kmsg))
        # A storage error: the database must not echo the row (number and text) in its message.
        receipt = kmsg.send(to=PHONES["single"], text=TEXT)
        message = kmsg.validate(to=PHONES["single"], text=TEXT, id=receipt.message_id)
        row = new_message_row(message, ["solapi"], rt.now())
        with pytest.raises(Exception) as storage:
            rt.store.insert_messages([row], now=rt.now())
        errors.append(storage.value)
        with pytest.raises(ValidationError) as duplicate:
            kmsg.send(to=PHONES["single"], text=TEXT, id=receipt.message_id)
        errors.append(duplicate.value)
        reprs = [repr(settings), repr(rt), repr(kmsg), repr(rt.store.engine), str(rt.store.engine.url)]
        reprs += [repr(settings.provider_config(name)) for name in settings.providers]
        reprs += [repr(rt.provider(name)) for name in settings.providers]
        haystack = _describe(errors) + "\n" + "\n".join(reprs)
        leaks = find_leaks(haystack, phones=PHONES.values(), texts=[TEXT], secrets=[*SECRETS.values(), DB_PASSWORD])
        assert not leaks, "\n".join(leaks)
        assert "solapi" in haystack and "to: must be" in haystack  # the texts are there, only without the data
    finally:
        rt.close()
        truncate(pg_url)


# -- end to end --------------------------------------------------------------------------------------


def _decode(raw: bytes | str) -> Iterator[str]:
    """A broker value as text, with every base64 task body decoded (the body is where arguments are)."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    yield text
    try:
        value = json.loads(text)
    except ValueError:
        return
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            body = item.get("body")
            if isinstance(body, str) and (item.get("properties") or {}).get("body_encoding") == "base64":
                yield base64.b64decode(body).decode("utf-8", "replace")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def snapshot(broker: Any, prefix: str = "") -> list[str]:
    """Every key and value of this test's broker (queues, unacked hash, bindings ...)."""
    out: list[str] = []
    for key in broker.scan_iter(match=f"{prefix}*", count=500):
        kind = broker.type(key).decode()
        values: list[Any] = []
        if kind == "list":
            values = broker.lrange(key, 0, -1)
        elif kind == "hash":
            values = [v for pair in broker.hgetall(key).items() for v in pair]
        elif kind == "set":
            values = list(broker.smembers(key))
        elif kind == "zset":
            values = broker.zrange(key, 0, -1)
        elif kind == "string":
            values = [broker.get(key)]
        out.append(key.decode("utf-8", "replace"))
        for value in values:
            if value is not None:
                out.extend(_decode(value))
    return out


PRODUCER = """
import json
from kmsg_worker import KMsg, ValidationError

seeds = json.loads({seeds!r})
phones, text, name = seeds["phones"], seeds["text"], seeds["name"]
k = KMsg()
ids = {{
    "single": k.send(to=phones["single"], text=text).message_id,
    "failing": k.send(to=phones["failing"], text=text, provider_id="aligo").message_id,
    "template": k.send(
        to=phones["template"], type="ALIMTALK", template_id="NO_SUCH_TEMPLATE", text=text, provider_id="solapi"
    ).message_id,
}}
batch = k.send_many(
    [{{"to": phones[n], "variables": {{"name": name}}}} for n in ("bulk1", "bulk2", "bulk3")],
    defaults={{"text": "#{{name}} " + text, "type": "LMS"}},
)
errors = []
for raw in [
    {{"to": phones["invalid"], "text": text}},
    {{"to": phones["single"], "type": "SMS", "text": text * 10}},
    {{"to": phones["single"], "text": text, "sender": phones["invalid"] + "#"}},
    {{"to": phones["single"], "text": text, "provider_id": "nope"}},
]:
    try:
        k.send(raw)
    except ValidationError as exc:
        errors.append([str(exc), repr(exc), exc.as_dict()])
try:
    k.send_many([{{"to": phones["invalid"]}}], defaults={{"text": text}}, on_invalid="reject")
except ValidationError as exc:
    errors.append([str(exc), repr(exc), [e.__dict__ for e in exc.errors]])
rt = k.runtime
reprs = [repr(rt.settings), repr(rt), repr(k)] + [repr(rt.provider(n)) for n in rt.settings.providers]
print(json.dumps({{"ids": ids, "batch": batch.message_ids, "errors": errors, "reprs": reprs}}))
"""


def _start_fakes() -> dict[str, FakeProviderServer]:
    return {
        "solapi": FakeSolapiServer(
            api_key=SECRETS["KMSG_SOLAPI_API_KEY"], api_secret=SECRETS["KMSG_SOLAPI_API_SECRET"], templates=["TPL_OK"]
        ).start(),
        "iwinv": FakeIwinvServer(
            api_key=SECRETS["KMSG_IWINV_API_KEY"],
            sms_api_key=SECRETS["KMSG_IWINV_SMS_API_KEY"],
            sms_auth_key=SECRETS["KMSG_IWINV_SMS_AUTH_KEY"],
        ).start(),
        "aligo": FakeAligoServer(api_key=SECRETS["KMSG_ALIGO_API_KEY"]).start(),
    }


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.integration
def test_no_number_text_or_secret_leaves_the_system_of_record(cluster: Cluster, pg_url: str) -> None:
    import redis

    fakes = _start_fakes()
    try:
        # The failing send: Aligo answers every request with 503 (retried, then failed).
        fakes["aligo"].set_faults(error_rate=1.0, error_status=503)
        cluster.env.update(fake_env(fakes))
        cluster.env.update(SECRETS)
        cluster.env.update(
            {
                "KMSG_PROVIDERS": "solapi,iwinv,aligo",
                "KMSG_DATABASE_URL": _with_password(pg_url, DB_PASSWORD),
                "KMSG_RETRY_MAX_ATTEMPTS": "2",
                "KMSG_CIRCUIT_ENABLED": "false",
                "KMSG_LOG_LEVEL": "INFO",
            }
        )
        seeds = json.dumps({"phones": PHONES, "text": TEXT, "name": NAME})
        # 1. Publish with no worker running, and look at the broker as Flower would.
        produced = cluster.run_python(PRODUCER.format(seeds=seeds), timeout=60)
        assert produced.returncode == 0, produced.stderr[-3000:]
        result = json.loads(produced.stdout.strip().splitlines()[-1])
        broker = redis.Redis.from_url(cluster.env["KMSG_BROKER_URL"])
        prefix = cluster.env.get("KMSG_BROKER_KEY_PREFIX", "")
        queued = snapshot(broker, prefix)
        assert any("kmsg.send_message" in v for v in queued) and any("kmsg.send_chunk" in v for v in queued)
        assert len(result["errors"]) == 5 and len(result["batch"]) == 3

        # 2. Workers and beat take over; the unacked hash is snapshotted while they work.
        cluster.start_worker(concurrency=2)
        cluster.start_beat()
        store = Store(make_engine(cluster.env["KMSG_DATABASE_URL"]))
        ids = result["ids"]
        want_final = {"failing": {"failed"}, "template": {"failed"}}
        in_flight: list[str] = []

        def done() -> bool:
            in_flight.extend(snapshot(broker, prefix))
            status = {k: (r.status if (r := store.get(m)) else "missing") for k, m in ids.items()}
            batch = [(r.status if (r := store.get(m)) else "missing") for m in result["batch"]]
            return (
                status["single"] in {"sent", "delivered"}
                and all(status[k] in v for k, v in want_final.items())
                and all(s in {"sent", "delivered"} for s in batch)
            )

        wait_until(done, 50, interval=0.3, what="every message sent or failed")
        time.sleep(1.0)  # let the tracking poll and the sweeps log once more
    finally:
        cluster.stop()
        for fake in fakes.values():
            fake.stop()

    logs = {p.name: p.read_text(errors="replace") for p in sorted(cluster.var_dir.glob("*.log"))}
    worker_log = "\n".join(logs.values())
    # The error paths really ran and logged (a test that finds nothing must have looked somewhere).
    assert "message.attempt_failed" in worker_log and "message.failed" in worker_log, worker_log[-3000:]
    assert "message.sent" in worker_log and "batch" in worker_log
    sources = {
        "broker before consumption": "\n".join(queued),
        "broker while consuming": "\n".join(in_flight),
        "producer exceptions": json.dumps(result["errors"], ensure_ascii=False),
        "reprs": "\n".join(result["reprs"]),
        "producer log": produced.stderr,
        **{f"log {name}": text for name, text in logs.items()},
    }
    leaks = [
        f"[{where}] {leak}"
        for where, text in sources.items()
        for leak in find_leaks(
            text, phones=PHONES.values(), texts=[TEXT, NAME], secrets=[*SECRETS.values(), DB_PASSWORD]
        )
    ]
    assert not leaks, "\n".join(leaks[:20])
    # Controls: the search looked at real payloads and logs, and finds the seeds where they belong.
    assert (
        '"message_id"' in sources["broker before consumption"] and '"batch_id"' in sources["broker before consumption"]
    )
    assert "message.accepted" in produced.stderr
    row = store.get(ids["single"])
    assert row is not None and row.recipient == _digits(PHONES["single"]) and row.content["text"] == TEXT
    stored = json.dumps(row.content) + json.dumps(row.content, ensure_ascii=False)
    assert len(find_leaks(stored, phones=[PHONES["single"]], texts=[TEXT], secrets=[])) >= 3
