-- consent-gate: what every node writing to one ledger must share (issue 15: several Asterisk
-- nodes, one ledger).  A caller's pseudonym (caller_ref) is an HMAC under the node's key and a
-- decision names the prompt audio by its sha256: a node with another key or other prompts would
-- write decisions that no longer match the others'.  `consent-gate-ari --check-config` records
-- the first node's fingerprints here and refuses a node whose fingerprints differ.
--
-- fingerprint: for 'hmac-key' an HMAC-SHA256 of a fixed label under the key (never the key);
-- for 'prompt-set' the sha256 over every prompt's language, name and audio sha256.
-- A deliberate change (a new key, new prompt audio on every node) is adopted by the owning
-- role: DELETE the row, then run --check-config on an updated node (docs/deployment.md).

CREATE TABLE cluster_identity (
    name text PRIMARY KEY CHECK (name IN ('hmac-key', 'prompt-set')),
    fingerprint text NOT NULL CHECK (fingerprint ~ '^[0-9a-f]{64}$'),
    first_node text NOT NULL CHECK (length(first_node) BETWEEN 1 AND 255),
    recorded_at timestamptz NOT NULL DEFAULT now()
);

-- Which node's Asterisk uses which systemname: the ledger's call_id is the channel uniqueid,
-- "<systemname>-<epoch>.<sequence>" (just "<epoch>.<sequence>" without one), so two Asterisks
-- sharing a systemname, or both without, hand out the same call ids.  A node is its Asterisk's
-- entity id and its host name; --check-config inserts the node's claim and refuses a
-- systemname that another node holds.  A node that is retired or renamed: DELETE its row (the owning role).
CREATE TABLE cluster_nodes (
    system_name text PRIMARY KEY CHECK (length(system_name) <= 255),
    node text NOT NULL CHECK (length(node) BETWEEN 1 AND 255),
    recorded_at timestamptz NOT NULL DEFAULT now()
);
