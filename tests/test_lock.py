"""The lock (``requirements.txt`` and ``requirements-dev.lock``, written by ``scripts/lock``)
against ``pyproject.toml``, and this environment against the lock.

Every dependency ``pyproject.toml`` declares is pinned by a version it allows, every pin is
there for a reason the lock names (the project or another pin), each pin carries its
hashes, both files agree on every package they share, and what ``scripts/setup`` installed
is exactly the dev lock. A dependency added, removed or narrowed in ``pyproject.toml``
without ``scripts/lock`` fails here. Pure file checks plus ``importlib.metadata``.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import ROOT

RUNTIME_LOCK = ROOT / "requirements.txt"
DEV_LOCK = ROOT / "requirements-dev.lock"
PROJECT = "voucherify-pipeline"


@dataclass
class Pin:
    name: str
    version: Version
    marker: Marker | None
    hashes: int = 0
    via: list[str] = field(default_factory=list)

    def applies(self) -> bool:
        return self.marker is None or self.marker.evaluate()


def read_lock(path: Path) -> dict[str, Pin]:
    """The pins of a ``uv pip compile --generate-hashes`` file, with their ``# via`` lines."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        pin = re.match(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$", raw)
        if pin:
            name = canonicalize_name(pin.group(1))
            marker = Marker(pin.group(3)) if pin.group(3) else None
            current = pins[name] = Pin(name, Version(pin.group(2)), marker)
        elif current is not None and line.startswith("--hash=sha256:"):
            current.hashes += 1
        elif current is not None and line.startswith("# via"):
            rest = line.removeprefix("# via").strip()
            if rest:
                current.via.append(rest)
        elif current is not None and line.startswith("#   "):
            current.via.append(line.removeprefix("#   ").strip())
    return pins


def declared(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = [Requirement(spec) for spec in project["dependencies"]]
    for extra in extras:
        for spec in project["optional-dependencies"][extra]:
            requirement = Requirement(spec)
            if canonicalize_name(requirement.name) != PROJECT:  # dev includes [local]
                requirements.append(requirement)
    return requirements


LOCKS = {
    "requirements.txt": (RUNTIME_LOCK, ()),
    "requirements-dev.lock": (DEV_LOCK, ("dev", "local")),
}


@pytest.mark.parametrize("lock_name", sorted(LOCKS))
def test_every_declared_dependency_is_pinned_at_a_version_pyproject_allows(lock_name: str) -> None:
    path, extras = LOCKS[lock_name]
    pins = read_lock(path)
    wrong = []
    for requirement in declared(*extras):
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None or not requirement.specifier.contains(pin.version, prereleases=True):
            wrong.append(f"{requirement} -> {pin.version if pin else 'not pinned'}")
    assert not wrong, f"{lock_name} is behind pyproject.toml (run scripts/lock): {wrong}"


@pytest.mark.parametrize("lock_name", sorted(LOCKS))
def test_every_pin_is_there_for_a_reason_and_has_its_hashes(lock_name: str) -> None:
    path, _ = LOCKS[lock_name]
    pins = read_lock(path)
    assert len(pins) > 20, f"{lock_name} was not read: {sorted(pins)}"
    for pin in pins.values():
        assert pin.hashes, f"{pin.name} has no --hash in {lock_name}"
        reasons = {
            canonicalize_name(via.split(" ")[0]) for via in pin.via if via != "-c requirements.txt"
        }
        assert reasons, f"{pin.name} in {lock_name} names no reason"
        unknown = reasons - set(pins) - {PROJECT}
        assert not unknown, f"{pin.name} in {lock_name} is there for {unknown}, not in the lock"


def test_both_files_pin_one_version_of_each_package() -> None:
    runtime, dev = read_lock(RUNTIME_LOCK), read_lock(DEV_LOCK)
    assert set(runtime) <= set(dev)
    differ = {
        name: (pin.version, dev[name].version)
        for name, pin in runtime.items()
        if pin.version != dev[name].version
    }
    assert not differ, f"the two lock files disagree (run scripts/lock): {differ}"


def test_this_environment_is_exactly_the_dev_lock() -> None:
    """What scripts/setup installed: each pin that applies here, at its version, and the
    project itself; nothing the lock leaves out is installed but pip's own tools."""
    pins = {name: pin for name, pin in read_lock(DEV_LOCK).items() if pin.applies()}
    installed = {
        canonicalize_name(dist.metadata["Name"]): Version(dist.version)
        for dist in importlib.metadata.distributions()
    }
    wrong = {
        name: (str(pin.version), str(installed.get(name, "missing")))
        for name, pin in pins.items()
        if installed.get(name) != pin.version
    }
    assert not wrong, (
        f"installed versions differ from requirements-dev.lock (run scripts/setup): {wrong}"
    )
    tooling = {"pip", "setuptools", "wheel", "uv", PROJECT}
    extra = sorted(set(installed) - set(pins) - tooling)
    assert not extra, f"installed but not in requirements-dev.lock: {extra}"
