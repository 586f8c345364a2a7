//! The in-memory cache of compiled components, bounded in entries and bytes.
//!
//! [`DeviceRuntime::compile`](crate::DeviceRuntime::compile) keeps every
//! component it compiled here, keyed by module digest, so a restart or a
//! rollback to the previous version does not compile again. Without a bound
//! a stream of desired states naming new modules would keep every compiled
//! image in memory for good (finding M7).
//!
//! # Invariants
//! - `bytes` is the sum of the entries' sizes.
//! - After [`ComponentCache::insert`] the cache holds at most
//!   [`CacheLimits::max_entries`] entries and [`CacheLimits::max_bytes`]
//!   bytes, unless the entries over the bound are all *pinned* (used by the
//!   current or the previous desired state): those are never evicted, since
//!   the runtime would need them again right away (a restart after a crash,
//!   or a rollback).
//! - Among unpinned entries, the least recently used goes first.

use std::collections::{HashMap, HashSet};

use wasmtime::component::Component;

/// Bounds of the in-memory compiled-component cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// Compiled components kept at most. Default 32 (a node runs at most
    /// 64 functions, usually of a handful of distinct modules).
    pub max_entries: usize,
    /// Bytes of compiled code kept at most. Default 256 MiB.
    pub max_bytes: u64,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self {
            max_entries: 32,
            max_bytes: 256 << 20,
        }
    }
}

/// Counters of the cache, for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Components held now.
    pub entries: usize,
    /// Bytes of compiled code held now.
    pub bytes: u64,
    /// Components evicted since the runtime started.
    pub evictions: u64,
}

struct Entry {
    component: Component,
    bytes: u64,
    last_used: u64,
}

/// Compiled components by digest, with LRU eviction of unpinned entries.
pub(crate) struct ComponentCache {
    limits: CacheLimits,
    entries: HashMap<String, Entry>,
    bytes: u64,
    uses: u64,
    evictions: u64,
}

impl ComponentCache {
    pub(crate) fn new(limits: CacheLimits) -> Self {
        Self {
            limits,
            entries: HashMap::new(),
            bytes: 0,
            uses: 0,
            evictions: 0,
        }
    }

    /// The component compiled from `digest`, marking it used.
    pub(crate) fn get(&mut self, digest: &str) -> Option<Component> {
        self.uses += 1;
        let entry = self.entries.get_mut(digest)?;
        entry.last_used = self.uses;
        Some(entry.component.clone())
    }

    /// Keeps `component` under `digest`, then evicts least recently used
    /// entries not in `pinned` until the cache is within its limits.
    pub(crate) fn insert(&mut self, digest: &str, component: Component, pinned: &HashSet<String>) {
        self.uses += 1;
        let bytes = image_bytes(&component);
        let entry = Entry {
            component,
            bytes,
            last_used: self.uses,
        };
        if let Some(old) = self.entries.insert(digest.to_owned(), entry) {
            self.bytes -= old.bytes;
        }
        self.bytes += bytes;
        self.evict(pinned);
    }

    /// Evicts unpinned entries, oldest use first, while over a limit.
    pub(crate) fn evict(&mut self, pinned: &HashSet<String>) {
        while self.entries.len() > self.limits.max_entries || self.bytes > self.limits.max_bytes {
            let victim = self
                .entries
                .iter()
                .filter(|(digest, _)| !pinned.contains(*digest))
                .min_by_key(|(_, e)| e.last_used)
                .map(|(digest, _)| digest.clone());
            let Some(victim) = victim else {
                return;
            };
            if let Some(e) = self.entries.remove(&victim) {
                self.bytes -= e.bytes;
                self.evictions += 1;
                tracing::debug!(digest = %victim, bytes = e.bytes, "compiled component evicted from the cache");
            }
        }
    }

    /// Whether `digest` is cached.
    pub(crate) fn contains(&self, digest: &str) -> bool {
        self.entries.contains_key(digest)
    }

    pub(crate) fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.entries.len(),
            bytes: self.bytes,
            evictions: self.evictions,
        }
    }
}

/// Size of a component's compiled code image.
fn image_bytes(component: &Component) -> u64 {
    let range = component.image_range();
    let len = (range.end as usize).saturating_sub(range.start as usize);
    u64::try_from(len).unwrap_or(u64::MAX)
}
