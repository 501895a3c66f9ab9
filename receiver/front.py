"""The webhook's POSTs answered by a plain WSGI callable, before Flask; the rest to Flask.

Why: a Flask request costs the web process as much Python as everything the webhook does
itself (a request and an app context, URL matching, the request object, hooks, the
response object), and the receiver's figure is judged against a bare Flask view. The
webhook needs none of it: ``receiver.intake.answer`` reads the WSGI environ directly.
So ``POST /webhooks/voucherify`` is answered here, with the same bytes the Flask view of
``receiver.views`` gives (``tests/receiver/test_front.py`` compares them, case by case),
and every other request, including other methods on the same path (405), goes to Flask
unchanged.

What Flask did around the view is done here too: the answer is counted in
``receiver_requests_total`` and timed in ``receiver_ack_seconds``; a client gone mid-body
gets Werkzeug's 400, and an unexpected error is logged with its traceback and answered
as Flask answers one (a 500), never a 2xx.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from werkzeug.exceptions import HTTPException, InternalServerError

from receiver import metrics
from receiver.intake import WEBHOOK_PATH, Intake, answer

log = logging.getLogger(__name__)

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class WebhookFront:
    """A WSGI app: the webhook's POSTs answered here, everything else by ``app``."""

    def __init__(self, intake: Intake, app: WSGIApp) -> None:
        self.intake = intake
        self.app = app

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != WEBHOOK_PATH or environ.get("REQUEST_METHOD") != "POST":
            return self.app(environ, start_response)
        started = time.perf_counter()
        try:
            it = answer(self.intake, environ)
        except HTTPException as exc:  # the client went away mid-body: Werkzeug's answer
            metrics.answered(WEBHOOK_PATH, exc.code or 500)
            return exc(environ, start_response)
        except Exception:
            log.exception("Exception on %s [POST]", WEBHOOK_PATH)  # as Flask logs one
            metrics.answered(WEBHOOK_PATH, 500)
            return InternalServerError()(environ, start_response)
        start_response(it.status, list(it.headers))
        metrics.ACK_LATENCY.observe(time.perf_counter() - started)
        metrics.answered(WEBHOOK_PATH, it.code)
        return (it.body,)
