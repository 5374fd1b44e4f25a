//! Transports over the service core.
//!
//! Invariant: only this folder uses axum and async-nats; transports never import each other.

pub mod http;
pub mod nats;
