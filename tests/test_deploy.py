"""``docker-compose.yml`` mirrors what the tests run, and is safe without its demo profile.

Docker has no engine on the machines this runs on, so nothing is started: the file is checked by a
compose client where one is installed (``config`` parses, interpolates and validates it without an
engine) and, everywhere, against the code it configures. A worker started with the production
environment really is started (a Celery worker process on the embedded broker), to see it stop.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
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
#: ``${NAME:?message}``: a value compose refuses to run without.
_REQUIRED = re.compile(r"^\$\{(\w+):\?(.+)\}$")
#: What only the demo may contain.
_DEMO_ONLY = re.compile(r"fakes:180\d\d|fake-|\bmock\b", re.IGNORECASE)
#: Lets ``config`` interpolate the file (Flower has no default password).
AUTH = {"FLOWER_BASIC_AUTH": "ops:a-test-password"}
WORKERS = ("worker", "bulk-worker")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as the container sees it when no override is set (``""``: unset)."""
    env: dict[str, str] = {}
    for name, raw in (service.get("environment") or {}).items():
        value = str(raw)
        match = _DEFAULTED.match(value)
        env[name] = match.group(2) if match else value
    return env


def queues(service: dict[str, Any]) -> set[str]:
    command = service["command"]
    return set(command[command.index("-Q") + 1].split(","))


def active(services: dict[str, Any], profiles: set[str]) -> dict[str, Any]:
    """The services ``up`` starts with these profiles (a service without profiles always starts)."""
    return {n: s for n, s in services.items() if not s.get("profiles") or set(s["profiles"]) & profiles}


class _At:
    """Where a fake provider listens, as :func:`fake_env` reads it."""

    def __init__(self, url: str) -> None:
        self.url = url


# -- with a compose client ------------------------------------------------------------------------


def _clients() -> list[list[str]]:
    clients = []
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        clients.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        clients.append(["docker-compose"])
    need("a docker compose client (.ci/run installs Debian's docker-compose)", bool(clients))
    return clients


def _config(client: list[str], *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KMSG_", "FLOWER_", "COMPOSE_"))}
    return subprocess.run(
        [*client, "-f", str(COMPOSE), *args, "config"],
        capture_output=True,
        text=True,
        env={**clean, **env},
        cwd=ROOT,
    )


def test_a_compose_client_accepts_the_file() -> None:
    for client in _clients():
        done = _config(client, env=AUTH)
        assert done.returncode == 0, (client, done.stderr)


def test_without_the_demo_profile_nothing_points_at_a_fake_or_the_mock() -> None:
    for client in _clients():
        done = _config(client, env=AUTH)
        assert done.returncode == 0, done.stderr
        rendered = yaml.safe_load(done.stdout)
        # Compose v2 leaves inactive services out of `config`; v1 prints them with their profiles.
        production = active(rendered["services"], set())
        assert set(production) >= {"worker", "bulk-worker", "beat", "flower", "migrate", "redis", "postgres"}
        text = yaml.safe_dump(production)
        assert not _DEMO_ONLY.search(text), _DEMO_ONLY.search(text)
        for name in WORKERS:
            assert production[name]["environment"]["KMSG_PROVIDERS"] in ("", None)


def test_flower_refuses_to_run_without_a_password() -> None:
    for client in _clients():
        done = _config(client, env={})
        assert done.returncode != 0 and "FLOWER_BASIC_AUTH" in done.stderr


# -- the file against the code ----------------------------------------------------------------------


def test_the_demo_providers_are_the_fakes_with_the_credentials_they_accept(compose: dict[str, Any]) -> None:
    services = compose["services"]
    fakes = services["fakes"]
    assert fakes["profiles"] == ["demo"]
    # The fakes service listens on 18080 (Solapi), 18081 (IWINV), 18082 (Aligo), as start_fakes lays them out
    command = fakes["command"]
    assert int(command[command.index("--port") + 1]) == 18080
    assert set(fakes["expose"]) == {"18080", "18081", "18082"}
    # fake_env reads only each server's url: stand-ins at the compose service's address do
    at = {name: _At(f"http://fakes:{18080 + i}") for i, name in enumerate(("solapi", "iwinv", "aligo"))}
    expected = fake_env(at)  # type: ignore[arg-type]
    for name in ("demo-worker", "demo"):
        service = services[name]
        assert service["profiles"] == ["demo"], name
        env = environment(service)
        # Every variable the tests set for the fakes, with the value they set, never from .env
        assert {k: env.get(k) for k in expected} == expected, name
        assert not any("${" in str(v) for v in service["environment"].values()), name
        settings = Settings.from_env(env)
        assert settings.providers == ("solapi", "iwinv", "aligo")
        settings.check_providers()  # every credential the adapters need is there
    assert queues(services["demo-worker"]) == set(QUEUES.values())


def test_a_production_worker_takes_its_providers_from_the_environment_only(compose: dict[str, Any]) -> None:
    services = compose["services"]
    demo_keys = set(fake_env({n: _At("http://x") for n in ("solapi", "iwinv", "aligo")}))  # type: ignore[arg-type]
    for name in WORKERS:
        raw = services[name]["environment"]
        env = environment(services[name])
        # Passed through from .env, empty when unset: no default provider, key or fake address
        for key in ("KMSG_PROVIDERS", *(k for k in demo_keys if not k.endswith("_BASE_URL"))):
            assert raw[key] == f"${{{key}:-}}", (name, key)
        assert not any(k.endswith("_BASE_URL") for k in raw), name  # the adapters' real defaults
        settings = Settings.from_env(env)
        assert settings.providers == () and settings.redis_url == "redis://redis:6379/0"
        assert settings.database_url.startswith("postgresql+psycopg://") and settings.metrics_port == 9808
        with pytest.raises(Exception, match="KMSG_PROVIDERS names no provider"):
            settings.check_providers()
        # With a provider named but its key missing, the error names the key
        with pytest.raises(Exception, match="KMSG_SOLAPI_API_KEY is not set"):
            Settings.from_env({**env, "KMSG_PROVIDERS": "solapi"}).check_providers()


def test_a_worker_with_no_provider_stops_at_start_naming_what_is_missing(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    # The production worker's environment, on the embedded broker and database (no server here)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSG_")}
    env.update(environment(compose["services"]["worker"]))
    env.update(
        {
            "KMSG_BROKER_URL": "",
            "KMSG_DATABASE_URL": f"sqlite:///{tmp_path / 'k.sqlite'}",
            "KMSG_VAR_DIR": str(tmp_path),
            "KMSG_METRICS_PORT": "0",
            "PYTHONPATH": str(ROOT),
        }
    )
    command = compose["services"]["worker"]["command"]
    done = subprocess.run(
        [sys.executable, "-m", *command], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "kmsg worker: error: KMSG_PROVIDERS names no provider" in done.stderr


def test_every_queue_has_a_worker_and_bulk_has_its_own(compose: dict[str, Any]) -> None:
    services = active(compose["services"], set())
    workers = {name: queues(s) for name, s in services.items() if "worker" in s.get("command", [])}
    assert set(workers) == set(WORKERS)
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
        if command[0] == "sh":
            commands = [shlex.split(part) for part in command[-1].split("&&")]
            kmsg_commands = [c for c in commands if c[0] == "kmsg"]
            assert kmsg_commands, name
        elif command[0] == "kmsg":
            kmsg_commands = [command]
        else:
            assert command[:3] == ["celery", "-A", "config.celery"], name
            continue
        for args in kmsg_commands:
            # An unknown subcommand or option fails before --help is honoured
            shown = CliRunner().invoke(cli, [*args[1:], "--help"], prog_name="kmsg")
            assert shown.exit_code == 0, (name, args, shown.output)
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "COPY config" in dockerfile and "COPY tasks" in dockerfile


def test_the_services_keep_the_production_settings(compose: dict[str, Any]) -> None:
    services = compose["services"]
    redis_args = shlex.join(services["redis"]["command"])
    # noeviction: evicted kombu bindings break the broker; appendonly: queued tasks survive a restart
    assert "--maxmemory-policy noeviction" in redis_args and "--appendonly yes" in redis_args
    # No default Flower password: compose refuses to run without one
    auth = str(services["flower"]["environment"]["FLOWER_BASIC_AUTH"])
    assert _REQUIRED.match(auth) and _REQUIRED.match(auth).group(1) == "FLOWER_BASIC_AUTH"  # type: ignore[union-attr]
    for name in (*WORKERS, "beat", "demo-worker"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert services["migrate"]["command"] == ["kmsg", "migrate"]
    beats = [n for n, s in services.items() if "beat" in s.get("command", [])]
    assert beats == ["beat"]  # exactly one
    # Long-running services come back after a crash or a reboot; one-shot steps do not
    for name, service in services.items():
        expected = "no" if name in ("migrate", "demo") else "unless-stopped"
        assert service.get("restart") == expected, name


def test_workers_beat_and_flower_have_health_checks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in (*WORKERS, "demo-worker"):
        check = " ".join(services[name]["healthcheck"]["test"])
        assert "celery -A config.celery inspect ping -d celery@$$HOSTNAME" in check, name
    assert "celerybeat-schedule" in " ".join(services["beat"]["healthcheck"]["test"])
    assert "/healthcheck" in " ".join(services["flower"]["healthcheck"]["test"])
    # The demo message waits for a worker that answers
    assert services["demo"]["depends_on"]["demo-worker"] == {"condition": "service_healthy"}


def test_the_beat_health_check_passes_on_a_fresh_schedule_and_fails_on_a_stale_one(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    test = compose["services"]["beat"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    code = test[3].replace("/var/lib/kmsg", str(tmp_path))
    run = [sys.executable, "-c", code]
    assert subprocess.run(run).returncode == 1  # no schedule file yet
    schedule = tmp_path / "celerybeat-schedule"
    schedule.write_bytes(b"")
    assert subprocess.run(run).returncode == 0
    os.utime(schedule, (0, 0))
    assert subprocess.run(run).returncode == 1


# -- the lock files ---------------------------------------------------------------------------------


def _name(requirement: str) -> str:
    """A requirement's project name, normalised (PEP 503)."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def _pinned(lock: Path) -> dict[str, str]:
    pins = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith((" ", "#")):
            name, _, version = line.split(";")[0].strip().partition("==")
            assert version, line  # every line is an exact pin
            pins[_name(name)] = version
    return pins


def test_the_lock_files_pin_every_dependency_and_are_what_installs_use() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    main = _pinned(ROOT / "requirements" / "main.lock")
    dev = _pinned(ROOT / "requirements" / "dev.lock")
    assert {_name(r) for r in project["dependencies"]} <= set(main)
    assert {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]} <= set(dev)
    assert all(dev[name] == version for name, version in main.items())  # one version of each everywhere
    # redis ships its own types; the stubs package shadowed them
    assert "types-redis" not in dev
    # The image, `make install` (and so .ci/run) install the lock, then the project without resolving
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "pip install --no-cache-dir -r requirements/main.lock" in dockerfile
    assert "pip install --no-cache-dir --no-deps ." in dockerfile
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "pip install --quiet -r requirements/dev.lock" in makefile and "--no-deps -e ." in makefile
    assert "make install" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_every_package_of_the_code_is_in_the_distribution() -> None:
    # A package missing from pyproject's list installs fine in editable mode (tests, CI) and is
    # missing from the image, which installs the project itself.
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("kmsg_worker", "tasks", "config")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert found == listed
