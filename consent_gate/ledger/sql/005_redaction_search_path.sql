-- consent-gate: consent_redact() and the redaction trigger must not be fooled by temporary tables.
--
-- PostgreSQL searches pg_temp *first* unless the search path names it.  consent_redact() is
-- SECURITY DEFINER with "search_path = pg_catalog, public", so a caller allowed to create
-- temporary tables could shadow data_erasures (a fake tombstone for anybody's decision) and
-- redact rows with no real tombstone behind them; the trigger looked the tombstone up by the
-- same unqualified name.  Now every object is schema-qualified and pg_temp comes last.
-- sql/roles/roles.sql also revokes TEMP on the database from PUBLIC.

CREATE OR REPLACE FUNCTION public.consent_events_append_only() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    token text := pg_catalog.current_setting('consent_gate.redaction_id', true);
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
       OR (pg_catalog.to_jsonb(NEW) - personal) IS DISTINCT FROM (pg_catalog.to_jsonb(OLD) - personal)
       OR NOT EXISTS (SELECT 1 FROM public.data_erasures d
                       WHERE d.erasure_id = token::uuid AND d.kind IN ('retention', 'erasure')
                         AND d.scope = 'record' AND d.consent_id = OLD.consent_id AND d.purpose = OLD.purpose)
    THEN
        RAISE EXCEPTION 'consent_events: only an audited redaction of the personal fields is allowed'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END;
$$;

CREATE OR REPLACE FUNCTION public.consent_redact(p_erasure_id uuid, p_at timestamptz) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public, pg_temp AS $$
DECLARE
    tomb public.data_erasures%ROWTYPE;
    n integer;
BEGIN
    SELECT * INTO tomb FROM public.data_erasures
     WHERE erasure_id = p_erasure_id AND kind IN ('retention', 'erasure') AND scope = 'record';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'consent_redact: no erasure tombstone %', p_erasure_id;
    END IF;
    PERFORM pg_catalog.set_config('consent_gate.redaction_id', p_erasure_id::text, true);
    UPDATE public.consent_events
       SET caller_ref = NULL, caller_number = NULL, redacted_at = p_at, redaction_id = p_erasure_id
     WHERE consent_id = tomb.consent_id AND purpose = tomb.purpose AND redacted_at IS NULL;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM pg_catalog.set_config('consent_gate.redaction_id', '', true);
    RETURN n;
END;
$$;

REVOKE ALL ON FUNCTION public.consent_redact(uuid, timestamptz) FROM PUBLIC;
