"""Verify against Voucherify: ask the API what happened, apply it through the same handlers.

What is checked, each run, at most ``VERIFY_BATCH_SIZE`` of each, oldest check first
(``claims``):

- open flags of a failed rollback (``already_rolled_back``, ``review``) and the flags this
  job raised itself (``verify_mismatch``);
- redemptions without a final state whose last event is older than
  ``VERIFY_AFTER_SECONDS``: ``SUCCEEDED`` ones within Voucherify's rollback window (a
  rollback can come up to 3 months later, and its webhook may be lost), and card
  redemptions ``ROLLED_BACK`` whose debit or restore is missing from the ledger. Each is
  checked again ``VERIFY_AFTER_SECONDS`` after its last check, round-robin.

Healing: Voucherify's answer (compared with our record in ``compare``) becomes the
webhook ``data`` it would have sent (``translate``: ``redemption.succeeded``,
``redemption.rollback.succeeded``, ``redemption.failed``) and goes through
``workers.processing`` as an event of its own, ``verify:<redemption id>:<status>``: the
inbox records it once, the handlers apply it in one transaction, and the ledger's UNIQUE
(redemption_id, effect) key makes a restore or a debit impossible to apply twice,
whether the webhook or the job gets there first. Only what is missing is applied; a
redemption that already agrees with Voucherify is just marked checked. The card balance
is not taken from the API (its voucher is a snapshot whose time is unknown): the drift
job works from webhook reports only.

Flags (``job``): a failed-rollback flag whose redemption Voucherify reports
``ROLLED_BACK``, with our record ``ROLLED_BACK`` and the restore in the ledger, is
resolved with a note saying so (the rollback happened and our books show it: nothing is
left for a person). Any other answer is written on the flag as a note and the flag stays
open. What the job cannot make agree (Voucherify says ``SUCCEEDED`` where we recorded a
rollback, or does not know the redemption) raises one open ``review`` flag
``verify_mismatch`` per redemption, resolved by the job itself once the two agree.
"""

from workers.jobs.verify.job import Check, VerifyResult, reconcile, verify

__all__ = ["Check", "VerifyResult", "reconcile", "verify"]
