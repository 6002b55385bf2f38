//! The subcommands of the `fenx-sync` binary, one module per kind: the argument declarations,
//! running and probing the service, operator actions on the outbox, and inspection tools.
//!
//! This is the binary's edge: errors are `anyhow` here (with context for the operator) and
//! nowhere in the library, whose modules return typed errors.

pub mod admin;
pub mod args;
pub mod check;
pub mod service;
