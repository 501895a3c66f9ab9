"""The receiver benchmark's baseline: a bare Flask app that answers 202 and does nothing.

Served by the same gunicorn settings as ``web.wsgi:app`` (``web/gunicorn.py``), so
the difference between the two is what our view costs: signature, parse, Redis LPUSH.
"""

from __future__ import annotations

from flask import Flask, Response

ANSWER = '{"status":"accepted","delivery_id":"00000000000000000000000000000000"}'

app = Flask(__name__)


@app.post("/webhooks/voucherify")
def receive_webhook() -> Response:
    return Response(ANSWER, status=202, mimetype="application/json")
