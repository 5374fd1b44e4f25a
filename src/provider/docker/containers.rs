//! Workspace containers: creation from a layer image, renaming, removal and the spare pool.
//!
//! A workspace's container is named `derrick-<workspace id>`. Labels cannot change after a
//! container is created, and a spare container is created before any workspace id exists, so
//! the name (which a rename changes in one call) is what ties a container to its workspace. The
//! labels carry what is fixed at creation: derrick's scope (one per state folder, so two derricks
//! on one engine never remove each other's containers), the role and the layer image.
//!
//! Every container runs `docker-init` as PID 1 (the engine's `--init`), which reaps the orphans
//! that commands leave, and a keep-alive shell in session 1. Commands run as execs, each in a
//! session of its own.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, RemoveContainerOptions, RenameContainerOptions,
};
use tracing::{debug, warn};

use super::client::{API_TIMEOUT, TRANSFER_TIMEOUT, bounded, bounded_optional};
use super::layers::image_of;
use super::{LABEL_LAYER, LABEL_ROLE, LABEL_SCOPE};
use crate::config::DockerSettings;
use crate::engine::WorkspaceId;
use crate::error::Result;
use crate::keys::LayerKey;

/// The main process of every container: a shell that sleeps until the container is removed. Its
/// last argument marks it in `ps`.
pub(super) const KEEP_ALIVE: [&str; 4] = [
    "/bin/sh",
    "-c",
    "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done",
    "derrick-keep-alive",
];

/// Returns the container name of a workspace.
pub(super) fn name_of(id: &WorkspaceId) -> String {
    format!("derrick-{id}")
}

/// The settings of every new container: its scope label and resource limits.
#[derive(Debug, Clone)]
pub(super) struct Template {
    pub scope: String,
    pub settings: DockerSettings,
}

/// Ready spare containers by layer image, and how many are being started.
#[derive(Debug, Default)]
pub(super) struct Spares {
    pools: Mutex<HashMap<LayerKey, Pool>>,
    /// Set at shutdown, after which no new spare starts.
    closed: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
struct Pool {
    ready: Vec<String>,
    starting: usize,
}

impl Template {
    /// Creates and starts a container of layer `key` named `name`.
    pub(super) async fn start(
        &self,
        docker: &Docker,
        name: &str,
        key: &LayerKey,
        role: &str,
    ) -> Result<String> {
        let settings = &self.settings;
        let host_config = HostConfig {
            init: Some(true),
            network_mode: Some(settings.network.as_str().to_owned()),
            nano_cpus: settings
                .nano_cpus
                .map(|nano_cpus| i64::try_from(nano_cpus).unwrap_or(i64::MAX)),
            memory: settings
                .memory_bytes
                .map(|bytes| i64::try_from(bytes).unwrap_or(i64::MAX)),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(image_of(key)),
            cmd: Some(KEEP_ALIVE.iter().map(|part| (*part).to_owned()).collect()),
            entrypoint: Some(Vec::new()),
            labels: Some(HashMap::from([
                (LABEL_SCOPE.to_owned(), self.scope.clone()),
                (LABEL_ROLE.to_owned(), role.to_owned()),
                (LABEL_LAYER.to_owned(), key.as_str().to_owned()),
            ])),
            host_config: Some(host_config),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(name.to_owned()),
            ..Default::default()
        };
        let created = bounded(
            "create container",
            name,
            API_TIMEOUT,
            docker.create_container(Some(options), body),
        )
        .await?;
        if let Err(error) = start(docker, &created.id).await {
            remove(docker, &created.id).await?;
            return Err(error);
        }
        Ok(created.id)
    }
}

impl Spares {
    /// Takes a ready spare of layer `key`, if one is there.
    pub(super) fn take(&self, key: &LayerKey) -> Option<String> {
        let mut pools = self.pools.lock().expect("spare pool lock");
        pools.get_mut(key)?.ready.pop()
    }

    /// Starts spares of layer `key` in the background until `target` are ready or starting.
    pub(super) fn refill(
        self: &Arc<Self>,
        docker: &Docker,
        template: &Arc<Template>,
        key: &LayerKey,
        target: usize,
    ) {
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        let missing = {
            let mut pools = self.pools.lock().expect("spare pool lock");
            let pool = pools.entry(key.clone()).or_default();
            let missing = target.saturating_sub(pool.ready.len() + pool.starting);
            pool.starting += missing;
            missing
        };
        for _ in 0..missing {
            let (spares, docker, template, key) = (
                Arc::clone(self),
                docker.clone(),
                Arc::clone(template),
                key.clone(),
            );
            tokio::spawn(async move {
                let name = format!("derrick-spare-{}", uuid::Uuid::new_v4().simple());
                let started = template.start(&docker, &name, &key, "spare").await;
                let mut pools = spares.pools.lock().expect("spare pool lock");
                let pool = pools.entry(key.clone()).or_default();
                pool.starting -= 1;
                match started {
                    Ok(container) => {
                        debug!(layer_key = %key.short(), container = %name, "spare container ready");
                        pool.ready.push(container);
                    }
                    Err(error) => {
                        warn!(layer_key = %key.short(), error = %error, "cannot start a spare container");
                    }
                }
            });
        }
    }

    /// Stops new spares and takes the ready ones out of the pools, for removal at shutdown;
    /// also returns how many are still starting.
    pub(super) fn drain(&self) -> (Vec<String>, usize) {
        self.closed.store(true, Ordering::SeqCst);
        let mut pools = self.pools.lock().expect("spare pool lock");
        let starting = pools.values().map(|pool| pool.starting).sum();
        let ready = pools
            .values_mut()
            .flat_map(|pool| std::mem::take(&mut pool.ready))
            .collect();
        (ready, starting)
    }
}

/// Renames a container.
pub(super) async fn rename(docker: &Docker, container: &str, name: &str) -> Result<()> {
    let options = RenameContainerOptions {
        name: name.to_owned(),
    };
    bounded(
        "rename container",
        container,
        API_TIMEOUT,
        docker.rename_container(container, options),
    )
    .await
}

/// Removes a container with its processes; removing a missing one succeeds.
pub(super) async fn remove(docker: &Docker, container: &str) -> Result<()> {
    let options = RemoveContainerOptions {
        force: true,
        v: true,
        ..Default::default()
    };
    bounded_optional(
        "remove container",
        container,
        TRANSFER_TIMEOUT,
        docker.remove_container(container, Some(options)),
    )
    .await?;
    Ok(())
}

/// Removes a container in the background and logs a failure. It serves containers that no
/// request waits for, such as the old container of a reset.
pub(super) fn remove_later(docker: &Docker, container: String) {
    let docker = docker.clone();
    tokio::spawn(async move {
        if let Err(error) = remove(&docker, &container).await {
            warn!(container = %container, error = %error, "cannot remove a discarded container");
        }
    });
}

/// A container of derrick's scope: its id and its name without the leading `/`.
pub(super) struct Listed {
    pub id: String,
    pub name: String,
}

/// Lists every container of `scope`, running or not.
pub(super) async fn list(docker: &Docker, scope: &str) -> Result<Vec<Listed>> {
    let options = ListContainersOptions {
        all: true,
        filters: Some(HashMap::from([(
            "label".to_owned(),
            vec![format!("{LABEL_SCOPE}={scope}")],
        )])),
        ..Default::default()
    };
    let containers = bounded(
        "list containers",
        &format!("scope {scope}"),
        API_TIMEOUT,
        docker.list_containers(Some(options)),
    )
    .await?;
    Ok(containers
        .into_iter()
        .filter_map(|container| {
            let name = container.names?.first()?.trim_start_matches('/').to_owned();
            Some(Listed {
                id: container.id?,
                name,
            })
        })
        .collect())
}

/// Returns the layer keys that any derrick container on the engine runs, whatever its scope:
/// derricks sharing an engine share layer images.
pub(super) async fn layers_in_use(docker: &Docker) -> Result<Vec<String>> {
    let options = ListContainersOptions {
        all: true,
        filters: Some(HashMap::from([(
            "label".to_owned(),
            vec![LABEL_LAYER.to_owned()],
        )])),
        ..Default::default()
    };
    let containers = bounded(
        "list containers",
        "every derrick scope",
        API_TIMEOUT,
        docker.list_containers(Some(options)),
    )
    .await?;
    Ok(containers
        .into_iter()
        .filter_map(|container| container.labels?.remove(LABEL_LAYER))
        .collect())
}

/// The parts of a container's inspection that adoption reads.
pub(super) struct Inspected {
    pub id: String,
    pub labels: HashMap<String, String>,
    pub running: bool,
}

/// Inspects a container by name or id; `None` when it does not exist.
pub(super) async fn inspect(docker: &Docker, container: &str) -> Result<Option<Inspected>> {
    let inspected = bounded_optional(
        "inspect container",
        container,
        API_TIMEOUT,
        docker.inspect_container(container, None),
    )
    .await?;
    Ok(inspected.map(|inspected| Inspected {
        id: inspected.id.unwrap_or_else(|| container.to_owned()),
        labels: inspected
            .config
            .and_then(|config| config.labels)
            .unwrap_or_default(),
        running: inspected.state.and_then(|state| state.running) == Some(true),
    }))
}

/// Starts a stopped container.
pub(super) async fn start(docker: &Docker, container: &str) -> Result<()> {
    bounded(
        "start container",
        container,
        TRANSFER_TIMEOUT,
        docker.start_container(container, None),
    )
    .await
}
