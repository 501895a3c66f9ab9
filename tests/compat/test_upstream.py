"""Each patch in compat/ leans on an upstream symbol that is not a public API: these tests
fail when one of them moves or changes shape, before a delivery can break silently."""

from __future__ import annotations

import base64
import importlib.metadata
import inspect
import json
import re
import tomllib

import billiard.pool
import celery.apps.worker
import kombu.transport
import pytest
from celery import Celery
from celery.concurrency import asynpool
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from compat import (
    billiard_pool,
    celery_asynpool,
    celery_worker,
)
from tests.conftest import ROOT
from workers.queue import DELIVERY_QUEUE, PROCESS_DELIVERY_TASK, Message


def test_kombu_qos_still_acks_redis_first_then_the_local_slot() -> None:
    # compat.kombu_redis.QoS relies on both methods, and on ack going to Redis before it
    # forgets the tag locally (the order that made a failed ack keep the slot).
    source = inspect.getsource(kombu_redis.QoS.ack)
    assert "_remove_from_indices" in source
    assert "super().ack" in source
    assert callable(virtual.QoS.ack)
    assert "reject" in vars(kombu_redis.QoS)


def test_kombu_still_resolves_transports_through_its_alias_table() -> None:
    assert kombu.transport.TRANSPORT_ALIASES["redis"].startswith(("kombu.", "compat."))
    assert isinstance(kombu.transport._transport_cache, dict)
    assert "TRANSPORT_ALIASES[transport]" in inspect.getsource(kombu.transport.resolve_transport)
    assert "_transport_cache" in inspect.getsource(kombu.transport.get_transport_cls)


def test_billiard_still_reads_its_exit_wait_constant_at_exit() -> None:
    assert isinstance(billiard.pool.GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT, int)
    assert "GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT" in inspect.getsource(billiard.pool.Worker)
    before = billiard.pool.GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT
    try:
        billiard_pool.shorten_pool_exit_wait()
        assert billiard.pool.GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT == 20
    finally:
        billiard.pool.GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT = before


def test_celery_pool_still_writes_jobs_in_pieces_that_finish_started_writes_completes() -> None:
    # compat.celery_asynpool finds a job's writer generator and its process, and runs the
    # rest of it as AsynPool.flush does; the join still appends a sentinel to each pipe.
    assert callable(asynpool._get_job_writer)
    assert asynpool.gen_not_started((lambda: (yield))())
    assert callable(asynpool.AsynPool._flush_writer)
    create_write_handlers = inspect.getsource(asynpool.AsynPool._create_write_handlers)
    assert "job._write_to = proc" in create_write_handlers
    assert "_active_writers" in create_write_handlers
    assert "proc.inq.put(None)" in inspect.getsource(asynpool.AsynPool._stop_task_handler)
    assert "self.outbound_buffer = deque()" in inspect.getsource(asynpool.AsynPool.__init__)
    assert "pop_message = outbound.popleft" in create_write_handlers
    # flush finishes started writes only while the pool runs (the bug worked around).
    flush = getattr(asynpool.AsynPool.flush, "__wrapped__", asynpool.AsynPool.flush)
    assert "if self._state == RUN:" in inspect.getsource(flush)
    assert celery_asynpool.finish_started_writes(object()) == 0  # no writers: nothing
    celery_asynpool.finish_started_writes_on_flush()
    celery_asynpool.finish_started_writes_on_flush()  # idempotent: wrapped once
    assert asynpool.AsynPool.flush.__wrapped__ is flush


def test_celery_signal_handlers_still_say_through_the_module_attribute() -> None:
    assert callable(celery.apps.worker.safe_say)
    # The handlers look safe_say up in the module when they run: replacing it is enough.
    assert "safe_say(" in inspect.getsource(celery.apps.worker._shutdown_handler)
    original = celery.apps.worker.safe_say
    said: list[str] = []
    try:
        celery_worker.replace_safe_say(lambda message, *_: said.append(message))
        celery.apps.worker.safe_say("worker: Warm shutdown")
    finally:
        celery.apps.worker.safe_say = original
    assert said == ["worker: Warm shutdown"]


def test_the_delivery_message_is_what_celery_itself_would_send() -> None:
    """The receiver builds Celery's protocol-2 message by hand (workers.queue.message)."""
    app = Celery("compat-check", set_as_current=False)
    message = Message('{"a":1}', "d-1", "2024-01-01T00:00:00+00:00")
    theirs = app.amqp.as_task_v2(
        "d-1", PROCESS_DELIVERY_TASK, args=(), kwargs=message.kwargs(), ignore_result=True
    )
    ours = json.loads(message.encode())
    # Celery 5.7 adds three headers the worker defaults when absent; any other new header
    # is one our message would lack: this fails, and message.py must learn it.
    optional = {"stamped_headers", "stamps", "replaced_task_nesting"}
    assert set(ours["headers"]) == set(theirs.headers) - optional
    for key in ("lang", "task", "id", "root_id", "parent_id", "group", "retries", "eta"):
        assert ours["headers"][key] == theirs.headers[key], key
    args, kwargs, embed = json.loads(base64.b64decode(ours["body"]))
    assert (tuple(args), kwargs) == tuple(theirs.body[:2])
    assert set(embed) == set(theirs.body[2])
    assert ours["properties"]["delivery_info"]["routing_key"] == DELIVERY_QUEUE
    assert ours["content-type"] == "application/json"


def test_kombu_messages_still_keep_their_ack_state_in_the_state_slot() -> None:
    # compat.kombu_redis.mark_acknowledged sets it as Message.ack does.
    from kombu.message import ACK_STATES, Message

    assert "_state" in Message.__slots__
    assert "ACK" in ACK_STATES
    assert "self._state = 'ACK'" in inspect.getsource(Message.ack)


CHECKED_ON = re.compile(r"Checked on (\S+) (\d+\.\d+\.\d+) \(pinned ``([^`]+)``\)")


@pytest.mark.parametrize(
    "module", sorted(p.stem for p in (ROOT / "compat").glob("*.py") if p.stem != "__init__")
)
def test_each_patch_names_the_version_it_was_checked_on_and_that_is_what_runs(
    module: str,
) -> None:
    """Each compat/ module says which release its upstream-shape tests ran on and the range
    pyproject.toml holds it to: a lock refresh that moves the library is a re-check."""
    text = (ROOT / "compat" / f"{module}.py").read_text(encoding="utf-8")
    found = CHECKED_ON.search(text)
    assert found, f"compat/{module}.py names no 'Checked on <library> X.Y.Z (pinned ``...``)'"
    library, checked, pinned = found.groups()
    declared = {
        Requirement(spec).name: str(Requirement(spec).specifier)
        for spec in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    assert SpecifierSet(declared[library]) == SpecifierSet(pinned), (library, declared[library])
    assert importlib.metadata.version(library) == checked, (
        f"{library} {importlib.metadata.version(library)} runs, compat/{module}.py was"
        f" checked on {checked}: run tests/compat/ and update its line"
    )


def test_celery_still_builds_requests_and_flags_shutdown_as_the_batch_strategy_does() -> None:
    # compat.celery_strategy copies celery.worker.strategy.default's request building and
    # reads the worker's shutdown flags: each symbol must still be where and what it was.
    from celery.concurrency.base import BasePool
    from celery.worker import state, strategy
    from celery.worker.request import create_request_cls

    default = inspect.getsource(strategy.default)
    for name in ("create_request_cls", "hybrid_to_proto2", "proto1_to_proto2", "connection_errors"):
        assert name in default, name
    assert list(inspect.signature(create_request_cls).parameters)[:5] == [
        "base", "task", "pool", "hostname", "eventer",
    ]  # fmt: skip
    assert len(inspect.signature(strategy.hybrid_to_proto2).parameters) == 2
    assert len(inspect.signature(strategy.proto1_to_proto2).parameters) >= 2
    assert hasattr(state, "should_stop")
    assert hasattr(state, "should_terminate")
    assert "self.limit = limit" in inspect.getsource(BasePool.__init__)  # the processes
