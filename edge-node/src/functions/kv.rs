//! The guests' key-value store: one sled tree per function name, bounded by
//! a per-function quota on the number of keys and on bytes (M9).
//!
//! # Namespace
//! State is keyed by the function *name*, not by its module digest: a new
//! module deployed under the same name (an upgrade, a rollback) keeps the
//! state, as a restart does. Whoever can set desired state chooses the
//! name, so handing the state to a different module is an explicit
//! decision of that operator; a function that must start empty gets a new
//! name. (See `SECURITY.md`, M9.)
//!
//! # Quota
//! Usage is the number of keys and the sum of key and value lengths. A put
//! that would grow the usage past `[functions] kv_max_keys` or
//! `kv_max_bytes` is refused: the guest gets `too-large` (an ordinary
//! capability error, the instance keeps running), the refusal is counted
//! (`kv_refused` of the function in reported state, and the node-wide
//! `function_kv_refused`) and the first refusal of a burst is logged. Puts
//! that do not grow the usage (an overwrite with a value no longer than the
//! old one) and deletes always pass, so a function over its quota (after
//! the limit was lowered) can clean up.
//!
//! # Invariants
//! - Every write to a `kv/{function}` tree goes through [`GuestKv`], which
//!   holds its lock from the read of the old value to the write, so the
//!   usage it keeps per function equals what the tree holds.
//! - Usage is read from the tree (one scan) the first time a function
//!   touches its store after a start, then maintained on every write.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use device_runtime::CapabilityError;
use tracing::{info, warn};

use crate::burst::Burst;
use crate::config::FunctionsConfig;
use crate::metrics::Counters;
use crate::store::{Store, StoreError};

/// Keys and bytes (keys plus values) of one function's store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvUsage {
    /// Entries.
    pub keys: u64,
    /// Sum of key and value lengths.
    pub bytes: u64,
}

impl KvUsage {
    /// The usage after writing `value_len` bytes under a key of `key_len`
    /// bytes whose current value has `old` bytes (`None`: new key).
    fn after_put(self, key_len: u64, old: Option<u64>, value_len: u64) -> Self {
        match old {
            Some(old) => Self {
                keys: self.keys,
                bytes: self.bytes.saturating_sub(old).saturating_add(value_len),
            },
            None => Self {
                keys: self.keys.saturating_add(1),
                bytes: self.bytes.saturating_add(key_len).saturating_add(value_len),
            },
        }
    }

    /// The usage after removing a key of `key_len` bytes whose value had
    /// `old` bytes (`None`: it was absent).
    fn after_delete(self, key_len: u64, old: Option<u64>) -> Self {
        match old {
            Some(old) => Self {
                keys: self.keys.saturating_sub(1),
                bytes: self.bytes.saturating_sub(key_len.saturating_add(old)),
            },
            None => self,
        }
    }
}

/// The per-function limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvQuota {
    /// Most keys.
    pub max_keys: u64,
    /// Most bytes (keys plus values).
    pub max_bytes: u64,
}

impl From<&FunctionsConfig> for KvQuota {
    fn from(c: &FunctionsConfig) -> Self {
        Self {
            max_keys: c.kv_max_keys,
            max_bytes: c.kv_max_bytes,
        }
    }
}

impl KvQuota {
    /// Whether a write that takes usage from `before` to `after` is
    /// allowed; `Err` says which limit it would break.
    fn admits(&self, before: KvUsage, after: KvUsage) -> Result<(), String> {
        let grows = after.keys > before.keys || after.bytes > before.bytes;
        if !grows {
            return Ok(());
        }
        if after.keys > self.max_keys {
            return Err(format!("kv_max_keys {} reached", self.max_keys));
        }
        if after.bytes > self.max_bytes {
            return Err(format!(
                "kv_max_bytes {} would be exceeded ({} bytes)",
                self.max_bytes, after.bytes
            ));
        }
        Ok(())
    }
}

/// What is known about one function's store.
#[derive(Debug, Default)]
struct Account {
    usage: KvUsage,
    refused: u64,
    burst: Burst,
}

/// Usage and refusals of one function, for reported state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvStats {
    /// Current usage.
    pub usage: KvUsage,
    /// Puts refused since the start (over quota).
    pub refused: u64,
}

/// The guests' key-value store with its quota. Shared by the capability
/// implementation (writes) and the status (reads).
#[derive(Debug)]
pub struct GuestKv {
    store: Store,
    quota: KvQuota,
    counters: Arc<Counters>,
    accounts: Mutex<HashMap<String, Account>>,
}

fn unavailable(e: &StoreError) -> CapabilityError {
    CapabilityError::Unavailable(e.to_string())
}

impl GuestKv {
    /// A store over `store`'s `kv/{function}` trees with `quota`; refusals
    /// are also counted in `counters`.
    pub fn new(store: Store, quota: KvQuota, counters: Arc<Counters>) -> Self {
        Self {
            store,
            quota,
            counters,
            accounts: Mutex::new(HashMap::new()),
        }
    }

    /// The account of `function`, read from the tree on first use.
    fn account<'a>(
        &self,
        accounts: &'a mut HashMap<String, Account>,
        function: &str,
    ) -> Result<&'a mut Account, CapabilityError> {
        if !accounts.contains_key(function) {
            let (keys, bytes) = self.store.kv_usage(function).map_err(|e| unavailable(&e))?;
            accounts.insert(
                function.to_owned(),
                Account {
                    usage: KvUsage { keys, bytes },
                    ..Account::default()
                },
            );
        }
        accounts
            .get_mut(function)
            .ok_or_else(|| CapabilityError::Unavailable("kv account vanished".into()))
    }

    /// Value of `key` of `function`.
    pub fn get(&self, function: &str, key: &str) -> Result<Option<Vec<u8>>, CapabilityError> {
        self.store
            .kv_get(function, key.as_bytes())
            .map_err(|e| unavailable(&e))
    }

    /// Stores `value` under `key` of `function`, unless that breaks the
    /// quota ([`CapabilityError::TooLarge`]).
    pub fn put(&self, function: &str, key: &str, value: &[u8]) -> Result<(), CapabilityError> {
        let mut accounts = self.accounts.lock().unwrap_or_else(PoisonError::into_inner);
        let account = self.account(&mut accounts, function)?;
        let old = self
            .store
            .kv_value_len(function, key.as_bytes())
            .map_err(|e| unavailable(&e))?;
        let before = account.usage;
        let after = before.after_put(key.len() as u64, old, value.len() as u64);
        if let Err(why) = self.quota.admits(before, after) {
            account.refused += 1;
            Counters::add(&self.counters.function_kv_refused, 1);
            if account.burst.refuse(1) {
                warn!(
                    %function,
                    keys = before.keys,
                    bytes = before.bytes,
                    value_bytes = value.len(),
                    "kv put refused: {why} (further refusals are counted as kv_refused, not logged, until a put succeeds)"
                );
            }
            return Err(CapabilityError::TooLarge);
        }
        self.store
            .kv_put(function, key.as_bytes(), value)
            .map_err(|e| unavailable(&e))?;
        account.usage = after;
        if let Some(n) = account.burst.accept() {
            info!(%function, refused = n, keys = after.keys, bytes = after.bytes, "kv puts accepted again after {n} refusal(s)");
        }
        Ok(())
    }

    /// Removes `key` of `function` (absent keys are not an error).
    pub fn delete(&self, function: &str, key: &str) -> Result<(), CapabilityError> {
        let mut accounts = self.accounts.lock().unwrap_or_else(PoisonError::into_inner);
        let account = self.account(&mut accounts, function)?;
        let old = self
            .store
            .kv_delete(function, key.as_bytes())
            .map_err(|e| unavailable(&e))?;
        account.usage = account.usage.after_delete(key.len() as u64, old);
        Ok(())
    }

    /// Usage and refusals of `function`, if it used its store since the start.
    pub fn stats(&self, function: &str) -> Option<KvStats> {
        self.accounts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(function)
            .map(|a| KvStats {
                usage: a.usage,
                refused: a.refused,
            })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code")]
mod tests {
    use super::*;
    use crate::store::{OutboxLimits, OverflowPolicy, StoreConfig};

    fn store(dir: &std::path::Path) -> Store {
        Store::open(&StoreConfig {
            path: dir.join("db"),
            cache_capacity_bytes: 1 << 20,
            outbox: OutboxLimits {
                max_bytes: 1 << 20,
                max_age: std::time::Duration::from_secs(3600),
                policy: OverflowPolicy::DropOldest,
            },
        })
        .unwrap()
    }

    #[test]
    fn quota_refuses_only_growth_past_a_limit() {
        let q = KvQuota {
            max_keys: 2,
            max_bytes: 100,
        };
        let u = |keys, bytes| KvUsage { keys, bytes };
        assert_eq!(q.admits(u(1, 10), u(2, 20)), Ok(()));
        assert!(
            q.admits(u(2, 20), u(3, 30))
                .unwrap_err()
                .contains("kv_max_keys 2")
        );
        assert!(
            q.admits(u(1, 90), u(1, 101))
                .unwrap_err()
                .contains("kv_max_bytes 100")
        );
        // Over the limit (it was lowered) but not growing: allowed.
        assert_eq!(q.admits(u(5, 500), u(5, 400)), Ok(()));
        assert_eq!(u(1, 10).after_put(3, Some(7), 2), u(1, 5));
        assert_eq!(u(1, 10).after_put(3, None, 2), u(2, 15));
        assert_eq!(u(2, 15).after_delete(3, Some(2)), u(1, 10));
        assert_eq!(u(2, 15).after_delete(3, None), u(2, 15));
    }

    #[test]
    fn puts_past_the_quota_fail_for_the_guest_and_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let counters = Arc::new(Counters::default());
        let quota = KvQuota {
            max_keys: 3,
            max_bytes: 64,
        };
        let kv = GuestKv::new(store(dir.path()), quota, counters.clone());
        for k in ["a", "b", "c"] {
            kv.put("f", k, b"0123456789").unwrap();
        }
        // Without the quota this fourth key was stored (disk fill, M9).
        assert_eq!(kv.put("f", "d", b"x"), Err(CapabilityError::TooLarge));
        assert_eq!(kv.get("f", "d").unwrap(), None);
        // Too many bytes for an existing key.
        assert_eq!(kv.put("f", "a", &[0u8; 64]), Err(CapabilityError::TooLarge));
        assert_eq!(kv.get("f", "a").unwrap().unwrap(), b"0123456789");
        // Overwrites that do not grow, and deletes, pass; then there is room.
        kv.put("f", "a", b"short").unwrap();
        kv.delete("f", "b").unwrap();
        kv.put("f", "d", b"x").unwrap();
        let s = kv.stats("f").unwrap();
        assert_eq!(s.refused, 2);
        assert_eq!(
            s.usage,
            KvUsage {
                keys: 3,
                bytes: (1 + 5) + (1 + 10) + (1 + 1)
            }
        );
        assert_eq!(
            counters
                .function_kv_refused
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
        // Another function has its own quota and namespace.
        kv.put("g", "a", b"0123456789").unwrap();
        assert_eq!(kv.get("g", "b").unwrap(), None);
        assert_eq!(kv.stats("g").unwrap().usage.keys, 1);
    }

    #[test]
    fn usage_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let quota = KvQuota {
            max_keys: 2,
            max_bytes: 1 << 20,
        };
        {
            let kv = GuestKv::new(store(dir.path()), quota, Arc::default());
            kv.put("f", "a", b"1").unwrap();
            kv.put("f", "b", b"2").unwrap();
        }
        // A new process reads the usage back from the tree: still full.
        let kv = GuestKv::new(store(dir.path()), quota, Arc::default());
        assert_eq!(kv.put("f", "c", b"3"), Err(CapabilityError::TooLarge));
        assert_eq!(kv.stats("f").unwrap().usage.keys, 2);
    }
}
