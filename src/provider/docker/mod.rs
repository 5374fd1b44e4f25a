//! The `docker` provider: workspaces are containers, layers are images, through bollard.
//!
//! - A layer is the image `derrick-layer:<key>`, labelled with its metadata (`layers`). The base
//!   layer is the configured base image, committed once under derrick's tag. The repositories
//!   and setup layers are commits of the workspace container that built them.
//! - A workspace is a container of its top layer named `derrick-<workspace id>` (`containers`).
//!   Its files live under [`WORKSPACE_ROOT`]; a repository at `/code/app` is at
//!   `/workspace/code/app`, and `HOME` is the root, as in the local provider.
//! - Repositories are checked out on the host from the Git mirror and copied in as a tar archive;
//!   a fetch copies the checkout out, updates it on the host and copies it back (`checkouts`). No
//!   credential and no Git remote access is needed inside the container.
//! - Commands are execs (`exec`); files move as tar archives after a path check (`files`).
//! - A reset replaces the container with a fresh one of the same image under the same name. A
//!   spare container per layer image, started in advance, makes that a pair of renames, and a
//!   warm create a single rename.
//!
//! Containers carry derrick's scope label, one value per state folder, so a derrick removes only
//! containers of its own state folder. Layer images are shared by every derrick on the engine:
//! their keys are content hashes.
//!
//! Invariant: only this module uses bollard. The workspace map is locked only for lookups, never
//! across an `.await`, so operations on different workspaces never wait on each other.

mod archive;
mod checkouts;
mod client;
mod containers;
mod exec;
mod files;
mod layers;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

pub use exec::KILL_GRACE;

use self::containers::{Spares, Template, name_of};
use self::exec::Running;
use crate::config::DockerSettings;
use crate::engine::{ExecOutput, ExecRequest, LayerInfo, LayerMeta, Provider, WorkspaceId};
use crate::error::{Error, Result};
use crate::git::{Checkout, CheckoutUpdate};
use crate::keys::{LayerKey, LayerKind};

/// The folder of a workspace's files inside its container.
pub const WORKSPACE_ROOT: &str = "/workspace";

/// Label with the scope of a container: derived from the state folder of the derrick that
/// created it.
const LABEL_SCOPE: &str = "dev.derrick.scope";

/// Label with a container's role: `workspace`, `spare` or `build`.
const LABEL_ROLE: &str = "dev.derrick.role";

/// Label with the layer key of a container's image.
const LABEL_LAYER: &str = "dev.derrick.layer";

/// Options of the docker provider.
#[derive(Debug, Clone)]
pub struct DockerOptions {
    /// Holds temporary checkouts on the host; created if missing.
    pub cache_dir: PathBuf,
    /// The state folder; its path decides which containers belong to this derrick.
    pub state_dir: PathBuf,
    /// The image of the base layer.
    pub base_image: String,
    pub settings: DockerSettings,
    /// Spare containers kept started per layer image; 0 turns spares off.
    pub spare_containers: usize,
}

/// The docker provider.
pub struct DockerProvider {
    docker: Docker,
    base_image: String,
    scope: String,
    temporary: PathBuf,
    template: Arc<Template>,
    spares: Arc<Spares>,
    spare_target: usize,
    workspaces: Mutex<HashMap<WorkspaceId, Arc<Workspace>>>,
}

/// The provider's view of one workspace: its container, layers and running commands.
#[derive(Debug)]
struct Workspace {
    /// The container id and the layer stack; locked only briefly.
    state: Mutex<WorkspaceState>,
    running: Arc<Running>,
}

#[derive(Debug, Clone)]
struct WorkspaceState {
    container: String,
    layers: Vec<LayerKey>,
}

impl DockerProvider {
    /// Connects to the engine and checks that the base image exists (pulling it if it does not).
    ///
    /// # Errors
    /// `provider_unavailable` when the engine cannot be reached or the base image is missing and
    /// cannot be pulled; `internal` when the cache folder cannot be created.
    pub async fn connect(options: DockerOptions) -> Result<DockerProvider> {
        let docker = client::connect().await?;
        check_cpus(&docker, &options.settings).await?;
        layers::ensure_image(&docker, &options.base_image).await?;
        let temporary = options.cache_dir.join("docker-tmp");
        let (created, state_dir) = (temporary.clone(), options.state_dir.clone());
        let scope = tokio::task::spawn_blocking(move || {
            // Checkouts left by a crash are only clutter; remove them before reuse.
            let _ = std::fs::remove_dir_all(&created);
            std::fs::create_dir_all(&created)?;
            // The scope comes from the canonical path, so the folder must exist first.
            std::fs::create_dir_all(&state_dir)?;
            Ok::<_, std::io::Error>(scope_of(&state_dir))
        })
        .await?
        .map_err(|error| {
            Error::internal(
                format!(
                    "cannot create {} or {}",
                    temporary.display(),
                    options.state_dir.display()
                ),
                error,
            )
        })?;
        info!(provider = "docker", scope = %scope, base_image = %options.base_image, "docker engine connected");
        Ok(DockerProvider {
            docker,
            base_image: options.base_image,
            template: Arc::new(Template {
                scope: scope.clone(),
                settings: options.settings,
            }),
            scope,
            temporary,
            spares: Arc::new(Spares::default()),
            spare_target: options.spare_containers,
            workspaces: Mutex::new(HashMap::new()),
        })
    }

    /// Connects to the engine to list and remove layer images only, changing nothing else: no
    /// base image is pulled and no folder is touched, so it is safe beside a running derrick.
    ///
    /// # Errors
    /// `provider_unavailable` when the engine cannot be reached.
    pub async fn inspect(state_dir: &Path) -> Result<DockerProvider> {
        let docker = client::connect().await?;
        let scope = scope_of(state_dir);
        Ok(DockerProvider {
            docker,
            base_image: String::new(),
            template: Arc::new(Template {
                scope: scope.clone(),
                settings: DockerSettings::default(),
            }),
            scope,
            temporary: PathBuf::new(),
            spares: Arc::new(Spares::default()),
            spare_target: 0,
            workspaces: Mutex::new(HashMap::new()),
        })
    }

    /// Removes every container of this derrick's scope that is not the container of a workspace
    /// in `known`: leftovers of a crash, spares and discarded containers. Returns their names.
    pub async fn remove_unknown(&self, known: &[WorkspaceId]) -> Result<Vec<String>> {
        let kept: HashSet<String> = known.iter().map(name_of).collect();
        let mut removed = Vec::new();
        for container in containers::list(&self.docker, &self.scope).await? {
            if kept.contains(&container.name) {
                continue;
            }
            containers::remove(&self.docker, &container.id).await?;
            removed.push(container.name);
        }
        Ok(removed)
    }

    /// Removes the spare containers, waiting for those still starting; called when derrick
    /// stops.
    pub async fn remove_spares(&self) {
        let deadline = tokio::time::Instant::now() + client::API_TIMEOUT;
        loop {
            let (ready, starting) = self.spares.drain();
            for container in ready {
                if let Err(error) = containers::remove(&self.docker, &container).await {
                    warn!(container = %container, error = %error, "cannot remove a spare container");
                }
            }
            if starting == 0 || tokio::time::Instant::now() > deadline {
                return;
            }
            // A spare in the middle of its start joins the pool within milliseconds.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn insert(&self, id: &WorkspaceId, container: String, layers: Vec<LayerKey>) {
        let workspace = Arc::new(Workspace {
            state: Mutex::new(WorkspaceState { container, layers }),
            running: Arc::default(),
        });
        let mut workspaces = self.workspaces.lock().expect("workspace map lock");
        workspaces.insert(id.clone(), workspace);
    }

    fn workspace(&self, id: &WorkspaceId) -> Result<Arc<Workspace>> {
        let workspaces = self.workspaces.lock().expect("workspace map lock");
        workspaces.get(id).cloned().ok_or_else(|| {
            Error::Internal(format!(
                "the docker provider has no container for workspace {id}"
            ))
        })
    }

    fn state(&self, id: &WorkspaceId) -> Result<(Arc<Workspace>, WorkspaceState)> {
        let workspace = self.workspace(id)?;
        let state = workspace
            .state
            .lock()
            .expect("workspace state lock")
            .clone();
        Ok((workspace, state))
    }

    /// Returns a ready container of the top layer of `layers`: a spare renamed to `name`, or a
    /// new one. Only setup layers get spares, because workspaces start on lower layers only
    /// while those are built, once per configuration.
    async fn container_of(&self, layers: &[LayerKey], name: &str) -> Result<String> {
        let key = layers.last().ok_or_else(|| {
            Error::invalid_request(format!("container {name} needs at least a base layer"))
        })?;
        let spare = self.spares.take(key);
        if self.spare_target > 0 && is_setup_stack(layers) {
            self.spares
                .refill(&self.docker, &self.template, key, self.spare_target);
        }
        if let Some(spare) = spare {
            containers::rename(&self.docker, &spare, name).await?;
            return Ok(spare);
        }
        self.template
            .start(&self.docker, name, key, "workspace")
            .await
    }

    /// Resolves a command's working folder to a container path.
    async fn working_dir(&self, container: &str, working_dir: Option<&str>) -> Result<String> {
        match working_dir {
            Some(directory) => Ok(files::resolve_directory(&self.docker, container, directory)
                .await?
                .container_path()),
            None => Ok(WORKSPACE_ROOT.to_owned()),
        }
    }
}

#[async_trait]
impl Provider for DockerProvider {
    fn kind(&self) -> &str {
        "docker"
    }

    async fn layer(&self, key: &LayerKey) -> Result<Option<LayerMeta>> {
        layers::read_meta(&self.docker, key).await
    }

    async fn ensure_base(&self, key: &LayerKey, config_name: &str) -> Result<()> {
        layers::ensure_base(
            &self.docker,
            &self.scope,
            &self.base_image,
            key,
            config_name,
        )
        .await
    }

    async fn provision(&self, id: &WorkspaceId, layers: &[LayerKey]) -> Result<()> {
        let container = self.container_of(layers, &name_of(id)).await?;
        self.insert(id, container, layers.to_vec());
        Ok(())
    }

    async fn checkout(&self, id: &WorkspaceId, checkouts: &[Checkout]) -> Result<()> {
        let (_, state) = self.state(id)?;
        checkouts::copy_in(&self.docker, &state.container, &self.temporary, checkouts).await
    }

    async fn update_checkout(
        &self,
        id: &WorkspaceId,
        checkout: &Checkout,
    ) -> Result<CheckoutUpdate> {
        let (_, state) = self.state(id)?;
        checkouts::update(&self.docker, &state.container, &self.temporary, checkout).await
    }

    async fn snapshot(&self, id: &WorkspaceId, meta: &LayerMeta) -> Result<()> {
        let (workspace, state) = self.state(id)?;
        // Processes that the setup left running are not part of the image. Ending them makes the
        // building workspace match the containers that later start from the image.
        exec::kill(&self.docker, &state.container, None, Duration::ZERO).await?;
        layers::commit(&self.docker, &state.container, meta).await?;
        workspace
            .state
            .lock()
            .expect("workspace state lock")
            .layers
            .push(meta.key.clone());
        if meta.kind == LayerKind::Setup && self.spare_target > 0 {
            self.spares
                .refill(&self.docker, &self.template, &meta.key, self.spare_target);
        }
        Ok(())
    }

    async fn exec(&self, id: &WorkspaceId, request: ExecRequest) -> Result<ExecOutput> {
        let (workspace, state) = self.state(id)?;
        let working_dir = self
            .working_dir(&state.container, request.working_dir.as_deref())
            .await?;
        exec::run(
            &self.docker,
            &state.container,
            id,
            request,
            working_dir,
            &workspace.running,
        )
        .await
    }

    async fn read_file(
        &self,
        id: &WorkspaceId,
        path: &str,
        working_dir: Option<&str>,
        max_bytes: u64,
    ) -> Result<Vec<u8>> {
        let (_, state) = self.state(id)?;
        files::read(
            &self.docker,
            &state.container,
            id,
            path,
            working_dir,
            max_bytes,
        )
        .await
    }

    async fn write_file(
        &self,
        id: &WorkspaceId,
        path: &str,
        working_dir: Option<&str>,
        content: &[u8],
    ) -> Result<()> {
        let (_, state) = self.state(id)?;
        let content = content.to_vec();
        files::write(&self.docker, &state.container, path, working_dir, content).await
    }

    /// Kills every process of the workspace's commands when a command is running, so that it
    /// replies (with 137) before a reset or destroy. Processes that finished commands left in
    /// the background end with the container, which reset and destroy remove.
    // NOTE: background processes survive this call when no command runs. That is enough while
    // every caller goes on to reset or destroy; a caller that keeps the container needs the
    // unconditional kill that `snapshot` uses.
    async fn kill_processes(&self, id: &WorkspaceId) -> Result<()> {
        let Ok((workspace, state)) = self.state(id) else {
            return Ok(());
        };
        if workspace.running.any() {
            exec::kill(&self.docker, &state.container, None, Duration::ZERO).await?;
        }
        Ok(())
    }

    async fn reset(&self, id: &WorkspaceId) -> Result<()> {
        let (workspace, state) = self.state(id)?;
        let discarded = format!("derrick-discarded-{}", uuid::Uuid::new_v4().simple());
        containers::rename(&self.docker, &state.container, &discarded).await?;
        let container = self.container_of(&state.layers, &name_of(id)).await?;
        workspace
            .state
            .lock()
            .expect("workspace state lock")
            .container = container;
        containers::remove_later(&self.docker, state.container);
        Ok(())
    }

    /// Removes the workspace's container; destroying one that does not exist succeeds.
    /// Takes back the container of a workspace that an earlier derrick left, starting it if it
    /// stopped. Returns `false` when the container is gone, belongs to another state folder or
    /// runs an image outside the workspace's layers. The caller then destroys the workspace.
    async fn adopt(&self, id: &WorkspaceId, layers: &[LayerKey]) -> Result<bool> {
        let Some(top) = layers.last() else {
            return Ok(false);
        };
        let name = name_of(id);
        let Some(found) = containers::inspect(&self.docker, &name).await? else {
            return Ok(false);
        };
        let ours = found.labels.get(LABEL_SCOPE) == Some(&self.scope);
        // A workspace's container runs one of its layers: the top one after a reset, a lower
        // one when the clone and setup built the layers above it in that container.
        let image_known = found
            .labels
            .get(LABEL_LAYER)
            .is_some_and(|key| layers.iter().any(|layer| layer.as_str() == key));
        if !ours || !image_known {
            return Ok(false);
        }
        if found.running {
            // Commands of the earlier derrick lost their requests; background ones go too, as
            // the local provider's re-adoption does.
            exec::kill(&self.docker, &found.id, None, Duration::ZERO).await?;
        } else {
            containers::start(&self.docker, &found.id).await?;
        }
        self.insert(id, found.id, layers.to_vec());
        info!(workspace_id = %id, layer_key = %top.short(), "workspace container adopted");
        Ok(true)
    }

    async fn release(&self, id: &WorkspaceId) -> Result<()> {
        // The container keeps running, so a restarted derrick adopts it with its changes.
        self.kill_processes(id).await?;
        self.workspaces
            .lock()
            .expect("workspace map lock")
            .remove(id);
        Ok(())
    }

    /// Lists the layer images with their sizes in bytes.
    async fn layers(&self) -> Result<Vec<LayerInfo>> {
        let sizes = layers::list(&self.docker).await?;
        Ok(sizes
            .into_iter()
            .map(|(meta, size_bytes)| LayerInfo { meta, size_bytes })
            .collect())
    }

    /// Removes the tag of layer `key` from the cache. The engine frees the image's data once no
    /// container and no image of a higher layer uses it, so running workspaces keep working.
    async fn remove_layer(&self, key: &LayerKey) -> Result<()> {
        layers::remove(&self.docker, key).await
    }

    /// Returns the layers that any derrick container on the engine runs, spares and other
    /// derricks' workspaces included, because derricks on one engine share layer images.
    async fn environment_layers(&self) -> Result<BTreeSet<LayerKey>> {
        let keys = containers::layers_in_use(&self.docker).await?;
        Ok(keys.iter().filter_map(|key| LayerKey::parse(key)).collect())
    }

    async fn destroy(&self, id: &WorkspaceId) -> Result<()> {
        let removed = self
            .workspaces
            .lock()
            .expect("workspace map lock")
            .remove(id);
        let container = match removed {
            Some(workspace) => workspace
                .state
                .lock()
                .expect("workspace state lock")
                .container
                .clone(),
            None => name_of(id),
        };
        containers::remove(&self.docker, &container).await
    }
}

/// Refuses a `docker.cpus` limit above the engine's CPU count, which the engine would reject at
/// every container start.
async fn check_cpus(docker: &Docker, settings: &DockerSettings) -> Result<()> {
    let Some(nano_cpus) = settings.nano_cpus else {
        return Ok(());
    };
    let info = client::bounded(
        "read",
        "the engine's info",
        client::API_TIMEOUT,
        docker.info(),
    )
    .await?;
    let Some(cpus) = info.ncpu.and_then(|count| u64::try_from(count).ok()) else {
        return Ok(());
    };
    if nano_cpus > cpus * 1_000_000_000 {
        return Err(Error::invalid_request(format!(
            "the configuration's `docker.cpus` is {}, but the docker engine has {cpus} CPUs; give \
             at most {cpus}",
            nano_cpus as f64 / 1e9
        )));
    }
    Ok(())
}

/// Tells whether `layers` ends in a setup layer: the engine stacks base, repositories and setup,
/// and a complete workspace runs on all three.
fn is_setup_stack(layers: &[LayerKey]) -> bool {
    layers.len() == 3
}

/// Returns the scope label value of a state folder: the first 16 hex digits of the SHA-256 of
/// its canonical path (its absolute path while it does not exist).
pub fn scope_of(state_dir: &Path) -> String {
    let absolute = std::fs::canonicalize(state_dir)
        .or_else(|_| std::path::absolute(state_dir))
        .unwrap_or_else(|_| state_dir.to_path_buf());
    let digest = Sha256::digest(absolute.as_os_str().as_encoded_bytes());
    hex::encode(digest)[..16].to_owned()
}
