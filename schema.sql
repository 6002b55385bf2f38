-- fenx-sync database schema.
--
-- Two SQLite files, kept apart so that long analyst queries never slow down ingest:
--   outbox.db     every notification received, byte-exact, with its processing state;
--   reporting.db  the entities synced from Fenergo, for analysts (added by the sync worker).
--
-- Each file's section starts with a `-- section: NAME version: N` line. fenx-sync applies a
-- section idempotently at start-up (and with `fenx-sync migrate`), records the version in
-- `schema_version`, and refuses to open a file recorded with a newer version than it knows.
-- Times are UTC text in RFC 3339 with milliseconds ('2026-11-23T15:16:59.123Z'), so they sort
-- and compare as text.

-- section: outbox version: 1

CREATE TABLE IF NOT EXISTS schema_version (
    version     INTEGER NOT NULL PRIMARY KEY,
    applied_at  TEXT    NOT NULL
);

-- One row per notification id, ever. Rows are never deleted by ingest, so a Fenergo retry of
-- an acknowledged notification (2-4-8-16 minutes later, or a month later) is recognised.
CREATE TABLE IF NOT EXISTS notification (
    seq              INTEGER PRIMARY KEY,        -- arrival order
    id               TEXT    NOT NULL UNIQUE,    -- Fenergo's notification id: opaque, case-sensitive
    id_derived       INTEGER NOT NULL DEFAULT 0, -- 1: no id was sent; id is sha256 of the raw bytes
    event_type       TEXT,                       -- e.g. 'entitydata:draftverified'; NULL if absent
    tenant_id        TEXT,
    relative_url     TEXT,                       -- link to the changed resource, as sent
    entity_key       TEXT,                       -- entity id from relative_url (or the URL itself):
                                                 -- one fetch serves every pending row for it
    event_when       TEXT,                       -- the notification's `When`, as sent
    correlation_id   TEXT,
    causation_id     TEXT,
    source           TEXT    NOT NULL,           -- 'webhook', or 'resync' for an operator's request
    signature_recipe TEXT,                       -- recipe that verified it, e.g. 'sha256-hex/hex'
    received_at      TEXT    NOT NULL,
    raw              BLOB    NOT NULL,           -- the notification's bytes exactly as received
    duplicates       INTEGER NOT NULL DEFAULT 0, -- later deliveries of the same id (not stored again)
    last_duplicate_at TEXT,
    -- processing state, owned by the sync worker
    status           TEXT    NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'done', 'ignored', 'dead')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT    NOT NULL,           -- not to be tried before this time
    last_error       TEXT,                       -- why the last attempt failed / why it is dead
    last_status      INTEGER,                    -- HTTP status of the last Fenergo response
    processed_at     TEXT
);

-- The sync worker scans pending rows oldest first; the partial index keeps that scan to them.
CREATE INDEX IF NOT EXISTS notification_pending ON notification (seq) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS notification_event_type ON notification (event_type, status);
CREATE INDEX IF NOT EXISTS notification_entity ON notification (entity_key, status);

-- Which entities a sync worker is working on. A worker leases an entity (all its pending rows
-- at once) so no two workers fetch the same entity concurrently; a crashed worker's lease
-- simply expires. Rows without an entity key are leased as 'seq:<seq>'.
CREATE TABLE IF NOT EXISTS entity_lease (
    entity_key   TEXT PRIMARY KEY,
    owner        TEXT NOT NULL,
    leased_until TEXT NOT NULL
);
