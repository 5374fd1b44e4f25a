//! Implementations of `engine::Provider`: the places that hold workspaces and their layers.
//!
//! Each implementation lives in a module of its own and is named only by the command line; the
//! engine sees an `Arc<dyn Provider>`. `remote_nats` is the exception: it implements
//! `service::Service` instead, because it forwards whole operations to workers whose engines
//! fill their own Git mirrors.
//!
//! Invariant: implementations never import each other, and they use only the trait and its types
//! from `engine`, never the engine's logic.

pub mod local;
pub mod remote_nats;
