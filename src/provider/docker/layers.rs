//! Layers as images: tags derived from layer keys, labels that carry each layer's metadata, the
//! base layer and commits.
//!
//! A layer `K` is the image `derrick-layer:K`. Its labels carry the key, the kind, the state the
//! layer stands for, the parent key, the configuration name, the commits of its repositories and
//! its creation time, so the cache can be read from the engine alone. A commit creates the image
//! and its tag in one call, so a half-built layer is never tagged. A failed setup is never
//! committed at all.

use std::collections::{BTreeMap, HashMap};

use bollard::Docker;
use bollard::models::{ContainerConfig, ContainerCreateBody};
use bollard::query_parameters::{
    CommitContainerOptions, CreateContainerOptions, CreateImageOptions, ListImagesOptions,
    RemoveContainerOptions, RemoveImageOptions,
};
use futures_util::StreamExt;
use tracing::info;

use super::client::{API_TIMEOUT, PULL_TIMEOUT, TRANSFER_TIMEOUT, bounded, bounded_optional};
use super::containers::KEEP_ALIVE;
use super::{LABEL_ROLE, LABEL_SCOPE};
use crate::engine::LayerMeta;
use crate::error::{Error, Result};
use crate::keys::{LayerKey, LayerKind};

/// Repository part of every layer image's tag; the tag is the layer key.
pub(super) const LAYER_REPOSITORY: &str = "derrick-layer";

const LABEL_KEY: &str = "dev.derrick.layer.key";
const LABEL_KIND: &str = "dev.derrick.layer.kind";
const LABEL_STATE: &str = "dev.derrick.layer.state";
const LABEL_PARENT: &str = "dev.derrick.layer.parent";
const LABEL_CONFIG: &str = "dev.derrick.layer.config";
const LABEL_COMMITS: &str = "dev.derrick.layer.commits";
const LABEL_CREATED: &str = "dev.derrick.layer.created_at";

/// Returns the image reference of layer `key`.
pub(super) fn image_of(key: &LayerKey) -> String {
    format!("{LAYER_REPOSITORY}:{}", key.as_str())
}

/// Reads the metadata of layer `key` from its image's labels; `None` when the image is missing
/// or was not made by derrick.
pub(super) async fn read_meta(docker: &Docker, key: &LayerKey) -> Result<Option<LayerMeta>> {
    let image = image_of(key);
    let inspected = bounded_optional(
        "inspect image",
        &image,
        API_TIMEOUT,
        docker.inspect_image(&image),
    )
    .await?;
    let labels = inspected
        .and_then(|inspected| inspected.config)
        .and_then(|config| config.labels)
        .unwrap_or_default();
    Ok(meta_from_labels(&labels).filter(|meta| meta.key == *key))
}

/// Makes sure the base layer `key` exists: the base image, pulled if missing, committed once
/// with derrick's labels.
///
/// # Errors
/// `provider_unavailable` naming the image and how to provide it when it is neither present nor
/// pullable.
pub(super) async fn ensure_base(
    docker: &Docker,
    scope: &str,
    base_image: &str,
    key: &LayerKey,
    config_name: &str,
) -> Result<()> {
    if read_meta(docker, key).await?.is_some() {
        return Ok(());
    }
    ensure_image(docker, base_image).await?;

    // A container that never starts: committing it copies the base image under derrick's tag
    // and labels without running anything.
    let name = format!("derrick-build-{}", uuid::Uuid::new_v4().simple());
    let body = ContainerCreateBody {
        image: Some(base_image.to_owned()),
        // An imported root file system has no command, and the engine requires one.
        cmd: Some(KEEP_ALIVE.iter().map(|part| (*part).to_owned()).collect()),
        labels: Some(HashMap::from([
            (LABEL_SCOPE.to_owned(), scope.to_owned()),
            (LABEL_ROLE.to_owned(), "build".to_owned()),
        ])),
        ..Default::default()
    };
    let options = CreateContainerOptions {
        name: Some(name.clone()),
        ..Default::default()
    };
    bounded(
        "create container",
        &name,
        API_TIMEOUT,
        docker.create_container(Some(options), body),
    )
    .await?;
    let meta = LayerMeta {
        key: key.clone(),
        kind: LayerKind::Base,
        parent: None,
        config_name: config_name.to_owned(),
        commits: BTreeMap::new(),
        created_at: now_rfc3339(),
    };
    let committed = commit(docker, &name, &meta).await;
    let removal = RemoveContainerOptions {
        force: true,
        ..Default::default()
    };
    bounded(
        "remove container",
        &name,
        API_TIMEOUT,
        docker.remove_container(&name, Some(removal)),
    )
    .await?;
    committed
}

/// Checks that `image` exists, pulling it when it does not.
///
/// # Errors
/// `provider_unavailable` naming the image and how to provide it.
pub(super) async fn ensure_image(docker: &Docker, image: &str) -> Result<()> {
    let present = bounded_optional(
        "inspect image",
        image,
        API_TIMEOUT,
        docker.inspect_image(image),
    )
    .await?;
    if present.is_some() {
        return Ok(());
    }
    info!(image, "pulling the base image");
    let options = CreateImageOptions {
        from_image: Some(image.to_owned()),
        ..Default::default()
    };
    let pull = async {
        let mut progress = docker.create_image(Some(options), None, None);
        while let Some(step) = progress.next().await {
            step?;
        }
        Ok(())
    };
    let pulled = tokio::time::timeout(PULL_TIMEOUT, pull).await;
    let reason = match pulled {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(error)) => error_text(error),
        Err(_) => format!("no result within {} s", PULL_TIMEOUT.as_secs()),
    };
    Err(Error::ProviderUnavailable(format!(
        "base image `{image}` is not present in the docker engine and cannot be pulled \
         ({reason}); load it with `docker load -i FILE`, import a root file system with \
         `docker import FILE {image}`, or name another image in `base_image` or --base-image"
    )))
}

/// Commits `container` as layer `meta.key`, tagged and labelled in the same call.
pub(super) async fn commit(docker: &Docker, container: &str, meta: &LayerMeta) -> Result<()> {
    let options = CommitContainerOptions {
        container: Some(container.to_owned()),
        repo: Some(LAYER_REPOSITORY.to_owned()),
        tag: Some(meta.key.as_str().to_owned()),
        comment: Some(format!("derrick {} layer", meta.kind.as_str())),
        pause: true,
        ..Default::default()
    };
    let config = ContainerConfig {
        labels: Some(labels_of(meta)),
        ..Default::default()
    };
    bounded(
        "commit",
        container,
        TRANSFER_TIMEOUT,
        docker.commit_container(options, config),
    )
    .await?;
    Ok(())
}

/// Lists derrick's layer images with their sizes in bytes.
pub(super) async fn list(docker: &Docker) -> Result<Vec<(LayerMeta, u64)>> {
    let options = ListImagesOptions {
        filters: Some(HashMap::from([(
            "label".to_owned(),
            vec![LABEL_KEY.to_owned()],
        )])),
        ..Default::default()
    };
    let images = bounded(
        "list images",
        "layer images",
        API_TIMEOUT,
        docker.list_images(Some(options)),
    )
    .await?;
    let mut layers: Vec<(LayerMeta, u64)> = images
        .into_iter()
        .filter_map(|image| {
            let meta = meta_from_labels(&image.labels)?;
            let tagged = image.repo_tags.contains(&image_of(&meta.key));
            tagged.then(|| (meta, u64::try_from(image.size).unwrap_or(0)))
        })
        .collect();
    layers.sort_by(|a, b| a.0.created_at.cmp(&b.0.created_at));
    Ok(layers)
}

/// Removes the tag of layer `key`; the engine deletes the image's data once nothing uses it.
/// Removing a missing layer succeeds.
pub(super) async fn remove(docker: &Docker, key: &LayerKey) -> Result<()> {
    let image = image_of(key);
    // Without `force` the engine refuses to untag an image that a container runs, which is what
    // keeps a workspace able to reset: its container is recreated from the tag.
    let options = RemoveImageOptions {
        force: false,
        noprune: false,
        ..Default::default()
    };
    bounded_optional(
        "remove image",
        &image,
        API_TIMEOUT,
        docker.remove_image(&image, Some(options), None),
    )
    .await?;
    Ok(())
}

fn labels_of(meta: &LayerMeta) -> HashMap<String, String> {
    let state = match meta.kind {
        LayerKind::Base => "provisioned",
        LayerKind::Repositories => "cloned",
        LayerKind::Setup => "clean_snapshotted",
    };
    let commits = serde_json::to_string(&meta.commits).expect("a map of strings serializes");
    let mut labels = HashMap::from([
        (LABEL_KEY.to_owned(), meta.key.as_str().to_owned()),
        (LABEL_KIND.to_owned(), meta.kind.as_str().to_owned()),
        (LABEL_STATE.to_owned(), state.to_owned()),
        (LABEL_CONFIG.to_owned(), meta.config_name.clone()),
        (LABEL_COMMITS.to_owned(), commits),
        (LABEL_CREATED.to_owned(), meta.created_at.clone()),
    ]);
    // An image inherits its parent's labels, so a layer without a parent sets an empty one.
    let parent = meta.parent.as_ref().map(LayerKey::as_str).unwrap_or("");
    labels.insert(LABEL_PARENT.to_owned(), parent.to_owned());
    labels
}

fn meta_from_labels(labels: &HashMap<String, String>) -> Option<LayerMeta> {
    let key = LayerKey::parse(labels.get(LABEL_KEY)?)?;
    let kind =
        serde_json::from_value(serde_json::Value::String(labels.get(LABEL_KIND)?.clone())).ok()?;
    let parent = labels
        .get(LABEL_PARENT)
        .and_then(|parent| LayerKey::parse(parent));
    let commits = serde_json::from_str(labels.get(LABEL_COMMITS)?).ok()?;
    Some(LayerMeta {
        key,
        kind,
        parent,
        config_name: labels.get(LABEL_CONFIG).cloned().unwrap_or_default(),
        commits,
        created_at: labels.get(LABEL_CREATED).cloned().unwrap_or_default(),
    })
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("the current UTC time has an RFC 3339 form")
}

/// Returns the engine's message of a failed call without bollard's wrapping.
fn error_text(error: bollard::errors::Error) -> String {
    match error {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message,
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_layer_meta() {
        let meta = LayerMeta {
            key: LayerKey::parse(&"a".repeat(64)).expect("key"),
            kind: LayerKind::Repositories,
            parent: LayerKey::parse(&"b".repeat(64)),
            config_name: "app".to_owned(),
            commits: BTreeMap::from([("/code/app".to_owned(), "c".repeat(40))]),
            created_at: "2026-12-04T10:00:00Z".to_owned(),
        };
        let labels = labels_of(&meta);
        assert_eq!(labels[LABEL_STATE], "cloned");
        assert_eq!(meta_from_labels(&labels), Some(meta.clone()));

        let base = LayerMeta {
            parent: None,
            kind: LayerKind::Base,
            ..meta
        };
        assert_eq!(labels_of(&base)[LABEL_PARENT], "");
        assert_eq!(meta_from_labels(&labels_of(&base)), Some(base));
    }
}
