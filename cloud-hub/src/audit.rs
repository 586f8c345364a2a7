//! The audit log: who changed what, when, and how it ended: one
//! [`AuditRecord`] per PUT/POST/DELETE that reached a route, refused ones
//! included. Kept in sled as a ring of `capacity` slots (`audit` tree, slot
//! = sequence mod capacity), so it stays bounded; read with `GET /v1/audit`.

use std::time::SystemTime;

pub use protocols::api::AuditRecord;

use crate::ca::unix_ms;

/// The audit log.
#[derive(Debug)]
pub struct AuditLog {
    db: sled::Db,
    tree: sled::Tree,
    capacity: u64,
}

impl AuditLog {
    /// The `audit` tree of `db`, keeping the last `capacity` records.
    pub fn open(db: &sled::Db, capacity: u64) -> Result<Self, sled::Error> {
        Ok(Self {
            db: db.clone(),
            tree: db.open_tree("audit")?,
            capacity: capacity.max(1),
        })
    }

    /// Records one call (the sequence number and time are set here).
    pub fn record(
        &self,
        who: String,
        method: &str,
        route: &str,
        target: &str,
        status: u16,
    ) -> Result<(), sled::Error> {
        let seq = self.db.generate_id()?;
        let rec = AuditRecord {
            seq,
            at_ms: unix_ms(SystemTime::now()),
            who,
            method: method.to_owned(),
            route: route.to_owned(),
            target: target.to_owned(),
            status,
        };
        let slot = (seq % self.capacity).to_be_bytes();
        self.tree
            .insert(slot, serde_json::to_vec(&rec).unwrap_or_default())?;
        Ok(())
    }

    /// The newest `limit` records, newest first.
    pub fn recent(&self, limit: usize) -> Vec<AuditRecord> {
        let mut all: Vec<AuditRecord> = self
            .tree
            .iter()
            .values()
            .filter_map(Result::ok)
            .filter_map(|v| serde_json::from_slice(&v).ok())
            .collect();
        all.sort_by_key(|r| std::cmp::Reverse(r.seq));
        all.truncate(limit);
        all
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    #[test]
    fn the_log_keeps_the_newest_capacity_records() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let log = AuditLog::open(&db, 3).unwrap();
        for i in 0..5u16 {
            log.record(format!("t{i}"), "PUT", "/r", "/r", 200 + i)
                .unwrap();
        }
        let r = log.recent(10);
        assert_eq!(r.len(), 3);
        assert_eq!(
            r.iter().map(|r| r.status).collect::<Vec<_>>(),
            [204, 203, 202]
        );
        assert_eq!(log.recent(1)[0].who, "t4");
    }
}
