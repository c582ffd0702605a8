-- consent-gate: consent_decisions per (consent_id, purpose).
--
-- A granular gate (`documentation+training`) gives the whole call one CONSENT_ID and writes one
-- decision event per purpose.  The view of 001 had one row per consent_id, so one purpose's
-- decision hid the others' (the training worker skipped granted training copies and deleted
-- originals another purpose still needed).  Now:
--
--   * one row per (consent_id, purpose);
--   * decision and the decision columns come from the group's latest decision event (granted,
--     declined, no-input, abandoned, unavailable, notified): a grant the gate then had to report
--     as unavailable counts as unavailable.  NULL when no decision event is stored (yet);
--   * latest_event / latest_at: the group's latest event of any kind;
--   * withdrawn_at (new, last column): when the caller withdrew consent (`*0`).  A withdrawal is
--     logged once, under the call's primary purpose, and withdraws every consent-based purpose
--     of the call: it is set for every group of the consent_id whose legal basis is `consent`,
--     and stays NULL for legal-obligation / legitimate-interest groups.
--
-- Column names, types and order of 001 are kept (CREATE OR REPLACE keeps the grants).

CREATE OR REPLACE VIEW consent_decisions AS
SELECT DISTINCT ON (e.consent_id, e.purpose)
       e.consent_id, e.call_id, d.event AS decision, e.event AS latest_event,
       e.purpose, coalesce(d.legal_basis, e.legal_basis) AS legal_basis, d.language, d.prompt_version,
       d.digit, d.recording_id, d.prompt_started_at, d.decided_at,
       e.occurred_at AS latest_at,
       CASE WHEN coalesce(d.legal_basis, e.legal_basis) = 'consent' THEN
            (SELECT min(w.occurred_at) FROM consent_events w
              WHERE w.consent_id = e.consent_id AND w.event = 'withdrawn')
       END AS withdrawn_at
  FROM consent_events e
  LEFT JOIN LATERAL (
        SELECT * FROM consent_events f
         WHERE f.consent_id = e.consent_id AND f.purpose = e.purpose
           AND f.event IN ('granted', 'declined', 'no-input', 'abandoned', 'unavailable', 'notified')
         ORDER BY f.occurred_at DESC, f.seq DESC LIMIT 1) d ON true
 ORDER BY e.consent_id, e.purpose, e.occurred_at DESC, e.seq DESC;
