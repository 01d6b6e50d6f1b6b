"""``docker-compose.yml`` mirrors what the tests run: the same queues, settings and fake providers.

Docker has no engine on the machines this runs on, so nothing is started: the file is checked by a
compose client where one is installed (``config -q`` parses and validates it without an engine) and,
everywhere, against the code it configures.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from kmsg_worker.cli import cli
from kmsg_worker.dispatch import QUEUES
from kmsg_worker.settings import Settings
from kmsg_worker.testing.servers import fake_env
from tests.conftest import ROOT, need

COMPOSE = ROOT / "docker-compose.yml"
#: ``${NAME:-default}``: the form every overridable value takes in the compose file.
_DEFAULTED = re.compile(r"^\$\{(\w+):-(.*)\}$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as the container sees it when no override is set."""
    env: dict[str, str] = {}
    for name, raw in (service.get("environment") or {}).items():
        value = str(raw)
        match = _DEFAULTED.match(value)
        env[name] = match.group(2) if match else value
    return env


def queues(service: dict[str, Any]) -> set[str]:
    command = service["command"]
    return set(command[command.index("-Q") + 1].split(","))


class _At:
    """Where a fake provider listens, as :func:`fake_env` reads it."""

    def __init__(self, url: str) -> None:
        self.url = url


def test_a_compose_client_accepts_the_file() -> None:
    clients = [["docker", "compose"]] if _docker_compose_v2() else []
    if shutil.which("docker-compose"):
        clients.append(["docker-compose"])
    need("a docker compose client (.ci/run installs Debian's docker-compose)", bool(clients))
    for client in clients:
        done = subprocess.run([*client, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True)
        assert done.returncode == 0, (client, done.stderr)


def _docker_compose_v2() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


def test_the_provider_settings_are_those_the_fakes_accept(compose: dict[str, Any]) -> None:
    # The fakes service listens on 18080 (Solapi), 18081 (IWINV), 18082 (Aligo), as start_fakes lays them out
    fakes = compose["services"]["fakes"]
    command = fakes["command"]
    assert int(command[command.index("--port") + 1]) == 18080
    assert set(fakes["expose"]) == {"18080", "18081", "18082"}
    # fake_env reads only each server's url: stand-ins at the compose service's address do
    at = {name: _At(f"http://fakes:{18080 + i}") for i, name in enumerate(("solapi", "iwinv", "aligo"))}
    expected = fake_env(at)  # type: ignore[arg-type]
    for name in ("worker", "bulk-worker", "beat", "flower", "migrate"):
        env = environment(compose["services"][name])
        # Every variable the tests set for the fakes, with the value they set (credentials included:
        # a key that differs is an authentication error at the fake)
        assert {k: env.get(k) for k in expected} == expected, name


def test_the_settings_load_from_the_compose_environment(compose: dict[str, Any]) -> None:
    env = environment(compose["services"]["worker"])
    settings = Settings.from_env(env)
    assert settings.providers == ("mock", "solapi", "iwinv", "aligo")
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.database_url.startswith("postgresql+psycopg://")
    assert settings.metrics_port == 9808


def test_every_queue_has_a_worker_and_bulk_has_its_own(compose: dict[str, Any]) -> None:
    services = compose["services"]
    workers = {name: queues(s) for name, s in services.items() if "worker" in s.get("command", [])}
    assert set().union(*workers.values()) == set(QUEUES.values())
    # as in the benchmark and the end-to-end tests: chunks never share a worker with single sends
    assert workers["bulk-worker"] == {QUEUES["bulk"]}
    assert all(QUEUES["bulk"] not in q for name, q in workers.items() if name != "bulk-worker")


def test_every_command_names_a_real_entry_point(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        command = service.get("command")
        if not command or service.get("image"):
            continue  # redis, postgres: their images' own commands
        assert "build" in service, name
        if command[0] == "kmsg":
            # An unknown subcommand or option fails before --help is honoured
            shown = CliRunner().invoke(cli, [*command[1:], "--help"], prog_name="kmsg")
            assert shown.exit_code == 0, (name, shown.output)
        else:
            assert command[:3] == ["celery", "-A", "config.celery"], name
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "pip install" in dockerfile and "COPY config" in dockerfile and "COPY tasks" in dockerfile


def test_the_services_keep_the_production_settings(compose: dict[str, Any]) -> None:
    services = compose["services"]
    redis_args = shlex.join(services["redis"]["command"])
    # noeviction: evicted kombu bindings break the broker; appendonly: queued tasks survive a restart
    assert "--maxmemory-policy noeviction" in redis_args and "--appendonly yes" in redis_args
    assert environment(services["flower"]).get("FLOWER_BASIC_AUTH")
    for name in ("worker", "bulk-worker", "beat"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert services["migrate"]["command"] == ["kmsg", "migrate"]
    beats = [n for n, s in services.items() if "beat" in s.get("command", [])]
    assert beats == ["beat"]  # exactly one
