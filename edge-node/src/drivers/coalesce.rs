//! Request coalescing: which Modbus reads fetch a group's points.
//!
//! Pure. [`plan`] sorts the points of one group by table and address and
//! merges neighbours into as few reads as the limits allow: a point joins the
//! current read when it starts at most `max_gap` registers (or bits) after the
//! end of the read so far and the read stays within `max_registers` (bit
//! tables: `max_bits`).
//!
//! # Invariants
//! - Every input point is covered, entirely, by exactly one [`Read`] of its
//!   own table; `Slot::offset + width <= Read::count`.
//! - `Read::count` never exceeds the table's limit (at most 125 registers or
//!   2000 bits, the Modbus protocol maxima, whatever the configuration says).
//! - Reads of one table are sorted by start address; they overlap only where
//!   the configured points themselves overlap.
//! - Inside a read, unrequested stretches between consecutive points are at
//!   most `max_gap` long.

use protocols::ModbusTable;
use serde::{Deserialize, Serialize};

/// Protocol maximum of registers per read (functions 3 and 4).
pub const MAX_REGISTERS: u16 = 125;
/// Protocol maximum of bits per read (functions 1 and 2).
pub const MAX_BITS: u16 = 2000;

/// Coalescing limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Most registers per read (clamped to 4..=125).
    pub max_registers: u16,
    /// Most bits per read (clamped to 1..=2000).
    pub max_bits: u16,
    /// Largest run of unrequested addresses a read may span to merge two
    /// points. 0 merges only adjacent points.
    pub max_gap: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_registers: MAX_REGISTERS,
            max_bits: MAX_BITS,
            max_gap: 16,
        }
    }
}

impl Limits {
    fn max_for(self, table: ModbusTable) -> u16 {
        if table.is_bit() {
            self.max_bits.clamp(1, MAX_BITS)
        } else {
            self.max_registers.clamp(4, MAX_REGISTERS)
        }
    }
}

/// One point to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    /// Caller's identifier (e.g. position in the group).
    pub slot: usize,
    /// Table.
    pub table: ModbusTable,
    /// First address.
    pub address: u16,
    /// Registers (or bits) it spans, >= 1.
    pub width: u16,
}

/// A point's place inside a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// The caller's identifier.
    pub slot: usize,
    /// Offset of its first register (or bit) from [`Read::start`].
    pub offset: u16,
    /// Its width.
    pub width: u16,
}

/// One read request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// Table.
    pub table: ModbusTable,
    /// First address read.
    pub start: u16,
    /// Registers (or bits) read.
    pub count: u16,
    /// The points this read serves.
    pub slots: Vec<Slot>,
}

fn table_rank(t: ModbusTable) -> u8 {
    match t {
        ModbusTable::Coil => 0,
        ModbusTable::DiscreteInput => 1,
        ModbusTable::Holding => 2,
        ModbusTable::Input => 3,
    }
}

/// Plans the reads for `points` under `limits`.
///
/// Points whose width exceeds the table limit, or that run past address
/// 65535, are returned in the second list (validation normally rejects them).
pub fn plan(points: &[Wanted], limits: Limits) -> (Vec<Read>, Vec<usize>) {
    let mut sorted: Vec<Wanted> = points.to_vec();
    sorted.sort_by_key(|w| (table_rank(w.table), w.address, w.width, w.slot));
    let mut reads: Vec<Read> = Vec::new();
    let mut rejected = Vec::new();
    for w in sorted {
        let max = limits.max_for(w.table);
        let end = u32::from(w.address) + u32::from(w.width); // exclusive
        if w.width == 0 || w.width > max || end > 65_536 {
            rejected.push(w.slot);
            continue;
        }
        if let Some(r) = reads.last_mut().filter(|r| r.table == w.table) {
            let r_end = u32::from(r.start) + u32::from(r.count);
            let gap_ok = u32::from(w.address) <= r_end + u32::from(limits.max_gap);
            let new_end = r_end.max(end);
            let size_ok = new_end - u32::from(r.start) <= u32::from(max);
            if gap_ok && size_ok {
                r.count = u16::try_from(new_end - u32::from(r.start)).unwrap_or(max);
                r.slots.push(Slot {
                    slot: w.slot,
                    offset: w.address - r.start,
                    width: w.width,
                });
                continue;
            }
        }
        reads.push(Read {
            table: w.table,
            start: w.address,
            count: w.width,
            slots: vec![Slot {
                slot: w.slot,
                offset: 0,
                width: w.width,
            }],
        });
    }
    (reads, rejected)
}

/// Splits one read into single-point reads (used after a device refuses a
/// merged read with "illegal data address": some gap register is unmapped).
pub fn split(read: &Read) -> Vec<Read> {
    read.slots
        .iter()
        .map(|s| Read {
            table: read.table,
            start: read.start + s.offset,
            count: s.width,
            slots: vec![Slot {
                slot: s.slot,
                offset: 0,
                width: s.width,
            }],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn w(slot: usize, table: ModbusTable, address: u16, width: u16) -> Wanted {
        Wanted {
            slot,
            table,
            address,
            width,
        }
    }

    #[test]
    fn merges_adjacent_and_near() {
        let pts = [
            w(0, ModbusTable::Holding, 0, 2),
            w(1, ModbusTable::Holding, 2, 1),
            w(2, ModbusTable::Holding, 10, 4),  // gap 7
            w(3, ModbusTable::Holding, 100, 1), // gap 86: new read
            w(4, ModbusTable::Input, 0, 1),     // other table
            w(5, ModbusTable::Coil, 5, 1),
            w(6, ModbusTable::Coil, 6, 1),
        ];
        let (reads, rej) = plan(
            &pts,
            Limits {
                max_gap: 8,
                ..Limits::default()
            },
        );
        assert!(rej.is_empty());
        let shape: Vec<_> = reads
            .iter()
            .map(|r| (r.table, r.start, r.count, r.slots.len()))
            .collect();
        assert_eq!(
            shape,
            vec![
                (ModbusTable::Coil, 5, 2, 2),
                (ModbusTable::Holding, 0, 14, 3),
                (ModbusTable::Holding, 100, 1, 1),
                (ModbusTable::Input, 0, 1, 1),
            ]
        );
    }

    #[test]
    fn respects_125() {
        let pts: Vec<_> = (0..300u16)
            .map(|i| w(usize::from(i), ModbusTable::Holding, i * 2, 2))
            .collect();
        let (reads, _) = plan(&pts, Limits::default());
        assert!(reads.iter().all(|r| r.count <= 125));
        // 600 registers in reads of at most 124 (62 two-register points).
        assert_eq!(reads.len(), 5);
    }

    #[test]
    fn zero_gap_merges_only_adjacent() {
        let pts = [
            w(0, ModbusTable::Holding, 0, 1),
            w(1, ModbusTable::Holding, 2, 1),
        ];
        let (reads, _) = plan(
            &pts,
            Limits {
                max_gap: 0,
                ..Limits::default()
            },
        );
        assert_eq!(reads.len(), 2);
        let (reads, _) = plan(
            &pts,
            Limits {
                max_gap: 1,
                ..Limits::default()
            },
        );
        assert_eq!(reads.len(), 1);
    }

    #[test]
    fn rejects_past_end() {
        let (reads, rej) = plan(&[w(9, ModbusTable::Holding, 65_534, 4)], Limits::default());
        assert!(reads.is_empty());
        assert_eq!(rej, vec![9]);
    }

    #[test]
    fn split_reads() {
        let (reads, _) = plan(
            &[
                w(0, ModbusTable::Holding, 0, 2),
                w(1, ModbusTable::Holding, 5, 4),
            ],
            Limits::default(),
        );
        assert_eq!(reads.len(), 1);
        let parts = split(&reads[0]);
        assert_eq!(
            parts.iter().map(|r| (r.start, r.count)).collect::<Vec<_>>(),
            vec![(0, 2), (5, 4)]
        );
    }

    fn tables() -> impl Strategy<Value = ModbusTable> {
        prop_oneof![
            Just(ModbusTable::Coil),
            Just(ModbusTable::DiscreteInput),
            Just(ModbusTable::Holding),
            Just(ModbusTable::Input)
        ]
    }

    proptest! {
        #[test]
        fn invariants(
            raw in prop::collection::vec((tables(), 0u16..2000, prop::sample::select(vec![1u16, 2, 4])), 0..200),
            max_registers in 1u16..200,
            max_bits in 1u16..3000,
            max_gap in 0u16..40,
        ) {
            let pts: Vec<Wanted> = raw.iter().enumerate().map(|(i, &(t, a, wd))| {
                w(i, t, a, if t.is_bit() { 1 } else { wd })
            }).collect();
            let limits = Limits { max_registers, max_bits, max_gap };
            let (reads, rej) = plan(&pts, limits);
            prop_assert!(rej.is_empty());
            let mut seen = vec![0u32; pts.len()];
            for r in &reads {
                prop_assert!(r.count >= 1);
                prop_assert!(r.count <= limits.max_for(r.table));
                let mut covered_end = 0u32;
                for (k, s) in r.slots.iter().enumerate() {
                    let p = pts[s.slot];
                    seen[s.slot] += 1;
                    prop_assert_eq!(p.table, r.table);
                    prop_assert_eq!(u32::from(r.start) + u32::from(s.offset), u32::from(p.address));
                    prop_assert!(s.offset + s.width <= r.count);
                    if k > 0 {
                        prop_assert!(u32::from(s.offset) <= covered_end + u32::from(max_gap));
                    }
                    covered_end = covered_end.max(u32::from(s.offset + s.width));
                }
                prop_assert_eq!(covered_end, u32::from(r.count));
            }
            prop_assert!(seen.iter().all(|&n| n == 1));
            for pair in reads.windows(2) {
                if pair[0].table == pair[1].table {
                    prop_assert!(pair[0].start <= pair[1].start);
                }
            }
        }
    }
}
