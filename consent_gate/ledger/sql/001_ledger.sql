-- consent-gate ledger: append-only consent events.
--
-- One row per event; a decision (CONSENT_ID) can have several events over a
-- call (granted, later withdrawn, ...).  Rows are never updated or deleted by
-- the application: triggers below reject UPDATE, DELETE and TRUNCATE, so the
-- guarantee lives in the database, not in a convention.  Personal data is kept
-- to a minimum: the caller is a keyed HMAC reference; the raw number only when
-- the operator configures it.

CREATE TABLE consent_events (
    seq               bigserial PRIMARY KEY,
    -- idempotency key: replaying the local journal twice inserts once
    event_id          uuid        NOT NULL UNIQUE,
    consent_id        uuid        NOT NULL,
    call_id           text        NOT NULL CHECK (length(call_id) <= 64),
    event             text        NOT NULL CHECK (event IN (
                          'granted', 'declined', 'no-input', 'abandoned', 'unavailable',
                          'notified', 'withdrawn', 'caller-records', 'paused', 'resumed')),
    purpose           text        NOT NULL CHECK (purpose ~ '^[a-z0-9-]{1,40}$'),
    legal_basis       text        NOT NULL CHECK (legal_basis IN ('consent', 'legitimate-interest', 'legal-obligation')),
    language          text        CHECK (language ~ '^[a-z]{2}(_[A-Z]{2})?$'),
    prompt_version    text        CHECK (prompt_version ~ '^[0-9a-f]{64}$'),
    digit             text        CHECK (digit ~ '^[0-9*#]{1,4}$'),
    caller_ref        text        CHECK (caller_ref ~ '^[0-9a-f]{64}$'),
    caller_number     text        CHECK (length(caller_number) <= 64),
    recording_id      text        CHECK (recording_id ~ '^[0-9a-f]{32}$'),
    prompt_started_at timestamptz,
    decided_at        timestamptz,
    occurred_at       timestamptz NOT NULL,
    stored_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    source            text        NOT NULL CHECK (source IN ('ari', 'agi', 'cli', 'journal')),
    via_journal       boolean     NOT NULL DEFAULT false,
    detail            jsonb       NOT NULL DEFAULT '{}'::jsonb
);

CREATE INDEX consent_events_call_id ON consent_events (call_id);
CREATE INDEX consent_events_consent_id ON consent_events (consent_id);
CREATE INDEX consent_events_caller_ref ON consent_events (caller_ref);

CREATE FUNCTION consent_events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'consent_events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER consent_events_no_update_delete
    BEFORE UPDATE OR DELETE ON consent_events
    FOR EACH ROW EXECUTE FUNCTION consent_events_append_only();

CREATE TRIGGER consent_events_no_truncate
    BEFORE TRUNCATE ON consent_events
    FOR EACH STATEMENT EXECUTE FUNCTION consent_events_append_only();

REVOKE UPDATE, DELETE, TRUNCATE ON consent_events FROM PUBLIC;

-- The current state of each decision: its first event plus the latest one.
CREATE VIEW consent_decisions AS
SELECT DISTINCT ON (e.consent_id)
       e.consent_id, e.call_id, first.event AS decision, e.event AS latest_event,
       first.purpose, first.legal_basis, first.language, first.prompt_version,
       first.digit, first.recording_id, first.prompt_started_at, first.decided_at,
       e.occurred_at AS latest_at
  FROM consent_events e
  JOIN LATERAL (
        SELECT * FROM consent_events f
         WHERE f.consent_id = e.consent_id
         ORDER BY f.occurred_at, f.seq LIMIT 1) first ON true
 ORDER BY e.consent_id, e.occurred_at DESC, e.seq DESC;
