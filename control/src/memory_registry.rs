//! An in-memory [`Registry`] for tests, with etcd's semantics and injectable faults.
//!
//! Built only for this crate's unit tests and, through the `test-support` feature, for its
//! integration tests: it never ships in weftd.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::registry::{
    Expect, LeaseSnapshot, LeaseWatch, RawLease, Registry, RegistryError, WatchBroken, WatchEvent,
    WatchItem, Written,
};
use crate::subnet::KeyPrefix;

/// An in-memory registry with etcd's semantics (revisions, conditional writes, etcd leases,
/// watches from a revision, compaction), plus knobs to inject what goes wrong in real clusters:
/// expiry, compaction, outages and lost races. Clones share one store.
#[derive(Clone, Debug)]
pub struct MemoryRegistry {
    prefix: KeyPrefix,
    state: Arc<Mutex<MemoryState>>,
}

#[derive(Debug, Default)]
struct MemoryState {
    config: Option<String>,
    revision: i64,
    compacted: i64,
    keys: BTreeMap<String, MemoryEntry>,
    /// Live etcd leases and their TTLs.
    leases: HashMap<i64, Duration>,
    next_lease: i64,
    /// Events after `compacted`, by revision, with full key names (`subnets/…`, `hosts/…`).
    history: Vec<(i64, WatchEvent)>,
    /// Each watch's directory and channel.
    watchers: Vec<(&'static str, mpsc::UnboundedSender<WatchItem>)>,
    unavailable: bool,
    /// On the next "create if absent", first store this value at the same key.
    race_next_create: Option<String>,
    /// During the next keep-alive, another host stores this value at every key of that etcd
    /// lease (without TTL), the given time after the request and as long before the answer.
    take_over_during_keep_alive: Option<(String, Duration)>,
    keep_alives: u64,
    cluster_id: u64,
}

/// The directory of the subnet leases, `<prefix>/subnets/`, as a key name prefix.
const SUBNETS: &str = "subnets/";
/// The directory of the per-host records, `/weft.io<prefix>/hosts/`, as a key name prefix.
const HOSTS: &str = "hosts/";

fn full_key(dir: &str, name: &str) -> String {
    format!("{dir}{name}")
}

/// `event` with its key name relative to `dir`, or `None` if the key is not in `dir`.
fn event_in(dir: &str, event: &WatchEvent) -> Option<WatchEvent> {
    match event {
        WatchEvent::Put(raw) => {
            let name = raw.name.strip_prefix(dir)?;
            Some(WatchEvent::Put(RawLease {
                name: name.to_owned(),
                ..raw.clone()
            }))
        }
        WatchEvent::Delete { name, revision } => Some(WatchEvent::Delete {
            name: name.strip_prefix(dir)?.to_owned(),
            revision: *revision,
        }),
    }
}

/// A key's new (value, etcd lease), or `None` for a deletion.
type Change = Option<(Vec<u8>, i64)>;

#[derive(Debug, Clone)]
struct MemoryEntry {
    value: Vec<u8>,
    etcd_lease: i64,
    mod_revision: i64,
}

impl MemoryState {
    fn check_available(&self) -> Result<(), RegistryError> {
        if self.unavailable {
            Err(RegistryError::Unavailable("injected outage".to_owned()))
        } else {
            Ok(())
        }
    }

    /// A new etcd lease of `ttl`; 0 (none) without TTL.
    fn grant(&mut self, ttl: Option<Duration>) -> i64 {
        match ttl {
            Some(ttl) => {
                self.next_lease += 1;
                self.leases.insert(self.next_lease, ttl);
                self.next_lease
            }
            None => 0,
        }
    }

    /// The names of the keys attached to `etcd_lease`.
    fn keys_of(&self, etcd_lease: i64) -> Vec<String> {
        self.keys
            .iter()
            .filter(|(_, e)| e.etcd_lease == etcd_lease)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Apply `changes` as one revision and tell the watchers.
    fn commit(&mut self, changes: Vec<(String, Change)>) -> i64 {
        self.revision += 1;
        let revision = self.revision;
        let mut events = Vec::with_capacity(changes.len());
        for (name, change) in changes {
            let event = match change {
                Some((value, etcd_lease)) => {
                    let entry = MemoryEntry {
                        value,
                        etcd_lease,
                        mod_revision: revision,
                    };
                    self.keys.insert(name.clone(), entry.clone());
                    WatchEvent::Put(RawLease {
                        name,
                        value: entry.value,
                        etcd_lease,
                        mod_revision: revision,
                    })
                }
                None => {
                    if self.keys.remove(&name).is_none() {
                        continue;
                    }
                    WatchEvent::Delete { name, revision }
                }
            };
            self.history.push((revision, event.clone()));
            events.push(event);
        }
        self.watchers.retain(|(dir, w)| {
            let events: Vec<_> = events.iter().filter_map(|e| event_in(dir, e)).collect();
            events.is_empty() || w.send(WatchItem::Events { revision, events }).is_ok()
        });
        revision
    }

    /// Every key (name relative to `dir`) in `dir`, at the current revision.
    fn listing(&self, dir: &str) -> LeaseSnapshot {
        LeaseSnapshot {
            revision: self.revision,
            cluster_id: self.cluster_id,
            leases: self
                .keys
                .iter()
                .filter_map(|(name, e)| {
                    Some(RawLease {
                        name: name.strip_prefix(dir)?.to_owned(),
                        value: e.value.clone(),
                        etcd_lease: e.etcd_lease,
                        mod_revision: e.mod_revision,
                    })
                })
                .collect(),
        }
    }

    /// A watch on `dir` from `from_revision`: the history replayed, then live events.
    fn watch(&mut self, dir: &'static str, from_revision: i64) -> MemoryWatch {
        let (tx, rx) = mpsc::unbounded_channel();
        if from_revision <= self.compacted {
            let _ = tx.send(WatchItem::Broken(WatchBroken::Compacted {
                compact_revision: self.compacted,
            }));
            return MemoryWatch { rx };
        }
        let mut pending: Option<(i64, Vec<WatchEvent>)> = None;
        let replay = self
            .history
            .iter()
            .filter(|(rev, _)| *rev >= from_revision)
            .filter_map(|(rev, event)| Some((*rev, event_in(dir, event)?)));
        for (rev, event) in replay {
            match &mut pending {
                Some((r, events)) if *r == rev => events.push(event),
                _ => {
                    if let Some((revision, events)) = pending.take() {
                        let _ = tx.send(WatchItem::Events { revision, events });
                    }
                    pending = Some((rev, vec![event]));
                }
            }
        }
        if let Some((revision, events)) = pending {
            let _ = tx.send(WatchItem::Events { revision, events });
        }
        self.watchers.push((dir, tx));
        MemoryWatch { rx }
    }

    fn break_watchers(&mut self, why: WatchBroken) {
        for (_, w) in self.watchers.drain(..) {
            let _ = w.send(WatchItem::Broken(why.clone()));
        }
    }
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryRegistry {
    /// An empty store under the default prefix.
    pub fn new() -> Self {
        let state = MemoryState {
            cluster_id: 1,
            ..MemoryState::default()
        };
        Self {
            prefix: KeyPrefix::default(),
            state: Arc::new(Mutex::new(state)),
        }
    }

    fn state(&self) -> MutexGuard<'_, MemoryState> {
        // A test that panicked while holding the lock must not hide its own failure behind a
        // poisoned-lock panic elsewhere.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Set or remove the network config.
    pub fn set_config(&self, config: Option<&str>) {
        self.state().config = config.map(str::to_owned);
    }

    /// Store `value` at lease key `name` as another host would: attached to a new etcd lease
    /// of `ttl`, or without TTL (a reservation). Returns the etcd lease (0 for none).
    pub fn put(&self, name: &str, value: &str, ttl: Option<Duration>) -> i64 {
        let mut s = self.state();
        let etcd_lease = s.grant(ttl);
        s.commit(vec![(
            full_key(SUBNETS, name),
            Some((value.as_bytes().to_vec(), etcd_lease)),
        )]);
        etcd_lease
    }

    /// Store `value` at host record key `name` as another host (or an operator) would,
    /// attached to etcd lease `etcd_lease` (0: none).
    pub fn put_host_record_raw(&self, name: &str, value: &str, etcd_lease: i64) {
        self.state().commit(vec![(
            full_key(HOSTS, name),
            Some((value.as_bytes().to_vec(), etcd_lease)),
        )]);
    }

    /// Delete host record `name`, as an operator would.
    pub fn delete_host_record_raw(&self, name: &str) {
        self.state().commit(vec![(full_key(HOSTS, name), None)]);
    }

    /// The host record at key `name`, if any.
    pub fn host_record(&self, name: &str) -> Option<String> {
        self.state()
            .keys
            .get(&full_key(HOSTS, name))
            .map(|e| String::from_utf8_lossy(&e.value).into_owned())
    }

    /// The etcd lease host record `name` is attached to (0 for none), if it exists.
    pub fn etcd_lease_of_host_record(&self, name: &str) -> Option<i64> {
        self.state()
            .keys
            .get(&full_key(HOSTS, name))
            .map(|e| e.etcd_lease)
    }

    /// Every host record key name, in order.
    pub fn host_record_names(&self) -> Vec<String> {
        self.state()
            .keys
            .keys()
            .filter_map(|k| k.strip_prefix(HOSTS).map(str::to_owned))
            .collect()
    }

    /// Delete lease key `name`, as an operator would. Returns whether it existed.
    pub fn delete(&self, name: &str) -> bool {
        let mut s = self.state();
        let key = full_key(SUBNETS, name);
        let existed = s.keys.contains_key(&key);
        s.commit(vec![(key, None)]);
        existed
    }

    /// Let etcd lease `etcd_lease` expire now: its keys are deleted in one revision.
    pub fn expire(&self, etcd_lease: i64) {
        let mut s = self.state();
        s.leases.remove(&etcd_lease);
        let doomed: Vec<_> = s
            .keys_of(etcd_lease)
            .into_iter()
            .map(|name| (name, None))
            .collect();
        if !doomed.is_empty() {
            s.commit(doomed);
        }
    }

    /// Compact the history up to the current revision: every running watch breaks with
    /// [`WatchBroken::Compacted`], and a watch from an older revision fails the same way.
    pub fn compact(&self) {
        let mut s = self.state();
        s.compacted = s.revision;
        let compacted = s.compacted;
        s.history.retain(|(rev, _)| *rev > compacted);
        s.break_watchers(WatchBroken::Compacted {
            compact_revision: compacted,
        });
    }

    /// Make every operation fail (and break every watch) until called with `true` again.
    pub fn set_available(&self, available: bool) {
        let mut s = self.state();
        s.unavailable = !available;
        if !available {
            s.break_watchers(WatchBroken::Disconnected("injected outage".to_owned()));
        }
    }

    /// Lose every key, etcd lease and revision, as a wiped or rebuilt etcd does: the revision
    /// starts again from 0 (and, with `new_cluster`, the cluster ID changes); every watch
    /// breaks. The network config survives, as an operator puts it back.
    pub fn lose_data(&self, new_cluster: bool) {
        let mut s = self.state();
        s.break_watchers(WatchBroken::Disconnected("etcd restarted".to_owned()));
        s.keys.clear();
        s.leases.clear();
        s.history.clear();
        s.revision = 0;
        s.compacted = 0;
        if new_cluster {
            s.cluster_id += 1;
        }
    }

    /// Break every running watch, as a failed connection does.
    pub fn break_watches(&self) {
        self.state().break_watchers(WatchBroken::Disconnected(
            "injected broken stream".to_owned(),
        ));
    }

    /// During the next keep-alive, `delay` after it is asked for, another host stores `value`
    /// at every key of that etcd lease, without TTL; the answer comes `delay` later. A keeper
    /// adopting its old lease learns that it lives, while the watch has already shown that the
    /// key is someone else's.
    pub fn take_over_during_next_keep_alive(&self, value: &str, delay: Duration) {
        self.state().take_over_during_keep_alive = Some((value.to_owned(), delay));
    }

    /// Make the next "create if absent" lose a race: another host stores `value` at the same
    /// key (without TTL) just before.
    pub fn race_next_create(&self, value: &str) {
        self.state().race_next_create = Some(value.to_owned());
    }

    /// The value at lease key `name`, if any.
    pub fn get(&self, name: &str) -> Option<String> {
        self.state()
            .keys
            .get(&full_key(SUBNETS, name))
            .map(|e| String::from_utf8_lossy(&e.value).into_owned())
    }

    /// The etcd lease lease key `name` is attached to (0 for none), if the key exists.
    pub fn etcd_lease_of(&self, name: &str) -> Option<i64> {
        self.state()
            .keys
            .get(&full_key(SUBNETS, name))
            .map(|e| e.etcd_lease)
    }

    /// Every lease key name, in order.
    pub fn names(&self) -> Vec<String> {
        self.state()
            .keys
            .keys()
            .filter_map(|k| k.strip_prefix(SUBNETS).map(str::to_owned))
            .collect()
    }

    /// How many keep-alives have succeeded.
    pub fn keep_alive_count(&self) -> u64 {
        self.state().keep_alives
    }

    /// The current store revision.
    pub fn revision(&self) -> i64 {
        self.state().revision
    }
}

impl Registry for MemoryRegistry {
    type Watch = MemoryWatch;

    fn prefix(&self) -> &KeyPrefix {
        &self.prefix
    }

    async fn config(&self) -> Result<Option<String>, RegistryError> {
        let s = self.state();
        s.check_available()?;
        Ok(s.config.clone())
    }

    async fn leases(&self) -> Result<LeaseSnapshot, RegistryError> {
        let s = self.state();
        s.check_available()?;
        Ok(s.listing(SUBNETS))
    }

    async fn write_lease(
        &self,
        name: &str,
        value: &str,
        ttl: Option<Duration>,
        expect: Expect,
    ) -> Result<Option<Written>, RegistryError> {
        let mut s = self.state();
        s.check_available()?;
        let key = full_key(SUBNETS, name);
        if expect == Expect::Absent {
            if let Some(rival) = s.race_next_create.take() {
                s.commit(vec![(key.clone(), Some((rival.into_bytes(), 0)))]);
            }
        }
        let holds = match (expect, s.keys.get(&key)) {
            (Expect::Absent, None) => true,
            (Expect::ModRevision(rev), Some(e)) => e.mod_revision == rev,
            _ => false,
        };
        if !holds {
            return Ok(None);
        }
        let etcd_lease = s.grant(ttl);
        let revision = s.commit(vec![(key, Some((value.as_bytes().to_vec(), etcd_lease)))]);
        Ok(Some(Written {
            etcd_lease,
            ttl,
            revision,
        }))
    }

    async fn keep_alive(&self, etcd_lease: i64) -> Result<Option<Duration>, RegistryError> {
        let takeover = {
            let mut s = self.state();
            s.check_available()?;
            s.take_over_during_keep_alive.take()
        };
        if let Some((value, delay)) = takeover {
            tokio::time::sleep(delay).await;
            {
                let mut s = self.state();
                let taken: Vec<_> = s
                    .keys_of(etcd_lease)
                    .into_iter()
                    .filter(|name| name.starts_with(SUBNETS))
                    .map(|name| (name, Some((value.clone().into_bytes(), 0))))
                    .collect();
                if !taken.is_empty() {
                    s.commit(taken);
                }
            }
            tokio::time::sleep(delay).await;
        }
        let mut s = self.state();
        s.check_available()?;
        let ttl = s.leases.get(&etcd_lease).copied();
        if ttl.is_some() {
            s.keep_alives += 1;
        }
        Ok(ttl)
    }

    async fn delete_lease(&self, name: &str, mod_revision: i64) -> Result<bool, RegistryError> {
        let mut s = self.state();
        s.check_available()?;
        let key = full_key(SUBNETS, name);
        match s.keys.get(&key) {
            Some(e) if e.mod_revision == mod_revision => {
                s.commit(vec![(key, None)]);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn watch(&self, from_revision: i64) -> Result<MemoryWatch, RegistryError> {
        let mut s = self.state();
        s.check_available()?;
        Ok(s.watch(SUBNETS, from_revision))
    }

    async fn host_records(&self) -> Result<LeaseSnapshot, RegistryError> {
        let s = self.state();
        s.check_available()?;
        Ok(s.listing(HOSTS))
    }

    async fn put_host_record(
        &self,
        name: &str,
        value: &str,
        etcd_lease: i64,
    ) -> Result<Option<i64>, RegistryError> {
        let mut s = self.state();
        s.check_available()?;
        if etcd_lease != 0 && !s.leases.contains_key(&etcd_lease) {
            return Ok(None);
        }
        let change = Some((value.as_bytes().to_vec(), etcd_lease));
        Ok(Some(s.commit(vec![(full_key(HOSTS, name), change)])))
    }

    async fn delete_host_record(
        &self,
        name: &str,
        mod_revision: i64,
    ) -> Result<bool, RegistryError> {
        let mut s = self.state();
        s.check_available()?;
        let key = full_key(HOSTS, name);
        match s.keys.get(&key) {
            Some(e) if e.mod_revision == mod_revision => {
                s.commit(vec![(key, None)]);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn watch_host_records(&self, from_revision: i64) -> Result<MemoryWatch, RegistryError> {
        let mut s = self.state();
        s.check_available()?;
        Ok(s.watch(HOSTS, from_revision))
    }
}

/// A watch on a [`MemoryRegistry`].
#[derive(Debug)]
pub struct MemoryWatch {
    rx: mpsc::UnboundedReceiver<WatchItem>,
}

impl LeaseWatch for MemoryWatch {
    async fn next(&mut self) -> WatchItem {
        self.rx.recv().await.unwrap_or_else(|| {
            WatchItem::Broken(WatchBroken::Disconnected("watch closed".to_owned()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(snapshot: &LeaseSnapshot) -> Vec<&str> {
        snapshot.leases.iter().map(|l| l.name.as_str()).collect()
    }

    #[tokio::test]
    async fn conditional_writes_and_deletes() {
        let reg = MemoryRegistry::new();
        let ttl = Some(Duration::from_secs(30));
        let w = reg
            .write_lease("10.1.1.0-24", "a", ttl, Expect::Absent)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(w.ttl, ttl);
        assert_ne!(w.etcd_lease, 0);
        assert_eq!(
            reg.write_lease("10.1.1.0-24", "b", ttl, Expect::Absent)
                .await
                .unwrap(),
            None,
            "create if absent fails on an existing key"
        );
        assert_eq!(
            reg.write_lease(
                "10.1.1.0-24",
                "b",
                None,
                Expect::ModRevision(w.revision - 1)
            )
            .await
            .unwrap(),
            None
        );
        let w2 = reg
            .write_lease("10.1.1.0-24", "b", None, Expect::ModRevision(w.revision))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reg.get("10.1.1.0-24").as_deref(), Some("b"));
        assert!(!reg.delete_lease("10.1.1.0-24", w.revision).await.unwrap());
        assert!(reg.delete_lease("10.1.1.0-24", w2.revision).await.unwrap());
        assert!(reg.names().is_empty());
    }

    #[tokio::test]
    async fn watch_replays_from_a_revision_then_follows() {
        let reg = MemoryRegistry::new();
        reg.put("10.1.1.0-24", "a", None);
        let snap = reg.leases().await.unwrap();
        reg.put("10.1.2.0-24", "b", None);
        let mut watch = reg.watch(snap.revision + 1).await.unwrap();
        reg.delete("10.1.1.0-24");
        let WatchItem::Events { events, .. } = watch.next().await else {
            panic!()
        };
        assert!(matches!(&events[..], [WatchEvent::Put(l)] if l.name == "10.1.2.0-24"));
        let WatchItem::Events { events, .. } = watch.next().await else {
            panic!()
        };
        assert!(matches!(&events[..], [WatchEvent::Delete { name, .. }] if name == "10.1.1.0-24"));
        assert_eq!(names(&reg.leases().await.unwrap()), ["10.1.2.0-24"]);
    }

    #[tokio::test]
    async fn expiry_compaction_and_outages() {
        let reg = MemoryRegistry::new();
        let lease = reg.put("10.1.1.0-24", "a", Some(Duration::from_secs(9)));
        assert_eq!(
            reg.keep_alive(lease).await.unwrap(),
            Some(Duration::from_secs(9))
        );
        let mut watch = reg.watch(reg.revision() + 1).await.unwrap();
        reg.expire(lease);
        assert_eq!(reg.keep_alive(lease).await.unwrap(), None);
        assert!(matches!(
            watch.next().await,
            WatchItem::Events { events, .. } if matches!(&events[..], [WatchEvent::Delete { .. }])
        ));

        let old = reg.revision();
        reg.put("10.1.2.0-24", "b", None);
        reg.compact();
        assert!(matches!(watch.next().await, WatchItem::Events { .. }));
        assert!(matches!(
            watch.next().await,
            WatchItem::Broken(WatchBroken::Compacted { .. })
        ));
        let mut stale = reg.watch(old).await.unwrap();
        assert!(matches!(
            stale.next().await,
            WatchItem::Broken(WatchBroken::Compacted { .. })
        ));

        let mut live = reg.watch(reg.revision() + 1).await.unwrap();
        reg.set_available(false);
        assert!(matches!(
            live.next().await,
            WatchItem::Broken(WatchBroken::Disconnected(_))
        ));
        assert!(reg.leases().await.is_err());
        assert!(reg.config().await.is_err());
        reg.set_available(true);
        assert_eq!(names(&reg.leases().await.unwrap()), ["10.1.2.0-24"]);
    }

    #[tokio::test]
    async fn injected_race_makes_create_fail() {
        let reg = MemoryRegistry::new();
        reg.race_next_create("{\"PublicIP\":\"198.18.0.9\",\"PublicIPv6\":null}");
        let lost = reg
            .write_lease("10.1.1.0-24", "mine", None, Expect::Absent)
            .await
            .unwrap();
        assert_eq!(lost, None);
        assert!(reg.get("10.1.1.0-24").unwrap().contains("198.18.0.9"));
        assert!(reg
            .write_lease("10.1.2.0-24", "mine", None, Expect::Absent)
            .await
            .unwrap()
            .is_some());
    }
}
