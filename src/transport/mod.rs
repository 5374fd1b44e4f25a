//! Transports over the service core.
//!
//! Invariant: only this folder uses axum. Besides this folder, only `nats_client` and
//! `provider::remote_nats` use async-nats. Transports never import each other.

pub mod http;
pub mod nats;
