-- consent-gate: de-identified training copies (see docs/anonymisation.md).
--
-- training_copies is the index a training pipeline reads.  It holds nothing that points back to
-- a call: a random id, a coarse period (the month), which purpose's retention applies, what was
-- done to each leg, and the date by which the copy must be gone.  No call id, no caller
-- reference, no recording id, no timestamps, no duration.
--
-- training_copy_links is the only join between a copy and the recording it came from.  It lives
-- with the ledger and goes with the recording: erasing a recording (data-subject erasure) erases
-- its copy and this row (consent_gate.admin.training.erase_training_copy); a copy that reaches its
-- delete_after date is deleted with its link (ON DELETE CASCADE).

CREATE TABLE training_copies (
    copy_id      text PRIMARY KEY CHECK (copy_id ~ '^[0-9a-f]{32}$'),
    period       text NOT NULL CHECK (period ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    purpose      text NOT NULL CHECK (purpose ~ '^[a-z0-9-]{1,40}$'),
    caller_leg   text NOT NULL CHECK (caller_leg IN ('mcadams', 'mcadams+pitch')),
    agent_leg    text NOT NULL CHECK (agent_leg IN ('original', 'mcadams', 'mcadams+pitch')),
    method       text NOT NULL CHECK (method ~ '^[a-z0-9.+-]{1,64}$'),
    delete_after date NOT NULL
);

CREATE INDEX training_copies_delete_after ON training_copies (delete_after);

CREATE TABLE training_copy_links (
    recording_id text PRIMARY KEY CHECK (recording_id ~ '^[0-9a-f]{32}$'),
    copy_id      text NOT NULL UNIQUE REFERENCES training_copies (copy_id) ON DELETE CASCADE
);
