"""Verify against Voucherify: list what it created, compare, apply what we miss.

Each run, within the API budget (``workers.jobs.voucherify_api``), first lists the
redemptions and rollbacks Voucherify created since the watermark, 100 a page, and compares
them with our rows (``window``: the calls grow with redemptions / 100), then checks the due
failed-rollback flags and its own ``verify_mismatch`` flags by their redemption's id
(``claims``). What our records miss (``compare``) becomes the webhook Voucherify would
have sent (``translate``) and goes through ``workers.processing`` as an event of its own,
``verify:<redemption id>:<status>``: the inbox and the ledger's keys apply it once,
whether the webhook or the job gets there first. A failed-rollback flag is resolved once
Voucherify and our books both show the rollback; what cannot be made to agree raises one
``verify_mismatch`` flag per redemption (``job``). Details: docs/reconciliation.md,
"Verify against Voucherify".
"""

from workers.jobs.verify.job import Check, VerifyResult, reconcile, verify

__all__ = ["Check", "VerifyResult", "reconcile", "verify"]
