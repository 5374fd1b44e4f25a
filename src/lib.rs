//! derrick provisions isolated, snapshot-backed workspaces for AI coding agents.
//!
//! The modules, from the edges down to the core:
//!
//! - `cli`: the command line; the only place that names concrete providers and transports.
//! - `transport`: the HTTP server over the service core.
//! - `api`: the wire types of the HTTP and NATS contract.
//! - `engine`: the service core; drives workspaces through the state machine over a provider.
//! - `provider`: the implementations of `engine::Provider` (`local`, `docker`).
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
pub mod paths;
pub mod provider;
pub mod states;
pub mod transport;
