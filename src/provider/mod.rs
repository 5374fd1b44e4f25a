//! Implementations of `engine::Provider`: the places that hold workspaces and their layers.
//!
//! Each implementation lives in a module of its own and is named only by the command line; the
//! engine sees an `Arc<dyn Provider>`. `remote_nats` is the exception: it implements
//! `service::Service` instead, because it forwards whole operations to workers whose engines
//! fill their own Git mirrors.
//!
//! `output` holds what both implementations share: the cap on a command's output and the buffer
//! that keeps its tail.
//!
//! Invariant: implementations never import each other, and they use only the trait and its types
//! from `engine`, never the engine's logic.

pub mod docker;
pub mod local;
pub(crate) mod output;
pub mod remote_nats;
