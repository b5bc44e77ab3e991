//! The token embedding of a packed model as a tract operator (`ai.moe_edge::MoeEdgeEmbedding`):
//! what `pack` puts in place of `Gather(table, input_ids)`. Each fed token's row is read from the
//! expert file and checked against its own CRC-32, so the table (the largest dense tensor of a
//! small model) never sits in memory. A token id outside `0..vocab` is an error naming it (as
//! the model checks ids before it runs).

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::internal::*;

use crate::error::{Error, Result};
use crate::pack::file::PackFile;
use crate::pack::format::{Entry, TensorKind};

/// The rows of an embedding table in an expert file, with their checksums.
#[derive(Debug)]
pub(crate) struct EmbeddingRows {
    file: Arc<PackFile>,
    table: Entry,
    row_crcs: Vec<u32>,
    pub vocab: usize,
    pub hidden: usize,
}

impl EmbeddingRows {
    /// The table of `file` (its shape and formats, F32 rows and U32 checksums, were checked
    /// against the manifest at open); reads the row checksums, checked by their own tensor
    /// checksum.
    pub(crate) fn open(file: Arc<PackFile>) -> Result<Self> {
        let table = file.entry(0, None, TensorKind::Embedding)?.clone();
        let crc_entry = file.entry(0, None, TensorKind::EmbeddingRowCrc)?;
        let row_crcs = file
            .read_tensor(crc_entry)?
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(EmbeddingRows {
            vocab: table.rows as usize,
            hidden: table.cols as usize,
            file,
            table,
            row_crcs,
        })
    }

    /// The rows of `ids`, one after the other (`[ids.len(), hidden]`).
    pub(crate) fn lookup(&self, ids: impl Iterator<Item = i64>) -> Result<Vec<f32>> {
        let row_bytes = self.hidden * 4;
        let mut out = Vec::with_capacity(ids.size_hint().0 * self.hidden);
        for id in ids {
            let row = usize::try_from(id)
                .ok()
                .filter(|&r| r < self.vocab)
                .ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "token id {id} is outside the vocabulary (0..{})",
                        self.vocab
                    ))
                })?;
            let offset = self.table.offset + (row * row_bytes) as u64;
            let bytes = self
                .file
                .read_range(offset, row_bytes, &format!("embedding row {row}"))?;
            if crc32fast::hash(&bytes) != self.row_crcs[row] && !cfg!(fuzzing) {
                return Err(Error::CorruptPack(format!(
                    "{}: embedding row {row} checksum mismatch (the data is damaged)",
                    self.file.path.display()
                )));
            }
            out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
        }
        Ok(out)
    }
}

/// The typed op: `ids[...]` (int64 or int32) -> `rows[..., hidden]` f32.
#[derive(Clone)]
pub(crate) struct EmbeddingOp {
    pub rows: Arc<EmbeddingRows>,
}

impl std::fmt::Debug for EmbeddingOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Embedding({} x {})", self.rows.vocab, self.rows.hidden)
    }
}

impl PartialEq for EmbeddingOp {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.rows, &other.rows)
    }
}
impl Eq for EmbeddingOp {}

impl Op for EmbeddingOp {
    fn name(&self) -> StaticName {
        "Embedding".into()
    }
    op_as_typed_op!();
}

impl EvalOp for EmbeddingOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let ids = inputs[0].cast_to::<i64>()?;
        let ids = ids.try_as_plain_ram()?.as_slice::<i64>()?;
        let values = self.rows.lookup(ids.iter().copied())?;
        let mut shape = inputs[0].shape().to_vec();
        shape.push(self.rows.hidden);
        Ok(tvec!(Tensor::from_shape(&shape, &values)?.into_tvalue()))
    }
}

impl TypedOp for EmbeddingOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            matches!(inputs[0].datum_type, DatumType::I64 | DatumType::I32),
            "Embedding takes int64 or int32 token ids, not {:?}",
            inputs[0].datum_type
        );
        let mut shape = inputs[0].shape.to_tvec();
        shape.push(self.rows.hidden.to_dim());
        Ok(tvec!(f32::fact(shape)))
    }
    as_op!();
}
