//! The operations of the wire contract as one trait, so that the transports serve any backend.
//!
//! `Engine` implements it by running workspaces on this machine. The `remote_nats` provider
//! implements it by forwarding each operation to a `derrick worker`, whose engine runs it. The
//! forwarding happens at this level, not at the `Provider` level, because a worker's engine fills
//! that worker's Git mirrors with credentials that never leave it.
//!
//! Invariant: the trait speaks only the wire types of `api` and the core's `Error`, so that a
//! transport never learns which backend serves it.

use async_trait::async_trait;

use crate::api;
use crate::engine::Engine;
use crate::engine::record::WorkspaceRecord;
use crate::error::Result;
use crate::states::StateMachine;

/// A backend that the HTTP and NATS transports serve.
#[async_trait]
pub trait Service: Send + Sync + 'static {
    /// Returns the declared state machine.
    fn states(&self) -> &StateMachine;

    /// Creates a workspace in `clean_snapshotted`.
    async fn create(&self, request: api::CreateRequest) -> Result<api::CreateResponse>;

    /// Lists the workspaces, oldest first.
    async fn list(&self) -> Result<api::ListResponse>;

    /// Returns the record of one workspace.
    async fn get(&self, id: &str) -> Result<WorkspaceRecord>;

    /// Runs a command and returns its output, whatever its exit code.
    async fn command(&self, id: &str, request: api::CommandRequest) -> Result<api::CommandOutput>;

    /// Runs a command; a non-zero exit is `command_failed` with the exit code and output.
    async fn command_checked(
        &self,
        id: &str,
        request: api::CommandRequest,
    ) -> Result<api::CommandResponse>;

    /// Reads a file of the workspace.
    async fn read_file(&self, id: &str, request: api::ReadFileRequest) -> Result<Vec<u8>>;

    /// Writes a file into the workspace, creating missing parent directories.
    async fn write_file(
        &self,
        id: &str,
        request: api::WriteFileRequest,
    ) -> Result<api::WriteFileResponse>;

    /// Restores the clean snapshot.
    async fn reset(&self, id: &str) -> Result<api::ResetResponse>;

    /// Fetches new commits and brings the workspace's checkouts to them.
    async fn fetch(&self, id: &str, request: api::FetchRequest) -> Result<api::FetchResponse>;

    /// Destroys a workspace.
    async fn destroy(&self, id: &str) -> Result<()>;
}

#[async_trait]
impl Service for Engine {
    fn states(&self) -> &StateMachine {
        Engine::states(self)
    }

    async fn create(&self, request: api::CreateRequest) -> Result<api::CreateResponse> {
        Engine::create(self, request).await
    }

    async fn list(&self) -> Result<api::ListResponse> {
        Ok(Engine::list(self))
    }

    async fn get(&self, id: &str) -> Result<WorkspaceRecord> {
        Engine::get(self, id)
    }

    async fn command(&self, id: &str, request: api::CommandRequest) -> Result<api::CommandOutput> {
        Engine::command(self, id, request).await
    }

    async fn command_checked(
        &self,
        id: &str,
        request: api::CommandRequest,
    ) -> Result<api::CommandResponse> {
        Engine::command_checked(self, id, request).await
    }

    async fn read_file(&self, id: &str, request: api::ReadFileRequest) -> Result<Vec<u8>> {
        Engine::read_file(self, id, request).await
    }

    async fn write_file(
        &self,
        id: &str,
        request: api::WriteFileRequest,
    ) -> Result<api::WriteFileResponse> {
        Engine::write_file(self, id, request).await
    }

    async fn reset(&self, id: &str) -> Result<api::ResetResponse> {
        Engine::reset(self, id).await
    }

    async fn fetch(&self, id: &str, request: api::FetchRequest) -> Result<api::FetchResponse> {
        Engine::fetch(self, id, request).await
    }

    async fn destroy(&self, id: &str) -> Result<()> {
        Engine::destroy(self, id).await
    }
}
