-- consent-gate: retention, legal hold and data-subject erasure, without giving up append-only.
--
-- consent_events stays append-only: DELETE and TRUNCATE are still always rejected, and an
-- UPDATE is accepted only when it is an *audited redaction*:
--
--   * it runs inside consent_redact() (which sets the transaction-local setting
--     consent_gate.redaction_id to the id of an erasure tombstone and clears it again);
--   * that tombstone exists in data_erasures (kind 'retention' or 'erasure') and names the
--     same consent_id and purpose as the row;
--   * the row was not redacted before, and the only columns that change are the personal
--     ones (caller_ref, caller_number -> NULL) and the marker (redacted_at, redaction_id).
--     Every other column -- including any column added by a later migration -- must stay
--     byte-for-byte the same, so the non-personal proof that a decision existed (when, which
--     purpose and legal basis, which prompt version, which key, which recording id) survives.
--
-- Even someone who sets the setting by hand can therefore do no more than what an erasure
-- does, and only after writing the tombstone that says so.
--
-- data_erasures (tombstones and refusals) and legal_holds (placed / released) are append-only
-- logs themselves.

ALTER TABLE consent_events
    ADD COLUMN redacted_at  timestamptz,
    ADD COLUMN redaction_id uuid;

-- The sweeper and the erasure look for rows that still hold personal data.
CREATE INDEX consent_events_unredacted ON consent_events (consent_id, purpose) WHERE redacted_at IS NULL;
CREATE INDEX consent_events_recording_id ON consent_events (recording_id) WHERE recording_id IS NOT NULL;

-- One row per thing removed (or refused): the non-personal proof of what happened and why.
--   scope 'record'    : the personal fields of the rows of one (consent_id, purpose)
--   scope 'recording' : the files of one recording id
--   kind  'retention' : the retention period ended (the sweeper)
--   kind  'erasure'   : a data-subject erasure request (GDPR Art. 17)
--   kind  'refusal'   : an erasure request refused (Art. 17(3)(b) legal obligation,
--                       Art. 17(3)(e) legal hold); nothing was removed
CREATE TABLE data_erasures (
    seq           bigserial   PRIMARY KEY,
    erasure_id    uuid        NOT NULL UNIQUE,
    kind          text        NOT NULL CHECK (kind IN ('retention', 'erasure', 'refusal')),
    scope         text        NOT NULL CHECK (scope IN ('record', 'recording')),
    consent_id    uuid,
    purpose       text        CHECK (purpose ~ '^[a-z0-9-]{1,40}$'),
    legal_basis   text        CHECK (legal_basis IN ('consent', 'legitimate-interest', 'legal-obligation')),
    call_id       text        CHECK (length(call_id) <= 64),
    recording_id  text        CHECK (recording_id ~ '^[0-9a-f]{32}$'),
    files         text[]      NOT NULL DEFAULT '{}',
    rows_redacted integer     NOT NULL DEFAULT 0 CHECK (rows_redacted >= 0),
    reason        text        NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
    request_id    uuid,       -- groups the rows written for one data-subject request or one sweep
    request_ref   text        CHECK (length(request_ref) <= 200),   -- e.g. the CRM ticket
    actor         text        NOT NULL CHECK (length(actor) BETWEEN 1 AND 100),
    performed_at  timestamptz NOT NULL,
    stored_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    CHECK (scope <> 'record' OR (consent_id IS NOT NULL AND purpose IS NOT NULL)),
    CHECK (scope <> 'recording' OR recording_id IS NOT NULL),
    CHECK (kind <> 'refusal' OR (files = '{}' AND rows_redacted = 0))
);

CREATE INDEX data_erasures_consent ON data_erasures (consent_id, purpose);
CREATE INDEX data_erasures_recording ON data_erasures (recording_id) WHERE recording_id IS NOT NULL;
CREATE INDEX data_erasures_request ON data_erasures (request_id);

-- Legal holds: a 'placed' row and, later, a 'released' row with the same hold_id.  A hold is on
-- a call (call_id) or on a caller (caller_ref, the same keyed HMAC as in consent_events).
CREATE TABLE legal_holds (
    seq        bigserial   PRIMARY KEY,
    hold_id    uuid        NOT NULL,
    action     text        NOT NULL CHECK (action IN ('placed', 'released')),
    call_id    text        CHECK (length(call_id) <= 64),
    caller_ref text        CHECK (caller_ref ~ '^[0-9a-f]{64}$'),
    reason     text        NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
    actor      text        NOT NULL CHECK (length(actor) BETWEEN 1 AND 100),
    at         timestamptz NOT NULL,
    stored_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    UNIQUE (hold_id, action),
    CHECK ((call_id IS NULL) <> (caller_ref IS NULL))
);

CREATE INDEX legal_holds_call ON legal_holds (call_id) WHERE call_id IS NOT NULL;
CREATE INDEX legal_holds_caller ON legal_holds (caller_ref) WHERE caller_ref IS NOT NULL;

CREATE VIEW active_legal_holds AS
SELECT p.hold_id, p.call_id, p.caller_ref, p.reason, p.actor, p.at
  FROM legal_holds p
 WHERE p.action = 'placed'
   AND NOT EXISTS (SELECT 1 FROM legal_holds r WHERE r.hold_id = p.hold_id AND r.action = 'released');

-- Append-only for the two logs.
CREATE FUNCTION consent_gate_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % is not allowed', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER data_erasures_append_only BEFORE UPDATE OR DELETE ON data_erasures
    FOR EACH ROW EXECUTE FUNCTION consent_gate_append_only();
CREATE TRIGGER data_erasures_no_truncate BEFORE TRUNCATE ON data_erasures
    FOR EACH STATEMENT EXECUTE FUNCTION consent_gate_append_only();
CREATE TRIGGER legal_holds_append_only BEFORE UPDATE OR DELETE ON legal_holds
    FOR EACH ROW EXECUTE FUNCTION consent_gate_append_only();
CREATE TRIGGER legal_holds_no_truncate BEFORE TRUNCATE ON legal_holds
    FOR EACH STATEMENT EXECUTE FUNCTION consent_gate_append_only();
REVOKE UPDATE, DELETE, TRUNCATE ON data_erasures, legal_holds FROM PUBLIC;

-- consent_events: DELETE and TRUNCATE stay forbidden; UPDATE only as an audited redaction (see
-- the top).  The function the two existing triggers (consent_events_no_update_delete,
-- consent_events_no_truncate) call is replaced; the triggers themselves stay as they are.
CREATE OR REPLACE FUNCTION consent_events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    token text := current_setting('consent_gate.redaction_id', true);
    personal constant text[] := ARRAY['caller_ref', 'caller_number', 'redacted_at', 'redaction_id'];
BEGIN
    IF TG_OP <> 'UPDATE' OR token IS NULL OR token = '' THEN
        RAISE EXCEPTION 'consent_events is append-only: % is not allowed', TG_OP
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'personal fields are removed only through consent_redact()';
    END IF;
    IF OLD.redacted_at IS NOT NULL
       OR NEW.redacted_at IS NULL
       OR NEW.redaction_id IS DISTINCT FROM token::uuid
       OR NEW.caller_ref IS NOT NULL
       OR NEW.caller_number IS NOT NULL
       OR (to_jsonb(NEW) - personal) IS DISTINCT FROM (to_jsonb(OLD) - personal)
       OR NOT EXISTS (SELECT 1 FROM data_erasures d
                       WHERE d.erasure_id = token::uuid AND d.kind IN ('retention', 'erasure')
                         AND d.scope = 'record' AND d.consent_id = OLD.consent_id AND d.purpose = OLD.purpose)
    THEN
        RAISE EXCEPTION 'consent_events: only an audited redaction of the personal fields is allowed'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END;
$$;

-- The one redaction path: null the personal fields of the rows a tombstone names.  Returns the
-- number of rows redacted (0 when they already were: idempotent).
CREATE FUNCTION consent_redact(p_erasure_id uuid, p_at timestamptz) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    tomb data_erasures%ROWTYPE;
    n integer;
BEGIN
    SELECT * INTO tomb FROM data_erasures
     WHERE erasure_id = p_erasure_id AND kind IN ('retention', 'erasure') AND scope = 'record';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'consent_redact: no erasure tombstone %', p_erasure_id;
    END IF;
    PERFORM set_config('consent_gate.redaction_id', p_erasure_id::text, true);
    UPDATE consent_events
       SET caller_ref = NULL, caller_number = NULL, redacted_at = p_at, redaction_id = p_erasure_id
     WHERE consent_id = tomb.consent_id AND purpose = tomb.purpose AND redacted_at IS NULL;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM set_config('consent_gate.redaction_id', '', true);
    RETURN n;
END;
$$;

REVOKE ALL ON FUNCTION consent_redact(uuid, timestamptz) FROM PUBLIC;
