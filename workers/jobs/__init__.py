"""Reconciliation jobs: the pipeline heals itself and says what it could not heal.

- ``redrive``   events stuck unfinished go back on the queue (bounded), then dead letters;
                parked deliveries go back to the queue
- ``verify``    redemptions and failed-rollback flags checked against Voucherify's API
- ``drift``     card balances reported by Voucherify against what the ledger implies
- ``retention`` old deliveries, bodies and event ids deleted in bounded batches

Each runs on a schedule under the ``beat`` process (``workers.celery_app.beat_schedule``)
and once from the CLI (``vfy-pipeline jobs run <job>``) through ``run_job(name, settings)``.
See docs/reconciliation.md.
"""

from workers.jobs.durability import check_broker_durability
from workers.jobs.runner import JOB_NAMES, JOBS, run_job

__all__ = ["JOBS", "JOB_NAMES", "check_broker_durability", "run_job"]
