//! Repositories in a container: checked out on the host from the Git mirror and copied in, and
//! brought up to date on the host and copied back.
//!
//! The container needs neither Git nor credentials nor network access to a remote: every Git
//! operation runs on the host through `git`, in a temporary folder under the cache.
//!
//! NOTE: archives are built and read in memory, so a copy holds a repository's whole working
//! tree and history in derrick's memory for a moment. Streaming through a temporary file would
//! bound that.

use std::path::{Path, PathBuf};

use bollard::Docker;

use super::WORKSPACE_ROOT;
use super::{archive, exec, files};
use crate::error::{Error, Result};
use crate::git::{self, Checkout, CheckoutUpdate};

/// Checks every repository out on the host and copies them into the container in one archive.
/// With no repositories, the archive creates the workspace root alone.
pub(super) async fn copy_in(
    docker: &Docker,
    container: &str,
    temporary: &Path,
    checkouts: &[Checkout],
) -> Result<()> {
    let folder = Scratch::create(temporary).await?;
    let root = folder.path().join("workspace");
    let result = async {
        let created = root.clone();
        tokio::task::spawn_blocking(move || std::fs::create_dir(&created))
            .await?
            .map_err(|error| Error::internal("cannot create a checkout folder", error))?;
        for checkout in checkouts {
            let destination = root.join(checkout.path.trim_start_matches('/'));
            git::checkout(checkout.clone(), destination).await?;
        }
        let archived =
            tokio::task::spawn_blocking(move || archive::tree_blocking(&root, "workspace"))
                .await??;
        files::upload(docker, container, "/", archived).await
    }
    .await;
    folder.remove().await;
    result
}

/// Brings the checkout at `checkout.path` to `checkout.commit`: copies it out, updates it on the
/// host from the mirror, and replaces the container's copy with the result.
pub(super) async fn update(
    docker: &Docker,
    container: &str,
    temporary: &Path,
    checkout: &Checkout,
) -> Result<CheckoutUpdate> {
    let source = format!("{WORKSPACE_ROOT}{}", checkout.path);
    let Some(archived) = files::download(docker, container, &source).await? else {
        return Err(Error::GitFailed {
            step: "update",
            url: checkout.url.to_string(),
            reason: format!(
                "the checkout at `{}` is missing in the workspace; reset or recreate the workspace",
                checkout.path
            ),
        });
    };
    let folder = Scratch::create(temporary).await?;
    let result = async {
        let unpacked = folder.path().to_path_buf();
        tokio::task::spawn_blocking(move || archive::unpack_blocking(&archived, &unpacked))
            .await??;
        let name = checkout
            .path
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let local = folder.path().join(&name);
        let update = git::update_checkout(checkout.clone(), local.clone()).await?;

        let archived =
            tokio::task::spawn_blocking(move || archive::tree_blocking(&local, &name)).await??;
        // The archive adds and overwrites files but never deletes, so the old copy goes first.
        exec::remove_tree(docker, container, &source).await?;
        let parent = source
            .rsplit_once('/')
            .map_or(WORKSPACE_ROOT, |(parent, _)| parent);
        files::upload(docker, container, parent, archived).await?;
        Ok(update)
    }
    .await;
    folder.remove().await;
    result
}

/// A temporary folder on the host, removed by [`Scratch::remove`].
struct Scratch(PathBuf);

impl Scratch {
    async fn create(temporary: &Path) -> Result<Scratch> {
        let path = temporary.join(uuid::Uuid::new_v4().simple().to_string());
        let created = path.clone();
        tokio::task::spawn_blocking(move || std::fs::create_dir_all(&created))
            .await?
            .map_err(|error| Error::internal(format!("cannot create {}", path.display()), error))?;
        Ok(Scratch(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// Removes the folder; a failure leaves clutter that the next start removes.
    async fn remove(self) {
        let path = self.0;
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(path)).await;
    }
}
