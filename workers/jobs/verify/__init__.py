"""Verify against Voucherify: list what it created, compare, apply what we miss.

Each run, within the API budget (``workers.jobs.voucherify_api``):

- open flags of a failed rollback (``already_rolled_back``, ``lost_rollback``, ``review``)
  and the flags this job raised itself (``verify_mismatch``), at most ``VERIFY_BATCH_SIZE``,
  each checked by its redemption's id (``claims``);
- the redemptions and rollbacks Voucherify created since the watermark (minus an overlap),
  up to ``VERIFY_AFTER_SECONDS`` ago, listed 100 a page and compared with our rows
  (``window``). The calls grow with redemptions / 100.

Healing: Voucherify's answer (compared with our record in ``compare``) becomes the
webhook ``data`` it would have sent (``translate``: ``redemption.succeeded``,
``redemption.rollback.succeeded``, ``redemption.failed``) and goes through
``workers.processing`` as an event of its own, ``verify:<redemption id>:<status>``: the
inbox records it once, the handlers apply it in one transaction, and the ledger's UNIQUE
(redemption_id, effect) key makes a restore or a debit impossible to apply twice,
whether the webhook or the job gets there first. The card's kind comes from the answer's
``gift`` / ``loyalty_card`` objects (the API's voucher has no ``type``); a rollback counts
only when it succeeded (``result``), never just for being the newest.

Flags (``job``): a failed-rollback flag whose redemption Voucherify reports
``ROLLED_BACK``, with our record ``ROLLED_BACK`` and the restore in the ledger, is
resolved with a note saying so. Any other answer is written on the flag as a note and
the flag stays open. What the job cannot make agree raises one open ``review`` flag
``verify_mismatch`` per redemption, resolved by the job itself once the two agree.
"""

from workers.jobs.verify.job import Check, VerifyResult, reconcile, verify

__all__ = ["Check", "VerifyResult", "reconcile", "verify"]
