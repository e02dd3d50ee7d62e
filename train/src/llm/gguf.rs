//! GGUF files: metadata and tensors, dequantized to f32 on load.
//!
//! Parsing is [`gguf_rs_lib`]'s (bounded reads, typed errors on truncated or corrupt input);
//! this module adds typed metadata lookups, dequantization of the tensor types fedlora loads
//! (F32, F16, BF16, Q8_0, Q4_1), and llama.cpp's inverse q/k row permutation.
//!
//! Layout: a GGUF tensor lists its dimensions innermost first (`ne0` = the contiguous one), so
//! a linear weight stored `[d_in, d_out]` in GGUF order is the row-major `[d_out, d_in]` matrix
//! Hugging Face uses. [`GgufFile::tensor`] returns row-major shapes (outermost first).

use std::io::Cursor;

use gguf_rs_lib::format::metadata::MetadataValue;
use gguf_rs_lib::prelude::{GGUFFileReader, GGUFTensorType};
use half::{bf16, f16};

use crate::error::TrainError;

/// One tensor read into host memory: f32 values, row-major, with its shape outermost first.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Values, row-major.
    pub data: Vec<f32>,
    /// Shape, outermost dimension first.
    pub shape: Vec<usize>,
}

/// A parsed GGUF file held in memory.
pub struct GgufFile {
    reader: GGUFFileReader<Cursor<Vec<u8>>>,
    origin: String,
}

fn corrupt(origin: &str, e: impl std::fmt::Display) -> TrainError {
    TrainError::ModelFile(format!("{origin}: not a readable GGUF file: {e}"))
}

/// A parse error, saying "truncated" when the file ends early.
fn parse_error(origin: &str, e: gguf_rs_lib::GGUFError) -> TrainError {
    use gguf_rs_lib::GGUFError;
    let eof = match &e {
        GGUFError::UnexpectedEof => true,
        GGUFError::Io(io) => io.kind() == std::io::ErrorKind::UnexpectedEof,
        _ => false,
    };
    if eof {
        TrainError::ModelFile(format!(
            "{origin}: the GGUF file is truncated (it ends before its header, metadata or \
             tensor table does): {e}"
        ))
    } else {
        corrupt(origin, e)
    }
}

impl GgufFile {
    /// Parses the header, the metadata and the tensor table of `bytes` (the whole file);
    /// `origin` names it in errors. Tensor data is read and checked when asked for.
    pub fn parse(bytes: Vec<u8>, origin: &str) -> Result<Self, TrainError> {
        if bytes.get(..4) != Some(b"GGUF".as_slice()) {
            return Err(corrupt(origin, "it does not start with the GGUF magic"));
        }
        let reader = GGUFFileReader::new(Cursor::new(bytes)).map_err(|e| parse_error(origin, e))?;
        Ok(Self {
            reader,
            origin: origin.to_string(),
        })
    }

    /// The name used in errors (the file's path, or the archive member it came from).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    fn value(&self, key: &str) -> Option<&MetadataValue> {
        self.reader.metadata().get(key)
    }

    fn wrong_type(&self, key: &str, want: &str) -> TrainError {
        TrainError::ModelFile(format!("{}: metadata `{key}` is not {want}", self.origin))
    }

    /// A string value, if the key is present.
    pub fn str(&self, key: &str) -> Result<Option<&str>, TrainError> {
        match self.value(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a string")),
        }
    }

    /// An unsigned integer value, if the key is present.
    pub fn uint(&self, key: &str) -> Result<Option<u64>, TrainError> {
        match self.value(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "an unsigned integer")),
        }
    }

    /// A float value (any numeric type), if the key is present.
    pub fn float(&self, key: &str) -> Result<Option<f64>, TrainError> {
        match self.value(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .or_else(|| v.as_u64().map(|u| u as f64))
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a number")),
        }
    }

    /// A boolean value, if the key is present.
    pub fn bool(&self, key: &str) -> Result<Option<bool>, TrainError> {
        match self.value(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a boolean")),
        }
    }

    fn array(&self, key: &str) -> Result<Option<&[MetadataValue]>, TrainError> {
        match self.value(key) {
            None => Ok(None),
            Some(MetadataValue::Array(a)) => Ok(Some(&a.values)),
            Some(_) => Err(self.wrong_type(key, "an array")),
        }
    }

    /// An array of strings, if the key is present.
    pub fn str_array(&self, key: &str) -> Result<Option<Vec<&str>>, TrainError> {
        let Some(values) = self.array(key)? else {
            return Ok(None);
        };
        values
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.wrong_type(key, "a string array"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// An array of integers, if the key is present.
    pub fn int_array(&self, key: &str) -> Result<Option<Vec<i64>>, TrainError> {
        let Some(values) = self.array(key)? else {
            return Ok(None);
        };
        values
            .iter()
            .map(|v| {
                v.as_i64()
                    .or_else(|| v.as_u64().and_then(|u| i64::try_from(u).ok()))
                    .ok_or_else(|| self.wrong_type(key, "an integer array"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// Whether the file has a tensor of this name.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.reader.get_tensor_info(name).is_some()
    }

    /// Names of all tensors, in file order.
    pub fn tensor_names(&self) -> Vec<String> {
        self.reader
            .tensor_infos()
            .iter()
            .map(|t| t.name().to_string())
            .collect()
    }

    /// Reads one tensor and dequantizes it to f32 (row-major, shape outermost first).
    pub fn tensor(&mut self, name: &str) -> Result<HostTensor, TrainError> {
        let info = self
            .reader
            .get_tensor_info(name)
            .ok_or_else(|| TrainError::ModelFile(format!("{}: no tensor `{name}`", self.origin)))?;
        let ty = info.tensor_type();
        let mut shape: Vec<usize> = info
            .shape()
            .dims()
            .iter()
            .map(|&d| usize::try_from(d).unwrap_or(usize::MAX))
            .collect();
        shape.reverse();
        let n = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                TrainError::ModelFile(format!("{}: tensor `{name}` is too large", self.origin))
            })?;
        let data = self.raw_bytes(name)?;
        let data = dequantize(ty, &data, n).map_err(|why| match why {
            DequantError::Unsupported => TrainError::Unsupported(format!(
                "{}: tensor `{name}` has type {ty:?}; fedlora dequantizes F32, F16, BF16, Q8_0 \
                 and Q4_1",
                self.origin
            )),
            DequantError::Length => TrainError::ModelFile(format!(
                "{}: tensor `{name}` holds the wrong number of bytes for {n} {ty:?} values",
                self.origin
            )),
        })?;
        Ok(HostTensor { data, shape })
    }
}

impl GgufFile {
    /// The stored bytes of tensor `name`, as the file holds them.
    fn raw_bytes(&mut self, name: &str) -> Result<Vec<u8>, TrainError> {
        let data = self
            .reader
            .load_tensor_data(name)
            .map_err(|e| {
                TrainError::ModelFile(format!(
                    "{}: tensor `{name}` cannot be read (truncated file?): {e}",
                    self.origin
                ))
            })?
            .ok_or_else(|| TrainError::ModelFile(format!("{}: no tensor `{name}`", self.origin)))?;
        Ok(data.as_slice().to_vec())
    }

    /// Reads a 2-D tensor stored as blocks of one of `kinds` without dequantizing it: `None`
    /// when the tensor is stored otherwise (or is not 2-D).
    pub fn tensor_blocks(
        &mut self,
        name: &str,
        kinds: &[crate::quant::QuantKind],
    ) -> Result<Option<crate::quant::QuantMatrix>, TrainError> {
        use crate::quant::QuantKind;
        let info = self
            .reader
            .get_tensor_info(name)
            .ok_or_else(|| TrainError::ModelFile(format!("{}: no tensor `{name}`", self.origin)))?;
        let stored = match info.tensor_type() {
            GGUFTensorType::Q8_0 => QuantKind::Q8_0,
            GGUFTensorType::Q4_1 => QuantKind::Q4_1,
            _ => return Ok(None),
        };
        let dims = info.shape().dims().to_vec();
        if !kinds.contains(&stored) || dims.len() != 2 {
            return Ok(None);
        }
        let (cols, rows) = (
            usize::try_from(dims[0]).unwrap_or(usize::MAX),
            usize::try_from(dims[1]).unwrap_or(usize::MAX),
        );
        let bytes = self.raw_bytes(name)?;
        crate::quant::QuantMatrix::from_blocks(stored, rows, cols, bytes)
            .map(Some)
            .map_err(|e| TrainError::ModelFile(format!("{}: tensor `{name}`: {e}", self.origin)))
    }
}

/// The row order that undoes llama.cpp's q/k permutation (see [`unpermute_rows`]): row `i` of
/// the original is row `from[i]` of the file's.
pub fn unpermute_order(rows: usize, n_head: usize) -> Result<Vec<usize>, TrainError> {
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        return Err(TrainError::ModelFile(format!(
            "a q/k projection with {rows} rows cannot be split into {n_head} heads of even size"
        )));
    }
    let half = rows / n_head / 2;
    let mut from = vec![0; rows];
    for h in 0..n_head {
        for s in 0..2 {
            for d in 0..half {
                from[h * 2 * half + s * half + d] = h * 2 * half + d * 2 + s;
            }
        }
    }
    Ok(from)
}

/// Why a byte buffer could not be dequantized.
#[derive(Debug, PartialEq, Eq)]
pub enum DequantError {
    /// The tensor type is not one fedlora dequantizes.
    Unsupported,
    /// The buffer does not hold exactly `n` values of the type.
    Length,
}

/// Q8_0 block: f16 scale `d`, then 32 signed bytes; value = d·q.
const Q8_0_BLOCK: usize = 34;
/// Q4_1 block: f16 scale `d`, f16 minimum `m`, then 16 bytes of nibbles; value = d·q + m, where
/// the low nibbles are values 0..16 of the block and the high nibbles values 16..32.
const Q4_1_BLOCK: usize = 20;
/// Values per Q8_0 / Q4_1 block.
const QK: usize = 32;

/// Dequantizes `n` values of type `ty` from `bytes` (little-endian, ggml's block layouts).
pub fn dequantize(ty: GGUFTensorType, bytes: &[u8], n: usize) -> Result<Vec<f32>, DequantError> {
    let exact = |per: usize, size: usize| {
        if n.is_multiple_of(per) && bytes.len() == n / per * size {
            Ok(())
        } else {
            Err(DequantError::Length)
        }
    };
    let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    match ty {
        GGUFTensorType::F32 => {
            exact(1, 4)?;
            Ok(bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        }
        GGUFTensorType::F16 => {
            exact(1, 2)?;
            Ok(bytes.chunks_exact(2).map(|c| f16_at(c, 0)).collect())
        }
        GGUFTensorType::BF16 => {
            exact(1, 2)?;
            Ok(bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect())
        }
        GGUFTensorType::Q8_0 => {
            exact(QK, Q8_0_BLOCK)?;
            let mut out = Vec::with_capacity(n);
            for block in bytes.chunks_exact(Q8_0_BLOCK) {
                let d = f16_at(block, 0);
                out.extend(block[2..].iter().map(|&q| d * f32::from(q as i8)));
            }
            Ok(out)
        }
        GGUFTensorType::Q4_1 => {
            exact(QK, Q4_1_BLOCK)?;
            let mut out = Vec::with_capacity(n);
            for block in bytes.chunks_exact(Q4_1_BLOCK) {
                let (d, m) = (f16_at(block, 0), f16_at(block, 2));
                let qs = &block[4..];
                out.extend(qs.iter().map(|&q| d * f32::from(q & 0x0F) + m));
                out.extend(qs.iter().map(|&q| d * f32::from(q >> 4) + m));
            }
            Ok(out)
        }
        _ => Err(DequantError::Unsupported),
    }
}

/// Undoes llama.cpp's row permutation of `attn_q` / `attn_k` (its converter's `permute`, which
/// transformers reverses with `reverse_permute_weights`): within each of `n_head` heads, rows
/// were reordered from `[2, dim/2]` to `[dim/2, 2]` (halves interleaved). Works on a weight
/// `[rows, cols]` or a bias `[rows]` (`cols` = 1).
pub fn unpermute_rows(t: &HostTensor, n_head: usize) -> Result<HostTensor, TrainError> {
    let rows = t.shape.first().copied().unwrap_or(0);
    let cols: usize = t.shape.iter().skip(1).product();
    let from = unpermute_order(rows, n_head)?;
    let mut out = vec![0f32; t.data.len()];
    for (original, &permuted) in from.iter().enumerate() {
        out[original * cols..(original + 1) * cols]
            .copy_from_slice(&t.data[permuted * cols..(permuted + 1) * cols]);
    }
    Ok(HostTensor {
        data: out,
        shape: t.shape.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_and_q8_0_blocks_decode_by_hand() {
        // Q8_0: d = 0.5, q = -3, 0, 7, ...
        let mut b = f16::from_f32(0.5).to_le_bytes().to_vec();
        let qs: Vec<i8> = (0..32).map(|i| (i as i8) - 16).collect();
        b.extend(qs.iter().map(|&q| q as u8));
        let v = dequantize(GGUFTensorType::Q8_0, &b, 32).unwrap();
        assert_eq!(v[0], -8.0);
        assert_eq!(v[31], 7.5);
        // Q4_1: d = 2, m = -1; byte j holds value j (low) and value j+16 (high)
        let mut b = f16::from_f32(2.0).to_le_bytes().to_vec();
        b.extend(f16::from_f32(-1.0).to_le_bytes());
        b.extend((0..16u8).map(|j| (15 - j) << 4 | j));
        let v = dequantize(GGUFTensorType::Q4_1, &b, 32).unwrap();
        assert_eq!(v[3], 2.0 * 3.0 - 1.0);
        assert_eq!(v[16 + 3], 2.0 * 12.0 - 1.0);
        assert_eq!(
            dequantize(GGUFTensorType::Q4_1, &b[..19], 32),
            Err(DequantError::Length)
        );
        assert_eq!(
            dequantize(GGUFTensorType::Q4_K, &b, 32),
            Err(DequantError::Unsupported)
        );
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (n_head, rows, cols) = (2usize, 8usize, 3usize);
        let original: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let half = rows / n_head / 2;
        let mut permuted = vec![0f32; rows * cols];
        for h in 0..n_head {
            for d in 0..half {
                for s in 0..2 {
                    let dst = h * 2 * half + d * 2 + s;
                    let src = h * 2 * half + s * half + d;
                    permuted[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&original[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_ne!(permuted, original);
        let t = HostTensor {
            data: permuted,
            shape: vec![rows, cols],
        };
        assert_eq!(unpermute_rows(&t, n_head).unwrap().data, original);
        assert!(unpermute_rows(&t, 3).is_err());
    }
}
