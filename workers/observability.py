"""What the worker process shows the outside: its Prometheus endpoint and clean JSON logs.

Metrics: prefork pool children cannot each serve HTTP, so the worker runs Prometheus in
multi-process mode. ``prepare_metrics_dir`` (called by the entry module ``workers.app``
before ``prometheus_client`` is imported) points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh
temporary folder unless one is given; every child writes its counters there, and the
worker's main process serves their sum on ``WORKER_METRICS_HOST``:``WORKER_METRICS_PORT``
(default 127.0.0.1:9808, loopback only: a scraper elsewhere needs the host set to an
address it can reach; port 0 turns it off) once the worker is ready. A folder given by
the operator is emptied when the worker starts (as gunicorn's is in
``web/gunicorn.py``), so give each worker its own.

Logs: one JSON object per line on stdout, from the first line on. Logging is set up as
soon as the entry module runs, with Python warnings (Celery's "running as root"
SecurityWarning, say) captured as log lines; Celery's start-up banner (plain text) is
turned off, and the lines Celery writes straight to the terminal from its signal handlers
("worker: Warm shutdown (MainProcess)") are written as JSON lines instead. Celery's own
per-task INFO lines ("Task ... received", "... succeeded") are turned off too: they name
the delivery without its event id and type, while the task's own ``event.<outcome>`` line
carries all three. Celery's warnings and errors still pass.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import MutableMapping
from typing import Any

from celery import signals

from compat.celery_worker import replace_safe_say
from config import logs
from config.logs import JsonFormatter
from config.settings import Settings

log = logging.getLogger(__name__)

MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
CELERY_TASK_LOGGERS = ("celery.app.trace", "celery.worker.strategy")


def prepare_metrics_dir(environ: MutableMapping[str, str]) -> tuple[str, bool]:
    """The folder of the multi-process metrics, and whether it was given (not created).

    prometheus_client chooses per-process or multi-process values once, when it is
    imported: imported before the folder is set here, the worker's endpoint would show its
    main process alone. That is a bug in the import order of the entry module, refused
    here rather than repaired (``tests/workers/test_observability.py`` holds the order)."""
    given = environ.get(MULTIPROC_VARIABLE)
    if given:
        os.makedirs(given, exist_ok=True)
        return given, True
    if "prometheus_client.values" in sys.modules:
        raise RuntimeError(
            f"prometheus_client was imported before {MULTIPROC_VARIABLE} was set: the"
            " worker's metrics would be its main process's alone; set it up first"
        )
    folder = tempfile.mkdtemp(prefix="vfy-worker-metrics-")
    environ[MULTIPROC_VARIABLE] = folder
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder, False


def empty_folder(folder: str) -> None:
    for name in os.listdir(folder):
        if name.endswith(".db"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))


def start_metrics_server(port: int, host: str = "127.0.0.1") -> Any | None:
    """Serve the sum of every process's metrics on ``host`` (loopback unless told);
    None when the address cannot be had."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:  # taken by another worker on this host: run without it
        log.warning("metrics.server_failed", extra={"host": host, "port": port, "error": str(exc)})
        return None
    log.info("metrics.serving", extra={"host": host, "port": port})
    return server


def say_as_json(message: str, stream: Any = None) -> None:
    """Stands in for ``celery.apps.worker.safe_say``: the same one ``os.write`` (safe in a
    signal handler), of a JSON line instead of plain text."""
    record = logging.LogRecord(
        "celery.worker", logging.WARNING, __file__, 0, "worker.said", None, None
    )
    record.said = message.strip()
    line = JsonFormatter().format(record) + "\n"
    target: Any = stream if stream is not None else sys.__stdout__
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.write(target.fileno(), line.encode())


def install(settings: Settings, environ: MutableMapping[str, str]) -> None:
    """Set up the worker's logs and signals; call before ``prometheus_client`` is imported."""
    logs.configure(settings.log_level)
    logging.captureWarnings(True)
    replace_safe_say(say_as_json)
    folder, given = prepare_metrics_dir(environ)
    servers: list[Any] = []

    @signals.celeryd_init.connect(weak=False)
    def _worker_starting(instance: Any = None, **_: Any) -> None:
        if instance is not None:
            instance.quiet = True  # no plain-text banner on stdout
        if given:
            empty_folder(folder)  # counters of an earlier run are not this run's

    @signals.setup_logging.connect(weak=False)
    def _quiet_task_lines(**_: Any) -> None:
        for name in CELERY_TASK_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)

    @signals.worker_ready.connect(weak=False)
    def _serve_metrics(**_: Any) -> None:
        if settings.worker_metrics_port and not servers:
            server = start_metrics_server(
                settings.worker_metrics_port, settings.worker_metrics_host
            )
            if server is not None:
                servers.append(server)

    @signals.worker_shutdown.connect(weak=False)
    def _stop_metrics(**_: Any) -> None:
        while servers:
            servers.pop().shutdown()
