"""What a caller or an operator gets wrong is refused early and plainly, and no secret is echoed.

Database URLs are shown with the password masked; tenant ids are checked at the producer (they label
metrics); an AlimTalk that no provider of its route could address to a Kakao channel is refused
before it is stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from kmsg_worker.errors import BatchValidationError, ConfigurationError, ValidationError
from kmsg_worker.message import DEFAULT_TENANT, check_tenant, normalize
from kmsg_worker.producer import KMsg
from kmsg_worker.runtime import Runtime
from kmsg_worker.settings import Settings, mask_url
from kmsg_worker.storage.db import make_engine
from kmsg_worker.storage.models import MessageRow
from tests.conftest import RecordingDispatcher

SECRET = "s3cr3t-Pa55"

# -- URLs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"mysql://kmsg:{SECRET}@db:3306/kmsg", "mysql://kmsg:***@db:3306/kmsg"),
        (f"postgresql+psycopg://kmsg:{SECRET}@db/kmsg", "postgresql+psycopg://kmsg:***@db/kmsg"),
        (f"redis://:{SECRET}@redis:6379/0", "redis://:***@redis:6379/0"),
        # Not parsable as a URL (an '@' and a '//' inside the password): still masked
        (f"postgresql://kmsg:a@b//{SECRET}@db/kmsg", "postgresql://kmsg:***@db/kmsg"),
        (f"kmsg:{SECRET}@db/kmsg", "kmsg:***@db/kmsg"),
        (f"postgresql://db/kmsg?user=kmsg&password={SECRET}", "postgresql://db/kmsg?user=kmsg&password=***"),
        ("sqlite:///var/kmsg.sqlite", "sqlite:///var/kmsg.sqlite"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
    ],
)
def test_mask_url_hides_every_password(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_an_unsupported_database_scheme_is_refused_without_its_password(tmp_path: Path) -> None:
    url = f"mysql://kmsg:{SECRET}@db:3306/kmsg"
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({"KMSG_VAR_DIR": str(tmp_path), "KMSG_DATABASE_URL": url})
    assert SECRET not in str(caught.value) and "mysql://kmsg:***@db:3306/kmsg" in str(caught.value)
    assert caught.value.variable == "KMSG_DATABASE_URL"


def test_a_malformed_database_url_is_refused_without_its_password() -> None:
    # Passes the scheme check, fails SQLAlchemy's parser: neither the error nor its cause shows it
    url = f"postgresql:/kmsg:{SECRET}@db/kmsg"
    with pytest.raises(ConfigurationError) as caught:
        make_engine(url)
    assert SECRET not in str(caught.value) and "***" in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


# -- tenants ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tenant", ["acme", "shop-1.kr", "A_b.C-9", "x" * 64])
def test_a_well_formed_tenant_is_kept(tenant: str) -> None:
    assert normalize({"to": "01012345678", "text": "hi", "tenant": tenant}).tenant == tenant


@pytest.mark.parametrize("tenant", [None, ""])
def test_no_tenant_is_the_default_one(tenant: str | None) -> None:
    assert normalize({"to": "01012345678", "text": "hi", "tenant": tenant}).tenant == DEFAULT_TENANT


@pytest.mark.parametrize("tenant", ["acme\tcorp", "line\nbreak", "x" * 65, "고객사", "a b", "a/b", "a:b", 7, "a\x00"])
def test_a_tenant_outside_the_rule_is_refused_naming_field_and_rule(tenant: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        normalize({"to": "01012345678", "text": "hi", "tenant": tenant})
    assert caught.value.field == "tenant"
    rule = "type" if isinstance(tenant, int) else "invalid_character" if "\x00" in tenant else "format"
    assert caught.value.rule == rule
    if rule == "format":
        assert "[A-Za-z0-9_.-]{1,64}" in str(caught.value)


def test_check_tenant_names_the_field_it_is_given() -> None:
    with pytest.raises(ValidationError) as caught:
        check_tenant("bad tenant", "send_many.tenant")
    assert caught.value.field == "send_many.tenant"


def test_the_producer_stores_nothing_for_a_bad_tenant(kmsg: KMsg, dispatcher: RecordingDispatcher) -> None:
    with pytest.raises(ValidationError, match="tenant"):
        kmsg.send(to="01012345678", text="hi", tenant="evil\ntenant")
    with kmsg.runtime.store.sessions() as s:
        assert s.scalar(select(func.count()).select_from(MessageRow)) == 0
    assert dispatcher.sends == []


# -- AlimTalk's Kakao channel ----------------------------------------------------------------------

ALIMTALK = {"type": "ALIMTALK", "to": "01012345678", "template_id": "T1", "variables": {"name": "kim"}}


def _producer(tmp_path: Path, backend_url: str, **env: str) -> KMsg:
    values = {
        "KMSG_VAR_DIR": str(tmp_path / "var"),
        "KMSG_DATABASE_URL": backend_url,
        "KMSG_SOLAPI_API_KEY": "k",
        "KMSG_SOLAPI_API_SECRET": "s",
        "KMSG_ALIGO_API_KEY": "k",
        **env,
    }
    return KMsg(runtime=Runtime(Settings.from_env(values), dispatcher=RecordingDispatcher()))


def _count(kmsg: KMsg) -> int:
    with kmsg.runtime.store.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(MessageRow)) or 0)


def test_an_alimtalk_without_any_kakao_channel_is_refused_naming_the_field(tmp_path: Path, backend_url: str) -> None:
    with _producer(tmp_path, backend_url, KMSG_PROVIDERS="solapi,aligo") as kmsg:
        with pytest.raises(ValidationError) as caught:
            kmsg.send(ALIMTALK)
        assert caught.value.field == "kakao.profile_id" and caught.value.rule == "required"
        # The operator is told both ways to fix it
        assert "KMSG_SOLAPI_KAKAO_PF_ID" in str(caught.value) and "KMSG_ALIGO_SENDER_KEY" in str(caught.value)
        # The bulk path applies the same rule, row by row
        with pytest.raises(BatchValidationError) as batch:
            kmsg.send_many([{"to": "01012345678"}], defaults={k: v for k, v in ALIMTALK.items() if k != "to"})
        assert batch.value.errors[0].field == "kakao.profile_id"
        assert _count(kmsg) == 0


@pytest.mark.parametrize(
    ("env", "extra"),
    [
        ({"KMSG_PROVIDERS": "solapi"}, {"kakao": {"profile_id": "KA01PF"}}),  # named in the message
        ({"KMSG_PROVIDERS": "solapi"}, {"kakao": {"pfId": "KA01PF"}}),  # Solapi's own spelling
        ({"KMSG_PROVIDERS": "solapi", "KMSG_SOLAPI_KAKAO_PF_ID": "KA01PF"}, {}),  # the provider's default
        ({"KMSG_PROVIDERS": "aligo", "KMSG_ALIGO_SENDER_KEY": "sk"}, {}),
        # IWINV's key is bound to its channel: a route through it can always address the message
        ({"KMSG_PROVIDERS": "solapi,iwinv", "KMSG_IWINV_API_KEY": "k"}, {}),
        ({"KMSG_PROVIDERS": "mock"}, {}),
    ],
)
def test_an_alimtalk_with_a_kakao_channel_is_accepted(
    tmp_path: Path, backend_url: str, env: dict[str, str], extra: dict[str, Any]
) -> None:
    with _producer(tmp_path, backend_url, **env) as kmsg:
        receipt = kmsg.send({**ALIMTALK, **extra})
        assert receipt.status == "queued" and _count(kmsg) == 1


def test_aligo_does_not_read_solapis_spelling_of_the_channel(tmp_path: Path, backend_url: str) -> None:
    with _producer(tmp_path, backend_url, KMSG_PROVIDERS="aligo") as kmsg, pytest.raises(ValidationError):
        kmsg.send({**ALIMTALK, "kakao": {"pfId": "KA01PF"}})
