//! The expert file (`experts.bin`) format: a fixed header, a table of tensor entries, and the
//! tensor data, every expert's tensors contiguous and its first tensor aligned. All integers
//! little-endian. See `docs/PACK_FORMAT.md`.
//!
//! Bytes from a file are decoded here: no indexing that can panic and no arithmetic that can
//! overflow (denied below; checked or saturating operations instead).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use crate::error::{Error, Result};
use crate::kernels::q4::q4_bytes;
use crate::kernels::q8::{q8_bytes, ScaleType};

pub const MAGIC: &[u8; 8] = b"MOEEXPRT";
pub const VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 64;
pub const ENTRY_BYTES: usize = 64;
/// `expert` field of entries that belong to the layer rather than one expert.
pub const NO_EXPERT: u32 = u32::MAX;
/// Alignment of tensors inside an expert's blob.
pub const TENSOR_ALIGN: u64 = 64;

/// What a table entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum TensorKind {
    Router = 0,
    Gate = 1,
    Up = 2,
    Down = 3,
    SharedGateProj = 4,
    SharedUpProj = 5,
    SharedDownProj = 6,
    SharedGate = 7,
    /// a dense linear layer's weight `[out, in]` (`pack --dense int8`); `layer` is its index in
    /// the manifest's `dense` list
    Dense = 8,
    /// the token embedding table `[vocab, hidden]` (`layer` 0), read a row at a time
    Embedding = 9,
    /// the CRC-32 of each row of the embedding table, `[vocab, 1]` u32, checked as rows are read
    EmbeddingRowCrc = 10,
}

impl TensorKind {
    fn from_u16(v: u16) -> Option<Self> {
        use TensorKind::*;
        [
            Router,
            Gate,
            Up,
            Down,
            SharedGateProj,
            SharedUpProj,
            SharedDownProj,
            SharedGate,
            Dense,
            Embedding,
            EmbeddingRowCrc,
        ]
        .into_iter()
        .find(|k| *k as u16 == v)
    }
}

/// How a tensor's values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum TensorFormat {
    F32 = 0,
    F16 = 1,
    /// int8 blocks of 32 along the input dimension, f16 scales (see `kernels::q8`)
    Q8F16Scales = 2,
    /// int8 blocks of 32, f32 scales
    Q8F32Scales = 3,
    /// int4 blocks of 32 with f16 scales (see `kernels::q4`)
    Q4F16Scales = 4,
    /// little-endian u32 values (checksums)
    U32 = 5,
}

impl TensorFormat {
    fn from_u16(v: u16) -> Option<Self> {
        use TensorFormat::*;
        [F32, F16, Q8F16Scales, Q8F32Scales, Q4F16Scales, U32]
            .into_iter()
            .find(|k| *k as u16 == v)
    }

    /// Bytes of a `[rows, cols]` tensor on disk (saturating: the table bounds the element count
    /// far below overflow before it asks).
    pub fn bytes(self, rows: usize, cols: usize) -> usize {
        match self {
            TensorFormat::F32 | TensorFormat::U32 => rows.saturating_mul(cols).saturating_mul(4),
            TensorFormat::F16 => rows.saturating_mul(cols).saturating_mul(2),
            TensorFormat::Q8F16Scales => q8_bytes(rows, cols, ScaleType::F16),
            TensorFormat::Q8F32Scales => q8_bytes(rows, cols, ScaleType::F32),
            TensorFormat::Q4F16Scales => q4_bytes(rows, cols),
        }
    }

    /// Whether the tensor is block-quantised (int8 or int4), computed by the int8 kernels.
    pub fn is_quantised(self) -> bool {
        matches!(
            self,
            TensorFormat::Q8F16Scales | TensorFormat::Q8F32Scales | TensorFormat::Q4F16Scales
        )
    }

    /// The scale type of an int8 format (`None` for the others).
    pub fn scale_type(self) -> Option<ScaleType> {
        match self {
            TensorFormat::Q8F16Scales => Some(ScaleType::F16),
            TensorFormat::Q8F32Scales => Some(ScaleType::F32),
            _ => None,
        }
    }
}

/// One tensor of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Index of the MoE layer in the manifest.
    pub layer: u32,
    pub expert: u32,
    pub kind: TensorKind,
    pub format: TensorFormat,
    pub rows: u32,
    pub cols: u32,
    pub offset: u64,
    pub length: u64,
    /// CRC-32 of the tensor's bytes.
    pub crc32: u32,
}

impl Entry {
    pub fn encode(&self) -> [u8; ENTRY_BYTES] {
        let mut b = [0u8; ENTRY_BYTES];
        b[0..4].copy_from_slice(&self.layer.to_le_bytes());
        b[4..8].copy_from_slice(&self.expert.to_le_bytes());
        b[8..10].copy_from_slice(&(self.kind as u16).to_le_bytes());
        b[10..12].copy_from_slice(&(self.format as u16).to_le_bytes());
        b[12..16].copy_from_slice(&self.rows.to_le_bytes());
        b[16..20].copy_from_slice(&self.cols.to_le_bytes());
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.length.to_le_bytes());
        b[40..44].copy_from_slice(&self.crc32.to_le_bytes());
        b
    }

    /// Decodes entry `index`; checks kind, format and that the length matches the shape.
    pub fn decode(b: &[u8], index: usize) -> Result<Self> {
        let bad = |what: String| Error::CorruptPack(format!("table entry {index}: {what}"));
        if b.len() != ENTRY_BYTES {
            return Err(bad(format!("{} bytes, not {ENTRY_BYTES}", b.len())));
        }
        let u32_at = |o: usize| u32::from_le_bytes(le(b, o));
        let u64_at = |o: usize| u64::from_le_bytes(le(b, o));
        let u16_at = |o: usize| u16::from_le_bytes(le(b, o));
        let kind = TensorKind::from_u16(u16_at(8))
            .ok_or_else(|| bad(format!("unknown tensor kind {}", u16_at(8))))?;
        let format = TensorFormat::from_u16(u16_at(10))
            .ok_or_else(|| bad(format!("unknown tensor format {}", u16_at(10))))?;
        let e = Entry {
            layer: u32_at(0),
            expert: u32_at(4),
            kind,
            format,
            rows: u32_at(12),
            cols: u32_at(16),
            offset: u64_at(24),
            length: u64_at(32),
            crc32: u32_at(40),
        };
        let elements = u64::from(e.rows).saturating_mul(u64::from(e.cols));
        if e.rows == 0 || e.cols == 0 || elements > MAX_TENSOR_ELEMENTS {
            return Err(bad(format!(
                "{kind:?} [{}, {}] is empty or larger than any model's tensor",
                e.rows, e.cols
            )));
        }
        let expected = format.bytes(e.rows as usize, e.cols as usize) as u64;
        if e.length != expected {
            return Err(bad(format!(
                "{:?} [{}, {}] as {:?} should be {expected} bytes, table says {}",
                kind, e.rows, e.cols, format, e.length
            )));
        }
        Ok(e)
    }

    /// `layer L expert E tensor K` for messages.
    pub fn describe(&self) -> String {
        if self.expert == NO_EXPERT {
            format!("layer {} {:?}", self.layer, self.kind)
        } else {
            format!(
                "layer {} expert {} {:?}",
                self.layer, self.expert, self.kind
            )
        }
    }
}

/// The most entries a table may have (2^20: 64 MiB of table, twenty times the tensors of the
/// largest MoE models published, and bounded before the table is read into memory).
pub const MAX_ENTRIES: u32 = 1 << 20;

/// The most elements a tensor of the table may have (2^36: far above any model's, and small
/// enough that its byte size cannot overflow).
pub const MAX_TENSOR_ELEMENTS: u64 = 1 << 36;

/// The file header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub alignment: u32,
    pub entry_count: u32,
    pub table_offset: u64,
    pub data_offset: u64,
    pub file_bytes: u64,
    pub table_crc32: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.alignment.to_le_bytes());
        b[16..20].copy_from_slice(&self.entry_count.to_le_bytes());
        b[24..32].copy_from_slice(&self.table_offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.data_offset.to_le_bytes());
        b[40..48].copy_from_slice(&self.file_bytes.to_le_bytes());
        b[48..52].copy_from_slice(&self.table_crc32.to_le_bytes());
        let crc = crc32fast::hash(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() < HEADER_BYTES {
            return Err(Error::CorruptPack(format!(
                "file is {} bytes, shorter than the {HEADER_BYTES}-byte header",
                b.len()
            )));
        }
        let magic: [u8; 8] = le(b, 0);
        if &magic != MAGIC {
            return Err(Error::CorruptPack(format!(
                "wrong magic {:?}, expected {:?}: not a moe-edge expert file",
                String::from_utf8_lossy(&magic),
                "MOEEXPRT"
            )));
        }
        let u32_at = |o: usize| u32::from_le_bytes(le(b, o));
        let u64_at = |o: usize| u64::from_le_bytes(le(b, o));
        if u32_at(8) != VERSION {
            return Err(Error::CorruptPack(format!(
                "format version {} is not supported (this build reads {VERSION})",
                u32_at(8)
            )));
        }
        if crc32fast::hash(b.get(..60).unwrap_or_default()) != u32_at(60) && !cfg!(fuzzing) {
            return Err(Error::CorruptPack("header checksum mismatch".into()));
        }
        Ok(Header {
            alignment: u32_at(12),
            entry_count: u32_at(16),
            table_offset: u64_at(24),
            data_offset: u64_at(32),
            file_bytes: u64_at(40),
            table_crc32: u32_at(48),
        })
    }
}

/// Rounds `v` up to a multiple of `align` (a power of two; saturating at the largest multiple).
pub fn align_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align).saturating_mul(align)
}

/// The `N` bytes of `b` at `at`, zeros where `b` ends first (callers check the length first).
fn le<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if let Some(src) = at.checked_add(N).and_then(|end| b.get(at..end)) {
        out.copy_from_slice(src);
    }
    out
}
