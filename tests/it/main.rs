//! One integration-test binary (each file under tests/ would otherwise link separately, which
//! is slow on small machines). Every test starts its own server on 127.0.0.1:0 with a temp dir.

mod cli;
mod convergence;
mod crash;
mod demo;
mod faults;
mod helpers;
mod hostile;
mod ingest;
mod platform;
mod polling;
mod proxy;
mod shared_store;
mod simulator;
mod sync;
mod systemd;
