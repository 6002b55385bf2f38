//! Indexes deferred by a bulk load in the PostgreSQL store (table `deferred_index`, migration
//! 3): dropping [`BULK_LOAD_INDEXES`] before a backfill into a database holding no entities of
//! any tenant, and building them again after it.
//!
//! It never drops an index of a store that holds entities, never drops one without recording its
//! definition in the same transaction, and takes its table locks in the upsert's order (entity,
//! then entity_property), so it cannot deadlock with a writer.

use deadpool_postgres::Client;

use super::Failure;
use crate::store::BULK_LOAD_INDEXES;

const EMPTY: &str = "SELECT NOT EXISTS (SELECT 1 FROM entity)";

pub(super) async fn defer(client: &mut Client) -> Result<Vec<String>, Failure> {
    // Checked before locking too, so a store with entities never waits for the lock.
    if !client.query_one(EMPTY, &[]).await?.get::<_, bool>(0) {
        return Ok(Vec::new());
    }
    let tx = client.transaction().await?;
    tx.batch_execute("LOCK TABLE entity, entity_property IN ACCESS EXCLUSIVE MODE")
        .await?;
    if !tx.query_one(EMPTY, &[]).await?.get::<_, bool>(0) {
        return Ok(Vec::new());
    }
    let found = tx
        .query(
            "SELECT indexname::text, indexdef FROM pg_indexes
              WHERE schemaname = current_schema() AND indexname = ANY($1) ORDER BY indexname",
            &[&&BULK_LOAD_INDEXES[..]],
        )
        .await?;
    let mut deferred = Vec::with_capacity(found.len());
    for row in found {
        let (name, definition): (String, String) = (row.get(0), row.get(1));
        tx.execute(
            "INSERT INTO deferred_index (name, definition, deferred_at) VALUES ($1, $2, now())
             ON CONFLICT (name) DO UPDATE SET definition = excluded.definition,
                                              deferred_at = excluded.deferred_at",
            &[&name, &definition],
        )
        .await?;
        tx.batch_execute(&format!("DROP INDEX \"{name}\"")).await?;
        deferred.push(name);
    }
    tx.commit().await?;
    Ok(deferred)
}

/// Without a statement timeout: an index over a million entities takes longer than one query
/// should. Writers to the indexed table wait while it builds.
pub(super) async fn build(client: &mut Client) -> Result<Vec<String>, Failure> {
    let tx = client.transaction().await?;
    tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
    // Row locks: a second instance building at once waits, then finds nothing left to build.
    let deferred = tx
        .query(
            "SELECT name, definition FROM deferred_index ORDER BY name FOR UPDATE",
            &[],
        )
        .await?;
    let mut built = Vec::with_capacity(deferred.len());
    for row in deferred {
        let (name, definition): (String, String) = (row.get(0), row.get(1));
        // An operator may have created it by hand meanwhile.
        let exists: bool = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_indexes
                                 WHERE schemaname = current_schema() AND indexname = $1)",
                &[&name],
            )
            .await?
            .get(0);
        if !exists {
            tx.batch_execute(&definition).await?;
        }
        tx.execute("DELETE FROM deferred_index WHERE name = $1", &[&name])
            .await?;
        built.push(name);
    }
    tx.commit().await?;
    Ok(built)
}
