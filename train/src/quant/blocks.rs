//! A frozen weight matrix held as ggml's 32-value blocks (Q8_0 or Q4_1), as a GGUF file stores
//! it, and dequantized a range of rows at a time.

use std::ops::Range;
use std::str::FromStr;

use half::f16;
use rayon::prelude::*;

use crate::error::TrainError;

/// Values per block (ggml's `QK8_0` = `QK4_1` = 32).
pub const BLOCK_VALUES: usize = 32;

/// How a frozen base weight is kept in memory while training and evaluating. LoRA adapters,
/// activations and gradients stay f32 whatever this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseDtype {
    /// Dense f32 (4 bytes per weight): the reference.
    #[default]
    F32,
    /// ggml Q8_0 blocks: an f16 scale and 32 signed bytes (8.5 bits per weight).
    Q8_0,
    /// ggml Q4_1 blocks: an f16 scale, an f16 minimum and 32 nibbles (5 bits per weight).
    Q4_1,
    /// Every matrix as its GGUF file stores it, where that is Q8_0 or Q4_1 (so the values are
    /// exactly the file's); a matrix stored dense (F32, F16, BF16) becomes Q8_0.
    Gguf,
}

impl BaseDtype {
    /// The block kind a matrix gets when the file does not store it in a kept kind, or `None`
    /// for f32.
    pub fn kind(self) -> Option<QuantKind> {
        match self {
            BaseDtype::F32 => None,
            BaseDtype::Q8_0 | BaseDtype::Gguf => Some(QuantKind::Q8_0),
            BaseDtype::Q4_1 => Some(QuantKind::Q4_1),
        }
    }

    /// The block kinds a GGUF file's matrices are kept in as stored.
    pub fn keeps(self) -> &'static [QuantKind] {
        match self {
            BaseDtype::F32 => &[],
            BaseDtype::Q8_0 => &[QuantKind::Q8_0],
            BaseDtype::Q4_1 => &[QuantKind::Q4_1],
            BaseDtype::Gguf => &[QuantKind::Q8_0, QuantKind::Q4_1],
        }
    }

    /// The name on the command line and in JSON (`f32`, `q8_0`, `q4_1`).
    pub fn name(self) -> &'static str {
        match self {
            BaseDtype::F32 => "f32",
            BaseDtype::Q8_0 => "q8_0",
            BaseDtype::Q4_1 => "q4_1",
            BaseDtype::Gguf => "gguf",
        }
    }
}

impl std::fmt::Display for BaseDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BaseDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(BaseDtype::F32),
            "q8_0" | "q8" => Ok(BaseDtype::Q8_0),
            "q4_1" | "q4" => Ok(BaseDtype::Q4_1),
            "gguf" => Ok(BaseDtype::Gguf),
            other => Err(format!(
                "unknown base dtype `{other}`: use f32, q8_0, q4_1 or gguf"
            )),
        }
    }
}

/// A ggml block layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKind {
    /// `d` (f16), then 32 `i8`; value = d·q.
    Q8_0,
    /// `d` (f16), `m` (f16), then 16 bytes: low nibbles are values 0..16, high nibbles 16..32;
    /// value = d·q + m.
    Q4_1,
}

impl QuantKind {
    /// Bytes per block of 32 values.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantKind::Q8_0 => 34,
            QuantKind::Q4_1 => 20,
        }
    }

    /// Dequantizes one block into `out` (32 values).
    fn dequantize_block(self, block: &[u8], out: &mut [f32]) {
        let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
        match self {
            QuantKind::Q8_0 => {
                for (o, &q) in out.iter_mut().zip(&block[2..34]) {
                    *o = d * f32::from(q as i8);
                }
            }
            QuantKind::Q4_1 => {
                let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
                let (lo, hi) = out.split_at_mut(16);
                for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&block[4..20]) {
                    *l = d * f32::from(q & 0x0F) + m;
                    *h = d * f32::from(q >> 4) + m;
                }
            }
        }
    }

    /// Quantizes 32 values into one block, as ggml's reference quantizers
    /// (`quantize_row_q8_0_ref`, `quantize_row_q4_1_ref`) do.
    fn quantize_block(self, x: &[f32], block: &mut [u8]) {
        match self {
            QuantKind::Q8_0 => {
                let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                block[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                for (b, &v) in block[2..34].iter_mut().zip(x) {
                    *b = ((v * id).round() as i8) as u8;
                }
            }
            QuantKind::Q4_1 => {
                let (min, max) = x
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                block[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                block[2..4].copy_from_slice(&f16::from_f32(min).to_le_bytes());
                for j in 0..16 {
                    let q0 = (((x[j] - min) * id + 0.5) as u8).min(15);
                    let q1 = (((x[j + 16] - min) * id + 0.5) as u8).min(15);
                    block[4 + j] = q0 | (q1 << 4);
                }
            }
        }
    }
}

/// A `[rows, cols]` matrix (row-major, Hugging Face's `[d_out, d_in]` for a linear weight) of
/// 32-value blocks along each row.
#[derive(Clone, PartialEq, Eq)]
pub struct QuantMatrix {
    kind: QuantKind,
    rows: usize,
    cols: usize,
    blocks: Vec<u8>,
}

impl std::fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QuantMatrix({:?}, [{}, {}], {} bytes)",
            self.kind,
            self.rows,
            self.cols,
            self.blocks.len()
        )
    }
}

fn shape_error(what: &str, rows: usize, cols: usize) -> TrainError {
    TrainError::ModelFile(format!(
        "{what} [{rows}, {cols}] cannot be kept in 32-value blocks: its rows must be a whole \
         number of blocks"
    ))
}

impl QuantMatrix {
    /// Takes blocks as a GGUF file stores them (`rows · cols / 32` blocks, row after row).
    pub fn from_blocks(
        kind: QuantKind,
        rows: usize,
        cols: usize,
        blocks: Vec<u8>,
    ) -> Result<Self, TrainError> {
        if cols == 0 || !cols.is_multiple_of(BLOCK_VALUES) {
            return Err(shape_error("a quantized tensor", rows, cols));
        }
        if blocks.len() != rows * cols / BLOCK_VALUES * kind.block_bytes() {
            return Err(TrainError::ModelFile(format!(
                "a {kind:?} tensor [{rows}, {cols}] holds {} bytes, not {}",
                blocks.len(),
                rows * cols / BLOCK_VALUES * kind.block_bytes()
            )));
        }
        Ok(Self {
            kind,
            rows,
            cols,
            blocks,
        })
    }

    /// Quantizes a dense row-major `[rows, cols]` matrix.
    pub fn quantize(
        kind: QuantKind,
        values: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<Self, TrainError> {
        if cols == 0 || !cols.is_multiple_of(BLOCK_VALUES) || values.len() != rows * cols {
            return Err(shape_error("a weight", rows, cols));
        }
        let bb = kind.block_bytes();
        let mut blocks = vec![0u8; values.len() / BLOCK_VALUES * bb];
        blocks
            .par_chunks_mut(bb * 1024)
            .zip(values.par_chunks(BLOCK_VALUES * 1024))
            .for_each(|(out, x)| {
                for (b, v) in out.chunks_exact_mut(bb).zip(x.chunks_exact(BLOCK_VALUES)) {
                    kind.quantize_block(v, b);
                }
            });
        Ok(Self {
            kind,
            rows,
            cols,
            blocks,
        })
    }

    /// The block layout.
    pub fn kind(&self) -> QuantKind {
        self.kind
    }

    /// Rows (output features of a linear weight).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (input features of a linear weight).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The blocks as a GGUF file stores them (row after row).
    pub fn blocks(&self) -> &[u8] {
        &self.blocks
    }

    /// Bytes the blocks take.
    pub fn bytes(&self) -> usize {
        self.blocks.len()
    }

    fn row_bytes(&self) -> usize {
        self.cols / BLOCK_VALUES * self.kind.block_bytes()
    }

    /// Dequantizes `rows` into `out` (`rows.len() · cols` values, row-major), on all cores for
    /// large ranges.
    ///
    /// # Panics
    /// If the range is out of bounds or `out` has the wrong length (callers size it).
    pub fn dequantize_rows(&self, rows: Range<usize>, out: &mut [f32]) {
        assert!(rows.end <= self.rows && out.len() == rows.len() * self.cols);
        let rb = self.row_bytes();
        let src = &self.blocks[rows.start * rb..rows.end * rb];
        let bb = self.kind.block_bytes();
        let kind = self.kind;
        let work = |(o, s): (&mut [f32], &[u8])| {
            for (ob, sb) in o.chunks_exact_mut(BLOCK_VALUES).zip(s.chunks_exact(bb)) {
                kind.dequantize_block(sb, ob);
            }
        };
        // ~64 Ki values per task: big enough to pay for the fork, small enough to share.
        let per = 2048;
        if out.len() >= 4 * per * BLOCK_VALUES {
            out.par_chunks_mut(per * BLOCK_VALUES)
                .zip(src.par_chunks(per * bb))
                .for_each(work);
        } else {
            work((out, src));
        }
    }

    /// The whole matrix, dense and row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0..self.rows, &mut out);
        out
    }

    /// The whole matrix as a dense f32 tensor `[rows, cols]` on `device`.
    pub fn to_tensor(&self, device: &burn::tensor::Device) -> burn::tensor::Tensor<2> {
        let data = burn::tensor::TensorData::new(self.to_f32(), [self.rows, self.cols]);
        burn::tensor::Tensor::from_data(data, device)
    }

    /// The rows `ids` (each `< rows`), dense: an embedding lookup.
    pub fn gather_rows(&self, ids: &[usize]) -> Vec<f32> {
        let mut out = vec![0f32; ids.len() * self.cols];
        for (o, &r) in out.chunks_exact_mut(self.cols).zip(ids) {
            self.dequantize_rows(r..r + 1, o);
        }
        out
    }

    /// Reorders whole rows: row `i` of the result is row `from[i]` of `self` (blocks are copied,
    /// not requantized).
    pub fn reorder_rows(&self, from: &[usize]) -> Self {
        let rb = self.row_bytes();
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for &r in from {
            blocks.extend_from_slice(&self.blocks[r * rb..(r + 1) * rb]);
        }
        Self {
            blocks,
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn blocks_dequantize_as_the_gguf_loader_does() {
        // The loader's dequantizer (checked against the gguf package by the parity fixtures)
        // and this one must agree bit for bit on the same bytes.
        for (kind, ty) in [
            (QuantKind::Q8_0, gguf_rs_lib::prelude::GGUFTensorType::Q8_0),
            (QuantKind::Q4_1, gguf_rs_lib::prelude::GGUFTensorType::Q4_1),
        ] {
            let m = QuantMatrix::quantize(kind, &random(6 * 64, 1), 6, 64).unwrap();
            let loader = crate::llm::gguf::dequantize(ty, &m.blocks, 6 * 64).unwrap();
            assert_eq!(m.to_f32(), loader, "{kind:?}");
            let mut part = vec![0f32; 2 * 64];
            m.dequantize_rows(3..5, &mut part);
            assert_eq!(part, loader[3 * 64..5 * 64]);
        }
    }

    #[test]
    fn quantization_error_is_within_half_a_step() {
        let x = random(32 * 40, 2);
        for kind in [QuantKind::Q8_0, QuantKind::Q4_1] {
            let m = QuantMatrix::quantize(kind, &x, 40, 32).unwrap();
            let y = m.to_f32();
            for (xb, yb) in x.chunks(32).zip(y.chunks(32)) {
                let (lo, hi) = xb
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
                let step = match kind {
                    QuantKind::Q8_0 => lo.abs().max(hi.abs()) / 127.0,
                    QuantKind::Q4_1 => (hi - lo) / 15.0,
                };
                for (a, b) in xb.iter().zip(yb) {
                    // half a step, plus the f16 rounding of the scale (and minimum)
                    assert!(
                        (a - b).abs() <= 0.5 * step + 2e-3 * hi.abs().max(lo.abs()),
                        "{kind:?}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_typed_errors() {
        assert!(QuantMatrix::quantize(QuantKind::Q8_0, &[0.0; 30], 1, 30).is_err());
        assert!(QuantMatrix::from_blocks(QuantKind::Q4_1, 2, 32, vec![0; 39]).is_err());
        assert!("q5_k".parse::<BaseDtype>().is_err());
        assert_eq!("Q8_0".parse::<BaseDtype>().unwrap(), BaseDtype::Q8_0);
    }

    #[test]
    fn gathered_and_reordered_rows_are_the_same_rows() {
        let m = QuantMatrix::quantize(QuantKind::Q4_1, &random(5 * 32, 3), 5, 32).unwrap();
        let dense = m.to_f32();
        let g = m.gather_rows(&[4, 0, 4]);
        assert_eq!(g[..32], dense[128..160]);
        assert_eq!(g[32..64], dense[..32]);
        let r = m.reorder_rows(&[2, 1, 0, 4, 3]).to_f32();
        assert_eq!(r[..32], dense[64..96]);
        assert_eq!(r[96..128], dense[128..160]);
    }
}
