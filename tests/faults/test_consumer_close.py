"""The broker-loss close that ended workers, replayed deterministically on a real Redis.

The end-to-end outage test (test_broker_outages.py) meets it in about 1 of 9 Redis stops: Celery's
connection-loss handler ``collect()`` s the connection (detaching kombu's transport from it) without
managing to close the channel that still holds an unacknowledged task, then ``close()`` s it, and
the close tries to put the task back through a Redis pool built from the detached client. Here
that state is built with kombu itself on a ``redis-server`` of the test's own: a task fetched and
not acknowledged, the broker gone, the transport detached the way ``collect()`` does it, and a
``collect()`` that gives up on its channel the way a timed-out read makes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.worker.consumer import Consumer
from kombu import Connection, Queue  # type: ignore[attr-defined,unused-ignore]

from tasks.signals import OutageSafeConsumer
from tests.faults.infra import PrivateRedis

pytestmark = [pytest.mark.integration]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.close()


def broker_lost_with_an_unacked_task(broker: PrivateRedis) -> Any:
    """A kombu connection whose default channel holds an unacknowledged task, its broker stopped."""
    connection = Connection(broker.url)
    channel = connection.default_channel
    work = Queue("work", channel=channel)
    work.declare()
    channel.basic_publish(channel.prepare_message("payload"), "", "work")
    assert work.get(no_ack=False) is not None  # fetched, not acknowledged (acks_late)
    broker.stop()
    return connection


def collect_that_times_out(connection: Any) -> None:
    """Replace ``collect()`` by what it amounts to when the channel's read times out: the transport
    is detached (kombu's own step) and the channel is left open."""

    def collect(socket_timeout: float | None = None) -> None:
        connection._do_close_transport()
        raise TimeoutError("timed out")  # Celery ignores any error from collect()

    connection.collect = collect


def test_kombu_cannot_close_a_channel_with_unacked_tasks_once_its_transport_is_detached(
    broker: PrivateRedis,
) -> None:
    connection = broker_lost_with_an_unacked_task(broker)
    connection._do_close_transport()
    with pytest.raises(AttributeError, match="hostname"):
        connection.close()


def consumer_of(cls: type[Any], connection: Any) -> Any:
    app = Celery("consumer-close", set_as_current=False)
    app.conf.worker_enable_prefetch_count_reduction = False
    app.conf.worker_cancel_long_running_tasks_on_connection_loss = True  # as config.celeryconfig
    consumer = cls.__new__(cls)  # only the connection-loss handler is under test
    consumer.app = app
    consumer.connection = connection
    return consumer


def test_celerys_consumer_fails_on_this_broker_loss(broker: PrivateRedis) -> None:
    connection = broker_lost_with_an_unacked_task(broker)
    collect_that_times_out(connection)
    consumer = consumer_of(Consumer, connection)
    with pytest.raises(AttributeError, match="hostname"):
        consumer.on_connection_error_after_connected(ConnectionError("Connection closed by server."))


def test_the_guarded_consumer_survives_it_and_lets_celery_reconnect(broker: PrivateRedis) -> None:
    connection = broker_lost_with_an_unacked_task(broker)
    collect_that_times_out(connection)
    consumer = consumer_of(OutageSafeConsumer, connection)
    consumer.on_connection_error_after_connected(ConnectionError("Connection closed by server."))
    assert consumer.connection is None  # released: Celery's blueprint restart opens a new one
