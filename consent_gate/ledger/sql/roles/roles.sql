-- consent-gate: least-privilege database roles.  Not a migration (roles are cluster-wide and
-- need a privileged user): run it once, and again after each `consent-gate db migrate`, as a
-- superuser or the database owner (REVOKE TEMPORARY ON DATABASE below needs one of them):
--
--   psql -v ON_ERROR_STOP=1 -d consent_gate -f sql/roles/roles.sql
--
-- consent_gate_gate   the ARI service and the AGI script: INSERT decisions into the ledger and
--                     nothing else -- it cannot read other callers' decisions, change or delete
--                     one, or touch the triggers.
-- consent_gate_admin  the retention sweeper, legal holds, data-subject export/erase (CLI and
--                     API) and the training-copy worker: read the ledger, append tombstones
--                     and holds, redact only through consent_redact(), manage training copies.
--
-- Both are NOLOGIN groups: give each service user its own login role, e.g.
--   CREATE ROLE asterisk LOGIN IN ROLE consent_gate_gate;   -- the AGI script and the ARI service
--                                                           -- (both run as asterisk; peer auth)
--   CREATE ROLE consent_gate_tools LOGIN IN ROLE consent_gate_admin;
--   \password consent_gate_tools     -- the same password as /etc/consent-gate/admin-pgpass
-- The tools (deploy/consent-gate-api.service, consent-gate-retention.service) run as their own
-- OS user consent-gate-admin and get that password as a systemd credential; with peer auth
-- instead, CREATE ROLE "consent-gate-admin" LOGIN IN ROLE consent_gate_admin.  Never make the
-- asterisk role a member of consent_gate_admin: Asterisk would then hold
-- the right to redact and to read every caller's decisions.
-- Neither owns a table, so neither can ALTER TABLE ... DISABLE TRIGGER: the append-only
-- guarantee holds against the service's own credentials.  Keep the owning (migrating) role for
-- migrations only.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'consent_gate_gate') THEN
        CREATE ROLE consent_gate_gate NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'consent_gate_admin') THEN
        CREATE ROLE consent_gate_admin NOLOGIN;
    END IF;
END
$$;

-- No temporary tables for anybody but the owner: a temporary table is searched before the
-- real one (unless a function pins pg_temp last, as consent_redact() now does) and is the
-- classic way to fool a SECURITY DEFINER function.  Needs the database owner or a superuser.
DO $$
BEGIN
    EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM consent_gate_gate, consent_gate_admin',
                   current_database());
END
$$;

-- Start from nothing, so rerunning after a migration leaves exactly the grants below.
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM consent_gate_gate, consent_gate_admin;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM consent_gate_gate, consent_gate_admin;
GRANT USAGE ON SCHEMA public TO consent_gate_gate, consent_gate_admin;

-- The gate: one INSERT per decision (ON CONFLICT DO NOTHING needs nothing more; the journal
-- replay is the same INSERT), and the id sequence behind it.
GRANT INSERT ON consent_events TO consent_gate_gate;
-- ON CONFLICT (event_id) reads the conflict target: that one column (a random UUID), no other.
GRANT SELECT (event_id) ON consent_events TO consent_gate_gate;
GRANT USAGE ON SEQUENCE consent_events_seq_seq TO consent_gate_gate;
-- The node check (--check-config): read the shared fingerprints, record the first ones.
GRANT SELECT, INSERT ON cluster_identity, cluster_nodes TO consent_gate_gate;

-- The tools.
GRANT SELECT ON ALL TABLES IN SCHEMA public TO consent_gate_admin;
GRANT INSERT ON consent_events, data_erasures, legal_holds TO consent_gate_admin;
GRANT SELECT, INSERT, UPDATE, DELETE ON training_copies, training_copy_links TO consent_gate_admin;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO consent_gate_admin;
GRANT EXECUTE ON FUNCTION consent_redact(uuid, timestamptz) TO consent_gate_admin;
