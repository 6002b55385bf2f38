-- fenx-sync reporting store in PostgreSQL (store.reporting_url): the same tables, columns and
-- views as the `reporting` section of schema.sql, in PostgreSQL's types, so one SQL cookbook
-- serves both stores. The outbox always stays in local SQLite.
--
-- Migrations: each block below starts with a line `-- migration` + `: N` and runs once, in order.
-- fenx-sync applies every pending block at start-up (and with `fenx-sync migrate`) in ONE
-- transaction that first takes a transaction-scoped advisory lock, so two instances starting at
-- once never race; it records each block in schema_version and refuses a database recorded with a
-- newer version than it knows. The tables live in the connection's current schema (the first
-- entry of search_path; `?options=-c%20search_path%3Dreporting` in the URL picks another).
--
-- Keys: every table's key includes tenant_id (Fenergo's tenant, `fenergo.tenant_id`), so
-- instances for several tenants share one database; an instance reads and writes only its own
-- tenant's rows. (Since migration 2 the entity tables' keys lead with entity_id.)
-- Times: every time column is timestamptz. Times Fenergo sent (created, event_when) are converted;
-- its original strings are kept only in the stored JSON (and the outbox's raw notification).
-- Text: every text column compares and sorts by byte (COLLATE "C"), as SQLite's do: keys and
-- indexes stay fast and ORDER BY gives the same order in both stores.
-- Values: property values are text as sent (JSON null as SQL NULL; numbers, booleans, arrays and
-- objects as their JSON text, e.g. '42', 'true', '["a","b"]'), and also typed where they read as
-- a type: value_number (double precision), value_bool and value_date; NULL otherwise.

-- migration: 1

-- Which migrations this database has had, one row each.
CREATE TABLE schema_version (
    version     bigint      PRIMARY KEY,
    applied_at  timestamptz NOT NULL
);

-- One row per entity: its latest version only. A row is replaced only by a strictly higher
-- version, never by an older or equal one.
CREATE TABLE entity (
    tenant_id            text COLLATE "C" NOT NULL,  -- Fenergo tenant id
    entity_id            text COLLATE "C" NOT NULL,  -- Fenergo entity id; case-sensitive
    entity_type          text COLLATE "C",      -- e.g. 'Individual', 'Company'
    version              bigint      NOT NULL,  -- Fenergo's version number of this entity
    status               text COLLATE "C",      -- Fenergo's status, as sent (e.g. '1')
    created              timestamptz,           -- when Fenergo created the entity
    json                 jsonb       NOT NULL,  -- the full EntityDto (the response's `data`
                                                -- object): json->'risk'->>'riskLevel'
    last_notification_id text COLLATE "C",      -- the notification that caused this version
    last_event_type      text COLLATE "C",      -- its event type
    last_event_when      timestamptz,           -- its `When`
    synced_at            timestamptz NOT NULL,  -- when fenx-sync wrote this version
    confirmed_at         timestamptz,           -- when a read once sync.confirm_after had passed
                                                -- last returned it (NULL: not yet)
    absent_since         timestamptz,           -- when a reconciliation first found Fenergo's
                                                -- list no longer returns it
    last_listed_run      bigint,                -- the last reconcile_run that listed it
    PRIMARY KEY (tenant_id, entity_id)
);

-- The entity's Single and Custom property values of its current version, one row per property.
-- Properties nested in a Custom property have dotted names ('registeredAddress.city'); the
-- Custom property's own value, when it has one, is under its plain name. Data groups
-- (Collection properties) are in entity_collection instead.
CREATE TABLE entity_property (
    tenant_id    text COLLATE "C" NOT NULL,
    entity_id    text COLLATE "C" NOT NULL,             -- entity.entity_id
    name         text COLLATE "C" NOT NULL,             -- property name, e.g. 'legalEntityName'
    value        text COLLATE "C",          -- as sent (see Values above); NULL when null
    value_type   text COLLATE "C" NOT NULL  -- 'Single'; 'Custom' for a Custom property's own value
                 CHECK (value_type IN ('Single', 'Custom')),
    value_number double precision,          -- the value as a number, when it is one
    value_bool   boolean,                   -- when the value is true/false (any case)
    value_date   date,                      -- when the value is a date or a date and time
    PRIMARY KEY (tenant_id, entity_id, name)
);

-- Data group (Collection property) rows of the entity's current version, flattened: one row per
-- field of each data group row.
CREATE TABLE entity_collection (
    tenant_id    text COLLATE "C" NOT NULL,
    entity_id    text COLLATE "C" NOT NULL,             -- entity.entity_id
    property     text COLLATE "C" NOT NULL, -- data group property name (dotted when nested)
    row_id       text COLLATE "C" NOT NULL,             -- the data group row's key in Fenergo
    field        text COLLATE "C" NOT NULL,             -- field name within the row
    value        text COLLATE "C",          -- as sent (see Values above); NULL when null
    value_number double precision,
    value_bool   boolean,
    value_date   date,
    PRIMARY KEY (tenant_id, entity_id, property, row_id, field)
);

-- Every version of every entity fenx-sync has stored, append-only (store.history_retention, when
-- set, prunes old versions but never an entity's current one). Versions that happened in Fenergo
-- between two fetches are absent: this is what we saw, not Fenergo's full audit trail.
CREATE TABLE entity_version (
    tenant_id       text COLLATE "C" NOT NULL,
    entity_id       text COLLATE "C" NOT NULL,   -- entity.entity_id
    version         bigint      NOT NULL,   -- Fenergo's version number
    json            jsonb       NOT NULL,   -- the full EntityDto of this version, as entity.json
    stored_at       timestamptz NOT NULL,   -- when fenx-sync stored it
    notification_id text COLLATE "C",       -- the notification that caused the fetch
    event_type      text COLLATE "C",       -- its event type
    PRIMARY KEY (tenant_id, entity_id, version)
);

-- One row per notification the sync worker finished with (a replay after a crash, or the same
-- notification delivered to another instance, replaces it).
CREATE TABLE sync_log (
    tenant_id       text COLLATE "C" NOT NULL,
    notification_id text COLLATE "C" NOT NULL,   -- Fenergo's notification id; case-sensitive
    event_type      text COLLATE "C",       -- e.g. 'entitydata:draftverified'; NULL if absent
    entity_id       text COLLATE "C",       -- the entity it concerned, when known
    outcome         text COLLATE "C" NOT NULL,   -- 'synced' (a new version was stored), 'unchanged'
                                            -- (we already had that version), 'older-ignored'
                                            -- (Fenergo returned an older version than ours),
                                            -- 'stale-accepted' (still not newer after retries),
                                            -- 'confirmation-pending' (served by the entity's
                                            -- pending confirmation read, not a fetch),
                                            -- 'confirmed-changed' (a confirmation read found a
                                            -- newer version; notification_id 'confirm:…'),
                                            -- 'ignored' (event type not synced), 'dead' (gave up)
    attempts        bigint      NOT NULL,   -- processing attempts, the last one included
    received_at     timestamptz NOT NULL,   -- when the webhook arrived
    event_when      timestamptz,            -- the notification's `When` (NULL if unreadable)
    processed_at    timestamptz NOT NULL,   -- when the worker finished with it
    detail          text COLLATE "C",       -- why, for dead letters
    PRIMARY KEY (tenant_id, notification_id)
);

-- Backfill and reconciliation runs: each pass over Fenergo's paged entity list, what it found
-- missing or behind in this store and repaired, and (while running) the cursor to resume from.
CREATE TABLE reconcile_run (
    run_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id     text COLLATE "C" NOT NULL,
    kind          text COLLATE "C" NOT NULL CHECK (kind IN ('backfill', 'reconcile')),
    status        text COLLATE "C" NOT NULL CHECK (status IN ('running', 'finished')),
    started_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    finished_at   timestamptz,
    cursor        text COLLATE "C",          -- the list's searchAfter cursor after the last page
    total_items   bigint,                    -- what Fenergo said the list holds
    seen          bigint NOT NULL DEFAULT 0, -- entities read from the list
    added         bigint NOT NULL DEFAULT 0, -- missing from the store, now stored
    updated       bigint NOT NULL DEFAULT 0, -- stored at an older version, now current
    unchanged     bigint NOT NULL DEFAULT 0  -- already current
);

-- Small facts the service records for operators and for itself, one row per key: today
-- 'fenergo.credentials_refused' (value: the reason; since: when the identity service first
-- refused; `fenx-sync status` prints it) and 'reconcile.next_due_at' (value: when the next
-- scheduled reconciliation is due, so a restart does not start a full pass).
CREATE TABLE sync_state (
    tenant_id   text COLLATE "C" NOT NULL,
    key         text COLLATE "C" NOT NULL,
    value       text COLLATE "C" NOT NULL,
    since       timestamptz NOT NULL,       -- when this value was first recorded
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, key)
);

-- Confirmation reads waiting to be made. A read taken less than sync.confirm_after after the
-- newest notification it served was received is provisional (Fenergo may not have caught up): it
-- is stored at once and the entity is read again once due_at has passed. One row per entity; a
-- later provisional read moves due_at forward instead of adding a second read.
CREATE TABLE entity_confirmation (
    tenant_id        text COLLATE "C" NOT NULL,
    entity_id        text COLLATE "C" NOT NULL,
    due_at           timestamptz NOT NULL,  -- newest served notification's received_at +
                                            -- sync.confirm_after
    read_version     bigint      NOT NULL,  -- the version the provisional read returned
    notification_id  text COLLATE "C" NOT NULL,  -- the newest notification it served (the cause)
    event_type       text COLLATE "C", 
    event_when       timestamptz,
    received_at      timestamptz NOT NULL,  -- when that notification arrived
    attempts         bigint      NOT NULL DEFAULT 0, -- failed confirmation reads so far
    requested_at     timestamptz NOT NULL,  -- when the provisional read was taken
    PRIMARY KEY (tenant_id, entity_id)
);

-- Entity documents are compressed with lz4 where the server has it (PostgreSQL 14+ built with
-- lz4): several times cheaper to write than the default pglz, for about the same size.
DO $$
BEGIN
    ALTER TABLE entity ALTER COLUMN json SET COMPRESSION lz4;
    ALTER TABLE entity_version ALTER COLUMN json SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value OR syntax_error THEN
    NULL;
END $$;

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

-- Current entities with the most used properties as columns (NULL where an entity does not have
-- the property). Every other property is in entity_property, or entity.json.
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
    date_of_birth,                  -- property dateOfBirth, as a date
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
        e.json -> 'risk' ->> 'riskCategory' AS risk_category,
        e.json -> 'risk' ->> 'riskLevel' AS risk_level
    FROM entity AS e
) AS e;

-- Per tenant and event type: how many notifications were processed and how long, in seconds,
-- from the notification's `When` to the end of its processing. The lag covers notifications that
-- were not dead-lettered and whose `When` was readable; `events` counts them all.
CREATE VIEW sync_lag AS
SELECT
    tenant_id,
    event_type,
    count(*) AS events,
    count(lag_seconds) AS timed_events,
    count(*) FILTER (WHERE outcome = 'dead') AS dead,
    round(avg(lag_seconds), 3) AS avg_lag_seconds,
    round(max(lag_seconds), 3) AS max_lag_seconds
FROM (
    SELECT
        tenant_id,
        event_type,
        outcome,
        CASE WHEN outcome <> 'dead' THEN extract(epoch FROM processed_at - event_when) END
            AS lag_seconds
    FROM sync_log
) AS s
GROUP BY tenant_id, event_type;

-- Entities Fenergo's list no longer returns: kept, never deleted, for an analyst to look into.
CREATE VIEW absent_entity AS
SELECT tenant_id, entity_id, entity_type, version, status, absent_since, synced_at, confirmed_at
FROM entity
WHERE absent_since IS NOT NULL;

-- migration: 2
-- Cost flat as the store grows. The columns current_entity shows are stored on the entity row
-- (fenx-sync fills them on every write; existing rows are filled below), so grouping or
-- filtering on them is an index scan, not seven property lookups per entity. Property and data
-- group rows are keyed by a plain index on their entity, which PostgreSQL stores once per entity
-- with the row pointers after it (B-tree deduplication), where a primary key repeated the whole
-- key per row; fenx-sync writes each (name) or (property, row_id, field) once per entity. The
-- indexes on values, which cost more bytes per entity than the values themselves, give way to one
-- on numbers. Lookups by arbitrary property text are yours to index if you need them:
--   CREATE INDEX my_property_by_value ON entity_property (name, value);
ALTER TABLE entity
    ADD COLUMN previous_version bigint,                   -- the version this one replaced
                                                          -- (NULL: the first fenx-sync stored)
    ADD COLUMN legal_entity_name text COLLATE "C",        -- property legalEntityName
    ADD COLUMN country_of_incorporation text COLLATE "C", -- property countryOfIncorporation
    ADD COLUMN registration_number text COLLATE "C",      -- property registrationNumber
    ADD COLUMN first_name text COLLATE "C",               -- property firstName
    ADD COLUMN last_name text COLLATE "C",                -- property lastName
    ADD COLUMN date_of_birth date,                        -- property dateOfBirth
    ADD COLUMN entity_status text COLLATE "C",            -- property entityStatus
    ADD COLUMN risk_category text COLLATE "C",            -- risk.riskCategory
    ADD COLUMN risk_level text COLLATE "C";               -- risk.riskLevel
UPDATE entity AS e SET
    previous_version = (SELECT max(v.version) FROM entity_version AS v
        WHERE v.tenant_id = e.tenant_id AND v.entity_id = e.entity_id AND v.version < e.version),
    risk_category = e.json -> 'risk' ->> 'riskCategory',
    risk_level = e.json -> 'risk' ->> 'riskLevel';
UPDATE entity AS e SET
    legal_entity_name = p.legal_entity_name,
    country_of_incorporation = p.country_of_incorporation,
    registration_number = p.registration_number,
    first_name = p.first_name,
    last_name = p.last_name,
    date_of_birth = p.date_of_birth,
    entity_status = p.entity_status
FROM (
    SELECT tenant_id, entity_id,
           max(value) FILTER (WHERE name = 'legalEntityName') AS legal_entity_name,
           max(value) FILTER (WHERE name = 'countryOfIncorporation') AS country_of_incorporation,
           max(value) FILTER (WHERE name = 'registrationNumber') AS registration_number,
           max(value) FILTER (WHERE name = 'firstName') AS first_name,
           max(value) FILTER (WHERE name = 'lastName') AS last_name,
           max(value_date) FILTER (WHERE name = 'dateOfBirth') AS date_of_birth,
           max(value) FILTER (WHERE name = 'entityStatus') AS entity_status
      FROM entity_property GROUP BY tenant_id, entity_id
) AS p
WHERE p.tenant_id = e.tenant_id AND p.entity_id = e.entity_id;

-- Keys lead with entity_id, then tenant_id: PostgreSQL cannot skip a leading column it is not
-- given, and analysts look entities up by id without naming the tenant.
ALTER TABLE entity DROP CONSTRAINT entity_pkey, ADD PRIMARY KEY (entity_id, tenant_id);
ALTER TABLE entity_version DROP CONSTRAINT entity_version_pkey,
    ADD PRIMARY KEY (entity_id, tenant_id, version);
ALTER TABLE entity_property DROP CONSTRAINT entity_property_pkey;
ALTER TABLE entity_collection DROP CONSTRAINT entity_collection_pkey;
CREATE INDEX entity_property_of_entity ON entity_property (entity_id, tenant_id);
CREATE INDEX entity_collection_of_entity ON entity_collection (entity_id, tenant_id);
DROP INDEX entity_by_type;
DROP INDEX entity_by_last_event_when;
DROP INDEX entity_property_by_value;
DROP INDEX entity_collection_by_value;
-- Companies by country, individuals by date of birth with their names: read from the index
-- alone (an index-only scan, once VACUUM has marked the pages all-visible; fenx-sync vacuums
-- entity after a backfill). tenant_id comes after the columns analysts filter on, so a query
-- that does not name the tenant still seeks.
CREATE INDEX entity_by_country ON entity (entity_type, country_of_incorporation, tenant_id);
CREATE INDEX entity_by_date_of_birth ON entity (entity_type, date_of_birth)
    INCLUDE (tenant_id, entity_id, first_name, last_name, legal_entity_name)
    WHERE date_of_birth IS NOT NULL;
-- Entities with an earlier version: what changed in their latest one.
CREATE INDEX entity_with_previous ON entity (tenant_id, entity_id)
    WHERE previous_version IS NOT NULL;
-- "Which entities have a number property above N" (numberOfEmployees > 250).
CREATE INDEX entity_property_by_number ON entity_property (name, value_number)
    WHERE value_number IS NOT NULL;

-- Current entities with the most used properties as columns (NULL where an entity does not have
-- the property). Every other property is in entity_property, or entity.json.
DROP VIEW current_entity;
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

-- migration: 3
-- Indexes deferred by a bulk load, as in schema.sql's reporting version 5: a backfill into a
-- store holding no entities (of any tenant) drops the indexes keyed by property values
-- (entity_by_date_of_birth, entity_property_by_number) and builds them once at its end; while
-- one is dropped its CREATE INDEX statement waits here.
CREATE TABLE deferred_index (
    name        text COLLATE "C" PRIMARY KEY, -- the index
    definition  text NOT NULL,                -- its CREATE INDEX statement
    deferred_at timestamptz NOT NULL          -- when the bulk load dropped it
);

-- migration: 4
-- Property and data group rows are found by entity_id alone: the tenant is checked on the rows,
-- and an index that repeated it stored one more id per entity in each of the two (about 75 bytes
-- per entity in all). An entity id shared by two tenants costs one more row read, no more.
DROP INDEX entity_property_of_entity;
DROP INDEX entity_collection_of_entity;
CREATE INDEX entity_property_of_entity ON entity_property (entity_id);
CREATE INDEX entity_collection_of_entity ON entity_collection (entity_id);

-- migration: 5
-- Data group fields are stored in entity_collection_field, which has no value_bool column, and
-- read through the view entity_collection, which derives value_bool from value as fenx-sync
-- does for entity_property (true/false in any case, surrounding spaces aside). PostgreSQL keeps
-- a bit per column in each row's header; a ninth column makes that header 32 bytes instead of
-- 24, 8 bytes on each of an entity's data group fields (about 80 bytes per entity). Index
-- entity_collection_field, not the view, to look fields up by value.
CREATE TABLE entity_collection_field (
    tenant_id    text COLLATE "C" NOT NULL,
    entity_id    text COLLATE "C" NOT NULL,             -- entity.entity_id
    property     text COLLATE "C" NOT NULL, -- data group property name (dotted when nested)
    row_id       text COLLATE "C" NOT NULL,             -- the data group row's key in Fenergo
    field        text COLLATE "C" NOT NULL,             -- field name within the row
    value        text COLLATE "C",          -- as sent (see Values above); NULL when null
    value_number double precision,
    value_date   date
);
INSERT INTO entity_collection_field
SELECT tenant_id, entity_id, property, row_id, field, value, value_number, value_date
  FROM entity_collection;
DROP TABLE entity_collection;
CREATE INDEX entity_collection_of_entity ON entity_collection_field (entity_id);
CREATE VIEW entity_collection AS
SELECT tenant_id, entity_id, property, row_id, field, value, value_number,
       CASE lower(btrim(value, E' \t\n\r\f')) WHEN 'true' THEN true WHEN 'false' THEN false END
           AS value_bool,
       value_date
  FROM entity_collection_field;
