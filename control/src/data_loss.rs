//! Noticing that etcd lost its data.
//!
//! A wiped member, a rebuilt cluster or a restore from an older snapshot all look alike to a
//! client: the keys it wrote are gone and, usually, the store's revision is lower than one it
//! has already seen, or the cluster answers with another cluster ID. Within one etcd cluster
//! the revision never goes back, so either sign is proof. [`StoreHistory`] remembers the
//! newest revision and the cluster ID seen by the lease keeper and the watcher, and checks
//! every fresh listing against them.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

/// What showed that etcd no longer holds the data it held before.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DataLoss {
    /// A listing was read at a revision lower than one seen before it was asked for.
    #[error("etcd's revision went back from {seen} to {now} (its data was wiped or restored from an older snapshot)")]
    RevisionWentBack {
        /// The newest revision seen before.
        seen: i64,
        /// The listing's revision.
        now: i64,
    },
    /// etcd answers with another cluster ID.
    #[error("etcd's cluster ID changed from {seen:x} to {now:x} (it is another cluster)")]
    ClusterChanged {
        /// The cluster ID seen before.
        seen: u64,
        /// The cluster ID now.
        now: u64,
    },
}

/// The newest revision and the cluster ID seen so far. Clones share one record.
#[derive(Clone, Debug, Default)]
pub struct StoreHistory {
    newest: Arc<AtomicI64>,
    cluster: Arc<AtomicU64>,
}

impl StoreHistory {
    /// Nothing seen yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The newest revision seen. Read it *before* asking for a listing, and give it to
    /// [`StoreHistory::check_listing`]: a listing asked for later cannot be older.
    pub fn newest(&self) -> i64 {
        self.newest.load(Ordering::Relaxed)
    }

    /// Record a revision etcd answered with (a write, a watch event).
    pub fn saw(&self, revision: i64) {
        self.newest.fetch_max(revision, Ordering::Relaxed);
    }

    /// Check a listing read at `revision` from cluster `cluster` (0: unknown), asked for when
    /// the newest revision seen was `floor`, and record it. After a loss the record starts
    /// again from this listing.
    pub fn check_listing(&self, floor: i64, revision: i64, cluster: u64) -> Result<(), DataLoss> {
        let seen_cluster = if cluster == 0 {
            0
        } else {
            self.cluster.swap(cluster, Ordering::Relaxed)
        };
        let loss = if seen_cluster != 0 && seen_cluster != cluster {
            Some(DataLoss::ClusterChanged {
                seen: seen_cluster,
                now: cluster,
            })
        } else if revision < floor {
            Some(DataLoss::RevisionWentBack {
                seen: floor,
                now: revision,
            })
        } else {
            None
        };
        match loss {
            Some(loss) => {
                self.newest.store(revision, Ordering::Relaxed);
                Err(loss)
            }
            None => {
                self.saw(revision);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_going_back_or_another_cluster_are_data_loss() {
        let h = StoreHistory::new();
        assert_eq!(h.check_listing(h.newest(), 10, 7), Ok(()));
        h.saw(15);
        h.saw(12);
        assert_eq!(h.newest(), 15);
        // A listing asked for before a write is seen may be older than it: not a loss.
        assert_eq!(h.check_listing(10, 14, 7), Ok(()));
        assert_eq!(h.newest(), 15);
        assert_eq!(
            h.check_listing(h.newest(), 3, 7),
            Err(DataLoss::RevisionWentBack { seen: 15, now: 3 })
        );
        // The record starts again from the listing that showed the loss.
        assert_eq!(h.newest(), 3);
        assert_eq!(h.check_listing(h.newest(), 4, 7), Ok(()));
        assert_eq!(
            h.check_listing(h.newest(), 90, 8),
            Err(DataLoss::ClusterChanged { seen: 7, now: 8 })
        );
        assert_eq!(
            h.check_listing(h.newest(), 91, 0),
            Ok(()),
            "unknown cluster"
        );
        assert_eq!(h.check_listing(h.newest(), 92, 8), Ok(()));
    }
}
