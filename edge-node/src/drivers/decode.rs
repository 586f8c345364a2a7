//! Register ⇄ value conversion for Modbus points.
//!
//! Pure functions. [`decode`] turns the raw 16-bit registers of one point into
//! its raw numeric value, honouring [`ByteOrder`] (inside each register) and
//! [`WordOrder`] (between registers); [`engineering`] applies scale and
//! offset. [`encode`] is the exact inverse used by the simulator and by the
//! round-trip property tests.
//!
//! Conventions (the usual "ABCD" names, A = most significant byte):
//!
//! | byte order | word order | 32-bit layout |
//! | --- | --- | --- |
//! | big-endian | high-first | `AB CD` (Modbus standard) |
//! | big-endian | low-first | `CD AB` (word swapped) |
//! | little-endian | high-first | `BA DC` (byte swapped) |
//! | little-endian | low-first | `DC BA` |

use protocols::{ByteOrder, DataType, WordOrder};

/// How a point's registers are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Format {
    /// Value type.
    pub data_type: DataType,
    /// Byte order inside each register.
    pub byte_order: ByteOrder,
    /// Register order of multi-register values.
    pub word_order: WordOrder,
}

/// Why registers could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer registers than the data type needs.
    #[error("{data_type:?} needs {needed} registers, got {got}")]
    TooShort {
        /// The type being decoded.
        data_type: DataType,
        /// Registers it needs.
        needed: usize,
        /// Registers available.
        got: usize,
    },
}

/// Reassembles the registers into one big-endian integer of
/// `16 · data_type.registers()` bits.
fn combine(regs: &[u16], f: Format) -> Result<u64, DecodeError> {
    let n = usize::from(f.data_type.registers());
    let Some(regs) = regs.get(..n) else {
        return Err(DecodeError::TooShort {
            data_type: f.data_type,
            needed: n,
            got: regs.len(),
        });
    };
    let fix = |r: u16| match f.byte_order {
        ByteOrder::BigEndian => r,
        ByteOrder::LittleEndian => r.swap_bytes(),
    };
    let fold = |acc: u64, r: &u16| (acc << 16) | u64::from(fix(*r));
    Ok(match f.word_order {
        WordOrder::HighFirst => regs.iter().fold(0, fold),
        WordOrder::LowFirst => regs.iter().rev().fold(0, fold),
    })
}

/// Splits a big-endian integer of `16 · n` bits into `n` registers laid out
/// per `f` (inverse of [`combine`]).
fn split(bits: u64, f: Format) -> Vec<u16> {
    let n = usize::from(f.data_type.registers());
    let fix = |r: u16| match f.byte_order {
        ByteOrder::BigEndian => r,
        ByteOrder::LittleEndian => r.swap_bytes(),
    };
    // Most significant word first.
    let mut words: Vec<u16> = (0..n)
        .rev()
        .map(|i| {
            let shift = 16 * i;
            #[allow(clippy::cast_possible_truncation, reason = "masked to 16 bits")]
            let w = ((bits >> shift) & 0xFFFF) as u16;
            fix(w)
        })
        .collect();
    if f.word_order == WordOrder::LowFirst {
        words.reverse();
    }
    words
}

/// Decodes the raw value of one point from its registers (at least
/// `data_type.registers()` of them; extra ones are ignored).
///
/// 64-bit integers beyond ±2⁵³ lose precision in the `f64` result.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_precision_loss,
    reason = "reinterpretation of register bits is the point of this function"
)]
pub fn decode(regs: &[u16], f: Format) -> Result<f64, DecodeError> {
    let bits = combine(regs, f)?;
    Ok(match f.data_type {
        DataType::Bool => {
            if bits == 0 {
                0.0
            } else {
                1.0
            }
        }
        DataType::U16 => f64::from(bits as u16),
        DataType::I16 => f64::from(bits as u16 as i16),
        DataType::U32 => f64::from(bits as u32),
        DataType::I32 => f64::from(bits as u32 as i32),
        DataType::I64 => bits as i64 as f64,
        DataType::F32 => f64::from(f32::from_bits(bits as u32)),
        DataType::F64 => f64::from_bits(bits),
    })
}

/// Encodes a raw value into registers laid out per `f` (inverse of
/// [`decode`]). Integer types round to nearest and saturate at their range;
/// `bool` is `value != 0`; NaN encodes as 0 for integer types.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "float to int `as` casts saturate, which is the documented behaviour"
)]
pub fn encode(value: f64, f: Format) -> Vec<u16> {
    let r = value.round();
    let bits: u64 = match f.data_type {
        DataType::Bool => u64::from(value != 0.0 && !value.is_nan()),
        DataType::U16 => u64::from(r as u16),
        DataType::I16 => u64::from(r as i16 as u16),
        DataType::U32 => u64::from(r as u32),
        DataType::I32 => u64::from(r as i32 as u32),
        DataType::I64 => r as i64 as u64,
        DataType::F32 => u64::from((value as f32).to_bits()),
        DataType::F64 => value.to_bits(),
    };
    split(bits, f)
}

/// Engineering value: `raw · scale + offset`.
pub fn engineering(raw: f64, scale: f64, offset: f64) -> f64 {
    raw.mul_add(scale, offset)
}

/// Inverse of [`engineering`] (for simulators writing engineering values).
pub fn raw_from_engineering(value: f64, scale: f64, offset: f64) -> f64 {
    if scale == 0.0 {
        value - offset
    } else {
        (value - offset) / scale
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::float_cmp)]

    use super::*;
    use proptest::prelude::*;

    fn fmt(data_type: DataType, byte_order: ByteOrder, word_order: WordOrder) -> Format {
        Format {
            data_type,
            byte_order,
            word_order,
        }
    }

    const BE: ByteOrder = ByteOrder::BigEndian;
    const LE: ByteOrder = ByteOrder::LittleEndian;
    const HF: WordOrder = WordOrder::HighFirst;
    const LF: WordOrder = WordOrder::LowFirst;

    #[test]
    fn known_vectors() {
        // f32 1.0 = 0x3F80_0000 in the four layouts.
        assert_eq!(
            encode(1.0, fmt(DataType::F32, BE, HF)),
            vec![0x3F80, 0x0000]
        );
        assert_eq!(
            encode(1.0, fmt(DataType::F32, BE, LF)),
            vec![0x0000, 0x3F80]
        );
        assert_eq!(
            encode(1.0, fmt(DataType::F32, LE, HF)),
            vec![0x803F, 0x0000]
        );
        assert_eq!(
            encode(1.0, fmt(DataType::F32, LE, LF)),
            vec![0x0000, 0x803F]
        );
        assert_eq!(decode(&[0x3F80, 0], fmt(DataType::F32, BE, HF)), Ok(1.0));
        // i32 -2 = 0xFFFF_FFFE.
        assert_eq!(
            decode(&[0xFFFF, 0xFFFE], fmt(DataType::I32, BE, HF)),
            Ok(-2.0)
        );
        assert_eq!(
            decode(&[0xFFFE, 0xFFFF], fmt(DataType::I32, BE, LF)),
            Ok(-2.0)
        );
        // u32 0x0001_0002.
        assert_eq!(decode(&[1, 2], fmt(DataType::U32, BE, HF)), Ok(65_538.0));
        // i16 / u16 / bool.
        assert_eq!(decode(&[0xFFFF], fmt(DataType::I16, BE, HF)), Ok(-1.0));
        assert_eq!(decode(&[0xFFFF], fmt(DataType::U16, BE, HF)), Ok(65_535.0));
        assert_eq!(decode(&[0x0100], fmt(DataType::U16, LE, HF)), Ok(1.0));
        assert_eq!(decode(&[0x0100], fmt(DataType::Bool, BE, HF)), Ok(1.0));
        // f64 1.0 = 0x3FF0_0000_0000_0000.
        assert_eq!(
            encode(1.0, fmt(DataType::F64, BE, HF)),
            vec![0x3FF0, 0, 0, 0]
        );
        assert_eq!(
            encode(1.0, fmt(DataType::F64, BE, LF)),
            vec![0, 0, 0, 0x3FF0]
        );
        // i64 -1.
        assert_eq!(decode(&[0xFFFF; 4], fmt(DataType::I64, LE, LF)), Ok(-1.0));
    }

    #[test]
    fn too_short_is_an_error() {
        assert_eq!(
            decode(&[1], fmt(DataType::F32, BE, HF)),
            Err(DecodeError::TooShort {
                data_type: DataType::F32,
                needed: 2,
                got: 1
            })
        );
    }

    #[test]
    fn saturates() {
        assert_eq!(
            decode(
                &encode(1e9, fmt(DataType::I16, BE, HF)),
                fmt(DataType::I16, BE, HF)
            ),
            Ok(32_767.0)
        );
        assert_eq!(
            decode(
                &encode(-5.0, fmt(DataType::U16, BE, HF)),
                fmt(DataType::U16, BE, HF)
            ),
            Ok(0.0)
        );
    }

    fn any_order() -> impl Strategy<Value = (ByteOrder, WordOrder)> {
        (prop::bool::ANY, prop::bool::ANY)
            .prop_map(|(b, w)| (if b { BE } else { LE }, if w { HF } else { LF }))
    }

    proptest! {
        #[test]
        fn roundtrip_integers(v in any::<i64>(), (b, w) in any_order(), scale in 0.001f64..1000.0, offset in -1e6f64..1e6) {
            #[allow(clippy::cast_precision_loss)]
            let cases: [(DataType, f64); 6] = [
                (DataType::I16, f64::from(v as i16)),
                (DataType::U16, f64::from(v as u16)),
                (DataType::I32, f64::from(v as i32)),
                (DataType::U32, f64::from(v as u32)),
                // Stay within ±2^53 so the f64 carries the integer exactly.
                (DataType::I64, (v >> 11) as f64),
                (DataType::Bool, f64::from(u8::from(v & 1 == 1))),
            ];
            for (dt, raw) in cases {
                let f = fmt(dt, b, w);
                let regs = encode(raw, f);
                prop_assert_eq!(regs.len(), usize::from(dt.registers()));
                let back = decode(&regs, f).unwrap();
                prop_assert_eq!(back, raw, "{:?}", f);
                // Engineering conversion is invertible up to rounding.
                let eng = engineering(back, scale, offset);
                let raw2 = raw_from_engineering(eng, scale, offset);
                prop_assert!((raw2 - raw).abs() <= 1e-6 * raw.abs().max(1.0) + 1e-6 * offset.abs());
            }
        }

        #[test]
        fn roundtrip_floats(x in any::<f64>(), y in any::<f32>(), (b, w) in any_order()) {
            let f = fmt(DataType::F64, b, w);
            let back = decode(&encode(x, f), f).unwrap();
            prop_assert_eq!(back.to_bits(), x.to_bits());
            let f = fmt(DataType::F32, b, w);
            let back = decode(&encode(f64::from(y), f), f).unwrap();
            prop_assert_eq!((back as f32).to_bits(), y.to_bits());
        }

        #[test]
        fn decode_never_panics(regs in prop::collection::vec(any::<u16>(), 0..6), (b, w) in any_order(), t in 0usize..8) {
            let dt = [DataType::Bool, DataType::I16, DataType::U16, DataType::I32, DataType::U32, DataType::I64, DataType::F32, DataType::F64][t];
            let r = decode(&regs, fmt(dt, b, w));
            prop_assert_eq!(r.is_ok(), regs.len() >= usize::from(dt.registers()));
        }
    }
}
