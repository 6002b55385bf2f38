-- fenx-sync database schema.
--
-- Two SQLite files, kept apart so that long analyst queries never slow down ingest:
--   outbox.db     every notification received, byte-exact, with its processing state;
--   reporting.db  the entities synced from Fenergo, for analysts (added by the sync worker).
--
-- Each file's section starts with a `-- section: NAME version: N` line. fenx-sync applies a
-- section at start-up (and with `fenx-sync migrate`) in one transaction, records the version in
-- `schema_version`, and refuses to open a file recorded with a newer version than it knows.
-- What precedes a section's first numbered block is idempotent and runs every time; each block
-- (a line `-- upgrade` + `: N`) runs once, in order, on a file recorded below version N and on a
-- new file, so existing stores upgrade in place.
-- Times are UTC text in RFC 3339 with milliseconds ('2026-11-23T15:16:59.123Z'), so they sort
-- and compare as text (src/time.rs writes them all).

-- section: outbox version: 3

CREATE TABLE IF NOT EXISTS schema_version (
    version     INTEGER NOT NULL PRIMARY KEY,
    applied_at  TEXT    NOT NULL
);

-- One row per notification id. Rows are never deleted by ingest, so a Fenergo retry of an
-- acknowledged notification (2-4-8-16 minutes later, or a month later) is recognised; 'done'
-- and 'ignored' rows are pruned once processed longer ago than store.retention (default 90
-- days, well past Fenergo's 30-day retry window); 'pending' and 'dead' rows are never pruned.
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
    source           TEXT    NOT NULL,           -- 'webhook', 'poll', or 'resync' (an operator's request)
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

-- Indexes are paid on every append, so the two the sync worker needs cover pending rows only
-- (settled rows leave them) and the due one grows at its end, as new rows are due at once.
-- Claims take the row due longest first: a range scan over rows already due, however many
-- wait for a later retry. The entity index (`notification_pending_entity`, block 3) is the
-- worker's to fill, not the append's.
CREATE INDEX IF NOT EXISTS notification_due
    ON notification (next_attempt_at, seq) WHERE status = 'pending';
-- `fenx-sync status` counts by event type and status from this index alone.
CREATE INDEX IF NOT EXISTS notification_event_type ON notification (event_type, status);
-- Retention pruning walks finished rows oldest first; the gauges count dead rows. Both partial
-- indexes leave appends alone (a new row is 'pending' with no processed_at).
CREATE INDEX IF NOT EXISTS notification_finished ON notification (processed_at)
    WHERE status IN ('done', 'ignored');
CREATE INDEX IF NOT EXISTS notification_dead ON notification (seq) WHERE status = 'dead';

-- One row, rewritten by the readiness probe: a committed write proves the disk takes writes,
-- where taking the lock and rolling back would not. Written only when no group commit has
-- succeeded lately.
CREATE TABLE IF NOT EXISTS write_probe (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    written_at TEXT    NOT NULL
);
-- Version 1 indexed every row whatever its status; the partial indexes above replace them.
DROP INDEX IF EXISTS notification_pending;
DROP INDEX IF EXISTS notification_entity;

-- Which entities a sync worker is working on. A worker leases an entity (all its pending rows
-- at once) so no two workers fetch the same entity concurrently; a crashed worker's lease
-- simply expires. Rows without an entity key are leased as 'seq:<seq>'.
CREATE TABLE IF NOT EXISTS entity_lease (
    entity_key   TEXT PRIMARY KEY,
    owner        TEXT NOT NULL,
    leased_until TEXT NOT NULL
);

-- upgrade: 2
-- Stale re-fetches (a read not newer than the stored version although the event is newer) have
-- their own budget (sync.stale_retries), apart from `attempts` (404s, 5xx, timeouts).
ALTER TABLE notification ADD COLUMN stale_reads INTEGER NOT NULL DEFAULT 0;

-- upgrade: 3
-- Every pending row of one entity, coalesced into one fetch. Its keys are random, so an append
-- that entered it would dirty a page per row; instead appends write `entity_indexed = 0`, which
-- only grows `notification_unindexed` at its end, and each claim first moves the rows appended
-- since into this index in one statement, where a page takes many rows at once. A row inserted
-- without naming the column (default 1) is indexed at once, as before version 3.
ALTER TABLE notification ADD COLUMN entity_indexed INTEGER NOT NULL DEFAULT 1;
DROP INDEX IF EXISTS notification_pending_entity;
CREATE INDEX notification_pending_entity
    ON notification (entity_key) WHERE status = 'pending' AND entity_indexed = 1;
CREATE INDEX notification_unindexed ON notification (seq) WHERE entity_indexed = 0;

-- section: reporting version: 5

-- reporting.db: the latest verified copy of every entity fetched from Fenergo, its history, and
-- a log of the notifications that caused each fetch. Written only by fenx-sync; analysts read it
-- with plain SQL. It can always be rebuilt by re-fetching, so it trades power-loss durability for
-- speed (synchronous=NORMAL). The PostgreSQL store (schema.postgres.sql) has the same tables,
-- columns and views, so one SQL cookbook serves both.
--
-- Its shape is built by the numbered blocks below, applied in order, once each, in one
-- transaction: a new file gets all of them, an older file those above its recorded version.
-- Block 3 documents the tables; block 4 gives the entity row its summary columns and the
-- indexes their current set. Blocks 1 and 2 are how older files looked.

CREATE TABLE IF NOT EXISTS schema_version (
    version     INTEGER NOT NULL PRIMARY KEY,
    applied_at  TEXT    NOT NULL
);

-- upgrade: 1
-- Version 1 (history: block 3 rebuilds every table).
-- One row per entity: its latest version only. A row is replaced only by a strictly higher
-- version, never by an older or equal one.
CREATE TABLE IF NOT EXISTS entity (
    entity_id            TEXT    NOT NULL PRIMARY KEY, -- Fenergo entity id; case-sensitive
    entity_type          TEXT,                         -- e.g. 'Individual', 'Company'
    version              INTEGER NOT NULL,             -- Fenergo's version number of this entity
    status               TEXT,                         -- Fenergo's status, as sent (e.g. '1')
    created              TEXT,                         -- creation time, as Fenergo sent it
    json                 TEXT    NOT NULL,             -- the full EntityDto (the response's
                                                       -- `data` object) as JSON text: use
                                                       -- json_extract(json, '$.risk.riskLevel')
    last_notification_id TEXT,                         -- the notification that caused this version
    last_event_type      TEXT,                         -- its event type
    last_event_when      TEXT,                         -- its `When`, as sent
    synced_at            TEXT    NOT NULL              -- when fenx-sync wrote this version
);

CREATE INDEX IF NOT EXISTS entity_by_type ON entity (entity_type);
CREATE INDEX IF NOT EXISTS entity_by_last_event_when ON entity (last_event_when);

-- The entity's Single and Custom property values of its current version, one row per property.
-- Properties nested in a Custom property have dotted names ('registeredAddress.city'); the
-- Custom property's own value, when it has one, is under its plain name. Data groups
-- (Collection properties) are in entity_collection instead.
CREATE TABLE IF NOT EXISTS entity_property (
    entity_id   TEXT NOT NULL,             -- entity.entity_id
    name        TEXT NOT NULL,             -- property name, e.g. 'legalEntityName'
    value       TEXT,                      -- see value conventions above; NULL when null
    value_type  TEXT NOT NULL              -- 'Single'; 'Custom' for a Custom property's own value
                CHECK (value_type IN ('Single', 'Custom')),
    PRIMARY KEY (entity_id, name)
) WITHOUT ROWID;

-- "Which entities have property X = Y"; the primary key already serves lookups per entity.
CREATE INDEX IF NOT EXISTS entity_property_by_value ON entity_property (name, value);

-- Data group (Collection property) rows of the entity's current version, flattened: one row
-- per field of each data group row.
CREATE TABLE IF NOT EXISTS entity_collection (
    entity_id   TEXT NOT NULL,             -- entity.entity_id
    property    TEXT NOT NULL,             -- data group property name (dotted when nested)
    row_id      TEXT NOT NULL,             -- the data group row's key in Fenergo
    field       TEXT NOT NULL,             -- field name within the row
    value       TEXT,                      -- see value conventions above; NULL when null
    PRIMARY KEY (entity_id, property, row_id, field)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS entity_collection_by_value
    ON entity_collection (property, field, value);

-- Every version of every entity fenx-sync has stored, append-only. Versions that happened in
-- Fenergo between two fetches are absent: this is what we saw, not Fenergo's full audit trail.
CREATE TABLE IF NOT EXISTS entity_version (
    entity_id       TEXT    NOT NULL,      -- entity.entity_id
    version         INTEGER NOT NULL,      -- Fenergo's version number
    json            TEXT    NOT NULL,      -- the full EntityDto of this version, as in entity.json
    stored_at       TEXT    NOT NULL,      -- when fenx-sync stored it
    notification_id TEXT,                  -- the notification that caused the fetch
    event_type      TEXT,                  -- its event type
    PRIMARY KEY (entity_id, version)
);

CREATE INDEX IF NOT EXISTS entity_version_by_stored_at ON entity_version (stored_at);

-- One row per notification the sync worker finished with (a replay after a crash replaces it).
CREATE TABLE IF NOT EXISTS sync_log (
    notification_id TEXT    NOT NULL PRIMARY KEY, -- Fenergo's notification id; case-sensitive
    event_type      TEXT,                  -- e.g. 'entitydata:draftverified'; NULL if absent
    entity_id       TEXT,                  -- the entity it concerned, when known
    outcome         TEXT    NOT NULL,      -- 'synced' (a new version was stored), 'unchanged'
                                           -- (we already had that version), 'older-ignored'
                                           -- (Fenergo returned an older version than ours),
                                           -- 'stale-accepted' (still not newer after retries),
                                           -- 'confirmation-pending' (served by the entity's
                                           -- pending confirmation read, not a fetch),
                                           -- 'confirmed-changed' (a confirmation read found a
                                           -- newer version; notification_id 'confirm:…'),
                                           -- 'ignored' (event type not synced), 'dead' (gave up)
    attempts        INTEGER NOT NULL,      -- processing attempts, the last one included
    received_at     TEXT    NOT NULL,      -- when the webhook arrived
    event_when      TEXT,                  -- the notification's `When`, as sent
    processed_at    TEXT    NOT NULL,      -- when the worker finished with it
    detail          TEXT                   -- why, for dead letters
);

CREATE INDEX IF NOT EXISTS sync_log_by_event_type ON sync_log (event_type, processed_at);
CREATE INDEX IF NOT EXISTS sync_log_by_outcome ON sync_log (outcome, processed_at);
CREATE INDEX IF NOT EXISTS sync_log_by_entity ON sync_log (entity_id);

-- Current entities with the most used properties as columns (NULL where an entity does not
-- have the property). Every other property is in entity_property, or entity.json.
CREATE VIEW IF NOT EXISTS current_entity AS
SELECT
    entity_id,
    entity_type,
    version,
    status,
    created,
    coalesce(legal_entity_name,
             nullif(trim(coalesce(first_name, '') || ' ' || coalesce(last_name, '')), ''))
        AS name,                    -- legal entity name, else first and last name
    legal_entity_name,              -- property legalEntityName
    country_of_incorporation,       -- property countryOfIncorporation
    registration_number,            -- property registrationNumber
    first_name,                     -- property firstName
    last_name,                      -- property lastName
    date_of_birth,                  -- property dateOfBirth
    entity_status,                  -- property entityStatus
    risk_category,                  -- the entity's risk.riskCategory
    risk_level,                     -- the entity's risk.riskLevel
    last_event_type,
    last_event_when,
    synced_at
FROM (
    -- One primary-key lookup per column: cheap per entity, and a filter on entity_id stays an
    -- index lookup instead of aggregating the whole property table.
    SELECT
        e.*,
        (SELECT value FROM entity_property AS p
          WHERE p.entity_id = e.entity_id AND p.name = 'legalEntityName') AS legal_entity_name,
        (SELECT value FROM entity_property AS p
          WHERE p.entity_id = e.entity_id AND p.name = 'countryOfIncorporation')
            AS country_of_incorporation,
        (SELECT value FROM entity_property AS p
          WHERE p.entity_id = e.entity_id AND p.name = 'registrationNumber')
            AS registration_number,
        (SELECT value FROM entity_property AS p
          WHERE p.entity_id = e.entity_id AND p.name = 'firstName') AS first_name,
        (SELECT value FROM entity_property AS p
          WHERE p.entity_id = e.entity_id AND p.name = 'lastName') AS last_name,
        (SELECT value FROM entity_property AS p
          WHERE p.entity_id = e.entity_id AND p.name = 'dateOfBirth') AS date_of_birth,
        (SELECT value FROM entity_property AS p
          WHERE p.entity_id = e.entity_id AND p.name = 'entityStatus') AS entity_status,
        json_extract(e.json, '$.risk.riskCategory') AS risk_category,
        json_extract(e.json, '$.risk.riskLevel') AS risk_level
    FROM entity AS e
);

-- Per event type: how many notifications were processed and how long, in seconds, from the
-- notification's `When` to the end of its processing. The lag covers notifications that were
-- not dead-lettered and whose `When` is readable; `events` counts them all.
CREATE VIEW IF NOT EXISTS sync_lag AS
SELECT
    event_type,
    count(*) AS events,
    count(lag_seconds) AS timed_events,
    sum(outcome = 'dead') AS dead,
    round(avg(lag_seconds), 3) AS avg_lag_seconds,
    round(max(lag_seconds), 3) AS max_lag_seconds
FROM (
    SELECT
        event_type,
        outcome,
        -- julianday() reads any number of fractional digits and '+hh:mm' offsets; upper() and
        -- trim() admit RFC 3339's lower-case 't'/'z' and stray spaces.
        CASE WHEN outcome <> 'dead' THEN
            (julianday(processed_at) - julianday(upper(trim(event_when)))) * 86400.0
        END AS lag_seconds
    FROM sync_log
)
GROUP BY event_type;

-- Backfill and reconciliation runs: each pass over Fenergo's paged entity list, what it found
-- missing or behind in this store and repaired, and (while running) the cursor to resume from.
CREATE TABLE IF NOT EXISTS reconcile_run (
    run_id        INTEGER PRIMARY KEY,
    kind          TEXT    NOT NULL CHECK (kind IN ('backfill', 'reconcile')),
    status        TEXT    NOT NULL CHECK (status IN ('running', 'finished')),
    started_at    TEXT    NOT NULL,
    updated_at    TEXT    NOT NULL,
    finished_at   TEXT,
    cursor        TEXT,                 -- the list's searchAfter cursor after the last stored page
    total_items   INTEGER,              -- what Fenergo said the list holds
    seen          INTEGER NOT NULL DEFAULT 0, -- entities read from the list
    added         INTEGER NOT NULL DEFAULT 0, -- missing from the store, now stored
    updated       INTEGER NOT NULL DEFAULT 0, -- stored at an older version, now current
    unchanged     INTEGER NOT NULL DEFAULT 0  -- already current
);

-- Small facts the service records for operators and for itself, one row per key: today
-- 'fenergo.credentials_refused' (value: the reason; since: when the identity service first
-- refused; `fenx-sync status` prints it) and 'reconcile.next_due_at' (value: when the next
-- scheduled reconciliation is due, so a restart does not start a full pass).
CREATE TABLE IF NOT EXISTS sync_state (
    key         TEXT PRIMARY KEY,
    value       TEXT NOT NULL,
    since       TEXT NOT NULL,         -- when this value was first recorded
    updated_at  TEXT NOT NULL
) WITHOUT ROWID;

-- Confirmation reads waiting to be made. A read taken less than sync.confirm_after after the
-- newest notification it served was received is provisional (Fenergo may not have caught up):
-- it is stored at once and the entity is read again once due_at has passed. One row per entity;
-- a later provisional read moves due_at forward instead of adding a second read.
CREATE TABLE IF NOT EXISTS entity_confirmation (
    entity_id        TEXT PRIMARY KEY,
    due_at           TEXT    NOT NULL,    -- newest served notification's received_at + confirm_after
    read_version     INTEGER NOT NULL,    -- the version the provisional read returned
    notification_id  TEXT    NOT NULL,    -- the newest notification it served (the write's cause)
    event_type       TEXT,
    event_when       TEXT,
    received_at      TEXT    NOT NULL,    -- when that notification arrived
    attempts         INTEGER NOT NULL DEFAULT 0, -- failed confirmation reads so far
    requested_at     TEXT    NOT NULL     -- when the provisional read was taken
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS entity_confirmation_by_due ON entity_confirmation (due_at);

-- upgrade: 2
ALTER TABLE entity ADD COLUMN confirmed_at TEXT;    -- when a read once confirm_after had passed
                                                    -- last returned this entity (NULL: never yet)
ALTER TABLE entity ADD COLUMN absent_since TEXT;    -- when a reconciliation first found Fenergo's
                                                    -- list no longer returns it (NULL: listed)
ALTER TABLE entity ADD COLUMN last_listed_run INTEGER; -- the last reconcile_run that listed it

-- Entities Fenergo's list no longer returns: kept, never deleted, for an analyst to look into.
CREATE VIEW IF NOT EXISTS absent_entity AS
SELECT entity_id, entity_type, version, status, absent_since, synced_at, confirmed_at
FROM entity
WHERE absent_since IS NOT NULL;

-- upgrade: 3
-- The current shape.
--
-- Keys: every table starts its key with tenant_id (Fenergo's tenant, `fenergo.tenant_id`), so one
-- store can hold several tenants, as a shared PostgreSQL store does; an instance reads and writes
-- only its own tenant's rows.
-- Times: every time column is UTC RFC 3339 text with exactly three fractional digits and 'Z'
-- ('2026-11-23T15:16:59.123Z'), so times compare and sort as text; julianday() computes with
-- them. Times Fenergo sent (created, event_when) are converted to that form; its original
-- strings are kept only in the stored JSON (and the outbox's raw notification).
-- Values: property values are TEXT as sent (JSON null as SQL NULL; numbers, booleans, arrays and
-- objects as their JSON text, e.g. '42', 'true', '["a","b"]'), and also typed where they read as
-- a type: value_number (REAL), value_bool (0/1) and value_date ('YYYY-MM-DD'); NULL otherwise.
-- Version 2 files are rebuilt in place: rows keep their data under the configured tenant, times
-- are converted, and property and data group rows are flattened again from entity.json.

DROP VIEW IF EXISTS current_entity;
DROP VIEW IF EXISTS sync_lag;
DROP VIEW IF EXISTS absent_entity;
ALTER TABLE entity RENAME TO v2_entity;
ALTER TABLE entity_version RENAME TO v2_entity_version;
ALTER TABLE sync_log RENAME TO v2_sync_log;
ALTER TABLE reconcile_run RENAME TO v2_reconcile_run;
ALTER TABLE sync_state RENAME TO v2_sync_state;
ALTER TABLE entity_confirmation RENAME TO v2_entity_confirmation;
-- Derived from entity.json: fenx-sync flattens every entity again after this block.
DROP TABLE entity_property;
DROP TABLE entity_collection;

-- One row per entity: its latest version only. A row is replaced only by a strictly higher
-- version, never by an older or equal one.
CREATE TABLE entity (
    tenant_id            TEXT    NOT NULL,             -- Fenergo tenant id
    entity_id            TEXT    NOT NULL,             -- Fenergo entity id; case-sensitive
    entity_type          TEXT,                         -- e.g. 'Individual', 'Company'
    version              INTEGER NOT NULL,             -- Fenergo's version number of this entity
    status               TEXT,                         -- Fenergo's status, as sent (e.g. '1')
    created              TEXT,                         -- when Fenergo created the entity
    json                 TEXT    NOT NULL,             -- the full EntityDto (the response's
                                                       -- `data` object) as JSON text: use
                                                       -- json_extract(json, '$.risk.riskLevel')
    last_notification_id TEXT,                         -- the notification that caused this version
    last_event_type      TEXT,                         -- its event type
    last_event_when      TEXT,                         -- its `When`
    synced_at            TEXT    NOT NULL,             -- when fenx-sync wrote this version
    confirmed_at         TEXT,                         -- when a read once sync.confirm_after had
                                                       -- passed last returned it (NULL: not yet)
    absent_since         TEXT,                         -- when a reconciliation first found
                                                       -- Fenergo's list no longer returns it
    last_listed_run      INTEGER,                      -- the last reconcile_run that listed it
    PRIMARY KEY (tenant_id, entity_id)
);

-- The entity's Single and Custom property values of its current version, one row per property.
-- Properties nested in a Custom property have dotted names ('registeredAddress.city'); the
-- Custom property's own value, when it has one, is under its plain name. Data groups
-- (Collection properties) are in entity_collection instead.
CREATE TABLE entity_property (
    tenant_id    TEXT NOT NULL,
    entity_id    TEXT NOT NULL,            -- entity.entity_id
    name         TEXT NOT NULL,            -- property name, e.g. 'legalEntityName'
    value        TEXT,                     -- as sent (see Values above); NULL when null
    value_type   TEXT NOT NULL             -- 'Single'; 'Custom' for a Custom property's own value
                 CHECK (value_type IN ('Single', 'Custom')),
    value_number REAL,                     -- the value as a number, when it is one
    value_bool   INTEGER,                  -- 1/0 when the value is true/false (any case)
    value_date   TEXT,                     -- 'YYYY-MM-DD' when the value is a date or date-time
    PRIMARY KEY (tenant_id, entity_id, name)
) WITHOUT ROWID;

-- Data group (Collection property) rows of the entity's current version, flattened: one row
-- per field of each data group row.
CREATE TABLE entity_collection (
    tenant_id    TEXT NOT NULL,
    entity_id    TEXT NOT NULL,            -- entity.entity_id
    property     TEXT NOT NULL,            -- data group property name (dotted when nested)
    row_id       TEXT NOT NULL,            -- the data group row's key in Fenergo
    field        TEXT NOT NULL,            -- field name within the row
    value        TEXT,                     -- as sent (see Values above); NULL when null
    value_number REAL,
    value_bool   INTEGER,
    value_date   TEXT,
    PRIMARY KEY (tenant_id, entity_id, property, row_id, field)
) WITHOUT ROWID;

-- Every version of every entity fenx-sync has stored, append-only (store.history_retention, when
-- set, prunes old versions but never an entity's current one). Versions that happened in Fenergo
-- between two fetches are absent: this is what we saw, not Fenergo's full audit trail.
CREATE TABLE entity_version (
    tenant_id       TEXT    NOT NULL,
    entity_id       TEXT    NOT NULL,      -- entity.entity_id
    version         INTEGER NOT NULL,      -- Fenergo's version number
    json            TEXT    NOT NULL,      -- the full EntityDto of this version, as in entity.json
    stored_at       TEXT    NOT NULL,      -- when fenx-sync stored it
    notification_id TEXT,                  -- the notification that caused the fetch
    event_type      TEXT,                  -- its event type
    PRIMARY KEY (tenant_id, entity_id, version)
);

-- One row per notification the sync worker finished with (a replay after a crash, or the same
-- notification delivered to another instance, replaces it).
CREATE TABLE sync_log (
    tenant_id       TEXT    NOT NULL,
    notification_id TEXT    NOT NULL,      -- Fenergo's notification id; case-sensitive
    event_type      TEXT,                  -- e.g. 'entitydata:draftverified'; NULL if absent
    entity_id       TEXT,                  -- the entity it concerned, when known
    outcome         TEXT    NOT NULL,      -- 'synced' (a new version was stored), 'unchanged'
                                           -- (we already had that version), 'older-ignored'
                                           -- (Fenergo returned an older version than ours),
                                           -- 'stale-accepted' (still not newer after retries),
                                           -- 'confirmation-pending' (served by the entity's
                                           -- pending confirmation read, not a fetch),
                                           -- 'confirmed-changed' (a confirmation read found a
                                           -- newer version; notification_id 'confirm:…'),
                                           -- 'ignored' (event type not synced), 'dead' (gave up)
    attempts        INTEGER NOT NULL,      -- processing attempts, the last one included
    received_at     TEXT    NOT NULL,      -- when the webhook arrived
    event_when      TEXT,                  -- the notification's `When` (NULL if unreadable)
    processed_at    TEXT    NOT NULL,      -- when the worker finished with it
    detail          TEXT,                  -- why, for dead letters
    PRIMARY KEY (tenant_id, notification_id)
);

-- Backfill and reconciliation runs: each pass over Fenergo's paged entity list, what it found
-- missing or behind in this store and repaired, and (while running) the cursor to resume from.
CREATE TABLE reconcile_run (
    run_id        INTEGER PRIMARY KEY,
    tenant_id     TEXT    NOT NULL,
    kind          TEXT    NOT NULL CHECK (kind IN ('backfill', 'reconcile')),
    status        TEXT    NOT NULL CHECK (status IN ('running', 'finished')),
    started_at    TEXT    NOT NULL,
    updated_at    TEXT    NOT NULL,
    finished_at   TEXT,
    cursor        TEXT,                 -- the list's searchAfter cursor after the last stored page
    total_items   INTEGER,              -- what Fenergo said the list holds
    seen          INTEGER NOT NULL DEFAULT 0, -- entities read from the list
    added         INTEGER NOT NULL DEFAULT 0, -- missing from the store, now stored
    updated       INTEGER NOT NULL DEFAULT 0, -- stored at an older version, now current
    unchanged     INTEGER NOT NULL DEFAULT 0  -- already current
);

-- Small facts the service records for operators and for itself, one row per key: today
-- 'fenergo.credentials_refused' (value: the reason; since: when the identity service first
-- refused; `fenx-sync status` prints it) and 'reconcile.next_due_at' (value: when the next
-- scheduled reconciliation is due, so a restart does not start a full pass).
CREATE TABLE sync_state (
    tenant_id   TEXT NOT NULL,
    key         TEXT NOT NULL,
    value       TEXT NOT NULL,
    since       TEXT NOT NULL,         -- when this value was first recorded
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (tenant_id, key)
) WITHOUT ROWID;

-- Confirmation reads waiting to be made. A read taken less than sync.confirm_after after the
-- newest notification it served was received is provisional (Fenergo may not have caught up):
-- it is stored at once and the entity is read again once due_at has passed. One row per entity;
-- a later provisional read moves due_at forward instead of adding a second read.
CREATE TABLE entity_confirmation (
    tenant_id        TEXT    NOT NULL,
    entity_id        TEXT    NOT NULL,
    due_at           TEXT    NOT NULL,    -- newest served notification's received_at + confirm_after
    read_version     INTEGER NOT NULL,    -- the version the provisional read returned
    notification_id  TEXT    NOT NULL,    -- the newest notification it served (the write's cause)
    event_type       TEXT,
    event_when       TEXT,
    received_at      TEXT    NOT NULL,    -- when that notification arrived
    attempts         INTEGER NOT NULL DEFAULT 0, -- failed confirmation reads so far
    requested_at     TEXT    NOT NULL,    -- when the provisional read was taken
    PRIMARY KEY (tenant_id, entity_id)
) WITHOUT ROWID;

-- Version 2 rows, under the tenant fenx-sync is configured with (temp.migration_tenant).
INSERT INTO entity
SELECT (SELECT tenant_id FROM migration_tenant), entity_id, entity_type, version, status,
       strftime('%Y-%m-%dT%H:%M:%fZ', upper(trim(created))), json, last_notification_id,
       last_event_type, strftime('%Y-%m-%dT%H:%M:%fZ', upper(trim(last_event_when))),
       strftime('%Y-%m-%dT%H:%M:%fZ', synced_at), strftime('%Y-%m-%dT%H:%M:%fZ', confirmed_at),
       strftime('%Y-%m-%dT%H:%M:%fZ', absent_since), last_listed_run
  FROM v2_entity;
INSERT INTO entity_version
SELECT (SELECT tenant_id FROM migration_tenant), entity_id, version, json,
       strftime('%Y-%m-%dT%H:%M:%fZ', stored_at), notification_id, event_type
  FROM v2_entity_version;
INSERT INTO sync_log
SELECT (SELECT tenant_id FROM migration_tenant), notification_id, event_type, entity_id, outcome,
       attempts, strftime('%Y-%m-%dT%H:%M:%fZ', received_at),
       strftime('%Y-%m-%dT%H:%M:%fZ', upper(trim(event_when))),
       strftime('%Y-%m-%dT%H:%M:%fZ', processed_at), detail
  FROM v2_sync_log;
INSERT INTO reconcile_run
SELECT run_id, (SELECT tenant_id FROM migration_tenant), kind, status, started_at, updated_at,
       finished_at, cursor, total_items, seen, added, updated, unchanged
  FROM v2_reconcile_run;
INSERT INTO sync_state
SELECT (SELECT tenant_id FROM migration_tenant), key, value, since, updated_at FROM v2_sync_state;
INSERT INTO entity_confirmation
SELECT (SELECT tenant_id FROM migration_tenant), entity_id, due_at, read_version,
       notification_id, event_type, strftime('%Y-%m-%dT%H:%M:%fZ', upper(trim(event_when))),
       received_at, attempts, requested_at
  FROM v2_entity_confirmation;
DROP TABLE v2_entity;
DROP TABLE v2_entity_version;
DROP TABLE v2_sync_log;
DROP TABLE v2_reconcile_run;
DROP TABLE v2_sync_state;
DROP TABLE v2_entity_confirmation;

-- Indexes back the README cookbook; the primary keys serve lookups per entity.
CREATE INDEX entity_by_type ON entity (tenant_id, entity_type);
CREATE INDEX entity_by_last_event_when ON entity (tenant_id, last_event_when);
-- "Which entities have property X = Y".
CREATE INDEX entity_property_by_value ON entity_property (name, value);
CREATE INDEX entity_collection_by_value ON entity_collection (property, field, value);
CREATE INDEX entity_version_by_stored_at ON entity_version (stored_at);
CREATE INDEX sync_log_by_event_type ON sync_log (event_type, processed_at);
CREATE INDEX sync_log_by_outcome ON sync_log (outcome, processed_at);
CREATE INDEX sync_log_by_entity ON sync_log (entity_id);
CREATE INDEX entity_confirmation_by_due ON entity_confirmation (tenant_id, due_at);

-- Current entities with the most used properties as columns (NULL where an entity does not
-- have the property). Every other property is in entity_property, or entity.json.
CREATE VIEW current_entity AS
SELECT
    tenant_id,
    entity_id,
    entity_type,
    version,
    status,
    created,
    coalesce(legal_entity_name,
             nullif(trim(coalesce(first_name, '') || ' ' || coalesce(last_name, '')), ''))
        AS name,                    -- legal entity name, else first and last name
    legal_entity_name,              -- property legalEntityName
    country_of_incorporation,       -- property countryOfIncorporation
    registration_number,            -- property registrationNumber
    first_name,                     -- property firstName
    last_name,                      -- property lastName
    date_of_birth,                  -- property dateOfBirth, as a date ('YYYY-MM-DD')
    entity_status,                  -- property entityStatus
    risk_category,                  -- the entity's risk.riskCategory
    risk_level,                     -- the entity's risk.riskLevel
    last_event_type,
    last_event_when,
    synced_at
FROM (
    -- One primary-key lookup per column: cheap per entity, and a filter on entity_id stays an
    -- index lookup instead of aggregating the whole property table.
    SELECT
        e.*,
        (SELECT value FROM entity_property AS p WHERE p.tenant_id = e.tenant_id
            AND p.entity_id = e.entity_id AND p.name = 'legalEntityName') AS legal_entity_name,
        (SELECT value FROM entity_property AS p WHERE p.tenant_id = e.tenant_id
            AND p.entity_id = e.entity_id AND p.name = 'countryOfIncorporation')
            AS country_of_incorporation,
        (SELECT value FROM entity_property AS p WHERE p.tenant_id = e.tenant_id
            AND p.entity_id = e.entity_id AND p.name = 'registrationNumber')
            AS registration_number,
        (SELECT value FROM entity_property AS p WHERE p.tenant_id = e.tenant_id
            AND p.entity_id = e.entity_id AND p.name = 'firstName') AS first_name,
        (SELECT value FROM entity_property AS p WHERE p.tenant_id = e.tenant_id
            AND p.entity_id = e.entity_id AND p.name = 'lastName') AS last_name,
        (SELECT value_date FROM entity_property AS p WHERE p.tenant_id = e.tenant_id
            AND p.entity_id = e.entity_id AND p.name = 'dateOfBirth') AS date_of_birth,
        (SELECT value FROM entity_property AS p WHERE p.tenant_id = e.tenant_id
            AND p.entity_id = e.entity_id AND p.name = 'entityStatus') AS entity_status,
        json_extract(e.json, '$.risk.riskCategory') AS risk_category,
        json_extract(e.json, '$.risk.riskLevel') AS risk_level
    FROM entity AS e
);

-- Per tenant and event type: how many notifications were processed and how long, in seconds,
-- from the notification's `When` to the end of its processing. The lag covers notifications that
-- were not dead-lettered and whose `When` was readable; `events` counts them all.
CREATE VIEW sync_lag AS
SELECT
    tenant_id,
    event_type,
    count(*) AS events,
    count(lag_seconds) AS timed_events,
    sum(outcome = 'dead') AS dead,
    round(avg(lag_seconds), 3) AS avg_lag_seconds,
    round(max(lag_seconds), 3) AS max_lag_seconds
FROM (
    SELECT
        tenant_id,
        event_type,
        outcome,
        CASE WHEN outcome <> 'dead' THEN
            (julianday(processed_at) - julianday(event_when)) * 86400.0
        END AS lag_seconds
    FROM sync_log
)
GROUP BY tenant_id, event_type;

-- Entities Fenergo's list no longer returns: kept, never deleted, for an analyst to look into.
CREATE VIEW absent_entity AS
SELECT tenant_id, entity_id, entity_type, version, status, absent_since, synced_at, confirmed_at
FROM entity
WHERE absent_since IS NOT NULL;

-- upgrade: 4
-- Cost flat as the store grows. The columns current_entity shows are stored on the entity row
-- (fenx-sync fills them on every write, and for existing rows right after this block), so
-- grouping or filtering on them is an index scan, not seven property lookups per entity; and the
-- indexes on values, which cost more bytes per entity than the values themselves, give way to
-- one on numbers. Lookups by arbitrary property text are yours to index if you need them:
--   CREATE INDEX my_property_by_value ON entity_property (name, value);
ALTER TABLE entity ADD COLUMN previous_version INTEGER;  -- the version this one replaced
                                                         -- (NULL: the first fenx-sync stored)
ALTER TABLE entity ADD COLUMN legal_entity_name TEXT;          -- property legalEntityName
ALTER TABLE entity ADD COLUMN country_of_incorporation TEXT;   -- property countryOfIncorporation
ALTER TABLE entity ADD COLUMN registration_number TEXT;        -- property registrationNumber
ALTER TABLE entity ADD COLUMN first_name TEXT;                 -- property firstName
ALTER TABLE entity ADD COLUMN last_name TEXT;                  -- property lastName
ALTER TABLE entity ADD COLUMN date_of_birth TEXT;              -- property dateOfBirth, 'YYYY-MM-DD'
ALTER TABLE entity ADD COLUMN entity_status TEXT;              -- property entityStatus
ALTER TABLE entity ADD COLUMN risk_category;     -- risk.riskCategory, typed as json_extract reads it
ALTER TABLE entity ADD COLUMN risk_level;        -- risk.riskLevel (a number, usually)
UPDATE entity SET previous_version = (
    SELECT max(v.version) FROM entity_version AS v
     WHERE v.tenant_id = entity.tenant_id AND v.entity_id = entity.entity_id
       AND v.version < entity.version);

DROP INDEX entity_by_type;
DROP INDEX entity_by_last_event_when;
DROP INDEX entity_property_by_value;
DROP INDEX entity_collection_by_value;
-- Companies by country, individuals by date of birth with their names: read from the index
-- alone. tenant_id comes after the columns analysts filter on, so a query that does not name
-- the tenant still seeks.
CREATE INDEX entity_by_country ON entity (entity_type, country_of_incorporation, tenant_id);
CREATE INDEX entity_by_date_of_birth
    ON entity (entity_type, date_of_birth, tenant_id, entity_id, first_name, last_name,
               legal_entity_name)
    WHERE date_of_birth IS NOT NULL;
-- Entities with an earlier version: what changed in their latest one.
CREATE INDEX entity_with_previous ON entity (tenant_id, entity_id)
    WHERE previous_version IS NOT NULL;
-- "Which entities have a number property above N" (numberOfEmployees > 250).
CREATE INDEX entity_property_by_number ON entity_property (name, value_number)
    WHERE value_number IS NOT NULL;

DROP VIEW current_entity;
-- Current entities with the most used properties as columns (NULL where an entity does not
-- have the property). Every other property is in entity_property, or entity.json.
CREATE VIEW current_entity AS
SELECT
    tenant_id,
    entity_id,
    entity_type,
    version,
    previous_version,               -- the version this one replaced (NULL: the first stored)
    status,
    created,
    coalesce(legal_entity_name,
             nullif(trim(coalesce(first_name, '') || ' ' || coalesce(last_name, '')), ''))
        AS name,                    -- legal entity name, else first and last name
    legal_entity_name,
    country_of_incorporation,
    registration_number,
    first_name,
    last_name,
    date_of_birth,
    entity_status,
    risk_category,
    risk_level,
    last_event_type,
    last_event_when,
    synced_at
FROM entity;

-- upgrade: 5
-- Indexes deferred by a bulk load. A backfill into a store holding no entities drops the indexes
-- keyed by property values (entity_by_date_of_birth, entity_property_by_number): each insert
-- into one lands on a page at random, so keeping them up row by row slows the load as the store
-- grows, where building them once at its end reads the rows in order. While one is dropped its
-- CREATE INDEX statement waits here; fenx-sync runs it at the end of a backfill or
-- reconciliation, or at start-up, once no backfill is unfinished (a failed one, resumed, goes
-- on loading without them).
CREATE TABLE deferred_index (
    name        TEXT PRIMARY KEY,      -- the index
    definition  TEXT NOT NULL,         -- its CREATE INDEX statement
    deferred_at TEXT NOT NULL          -- when the bulk load dropped it
) WITHOUT ROWID;
