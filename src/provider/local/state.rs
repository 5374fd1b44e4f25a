//! What the provider keeps in memory about each workspace: its layer stack and the process
//! groups of its commands.
//!
//! The map is behind a std `Mutex` that is held only to look an entry up, never across an
//! `.await` or a system call. Each entry has a lock of its own, so work on one workspace does not
//! wait for work on another.
//!
//! The layer stack is also stored in `layers.json` (see `workspace`), which is how a restarted
//! provider finds it again. Process groups are not stored: a restart loses track of them, and
//! the `/proc` scan by workspace id still finds their processes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::processes::ProcessGroup;
use crate::engine::WorkspaceId;
use crate::keys::LayerKey;

/// Number of recorded groups after which finished ones are dropped. It bounds the memory of a
/// workspace that runs many commands without a reset, and is far above what one task starts.
const GROUPS_BEFORE_PRUNING: usize = 256;

/// The in-memory state of every known workspace.
#[derive(Debug, Default)]
pub(super) struct Workspaces {
    entries: Mutex<HashMap<WorkspaceId, Arc<Mutex<WorkspaceState>>>>,
}

#[derive(Debug)]
struct WorkspaceState {
    /// Layer keys, bottom first.
    layers: Vec<LayerKey>,
    groups: Vec<ProcessGroup>,
}

impl Workspaces {
    /// Returns the layer stack of a known workspace.
    pub(super) fn layers(&self, id: &WorkspaceId) -> Option<Vec<LayerKey>> {
        let entry = self.entry(id)?;
        Some(lock(&entry).layers.clone())
    }

    /// Starts tracking a freshly provisioned workspace, replacing any old state.
    pub(super) fn insert(&self, id: &WorkspaceId, layers: Vec<LayerKey>) {
        let state = WorkspaceState {
            layers,
            groups: Vec::new(),
        };
        lock(&self.entries).insert(id.clone(), Arc::new(Mutex::new(state)));
    }

    /// Starts tracking a workspace found on disk, unless a concurrent request already did.
    pub(super) fn adopt(&self, id: &WorkspaceId, layers: Vec<LayerKey>) {
        let state = WorkspaceState {
            layers,
            groups: Vec::new(),
        };
        let mut entries = lock(&self.entries);
        entries
            .entry(id.clone())
            .or_insert_with(|| Arc::new(Mutex::new(state)));
    }

    /// Replaces the layer stack after a snapshot.
    pub(super) fn set_layers(&self, id: &WorkspaceId, layers: Vec<LayerKey>) {
        if let Some(entry) = self.entry(id) {
            lock(&entry).layers = layers;
        }
    }

    /// Records the group of a command that just started.
    pub(super) fn record_group(&self, id: &WorkspaceId, group: ProcessGroup) {
        let Some(entry) = self.entry(id) else { return };
        let mut state = lock(&entry);
        if state.groups.len() >= GROUPS_BEFORE_PRUNING {
            state.groups.retain(ProcessGroup::is_active);
        }
        state.groups.push(group);
    }

    /// Returns the recorded groups.
    pub(super) fn groups(&self, id: &WorkspaceId) -> Vec<ProcessGroup> {
        self.entry(id)
            .map(|entry| lock(&entry).groups.clone())
            .unwrap_or_default()
    }

    /// Forgets groups that were killed; groups recorded meanwhile stay.
    pub(super) fn forget_groups(&self, id: &WorkspaceId, killed: &[ProcessGroup]) {
        if let Some(entry) = self.entry(id) {
            lock(&entry).groups.retain(|group| !killed.contains(group));
        }
    }

    /// Stops tracking a workspace.
    pub(super) fn remove(&self, id: &WorkspaceId) {
        lock(&self.entries).remove(id);
    }

    fn entry(&self, id: &WorkspaceId) -> Option<Arc<Mutex<WorkspaceState>>> {
        lock(&self.entries).get(id).cloned()
    }
}

/// Locks a mutex. A panic while it was held cannot leave the state half-changed (every change is
/// one assignment or one `Vec` call), so a poisoned lock is used as is.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
