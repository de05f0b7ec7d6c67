//! The groups local containers joined, as the relay snooped them, shared with control (which
//! publishes them in the host's record).

use std::net::Ipv4Addr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

#[derive(Debug, Default)]
struct State {
    version: u64,
    groups: Vec<Ipv4Addr>,
}

/// A shared, versioned set of the groups joined on this host. Cloning gives another handle;
/// the relay writes, control reads with [`LocalGroups::snapshot`] or waits for a change with
/// [`LocalGroups::wait_change`]. The version grows by one with every change, so a reader
/// that saw version `v` knows whether it missed something.
#[derive(Clone, Debug, Default)]
pub struct LocalGroups {
    shared: Arc<(Mutex<State>, Condvar)>,
}

impl LocalGroups {
    /// An empty set at version 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current version and groups (sorted).
    pub fn snapshot(&self) -> (u64, Vec<Ipv4Addr>) {
        let state = self.lock();
        (state.version, state.groups.clone())
    }

    /// Wait until the version differs from `seen` or `timeout` passes, then return the
    /// current version and groups.
    pub fn wait_change(&self, seen: u64, timeout: Duration) -> (u64, Vec<Ipv4Addr>) {
        let (_, changed) = &*self.shared;
        let state = self.lock();
        let state = match changed.wait_timeout_while(state, timeout, |s| s.version == seen) {
            Ok((state, _)) => state,
            Err(poisoned) => poisoned.into_inner().0,
        };
        (state.version, state.groups.clone())
    }

    /// Replace the set if `groups` (sorted) differs from it; returns whether it changed.
    pub(crate) fn set(&self, groups: &[Ipv4Addr]) -> bool {
        let mut state = self.lock();
        if state.groups == groups {
            return false;
        }
        state.groups = groups.to_vec();
        state.version += 1;
        drop(state);
        self.shared.1.notify_all();
        true
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is replaced whole under the lock, so a panicked writer left it consistent.
        self.shared.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_bump_the_version_and_wake_waiters() {
        let local = LocalGroups::new();
        assert_eq!(local.snapshot(), (0, vec![]));
        let reader = local.clone();
        let waiter = std::thread::spawn(move || reader.wait_change(0, Duration::from_secs(10)));
        let group: Ipv4Addr = "239.1.1.1".parse().unwrap();
        assert!(local.set(&[group]));
        assert!(!local.set(&[group]), "the same set is no change");
        assert_eq!(waiter.join().unwrap(), (1, vec![group]));
        assert_eq!(
            local.wait_change(1, Duration::from_millis(1)),
            (1, vec![group])
        );
        assert!(local.set(&[]));
        assert_eq!(local.snapshot(), (2, vec![]));
    }
}
