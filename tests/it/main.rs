//! derrick's integration tests: one binary with a module per area and shared helpers in
//! `support`.

mod support;

mod auth;
mod cache;
mod cli;
mod commands;
mod contract;
mod credentials;
mod docker;
mod files;
mod git_server;
mod nats;
mod provider_defects;
mod reset;
mod robustness;
mod workspaces;
