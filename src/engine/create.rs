//! Creating a workspace: start from the deepest cached layer and run only the missing steps.
//!
//! With a cached setup layer a create provisions on it and refreshes the checkouts (no clone, no
//! setup). With a cached repositories layer it refreshes the checkouts and runs the setup. With
//! neither it clones, snapshots the repositories layer, runs the setup and snapshots again.
//! Builds of one setup layer run once: concurrent creates wait on the build lock and then hit.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tracing::{info, instrument};

use super::record::{self, HistoryEntry, LayerRecord, RepositoryRecord, WorkspaceRecord};
use super::{Engine, ExecRequest, LayerMeta, Workspace, WorkspaceId, millis, validate_env};
use crate::api;
use crate::error::{Error, Result};
use crate::git::MirrorState;
use crate::keys::{LayerKey, LayerKind};

/// The deepest cached layer that a create starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CacheHit {
    Setup,
    Repositories,
    None,
}

impl CacheHit {
    fn as_str(self) -> &'static str {
        match self {
            CacheHit::Setup => "setup",
            CacheHit::Repositories => "repositories",
            CacheHit::None => "none",
        }
    }
}

/// Durations of the steps of one create, by step name.
type Durations = BTreeMap<String, u64>;

impl Engine {
    /// Creates a workspace in `clean_snapshotted`.
    ///
    /// # Errors
    /// `git_failed` or `setup_failed` leave the workspace listed as `failed` with the step and
    /// its output; nothing of the failed step is cached.
    #[instrument(skip_all)]
    pub async fn create(&self, request: api::CreateRequest) -> Result<api::CreateResponse> {
        validate_env(&request.env)?;
        let _slot = self.reserve_slot()?;
        let build_lock = self.build_lock(&self.keys.setup);
        let mut build_guard = Some(build_lock.lock().await);
        let cache_guard = self.cache_guard.read().await;
        let hit = if self.provider.layer(&self.keys.setup).await?.is_some() {
            build_guard = None;
            CacheHit::Setup
        } else if self
            .provider
            .layer(&self.keys.repositories)
            .await?
            .is_some()
        {
            CacheHit::Repositories
        } else {
            CacheHit::None
        };
        info!(layer_key = %self.keys.setup.short(), hit = hit.as_str(), "create");

        let mut durations = Durations::new();
        let workspace = self.provision(hit, request.env, &mut durations).await?;
        drop(cache_guard);
        self.usage.touch(self.layers_of(&workspace)).await;
        let built = self.build(&workspace, hit, &mut durations).await;
        drop(build_guard);
        if let Err(error) = built {
            let step = workspace.record.lock().expect("record lock").state.clone();
            self.fail(&workspace, failed_step(&step), &error).await;
            if let Err(cleanup) = self.provider.destroy(&workspace.id).await {
                tracing::error!(workspace_id = %workspace.id, error = %cleanup, "cannot clean up failed workspace");
            }
            return Err(error);
        }

        if hit != CacheHit::Setup {
            self.usage.touch(self.layers_of(&workspace)).await;
            self.enforce_cache_limit().await;
        }
        // The idle clock starts when the client gets the workspace, not when the build began.
        workspace.mark_active();
        let state = workspace.record.lock().expect("record lock").state.clone();
        Ok(api::CreateResponse {
            id: workspace.id.to_string(),
            state,
            cache: api::CacheInfo {
                hit: hit.as_str().to_owned(),
            },
            durations_ms: durations,
        })
    }

    /// Creates the environment on the cached layers and registers the workspace as `provisioned`.
    async fn provision(
        &self,
        hit: CacheHit,
        env: BTreeMap<String, String>,
        durations: &mut Durations,
    ) -> Result<Arc<Workspace>> {
        let started = Instant::now();
        let id = WorkspaceId::generate();
        let layers = self.cached_layers(hit);
        if hit == CacheHit::None {
            self.provider
                .ensure_base(&self.keys.base, &self.config.name)
                .await?;
        }
        let keys: Vec<LayerKey> = layers.iter().map(|layer| layer.key.clone()).collect();
        self.provider.provision(&id, &keys).await?;
        let duration_ms = millis(started.elapsed());
        durations.insert("provision".to_owned(), duration_ms);

        let now = record::now_rfc3339();
        let record = WorkspaceRecord {
            id: id.clone(),
            state: self.machine.initial.clone(),
            name: self.config.name.clone(),
            provider: self.provider.kind().to_owned(),
            created_at: now.clone(),
            cache_hit: hit.as_str().to_owned(),
            history: vec![HistoryEntry {
                state: self.machine.initial.clone(),
                op: "provision".to_owned(),
                at: now,
                duration_ms,
            }],
            history_dropped: 0,
            layers,
            repositories: Vec::new(),
            failure: None,
        };
        info!(workspace_id = %id, state = %record.state, duration_ms, "transition");
        let workspace = Arc::new(Workspace::new(id.clone(), env, record));
        self.persist(&workspace).await?;
        self.records.write_env(&id, &workspace.env).await?;
        self.workspaces
            .lock()
            .expect("workspace map lock")
            .insert(id, workspace.clone());
        Ok(workspace)
    }

    /// Runs the steps that the cache hit leaves, holding the workspace's operation lock.
    async fn build(
        &self,
        workspace: &Workspace,
        hit: CacheHit,
        durations: &mut Durations,
    ) -> Result<()> {
        let _operations = workspace.operations.lock().await;
        let started = Instant::now();
        match hit {
            CacheHit::Setup => {
                self.refresh_checkouts(workspace).await?;
                durations.insert("fetch".to_owned(), millis(started.elapsed()));
                self.transition(workspace, "restore", started).await
            }
            CacheHit::Repositories => {
                self.refresh_checkouts(workspace).await?;
                durations.insert("fetch".to_owned(), millis(started.elapsed()));
                self.transition(workspace, "clone", started).await?;
                self.setup_and_snapshot(workspace, durations).await
            }
            CacheHit::None => {
                self.clone_repositories(workspace).await?;
                durations.insert("clone".to_owned(), millis(started.elapsed()));
                self.transition(workspace, "clone", started).await?;
                self.setup_and_snapshot(workspace, durations).await
            }
        }
    }

    /// Fills the mirrors, checks every repository out and snapshots the repositories layer.
    async fn clone_repositories(&self, workspace: &Workspace) -> Result<()> {
        let mut checkouts = Vec::with_capacity(self.config.repositories.len());
        let mut records = Vec::with_capacity(self.config.repositories.len());
        for repository in &self.config.repositories {
            info!(workspace_id = %workspace.id, url = %repository.url, "syncing mirror");
            let state = self.mirrors.sync(repository).await?;
            log_sync(workspace, repository.url.as_str(), &state);
            records.push(repository_record(repository, &state));
            checkouts.push(self.checkout_of(repository, &state, None));
        }
        self.provider.checkout(&workspace.id, &checkouts).await?;
        workspace.record.lock().expect("record lock").repositories = records;
        self.snapshot(workspace, LayerKind::Repositories, &self.keys.repositories)
            .await
    }

    /// Fetches every repository into its mirror and moves the cached checkout to the commit its
    /// reference points to now, so a reused snapshot never serves stale code.
    async fn refresh_checkouts(&self, workspace: &Workspace) -> Result<()> {
        let top = self
            .layers_of(workspace)
            .last()
            .cloned()
            .expect("a cache hit has at least one layer");
        let snapshot_commits = self
            .provider
            .layer(&top)
            .await?
            .map(|meta| meta.commits)
            .unwrap_or_default();
        let mut records = Vec::with_capacity(self.config.repositories.len());
        for repository in &self.config.repositories {
            let state = self.mirrors.sync(repository).await?;
            log_sync(workspace, repository.url.as_str(), &state);
            let mut record = repository_record(repository, &state);
            let snapshot_commit = snapshot_commits.get(&repository.path).cloned();
            if snapshot_commit.as_ref() != Some(&state.commit) {
                let checkout = self.checkout_of(repository, &state, snapshot_commit);
                let update = self
                    .provider
                    .update_checkout(&workspace.id, &checkout)
                    .await?;
                record.commit = update.after;
            }
            records.push(record);
        }
        workspace.record.lock().expect("record lock").repositories = records;
        Ok(())
    }

    /// Runs the setup script and snapshots the setup layer.
    async fn setup_and_snapshot(
        &self,
        workspace: &Workspace,
        durations: &mut Durations,
    ) -> Result<()> {
        let started = Instant::now();
        if !self.config.setup_script.trim().is_empty() {
            info!(workspace_id = %workspace.id, "running the setup script");
            let request = ExecRequest {
                cmd: self.config.setup_script.clone(),
                working_dir: None,
                env: self.config.env.clone(),
                timeout: self.setup_timeout,
            };
            let output = self.provider.exec(&workspace.id, request).await?;
            if output.exit_code != 0 && workspace.was_killed() {
                return Err(Error::ProviderUnavailable(format!(
                    "the setup script of workspace `{}` was killed because the workspace was \
                     destroyed or derrick is shutting down; create the workspace again",
                    workspace.id
                )));
            }
            if output.exit_code != 0 {
                let mut message = output.output;
                if output.timed_out {
                    message.push_str(
                        "\n[derrick: the setup script was killed by the --setup-timeout limit]",
                    );
                }
                return Err(Error::SetupFailed {
                    id: workspace.id.to_string(),
                    exit_code: output.exit_code,
                    output: message,
                });
            }
        }
        durations.insert("setup".to_owned(), millis(started.elapsed()));
        self.transition(workspace, "setup", started).await?;

        let started = Instant::now();
        self.snapshot(workspace, LayerKind::Setup, &self.keys.setup)
            .await?;
        durations.insert("snapshot".to_owned(), millis(started.elapsed()));
        self.transition(workspace, "snapshot", started).await
    }

    /// Records the workspace's content as a layer and adds it to the workspace's record.
    async fn snapshot(&self, workspace: &Workspace, kind: LayerKind, key: &LayerKey) -> Result<()> {
        let parent = self.layers_of(workspace).last().cloned();
        let commits = workspace
            .record
            .lock()
            .expect("record lock")
            .repositories
            .iter()
            .map(|repository| (repository.path.clone(), repository.commit.clone()))
            .collect();
        let meta = LayerMeta {
            key: key.clone(),
            kind,
            parent,
            config_name: self.config.name.clone(),
            commits,
            created_at: record::now_rfc3339(),
        };
        let _cache_guard = self.cache_guard.read().await;
        self.provider.snapshot(&workspace.id, &meta).await?;
        info!(workspace_id = %workspace.id, layer_key = %key.short(), kind = kind.as_str(), "layer stored");
        let layer = LayerRecord {
            kind,
            key: key.clone(),
            cache_hit: false,
        };
        workspace
            .record
            .lock()
            .expect("record lock")
            .layers
            .push(layer);
        Ok(())
    }

    fn cached_layers(&self, hit: CacheHit) -> Vec<LayerRecord> {
        let cached = |kind: LayerKind| LayerRecord {
            kind,
            key: self.keys.get(kind).clone(),
            cache_hit: true,
        };
        match hit {
            CacheHit::Setup => vec![
                cached(LayerKind::Base),
                cached(LayerKind::Repositories),
                cached(LayerKind::Setup),
            ],
            CacheHit::Repositories => {
                vec![cached(LayerKind::Base), cached(LayerKind::Repositories)]
            }
            CacheHit::None => vec![LayerRecord {
                kind: LayerKind::Base,
                key: self.keys.base.clone(),
                cache_hit: false,
            }],
        }
    }
}

fn repository_record(
    repository: &crate::config::Repository,
    state: &MirrorState,
) -> RepositoryRecord {
    RepositoryRecord {
        path: repository.path.clone(),
        url: repository.url.to_string(),
        reference: repository.reference.clone(),
        branch: state.branch.clone(),
        commit: state.commit.clone(),
    }
}

fn log_sync(workspace: &Workspace, url: &str, state: &MirrorState) {
    let how = if state.cloned { "cloned" } else { "fetched" };
    info!(workspace_id = %workspace.id, url, commit = %state.commit, how, "mirror synced");
}

/// Names the step that failed from the state the workspace was in when it failed.
fn failed_step(state: &str) -> &'static str {
    match state {
        "provisioned" => "clone",
        "cloned" => "setup",
        "setup" => "snapshot",
        _ => "create",
    }
}
