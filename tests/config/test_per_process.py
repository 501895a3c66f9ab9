"""``config.per_process.PerProcess``: one object per process and key, made again in a
forked child (the parent's left open), and a second caller with other parameters refused."""

from __future__ import annotations

import os

import pytest

from config.per_process import PerProcess


class Thing:
    def __init__(self, key: str, **params: object) -> None:
        self.key, self.params, self.pid, self.closed = key, params, os.getpid(), False

    def close(self) -> None:
        self.closed = True


def test_one_object_per_key_made_once() -> None:
    things: PerProcess[Thing] = PerProcess("thing", Thing, Thing.close)
    first = things.get("a", size=2)
    assert things.get("a", size=2) is first
    assert things.get("b", size=2) is not first


def test_a_second_caller_with_other_parameters_is_refused_not_given_the_first_ones() -> None:
    things: PerProcess[Thing] = PerProcess("the pool", Thing, Thing.close)
    things.get("a", size=2)
    with pytest.raises(ValueError, match=r"the pool for 'a' was made with \{'size': 2\}"):
        things.get("a", size=8)


def test_close_closes_this_processs_objects_and_the_next_get_makes_a_new_one() -> None:
    things: PerProcess[Thing] = PerProcess("thing", Thing, Thing.close)
    first = things.get("a")
    things.close()
    assert first.closed
    assert things.get("a") is not first


def test_a_forked_child_makes_its_own_and_leaves_the_parents_open() -> None:
    things: PerProcess[Thing] = PerProcess("thing", Thing, Thing.close)
    parent = things.get("a", size=2)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running pytest's teardown
        child = things.get("a", size=8)  # the parent's parameters do not bind the child
        things.close()
        ok = child is not parent and child.pid == os.getpid() and not parent.closed
        os.write(write, b"ok" if ok and child.closed else b"wrong")
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.read(read, 16) == b"ok"
    assert status == 0
    assert things.get("a", size=2) is parent
    assert not parent.closed
