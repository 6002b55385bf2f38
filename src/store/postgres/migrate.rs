//! Versioned migrations of the PostgreSQL reporting store, from `schema.postgres.sql`: every
//! pending `-- migration: N` block in one transaction, under a transaction-scoped advisory lock
//! so instances starting together apply each block once, each recorded in `schema_version`.
//!
//! It must never apply a block twice, never leave a database half-migrated (all or nothing), and
//! never touch a database recorded with a newer version than it knows.

use deadpool_postgres::Client;

use super::{Failure, PgError};

const SCHEMA: &str = include_str!("../../../schema.postgres.sql");
const MARK: &str = "-- migration: ";

/// The `(version, sql)` blocks of `schema.postgres.sql`, in order.
fn migrations() -> impl Iterator<Item = (i64, &'static str)> {
    SCHEMA.split(MARK).skip(1).map(|block| {
        let (header, sql) = block.split_once('\n').unwrap_or((block, ""));
        let version = header
            .trim()
            .parse()
            .expect("schema.postgres.sql: every `-- migration:` line carries a number");
        (version, sql)
    })
}

/// The newest version this build knows.
pub(super) fn latest() -> i64 {
    migrations().map(|(v, _)| v).max().unwrap_or(0)
}

/// Brings the current schema up to [`latest`]; returns the version it is at.
pub(super) async fn migrate(client: &mut Client) -> Result<i64, Failure> {
    let tx = client.transaction().await?;
    // Lifted here only: a migration of a big table may take longer than one query should.
    tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
    // Keyed by schema, so stores in different schemas of one database never wait for each other.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('fenx-sync migrate ' || current_schema(), 0))",
        &[],
    )
    .await?;
    let has_table: bool = tx
        .query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])
        .await?
        .get(0);
    let found: i64 = if has_table {
        tx.query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
            .await?
            .get(0)
    } else {
        0
    };
    let known = latest();
    if found > known {
        return Err(Failure::Refused(PgError::SchemaTooNew { found, known }));
    }
    for (version, sql) in migrations().filter(|&(v, _)| v > found) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES ($1, now())",
            &[&version],
        )
        .await?;
        tracing::info!(version, "applied reporting store migration");
    }
    tx.commit().await?;
    Ok(known)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_numbered_one_up_in_order() {
        let versions: Vec<i64> = migrations().map(|(v, _)| v).collect();
        assert_eq!(versions, (1..=latest()).collect::<Vec<_>>());
        assert!(migrations().all(|(_, sql)| sql.contains("CREATE") || sql.contains("ALTER")));
    }
}
