//! Helpers shared by the integration-test modules: real Git repositories built with the `git`
//! CLI (`repos`), a loopback Git smart HTTP server with optional Basic authentication
//! (`git_server`), a `nats-server` per test (`nats`), a derrick process per test served over
//! HTTP or NATS (`derrick`), and workers with a `remote_nats` controller (`remote`).

// Each test module uses a different part of this shared code, so the part that no module uses
// yet would warn as dead code. `expect` does not fit, because that part changes as modules are
// added.
#![allow(
    dead_code,
    reason = "shared by many test modules, each using only part of it"
)]

pub mod derrick;
pub mod git_server;
pub mod repos;

pub use derrick::{docker, nats, remote};
