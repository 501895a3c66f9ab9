-- The raw body of an event whose body PostgreSQL's jsonb refuses (NaN or Infinity, an
-- escaped lone surrogate or NUL, nesting too deep for its parser): kept as text, byte for
-- byte, so its dead letter still shows what came and a person can judge it. NULL for every
-- other event (its body is in payload), and once retention prunes the body.
ALTER TABLE events ADD COLUMN raw_body text;
ALTER TABLE events ADD CONSTRAINT events_one_body CHECK (payload IS NULL OR raw_body IS NULL);
