"""Start all fake provider servers at once, and the settings that point adapters at them.

Used by ``kmsg fake-providers``, the end-to-end tests and the benchmarks, so every one of them
agrees on the fakes' credentials.
"""

from __future__ import annotations

from kmsg_worker.testing.fake_aligo import DEFAULT_API_KEY as ALIGO_KEY
from kmsg_worker.testing.fake_aligo import DEFAULT_SENDER_KEY as ALIGO_SENDER_KEY
from kmsg_worker.testing.fake_aligo import DEFAULT_USER_ID as ALIGO_USER
from kmsg_worker.testing.fake_aligo import FakeAligoServer
from kmsg_worker.testing.fake_iwinv import (
    FAKE_API_KEY,
    FAKE_COMPANY_ID,
    FAKE_SMS_API_KEY,
    FAKE_SMS_AUTH_KEY,
    FakeIwinvServer,
)
from kmsg_worker.testing.fake_solapi import FakeSolapiServer
from kmsg_worker.testing.fakeserver import FakeProviderServer

__all__ = ["SENDER", "fake_env", "start_fakes"]

#: A sender number every fake accepts as registered.
SENDER = "0212345678"
SOLAPI_KEY, SOLAPI_SECRET = "fake-solapi-key", "fake-solapi-secret"


def start_fakes(host: str = "127.0.0.1", base_port: int = 0) -> dict[str, FakeProviderServer]:
    """Start the Solapi, IWINV and Aligo fakes (ports ``base_port``, +1, +2; 0 = any free port)."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        FakeProviderServer.allow_external = True

    def port(offset: int) -> int:
        return base_port + offset if base_port else 0

    return {
        "solapi": FakeSolapiServer(host, port(0), api_key=SOLAPI_KEY, api_secret=SOLAPI_SECRET).start(),
        "iwinv": FakeIwinvServer(host, port(1)).start(),
        "aligo": FakeAligoServer(host, port(2)).start(),
    }


def fake_env(fakes: dict[str, FakeProviderServer]) -> dict[str, str]:
    """``KMSG_*`` variables that configure each adapter for the running fakes."""
    env: dict[str, str] = {"KMSG_DEFAULT_SENDER": SENDER}
    if "solapi" in fakes:
        env.update(
            {
                "KMSG_SOLAPI_BASE_URL": fakes["solapi"].url,
                "KMSG_SOLAPI_API_KEY": SOLAPI_KEY,
                "KMSG_SOLAPI_API_SECRET": SOLAPI_SECRET,
                "KMSG_SOLAPI_DEFAULT_FROM": SENDER,
                "KMSG_SOLAPI_KAKAO_PF_ID": "fake-pf-id",
            }
        )
    if "iwinv" in fakes:
        env.update(
            {
                "KMSG_IWINV_BASE_URL": fakes["iwinv"].url,
                "KMSG_IWINV_API_KEY": FAKE_API_KEY,
                "KMSG_IWINV_SMS_API_KEY": FAKE_SMS_API_KEY,
                "KMSG_IWINV_SMS_AUTH_KEY": FAKE_SMS_AUTH_KEY,
                "KMSG_IWINV_SMS_COMPANY_ID": FAKE_COMPANY_ID,
                "KMSG_IWINV_SENDER_NUMBER": SENDER,
            }
        )
    if "aligo" in fakes:
        env.update(
            {
                "KMSG_ALIGO_BASE_URL": fakes["aligo"].url,
                "KMSG_ALIGO_API_KEY": ALIGO_KEY,
                "KMSG_ALIGO_USER_ID": ALIGO_USER,
                "KMSG_ALIGO_SENDER": SENDER,
                "KMSG_ALIGO_SENDER_KEY": ALIGO_SENDER_KEY,
            }
        )
    return env
