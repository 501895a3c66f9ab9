-- Flags that end with what the books learn later (issue 23):
--
-- A lost rollback is no longer lost once the card's restore is in the ledger, whether the
-- rollback's webhook or the card's refund transaction (CREDITS_REFUND / POINTS_REFUND)
-- brought it: the lost_rollback flag becomes already_rolled_back, as 0007 does for a
-- redemption that becomes ROLLED_BACK.
CREATE FUNCTION flags_end_lost_rollback_by_restore() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE flags
    SET category = 'already_rolled_back',
        note = 'the restore is in our records since '
               || to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
               || ' (event ' || NEW.event_id || '): the rollback is no longer missing'
    WHERE redemption_id = NEW.redemption_id AND category = 'lost_rollback' AND status = 'open';
    RETURN NULL;
END
$$;
CREATE TRIGGER ledger_entries_lost_rollback_ended
    AFTER INSERT ON ledger_entries
    FOR EACH ROW WHEN (NEW.effect = 'restore')
    EXECUTE FUNCTION flags_end_lost_rollback_by_restore();

-- A failed rollback a person was to review is settled once a rollback of the same
-- redemption succeeds: the review flags of its failed attempts are resolved with a note.
-- (The handler of redemption.rollback.failed resolves the flag at once when the success
-- came first, so either order ends in the same rows.)
CREATE FUNCTION flags_end_review_by_rollback() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE flags
    SET status = 'resolved', resolved_at = now(),
        note = 'a rollback of the redemption succeeded (rollback ' || COALESCE(NEW.rollback_id, 'unknown')
               || '): nothing is left to roll back'
    WHERE redemption_id = NEW.redemption_id AND category = 'review'
      AND rollback_id IS NOT NULL AND status = 'open';
    RETURN NULL;
END
$$;
CREATE TRIGGER redemptions_review_ended
    AFTER INSERT OR UPDATE OF status ON redemptions
    FOR EACH ROW WHEN (NEW.status = 'ROLLED_BACK')
    EXECUTE FUNCTION flags_end_review_by_rollback();
