//! Modbus PDU processing against a register bank (pure, no I/O).
//!
//! Supports functions 1–6, 15 and 16. Requests outside the bank answer
//! exception 2 (illegal data address); bad quantities exception 3; other
//! functions exception 1.

use protocols::ModbusTable;

/// Exception: illegal function.
pub const ILLEGAL_FUNCTION: u8 = 0x01;
/// Exception: illegal data address.
pub const ILLEGAL_DATA_ADDRESS: u8 = 0x02;
/// Exception: illegal data value.
pub const ILLEGAL_DATA_VALUE: u8 = 0x03;
/// Exception: server device failure.
pub const SERVER_DEVICE_FAILURE: u8 = 0x04;

/// The four tables of one unit. Each table covers addresses `0..len`.
#[derive(Debug, Clone, Default)]
pub struct Bank {
    /// Coils (function 1, 5, 15).
    pub coils: Vec<bool>,
    /// Discrete inputs (function 2).
    pub discrete: Vec<bool>,
    /// Holding registers (function 3, 6, 16).
    pub holding: Vec<u16>,
    /// Input registers (function 4).
    pub input: Vec<u16>,
}

/// A read that was served: which table and range (for ground-truth logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// Table.
    pub table: ModbusTable,
    /// First address.
    pub start: u16,
    /// Count.
    pub count: u16,
}

impl Bank {
    /// A bank with `n` entries in every table.
    pub fn with_size(n: usize) -> Self {
        Self {
            coils: vec![false; n],
            discrete: vec![false; n],
            holding: vec![0; n],
            input: vec![0; n],
        }
    }

    /// Grows the tables so `table` covers `address + width`.
    pub fn ensure(&mut self, table: ModbusTable, address: u16, width: u16) {
        let need = usize::from(address) + usize::from(width);
        match table {
            ModbusTable::Coil => grow(&mut self.coils, need, false),
            ModbusTable::DiscreteInput => grow(&mut self.discrete, need, false),
            ModbusTable::Holding => grow(&mut self.holding, need, 0),
            ModbusTable::Input => grow(&mut self.input, need, 0),
        }
    }

    /// Writes registers (holding or input) or bits (`w != 0`) at `address`.
    pub fn put(&mut self, table: ModbusTable, address: u16, words: &[u16]) {
        let a = usize::from(address);
        match table {
            ModbusTable::Coil => set_bits(&mut self.coils, a, words),
            ModbusTable::DiscreteInput => set_bits(&mut self.discrete, a, words),
            ModbusTable::Holding => set_words(&mut self.holding, a, words),
            ModbusTable::Input => set_words(&mut self.input, a, words),
        }
    }

    /// Processes one request PDU; returns the response PDU and, for reads,
    /// what was served.
    pub fn process(&mut self, pdu: &[u8]) -> (Vec<u8>, Option<Served>) {
        let Some(&fc) = pdu.first() else {
            return (exception(0, ILLEGAL_FUNCTION), None);
        };
        let u16_at = |i: usize| u16_at(pdu, i);
        match fc {
            1..=4 => self.read(fc, pdu),
            5 => {
                let (Some(addr), Some(v)) = (u16_at(1), u16_at(3)) else {
                    return (exception(fc, ILLEGAL_DATA_VALUE), None);
                };
                if v != 0xFF00 && v != 0 {
                    return (exception(fc, ILLEGAL_DATA_VALUE), None);
                }
                match self.coils.get_mut(usize::from(addr)) {
                    Some(c) => {
                        *c = v == 0xFF00;
                        (pdu.get(..5).map(<[u8]>::to_vec).unwrap_or_default(), None)
                    }
                    None => (exception(fc, ILLEGAL_DATA_ADDRESS), None),
                }
            }
            6 => {
                let (Some(addr), Some(v)) = (u16_at(1), u16_at(3)) else {
                    return (exception(fc, ILLEGAL_DATA_VALUE), None);
                };
                match self.holding.get_mut(usize::from(addr)) {
                    Some(r) => {
                        *r = v;
                        (pdu.get(..5).map(<[u8]>::to_vec).unwrap_or_default(), None)
                    }
                    None => (exception(fc, ILLEGAL_DATA_ADDRESS), None),
                }
            }
            15 | 16 => self.write_multiple(fc, pdu),
            _ => (exception(fc, ILLEGAL_FUNCTION), None),
        }
    }

    /// Read coils / discrete inputs / holding / input registers (fc 1–4).
    fn read(&self, fc: u8, pdu: &[u8]) -> (Vec<u8>, Option<Served>) {
        let u16_at = |i: usize| u16_at(pdu, i);
        let (Some(start), Some(count)) = (u16_at(1), u16_at(3)) else {
            return (exception(fc, ILLEGAL_DATA_VALUE), None);
        };
        let table = match fc {
            1 => ModbusTable::Coil,
            2 => ModbusTable::DiscreteInput,
            3 => ModbusTable::Holding,
            _ => ModbusTable::Input,
        };
        let max = if table.is_bit() { 2000 } else { 125 };
        if count == 0 || count > max {
            return (exception(fc, ILLEGAL_DATA_VALUE), None);
        }
        let range = usize::from(start)..usize::from(start) + usize::from(count);
        let resp = match table {
            ModbusTable::Coil => self.coils.get(range).map(|b| bits_response(fc, b)),
            ModbusTable::DiscreteInput => self.discrete.get(range).map(|b| bits_response(fc, b)),
            ModbusTable::Holding => self.holding.get(range).map(|w| words_response(fc, w)),
            ModbusTable::Input => self.input.get(range).map(|w| words_response(fc, w)),
        };
        match resp {
            Some(r) => (
                r,
                Some(Served {
                    table,
                    start,
                    count,
                }),
            ),
            None => (exception(fc, ILLEGAL_DATA_ADDRESS), None),
        }
    }

    /// Write multiple coils (fc 15) or holding registers (fc 16).
    fn write_multiple(&mut self, fc: u8, pdu: &[u8]) -> (Vec<u8>, Option<Served>) {
        let u16_at = |i: usize| u16_at(pdu, i);
        let (Some(addr), Some(count), Some(&nbytes)) = (u16_at(1), u16_at(3), pdu.get(5)) else {
            return (exception(fc, ILLEGAL_DATA_VALUE), None);
        };
        let Some(data) = pdu.get(6..6 + usize::from(nbytes)) else {
            return (exception(fc, ILLEGAL_DATA_VALUE), None);
        };
        let a = usize::from(addr);
        let n = usize::from(count);
        let ok = if fc == 15 {
            data.len() == n.div_ceil(8)
                && self.coils.get_mut(a..a + n).is_some_and(|coils| {
                    for (i, c) in coils.iter_mut().enumerate() {
                        *c = data[i / 8] >> (i % 8) & 1 == 1;
                    }
                    true
                })
        } else {
            data.len() == 2 * n
                && self.holding.get_mut(a..a + n).is_some_and(|regs| {
                    for (i, r) in regs.iter_mut().enumerate() {
                        *r = u16::from_be_bytes([data[2 * i], data[2 * i + 1]]);
                    }
                    true
                })
        };
        if ok {
            (pdu.get(..5).map(<[u8]>::to_vec).unwrap_or_default(), None)
        } else {
            (exception(fc, ILLEGAL_DATA_ADDRESS), None)
        }
    }
}

/// The big-endian u16 at byte `i` of `pdu`.
fn u16_at(pdu: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*pdu.get(i)?, *pdu.get(i + 1)?]))
}

fn grow<T: Clone>(v: &mut Vec<T>, need: usize, fill: T) {
    if v.len() < need {
        v.resize(need, fill);
    }
}

fn set_bits(v: &mut Vec<bool>, a: usize, words: &[u16]) {
    grow(v, a + words.len(), false);
    for (i, w) in words.iter().enumerate() {
        v[a + i] = *w != 0;
    }
}

fn set_words(v: &mut Vec<u16>, a: usize, words: &[u16]) {
    grow(v, a + words.len(), 0);
    v[a..a + words.len()].copy_from_slice(words);
}

/// An exception response PDU.
pub fn exception(fc: u8, code: u8) -> Vec<u8> {
    vec![fc | 0x80, code]
}

fn bits_response(fc: u8, bits: &[bool]) -> Vec<u8> {
    let n = bits.len().div_ceil(8);
    let mut out = Vec::with_capacity(2 + n);
    out.push(fc);
    out.push(u8::try_from(n).unwrap_or(u8::MAX));
    for chunk in bits.chunks(8) {
        let mut b = 0u8;
        for (i, bit) in chunk.iter().enumerate() {
            if *bit {
                b |= 1 << i;
            }
        }
        out.push(b);
    }
    out
}

fn words_response(fc: u8, words: &[u16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + 2 * words.len());
    out.push(fc);
    out.push(u8::try_from(2 * words.len()).unwrap_or(u8::MAX));
    for w in words {
        out.extend_from_slice(&w.to_be_bytes());
    }
    out
}

/// Modbus RTU CRC-16 (polynomial 0xA001, initial 0xFFFF), sent low byte first.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in data {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// Length of the RTU request frame at the start of `buf` (address, PDU and
/// CRC), or `None` if more bytes are needed. `Some(0)` means the function is
/// unknown, so the frame cannot be delimited.
pub fn rtu_request_len(buf: &[u8]) -> Option<usize> {
    let fc = *buf.get(1)?;
    match fc {
        1..=6 => Some(8),
        15 | 16 => buf.get(6).map(|&n| 9 + usize::from(n)),
        _ => Some(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_exceptions() {
        let mut b = Bank::with_size(10);
        b.put(ModbusTable::Holding, 2, &[0x1234, 0xABCD]);
        b.put(ModbusTable::Coil, 0, &[1, 0, 1]);
        let (r, s) = b.process(&[3, 0, 2, 0, 2]);
        assert_eq!(r, vec![3, 4, 0x12, 0x34, 0xAB, 0xCD]);
        assert_eq!(
            s,
            Some(Served {
                table: ModbusTable::Holding,
                start: 2,
                count: 2
            })
        );
        assert_eq!(b.process(&[1, 0, 0, 0, 3]).0, vec![1, 1, 0b101]);
        assert_eq!(
            b.process(&[3, 0, 9, 0, 2]).0,
            vec![0x83, ILLEGAL_DATA_ADDRESS]
        );
        assert_eq!(
            b.process(&[3, 0, 0, 0, 0]).0,
            vec![0x83, ILLEGAL_DATA_VALUE]
        );
        assert_eq!(b.process(&[0x2B]).0, vec![0xAB, ILLEGAL_FUNCTION]);
        assert_eq!(
            b.process(&[16, 0, 0, 0, 1, 2, 0xBE, 0xEF]).0,
            vec![16, 0, 0, 0, 1]
        );
        assert_eq!(b.holding[0], 0xBEEF);
    }

    #[test]
    fn crc_known_vector() {
        // 01 03 00 00 00 0A -> CRC C5 CD (low byte first on the wire).
        assert_eq!(
            crc16(&[0x01, 0x03, 0x00, 0x00, 0x00, 0x0A]).to_le_bytes(),
            [0xC5, 0xCD]
        );
    }
}
