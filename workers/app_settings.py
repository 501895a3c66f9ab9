"""What the tasks need from the Celery app they run in: its settings and the jobs' task
names. A leaf module, so that ``workers.celery_app`` (which imports the tasks to register
them) and the tasks (``workers.tasks``, ``workers.jobs.schedule``) never import each other.
"""

from __future__ import annotations

from celery import Celery

from config.settings import Settings

SETTINGS_KEY = "pipeline_settings"
"""``app.conf`` key of the settings the app was made with (``make_celery``)."""
JOB_TASK_PREFIX = "voucherify.jobs."
"""The jobs' tasks are ``voucherify.jobs.<job>`` (registered in ``workers.jobs.schedule``)."""


def settings_of(app: Celery) -> Settings:
    """The settings the app was made with (``make_celery``)."""
    settings: Settings = app.conf[SETTINGS_KEY]
    return settings
