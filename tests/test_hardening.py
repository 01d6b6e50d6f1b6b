"""What a caller or an operator gets wrong is refused early and plainly, and no secret is echoed.

Database URLs are shown with the password masked; tenant ids are checked at the producer (they label
metrics); an AlimTalk that no provider of its route could address to a Kakao channel is refused
before it is stored.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kmsg_worker.errors import ConfigurationError
from kmsg_worker.settings import Settings, mask_url
from kmsg_worker.storage.db import make_engine

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
