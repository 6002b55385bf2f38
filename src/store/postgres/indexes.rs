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
    // An analyst's open transaction must not hold every writer of the store up behind this.
    tx.batch_execute(
        "SET LOCAL lock_timeout = '5s';
         LOCK TABLE entity, entity_property IN ACCESS EXCLUSIVE MODE",
    )
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

/// One transaction per index, without a statement timeout: an index over a million entities
/// takes longer than one query should. Writers to the indexed table wait while it builds.
pub(super) async fn build(client: &mut Client) -> Result<Vec<String>, Failure> {
    let mut built = Vec::new();
    for name in list(client).await? {
        let tx = client.transaction().await?;
        tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
        // A row lock: a second instance building at once waits, then finds the row gone.
        let Some(row) = tx
            .query_opt(
                "SELECT definition FROM deferred_index WHERE name = $1 FOR UPDATE",
                &[&name],
            )
            .await?
        else {
            continue;
        };
        let definition: String = row.get(0);
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
        tx.commit().await?;
        built.push(name);
    }
    Ok(built)
}

pub(super) async fn list(client: &Client) -> Result<Vec<String>, Failure> {
    let rows = client
        .query("SELECT name FROM deferred_index ORDER BY name", &[])
        .await?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}
