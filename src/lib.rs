//! derrick provisions isolated, snapshot-backed workspaces for AI coding agents.
//!
//! The modules, from the edges down to the core:
//!
//! - `cli`: the command line; the only place that names concrete providers and transports.
//! - `transport`: the HTTP and NATS servers over a `service::Service`, and `derrick worker`.
//! - `nats_client`: connecting to NATS (URL, authentication, TLS), for the transport, the worker
//!   and `remote_nats`.
//! - `api`: the wire types of the HTTP and NATS contract and of the worker traffic.
//! - `service`: the operations of the contract as a trait, served by the engine or by
//!   `remote_nats`.
//! - `engine`: the service core; drives workspaces through the state machine over a provider.
//! - `provider`: the implementations of `engine::Provider` (`local`, `docker`), and
//!   `remote_nats`, which forwards each operation to a worker.
//! - `git`: host mirrors and checkouts out of them (the only user of git2).
//! - `paths`: resolution of request paths inside a workspace root.
//! - `config`, `states`, `keys`, `error`: configuration, the state machine, layer keys, errors.

pub mod api;
pub mod cli;
pub mod config;
pub mod engine;
pub mod error;
pub mod git;
pub mod keys;
pub mod nats_client;
pub mod paths;
pub mod provider;
pub mod service;
pub mod states;
pub mod transport;
