"""Fixtures shared by the fault-injection tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kmsg_worker.testing.fakeserver import FakeProviderServer
from kmsg_worker.testing.servers import fake_env, start_fakes
from tests.conftest import Cluster


@pytest.fixture
def solapi(cluster: Cluster) -> Iterator[FakeProviderServer]:
    fakes = start_fakes()
    for name in ("iwinv", "aligo"):
        fakes.pop(name).stop()
    cluster.env.update(fake_env(fakes))
    cluster.env.update(
        {
            "KMSG_PROVIDERS": "solapi",
            # Delivery tracking is not under test here; "sent" (accepted by the provider) is the goal.
            "KMSG_TRACKING_FIRST_CHECK_SECONDS": "86400",
            "KMSG_RETRY_MAX_ATTEMPTS": "12",
            "KMSG_RETRY_BASE_SECONDS": "0.2",
            "KMSG_RETRY_MAX_SECONDS": "2",
        }
    )
    yield fakes["solapi"]
    fakes["solapi"].stop()
