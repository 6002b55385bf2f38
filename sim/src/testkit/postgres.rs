//! A PostgreSQL database of a benchmark's own, for runs that compare the two reporting stores:
//! created next to the database an operator names (`FENX_BENCH_POSTGRES_URL`, else the tests'
//! `FENX_TEST_POSTGRES_URL`) with `psql`, and dropped when the run ends.
//!
//! It must never touch the named database's own tables, and never leave its database behind
//! (dropped on drop, `WITH (FORCE)` past open connections).

use std::process::Command;

/// A fresh, empty database; dropped with this value.
pub struct FreshDatabase {
    admin_url: String,
    name: String,
    /// The new database's URL.
    pub url: String,
}

impl FreshDatabase {
    /// A new database beside the one `FENX_BENCH_POSTGRES_URL` (or `FENX_TEST_POSTGRES_URL`)
    /// names; `None` when neither is set or `psql` cannot create it (said on stderr).
    pub fn create(purpose: &str) -> Option<FreshDatabase> {
        let admin_url = std::env::var("FENX_BENCH_POSTGRES_URL")
            .or_else(|_| std::env::var("FENX_TEST_POSTGRES_URL"))
            .ok()?;
        let name = format!("fenx_{purpose}_{}", std::process::id());
        if let Err(problem) = psql(&admin_url, &format!("CREATE DATABASE {name}")) {
            eprintln!("no PostgreSQL run: cannot create database {name}: {problem}");
            return None;
        }
        let url = match admin_url.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => return None,
        };
        Some(FreshDatabase {
            admin_url,
            name,
            url,
        })
    }
}

impl Drop for FreshDatabase {
    fn drop(&mut self) {
        let drop = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(problem) = psql(&self.admin_url, &drop) {
            eprintln!("cannot drop database {}: {problem}", self.name);
        }
    }
}

fn psql(url: &str, sql: &str) -> Result<(), String> {
    let output = Command::new("psql")
        .args([url, "-Atqc", sql])
        .output()
        .map_err(|error| format!("psql: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}
