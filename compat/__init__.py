"""Every patch of a library's internals, in one place.

Each module here leans on one upstream symbol that is not a public API, says why, and has
a test in ``tests/compat/`` that fails when that symbol moves or changes shape, so a minor
upgrade inside the pinned series (``pyproject.toml``) cannot break delivery silently.

- ``kombu_redis``: ``kombu.transport.redis.QoS.ack`` / ``.reject``,
  ``kombu.transport.TRANSPORT_ALIASES`` and ``kombu.message.Message._state``: a failed
  ack frees its prefetch slot; a batch's messages acknowledged in one round trip.
- ``billiard_pool``: ``billiard.pool.GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT``: a warm
  shutdown takes 2 s, not 30 s.
- ``celery_asynpool``: ``AsynPool.flush``, ``._flush_writer``, ``._active_writers`` and a
  job's ``_write_to``: a warm shutdown finishes writing a batch job before the pool is
  joined.
- ``celery_strategy``: ``celery.worker.request.create_request_cls``, the protocol readers
  of ``celery.worker.strategy`` and ``celery.worker.state``'s shutdown flags: the batch
  task's strategy builds its requests as Celery's default one does.
- ``celery_worker``: ``celery.apps.worker.safe_say``: the lines Celery writes from its
  signal handlers come out as JSON.
- ``gunicorn_gthread``: gunicorn's gthread worker (``ThreadWorker``'s accept and
  hand-over): each request is read whole by the main loop before a thread takes it.

Nothing here imports the project's own packages.
"""
