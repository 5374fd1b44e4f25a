//! Cache care: what the layer cache contains, when each layer was last used, and eviction of the
//! least recently used layers down to a size limit.
//!
//! Last use is the modification time of `<cache>/usage/<key>`, which the engine touches whenever
//! a workspace starts on a layer or resets to it. A layer never touched counts from its creation.
//! The files live beside the provider's layers so that every provider shares them.
//!
//! Invariant: eviction removes only layers that no workspace uses and that are no other cached
//! layer's parent, so a child layer is never left without its parent.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use super::provider::{LayerInfo, Provider};
use crate::error::{Error, Result};
use crate::keys::{LayerKey, LayerKind};

/// A lock on `<cache>/lock`. Every derrick, worker and warm job locks it shared while it uses the
/// cache, and `derrick cache prune` locks it exclusively. So a prune never removes a layer under
/// a running process, whatever state folder each one names.
#[derive(Debug)]
pub struct CacheLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl CacheLock {
    /// Takes the lock shared, as a process that uses the cache.
    ///
    /// # Errors
    /// Fails while a prune holds it, or when the lock file cannot be opened.
    pub fn shared(cache_dir: &Path) -> Result<CacheLock> {
        Self::take(
            cache_dir,
            nix::fcntl::FlockArg::LockSharedNonblock,
            "is being pruned",
        )
    }

    /// Takes the lock exclusively, as a prune.
    ///
    /// # Errors
    /// Fails while any other process uses the cache.
    pub fn exclusive(cache_dir: &Path) -> Result<CacheLock> {
        Self::take(
            cache_dir,
            nix::fcntl::FlockArg::LockExclusiveNonblock,
            "is in use by a running derrick, worker or warm job; stop it first, or let a serving derrick evict with --cache-max-bytes",
        )
    }

    fn take(cache_dir: &Path, mode: nix::fcntl::FlockArg, busy: &str) -> Result<CacheLock> {
        let path = cache_dir.join("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|error| Error::internal(format!("cannot open {}", path.display()), error))?;
        let lock = nix::fcntl::Flock::lock(file, mode).map_err(|(_, errno)| {
            Error::ProviderUnavailable(format!(
                "the cache folder {} {busy} ({errno})",
                cache_dir.display()
            ))
        })?;
        Ok(CacheLock { _lock: lock })
    }
}

/// One layer as `derrick cache list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CacheEntry {
    pub key: LayerKey,
    pub kind: LayerKind,
    /// The workspace state that the layer records: `provisioned`, `cloned` or
    /// `clean_snapshotted`.
    pub state: &'static str,
    pub parent: Option<LayerKey>,
    pub size_bytes: u64,
    /// RFC 3339 time of the last workspace that started on the layer or reset to it.
    pub last_used: String,
    pub config_name: String,
    /// Whether a workspace uses the layer, which protects it from eviction.
    pub in_use: bool,
    #[serde(skip)]
    last_used_at: SystemTime,
}

/// The last-use times of layers, as file times under `<cache>/usage`.
#[derive(Debug, Clone)]
pub struct Usage {
    folder: PathBuf,
}

impl Usage {
    /// Keeps last-use times under `<cache_dir>/usage`.
    pub fn new(cache_dir: &Path) -> Usage {
        Usage {
            folder: cache_dir.join("usage"),
        }
    }

    /// Records that a workspace uses `keys` now. Failures are logged, not returned: a missing
    /// time only makes a layer look older than it is.
    pub async fn touch(&self, keys: Vec<LayerKey>) {
        let folder = self.folder.clone();
        let touched = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::create_dir_all(&folder)?;
            let now = SystemTime::now();
            for key in keys {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(folder.join(key.as_str()))?;
                file.set_modified(now)?;
            }
            Ok(())
        })
        .await;
        match touched {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(folder = %self.folder.display(), error = %error, "cannot record layer use");
            }
            Err(error) => {
                tracing::warn!(error = %error, "cannot record layer use");
            }
        }
    }

    /// Removes the last-use time of an evicted layer.
    async fn forget(&self, key: &LayerKey) {
        let _ = tokio::fs::remove_file(self.folder.join(key.as_str())).await;
    }

    /// Returns when `info`'s layer was last used, or its creation time if never.
    async fn last_used(&self, info: &LayerInfo) -> SystemTime {
        let path = self.folder.join(info.meta.key.as_str());
        if let Ok(modified) = tokio::fs::metadata(&path)
            .await
            .and_then(|metadata| metadata.modified())
        {
            return modified;
        }
        time::OffsetDateTime::parse(
            &info.meta.created_at,
            &time::format_description::well_known::Rfc3339,
        )
        .map(SystemTime::from)
        .unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

/// Lists the layers in the cache, most recently used first.
pub async fn entries(
    provider: &dyn Provider,
    usage: &Usage,
    in_use: &BTreeSet<LayerKey>,
) -> Result<Vec<CacheEntry>> {
    let mut entries = Vec::new();
    for info in provider.layers().await? {
        let last_used_at = usage.last_used(&info).await;
        entries.push(CacheEntry {
            in_use: in_use.contains(&info.meta.key),
            state: state_of(info.meta.kind),
            last_used: rfc3339(last_used_at)?,
            last_used_at,
            size_bytes: info.size_bytes,
            config_name: info.meta.config_name,
            parent: info.meta.parent,
            kind: info.meta.kind,
            key: info.meta.key,
        });
    }
    sort_by_last_use(&mut entries);
    Ok(entries)
}

/// Removes least recently used layers until the cache takes at most `max_bytes`, skipping every
/// layer in `in_use` and every parent of another cached layer. Returns the removed layers;
/// the cache may stay above the limit when only such layers remain.
pub async fn evict(
    provider: &dyn Provider,
    usage: &Usage,
    in_use: &BTreeSet<LayerKey>,
    max_bytes: u64,
) -> Result<Vec<CacheEntry>> {
    let mut remaining = entries(provider, usage, in_use).await?;
    let mut removed = Vec::new();
    loop {
        let total: u64 = remaining.iter().map(|entry| entry.size_bytes).sum();
        if total <= max_bytes {
            break;
        }
        let parents: BTreeSet<&LayerKey> = remaining
            .iter()
            .filter_map(|entry| entry.parent.as_ref())
            .collect();
        // `remaining` is sorted most recently used first, so the last candidate is the oldest.
        let Some(index) = remaining
            .iter()
            .rposition(|entry| !entry.in_use && !parents.contains(&entry.key))
        else {
            break;
        };
        let mut entry = remaining.remove(index);
        if let Err(error) = provider.remove_layer(&entry.key).await {
            // Another process may have started on the layer since the list: keep it.
            tracing::warn!(layer_key = %entry.key, error = %error, "cannot evict a layer; keeping it");
            entry.in_use = true;
            remaining.push(entry);
            sort_by_last_use(&mut remaining);
            continue;
        }
        usage.forget(&entry.key).await;
        removed.push(entry);
    }
    Ok(removed)
}

/// Sorts entries most recently used first, ties by key.
fn sort_by_last_use(entries: &mut [CacheEntry]) {
    entries.sort_by(|a, b| {
        b.last_used_at
            .cmp(&a.last_used_at)
            .then_with(|| a.key.cmp(&b.key))
    });
}

fn state_of(kind: LayerKind) -> &'static str {
    match kind {
        LayerKind::Base => "provisioned",
        LayerKind::Repositories => "cloned",
        LayerKind::Setup => "clean_snapshotted",
    }
}

fn rfc3339(at: SystemTime) -> Result<String> {
    time::OffsetDateTime::from(at)
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(|error| Error::internal("cannot format a last-use time", error))
}
