"""Refuse to start or join Ray in a test that is not marked `ray` (tests/conftest.py turns this on).

`make test-quick` deselects the `ray` tests; a test that starts Ray without the mark would make the
quick tier slow again, silently. conftest.py loads this file in the pytest process, and puts this
folder first on the PYTHONPATH of an unmarked test, so the test's child processes (`kd ...`,
`ray start`, scripts) import it as `sitecustomize` and keep the same rule. It acts only while the
environment variable RAY_FORBIDDEN names a file: each refused attempt is written there too, so
the test fails even where the code under test swallows the error or a child process dies of it.
"""
from __future__ import annotations

import functools
import importlib.abc
import os
import sys

RAY_FORBIDDEN = "KD_TEST_RAY_FORBIDDEN"


class RayForbiddenError(BaseException):
    """A BaseException, so that an `except Exception` in the code under test cannot hide it."""


def refuse(what: str) -> None:
    """Raise (and record) when Ray is forbidden here; do nothing otherwise."""
    report = os.environ.get(RAY_FORBIDDEN)
    if not report:
        return
    message = (f"this test {what} but is not marked `ray`: mark it @pytest.mark.ray (or use the ray_cluster "
               f"fixture), so that `make test-quick` (-m 'not ray and not slow') leaves it out")
    with open(report, "a", encoding="utf-8") as out:
        out.write(f"[pid {os.getpid()}] {message}\n")
    raise RayForbiddenError(message)


def _guard_init(worker) -> None:
    real = worker.init

    @functools.wraps(real)
    def init(*args, **kwargs):
        refuse("calls ray.init() (itself, or through a Ray API, a Ray Train trainer or Serve)")
        return real(*args, **kwargs)

    worker.init = init
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "init", None) is real:  # `ray` bound it before the guard came
        ray.init = init


def _guard_node(node) -> None:
    real = node.Node.__init__

    @functools.wraps(real)
    def __init__(self, *args, **kwargs):
        refuse("starts or joins a Ray node (`ray start`, ray.init)")
        real(self, *args, **kwargs)

    node.Node.__init__ = __init__


GUARDS = {"ray._private.worker": _guard_init, "ray._private.node": _guard_node}


class _GuardOnImport(importlib.abc.MetaPathFinder):
    """Patch Ray's modules as they are imported: nothing of Ray is imported before a test needs it."""

    def find_spec(self, name, path, target=None):
        if name not in GUARDS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                break
        else:
            return None
        run_module = spec.loader.exec_module

        def exec_module(module) -> None:
            run_module(module)
            GUARDS[name](module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Guard Ray's modules already imported and those imported later; once per process."""
    if any(isinstance(finder, _GuardOnImport) for finder in sys.meta_path):
        return
    for name, guard in GUARDS.items():
        if name in sys.modules:
            guard(sys.modules[name])
    sys.meta_path.insert(0, _GuardOnImport())


install()
