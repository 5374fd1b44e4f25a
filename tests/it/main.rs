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
mod faults;
mod files;
mod git_server;
mod limits;
mod load;
mod nats;
mod operations;
mod provider_defects;
mod remote;
mod reset;
mod restarts;
mod robustness;
mod workspaces;
