"""gunicorn settings of the ``web`` process (``gunicorn -c web/gunicorn.py web.wsgi:app``).

Worker class chosen by measurement (see the README's figures): ``gthread`` keeps
connections alive and lets a slow broker call block one thread, not the process.
SIGTERM: gunicorn stops accepting, lets in-flight requests finish within
``graceful_timeout``, then exits.
"""

import os
import shutil
import tempfile

from gunicorn.glogging import Logger

from compat.gunicorn_gthread import BufferingThreadWorker
from config.entry import load_settings

# Checked here, in the master, before gunicorn uses a value or starts a worker: a bad or
# missing variable stops gunicorn with the one line every process prints, status 2. (A
# worker exiting at import instead is only respawned by gunicorn, forever; and PORT or
# LOG_LEVEL read raw would fail inside gunicorn without naming the variable.)
_settings = load_settings("web", os.environ)

bind = f"0.0.0.0:{_settings.port}"
workers = _settings.web_concurrency
# gthread whose threads only take requests that have fully arrived: a slow client cannot
# hold a thread (compat/gunicorn_gthread.py); WEB_WORKER_CLASS=sync is gunicorn's own.
if _settings.web_worker_class == "gthread":
    BufferingThreadWorker.configure(
        request_timeout=_settings.web_request_timeout_seconds,
        max_body=_settings.max_body_bytes,
    )
    worker_class = f"{BufferingThreadWorker.__module__}.{BufferingThreadWorker.__name__}"
else:
    worker_class = _settings.web_worker_class
# Behind a TLS-terminating load balancer: trust its X-Forwarded-Proto/-For, so Flask sees
# HTTPS (the dashboard's cookie is Secure) and the client's address.
forwarded_allow_ips = _settings.forwarded_allow_ips
threads = _settings.web_threads
keepalive = 75  # longer than common load-balancer idle timeouts
timeout = 30
graceful_timeout = 20
backlog = 2048
accesslog = None  # the app logs what matters; no per-request line with headers


class QuietAccessLogger(Logger):  # type: ignore[misc]  # gunicorn is untyped
    """gunicorn's logger without the access log when ``accesslog`` is None.

    gunicorn builds every request's access-log atoms (headers, times, a date) whenever a
    ``logconfig_dict`` is given, even though its ``gunicorn.access`` logger then drops the
    line: 4 % of the web worker's Python time under load in the receiver's profile.
    """

    def access(self, resp: object, req: object, environ: object, request_time: object) -> None:
        if self.cfg.accesslog:
            super().access(resp, req, environ, request_time)


logger_class = QuietAccessLogger
errorlog = "-"
loglevel = _settings.log_level.lower()
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "config.logs.JsonFormatter"}},
    "handlers": {
        "stdout": {
            "class": "logging.StreamHandler",
            "formatter": "json",
            "stream": "ext://sys.stdout",
        }
    },
    "root": {"handlers": ["stdout"], "level": loglevel.upper()},
    "loggers": {
        "gunicorn.error": {"handlers": ["stdout"], "level": loglevel.upper(), "propagate": False},
        "gunicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
    },
}

# Prometheus multi-process mode: every gunicorn worker writes its metrics to files in
# this folder and /metrics adds them up. A folder made here is removed when gunicorn exits.
_own_metrics_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _own_metrics_dir:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="vfy-web-metrics-")


def on_starting(server: object) -> None:
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder, exist_ok=True)


def on_exit(server: object) -> None:
    if _own_metrics_dir:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


def child_exit(server: object, worker: object) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[attr-defined,no-untyped-call]


# gunicorn's control socket is one fixed path per user: several web processes on one
# machine (tests, benchmarks) would fight over it, and nothing here uses it.
control_socket_disable = True
