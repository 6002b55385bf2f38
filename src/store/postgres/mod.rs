//! The PostgreSQL reporting store (`store.reporting_url`): the [`ReportingStore`] interface over a
//! bounded pool of connections to a database that several fenx-sync instances (of one tenant or
//! of many) share and analysts query. `schema.postgres.sql` holds its tables; `connect.rs` the
//! URL, TLS and pool; `migrate.rs` the migrations; `entities.rs` the monotonic batch upsert;
//! `confirmations.rs` the pending confirmation reads; `indexes.rs` a bulk load's deferred
//! indexes; `records.rs` everything else it keeps.
//!
//! It must never read or write another tenant's rows (every statement is keyed by the tenant the
//! store was opened with), never let an older or equal version overwrite a stored one, never take
//! entity row locks out of entity-id order (so concurrent writers never deadlock), never wait on
//! an unreachable server for longer than its timeouts (a failed call is a prompt [`StoreError`]
//! and the caller retries later), and never log a password.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use deadpool_postgres::{Client, Pool, PoolError};

mod confirmations;
mod connect;
mod entities;
mod indexes;
mod migrate;
mod records;

pub use connect::Target;
use entities::{Prepared, Write};

use super::{
    ConfirmationBacklog, EntitySnapshot, PendingConfirmation, ProcessedNotification, ReadFollowUp,
    ReconcileRun, ReportingStore, RunKind, StateEntry, StateKey, StoreCheck, StoreError,
    StoreStats, StoredState, SyncCause, UpsertOutcome,
};

/// The longest any one call may take, from waiting for a connection to the last row: past the
/// connect and statement timeouts, so it only fires when the network swallows packets.
const CALL_TIMEOUT: Duration = Duration::from_secs(45);

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("store.reporting_url: {0}")]
    Url(String),
    #[error("store.reporting_url: TLS: {0}")]
    Tls(String),
    #[error("PostgreSQL reporting store {target}: cannot {action}: {detail}")]
    Failed {
        target: String,
        action: String,
        detail: String,
    },
    #[error("PostgreSQL reporting store {target}: cannot {action}: no answer within {after:?}")]
    Timeout {
        target: String,
        action: String,
        after: Duration,
    },
    #[error(
        "the PostgreSQL reporting store is at schema version {found}, newer than this fenx-sync \
         knows ({known}): run a newer fenx-sync"
    )]
    SchemaTooNew { found: i64, known: i64 },
    #[error("{0:?} is not a role name (empty, or contains a NUL)")]
    BadRole(String),
}

/// Why a call failed, before it is put in the store's terms.
pub(super) enum Failure {
    Pool(PoolError),
    Query(tokio_postgres::Error),
    Refused(PgError),
}

impl From<PoolError> for Failure {
    fn from(error: PoolError) -> Failure {
        Failure::Pool(error)
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(error: tokio_postgres::Error) -> Failure {
        Failure::Query(error)
    }
}

/// `t` to the millisecond, as the SQLite store keeps times (`time::format`), so both stores
/// return the same instants.
pub(super) fn ms(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(TimeDelta::milliseconds(1)).unwrap_or(t)
}

/// The current time, to the millisecond.
fn now() -> DateTime<Utc> {
    ms(Utc::now())
}

/// The error and every cause below it, on one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.ends_with(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

/// The reporting store in PostgreSQL, for one tenant.
pub struct PostgresStore {
    pool: Pool,
    tenant: String,
    target: String,
    /// Set once the schema was brought to this build's version; every call waits for it.
    migrated: tokio::sync::OnceCell<i64>,
}

impl PostgresStore {
    /// Connects to `target` and migrates its schema to the version this build knows; fails
    /// (without retrying) when the server cannot be reached or its schema is newer.
    pub async fn open(target: &Target, tenant: &str) -> Result<PostgresStore, StoreError> {
        let store = PostgresStore::lazy(target, tenant)?;
        store.migrate().await?;
        Ok(store)
    }

    /// A store that has not connected yet: its first call migrates the schema (and fails, to
    /// be retried, while the server cannot be reached).
    pub fn lazy(target: &Target, tenant: &str) -> Result<PostgresStore, StoreError> {
        Ok(PostgresStore {
            pool: connect::pool(target)?,
            tenant: tenant.to_owned(),
            target: target.describe(),
            migrated: tokio::sync::OnceCell::new(),
        })
    }

    /// Applies pending migrations, once per store; returns the schema version.
    pub async fn migrate(&self) -> Result<i64, StoreError> {
        let work = async {
            let mut client = self.client().await?;
            migrate::migrate(&mut client).await
        };
        // Migrations lift the statement timeout: only a lost connection ends them.
        self.migrated
            .get_or_try_init(|| async {
                work.await
                    .map_err(|failure| self.failed("migrate the schema".into(), failure))
            })
            .await
            .copied()
    }

    async fn client(&self) -> Result<Client, Failure> {
        Ok(self.pool.get().await?)
    }

    /// Runs `work` within [`CALL_TIMEOUT`], naming `action` in its error.
    async fn run<T>(
        &self,
        action: impl FnOnce() -> String,
        work: impl Future<Output = Result<T, Failure>> + Send,
    ) -> Result<T, StoreError> {
        self.migrate().await?;
        match tokio::time::timeout(CALL_TIMEOUT, work).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(failure)) => Err(self.failed(action(), failure)),
            Err(_) => Err(PgError::Timeout {
                target: self.target.clone(),
                action: action(),
                after: CALL_TIMEOUT,
            }
            .into()),
        }
    }

    fn failed(&self, action: String, failure: Failure) -> StoreError {
        let detail = match failure {
            Failure::Pool(error) => chain(&error),
            Failure::Query(error) => chain(&error),
            Failure::Refused(error) => return error.into(),
        };
        PgError::Failed {
            target: self.target.clone(),
            action,
            detail,
        }
        .into()
    }

    /// Writes entities with their causes, and what `after` records beside them, in one
    /// transaction; the flattening is done before a connection is taken.
    async fn write(
        &self,
        action: impl FnOnce() -> String,
        writes: &[Write<'_>],
        after: After<'_>,
    ) -> Result<Vec<UpsertOutcome>, StoreError> {
        let prepared: Vec<Prepared> = writes.iter().map(Prepared::of).collect();
        self.run(action, async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            let outcomes = entities::write(&tx, &self.tenant, &prepared, now()).await?;
            match after {
                After::Nothing => {}
                After::Read(entity, cause, follow_up) => {
                    confirmations::follow_up(&tx, &self.tenant, entity, cause, follow_up).await?;
                }
                After::Confirmed(pending, at) => {
                    confirmations::close(&tx, &self.tenant, &pending).await?;
                    let ids: Vec<&str> = pending.iter().map(|p| p.entity_id.as_str()).collect();
                    confirmations::mark_confirmed(&tx, &self.tenant, &ids, at).await?;
                }
            }
            tx.commit().await?;
            Ok(outcomes)
        })
        .await
    }
}

/// What a write records beside the entities, in its transaction.
enum After<'a> {
    Nothing,
    /// A worker's read, and what it leaves to do.
    Read(&'a EntitySnapshot, &'a SyncCause, &'a ReadFollowUp),
    /// These confirmations were made at this time.
    Confirmed(Vec<&'a PendingConfirmation>, DateTime<Utc>),
}

#[async_trait]
impl ReportingStore for PostgresStore {
    fn describe(&self) -> String {
        format!("PostgreSQL {} (tenant {})", self.target, self.tenant)
    }

    async fn store_read(
        &self,
        entity: &EntitySnapshot,
        cause: &SyncCause,
        follow_up: Option<&ReadFollowUp>,
    ) -> Result<UpsertOutcome, StoreError> {
        let writes = [Write { entity, cause }];
        let outcomes = self
            .write(
                || {
                    format!(
                        "store entity {} version {}",
                        entity.entity_id, entity.version
                    )
                },
                &writes,
                follow_up.map_or(After::Nothing, |f| After::Read(entity, cause, f)),
            )
            .await?;
        Ok(outcomes[0])
    }

    async fn upsert_entities(
        &self,
        entities: &[EntitySnapshot],
        cause: &SyncCause,
    ) -> Result<Vec<UpsertOutcome>, StoreError> {
        if entities.is_empty() {
            return Ok(Vec::new());
        }
        let writes: Vec<Write> = entities
            .iter()
            .map(|entity| Write { entity, cause })
            .collect();
        self.write(
            || format!("store {} entities", entities.len()),
            &writes,
            After::Nothing,
        )
        .await
    }

    async fn stored_state(&self, entity_id: &str) -> Result<Option<StoredState>, StoreError> {
        self.run(|| format!("read entity {entity_id}"), async {
            let client = self.client().await?;
            let select = client
                .prepare_cached(
                    "SELECT version, last_event_when, synced_at FROM entity
                          WHERE tenant_id = $1 AND entity_id = $2",
                )
                .await?;
            let row = client
                .query_opt(&select, &[&self.tenant, &entity_id])
                .await?;
            Ok(row.map(|r| StoredState {
                version: r.get(0),
                last_event_when: r.get(1),
                synced_at: r.get(2),
            }))
        })
        .await
    }

    async fn record_processed(&self, records: &[ProcessedNotification]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        self.run(
            || format!("log {} processed notifications", records.len()),
            async {
                let client = self.client().await?;
                records::log_processed(&client, &self.tenant, records, now()).await
            },
        )
        .await
    }

    async fn defer_to_confirmation(
        &self,
        entity_id: &str,
        read_after: DateTime<Utc>,
        due_at: DateTime<Utc>,
        cause: &SyncCause,
        received_at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        self.run(
            || format!("defer {entity_id} to its pending confirmation"),
            async {
                let client = self.client().await?;
                let deferral = confirmations::Deferral {
                    entity_id,
                    read_after,
                    due_at,
                    cause,
                    received_at,
                };
                confirmations::defer(&client, &self.tenant, &deferral).await
            },
        )
        .await
    }

    async fn due_confirmations(
        &self,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<PendingConfirmation>, StoreError> {
        self.run(|| "read due confirmations".into(), async {
            let client = self.client().await?;
            confirmations::due(&client, &self.tenant, now, limit).await
        })
        .await
    }

    async fn confirmation_backlog(
        &self,
        now: DateTime<Utc>,
    ) -> Result<ConfirmationBacklog, StoreError> {
        self.run(|| "count due confirmations".into(), async {
            let client = self.client().await?;
            confirmations::backlog(&client, &self.tenant, now).await
        })
        .await
    }

    async fn confirm(
        &self,
        reads: &[(PendingConfirmation, EntitySnapshot)],
        at: DateTime<Utc>,
    ) -> Result<Vec<UpsertOutcome>, StoreError> {
        if reads.is_empty() {
            return Ok(Vec::new());
        }
        let writes: Vec<Write> = reads
            .iter()
            .map(|(pending, entity)| Write {
                entity,
                cause: &pending.cause,
            })
            .collect();
        self.write(
            || format!("confirm {} entities", reads.len()),
            &writes,
            After::Confirmed(reads.iter().map(|(p, _)| p).collect(), at),
        )
        .await
    }

    async fn postpone_confirmation(
        &self,
        pending: &PendingConfirmation,
        retry_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.run(
            || format!("postpone the confirmation of {}", pending.entity_id),
            async {
                let client = self.client().await?;
                confirmations::postpone(&client, &self.tenant, pending, retry_at).await
            },
        )
        .await
    }

    async fn drop_confirmation(&self, pending: &PendingConfirmation) -> Result<(), StoreError> {
        self.run(
            || format!("drop the confirmation of {}", pending.entity_id),
            async {
                let client = self.client().await?;
                confirmations::close(&client, &self.tenant, &[pending]).await
            },
        )
        .await
    }

    async fn pending_confirmations(&self) -> Result<i64, StoreError> {
        self.run(|| "count confirmations".into(), async {
            let client = self.client().await?;
            confirmations::pending(&client, &self.tenant).await
        })
        .await
    }

    async fn put_state(
        &self,
        key: StateKey,
        value: &str,
        since: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.run(|| format!("record {}", key.as_str()), async {
            let client = self.client().await?;
            records::put_state(&client, &self.tenant, key, value, since).await
        })
        .await
    }

    async fn clear_state(&self, key: StateKey) -> Result<(), StoreError> {
        self.run(|| format!("clear {}", key.as_str()), async {
            let client = self.client().await?;
            records::clear_state(&client, &self.tenant, key).await
        })
        .await
    }

    async fn state(&self, key: StateKey) -> Result<Option<StateEntry>, StoreError> {
        self.run(|| format!("read {}", key.as_str()), async {
            let client = self.client().await?;
            records::state(&client, &self.tenant, key).await
        })
        .await
    }

    async fn state_of_every_tenant(
        &self,
        key: StateKey,
    ) -> Result<Vec<(String, StateEntry)>, StoreError> {
        self.run(|| format!("read {} of every tenant", key.as_str()), async {
            let client = self.client().await?;
            records::state_of_every_tenant(&client, key).await
        })
        .await
    }

    async fn running_reconcile(&self, kind: RunKind) -> Result<Option<ReconcileRun>, StoreError> {
        self.run(
            || format!("read the running {} run", kind.as_str()),
            async {
                let client = self.client().await?;
                records::running_run(&client, &self.tenant, kind).await
            },
        )
        .await
    }

    async fn start_reconcile(&self, kind: RunKind) -> Result<ReconcileRun, StoreError> {
        self.run(|| format!("start a {} run", kind.as_str()), async {
            let mut client = self.client().await?;
            records::start_run(&mut client, &self.tenant, kind, now()).await
        })
        .await
    }

    async fn save_reconcile(&self, run: &ReconcileRun, finished: bool) -> Result<(), StoreError> {
        self.run(|| format!("save run {}", run.run_id), async {
            let client = self.client().await?;
            records::save_run(&client, &self.tenant, run, finished, now()).await
        })
        .await
    }

    async fn mark_listed(&self, run_id: i64, entity_ids: &[String]) -> Result<(), StoreError> {
        if entity_ids.is_empty() {
            return Ok(());
        }
        self.run(|| format!("mark run {run_id}'s entities listed"), async {
            let client = self.client().await?;
            records::mark_listed(&client, &self.tenant, run_id, entity_ids).await
        })
        .await
    }

    async fn mark_absent(&self, run_id: i64) -> Result<u64, StoreError> {
        self.run(
            || format!("mark entities run {run_id} did not list"),
            async {
                let client = self.client().await?;
                records::mark_absent(&client, &self.tenant, run_id, now()).await
            },
        )
        .await
    }

    async fn last_run_started(&self, kind: RunKind) -> Result<Option<DateTime<Utc>>, StoreError> {
        self.run(|| format!("read the last {} run", kind.as_str()), async {
            let client = self.client().await?;
            records::last_run_started(&client, &self.tenant, kind).await
        })
        .await
    }

    async fn prune_history(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        self.run(|| "prune entity history".into(), async {
            let client = self.client().await?;
            records::prune_history(&client, &self.tenant, before).await
        })
        .await
    }

    async fn refresh_statistics(&self) -> Result<(), StoreError> {
        self.migrate().await?;
        // Neither the call timeout nor the pool's statement timeout: VACUUM reads the whole
        // entity table, which takes minutes on a large store.
        let work = async {
            let client = self.client().await?;
            client.simple_query("SET statement_timeout = 0").await?;
            // One statement each: VACUUM refuses to run in a multi-statement string. VACUUM
            // marks entity's pages all-visible, which its covering indexes need to answer from
            // the index alone; the other tables only need their statistics.
            let refreshed = match client.simple_query("VACUUM (ANALYZE) entity").await {
                Ok(_) => client
                    .simple_query(
                        "ANALYZE entity_property, entity_collection_field, entity_version",
                    )
                    .await
                    .map(drop),
                Err(error) => Err(error),
            };
            client.simple_query("RESET statement_timeout").await?;
            refreshed.map_err(Failure::from)
        };
        work.await.map_err(|failure| {
            self.failed("refresh the query planner's statistics".into(), failure)
        })
    }

    async fn defer_indexes(&self) -> Result<Vec<String>, StoreError> {
        self.run(|| "defer the bulk load's indexes".into(), async {
            let mut client = self.client().await?;
            indexes::defer(&mut client).await
        })
        .await
    }

    async fn build_deferred_indexes(&self) -> Result<Vec<String>, StoreError> {
        self.migrate().await?;
        // Not within the call timeout: building takes as long as the tables are big.
        let work = async {
            let mut client = self.client().await?;
            indexes::build(&mut client).await
        };
        work.await
            .map_err(|failure| self.failed("build the deferred indexes".into(), failure))
    }

    async fn deferred_indexes(&self) -> Result<Vec<String>, StoreError> {
        self.run(|| "list the deferred indexes".into(), async {
            let client = self.client().await?;
            indexes::list(&client).await
        })
        .await
    }

    async fn check(&self) -> Result<StoreCheck, StoreError> {
        self.run(|| "answer a trivial query".into(), async {
            let client = self.client().await?;
            client.simple_query("SELECT 1").await?;
            Ok(StoreCheck::default())
        })
        .await
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.run(|| "measure the store".into(), async {
            let client = self.client().await?;
            records::stats(&client, &self.tenant).await
        })
        .await
    }

    async fn grant_read(&self, role: &str) -> Result<(), StoreError> {
        self.run(|| format!("grant read access to {role}"), async {
            let mut client = self.client().await?;
            records::grant_read(&mut client, role).await
        })
        .await
    }
}

#[cfg(test)]
mod tests;
