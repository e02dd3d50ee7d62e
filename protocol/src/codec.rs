//! Update codecs: how a flat adapter (or delta) becomes bytes on the wire and back.
//!
//! Every encoding starts with a two-byte header, `[codec id, format version]`, then a `u32` LE
//! value count, then the codec's body. A decoder refuses an unknown id or version, a count that
//! differs from the spec's, and trailing bytes.

use serde::{Deserialize, Serialize};

use crate::adapter::{AdapterSpec, FlatAdapter};
use crate::error::ProtocolError;

/// The codecs a round config can choose.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Codec {
    /// IEEE-754 `f32`, little-endian: lossless, the baseline every ratio is measured against.
    #[default]
    DenseF32,
    /// IEEE-754 half precision, little-endian: 2 bytes a value, round-to-nearest-even.
    F16,
}

const HEADER_LEN: usize = 2 + 4;
const FORMAT_VERSION: u8 = 1;

impl Codec {
    fn id(self) -> u8 {
        match self {
            Codec::DenseF32 => 1,
            Codec::F16 => 2,
        }
    }

    fn from_id(id: u8) -> Result<Self, ProtocolError> {
        match id {
            1 => Ok(Codec::DenseF32),
            2 => Ok(Codec::F16),
            other => Err(ProtocolError::Codec(format!("unknown codec id {other}"))),
        }
    }

    /// Short name used in configs and reports.
    pub fn name(self) -> &'static str {
        match self {
            Codec::DenseF32 => "dense-f32",
            Codec::F16 => "f16",
        }
    }

    /// Parses a name as written by [`Codec::name`].
    pub fn from_name(name: &str) -> Result<Self, ProtocolError> {
        match name {
            "dense-f32" | "dense" | "f32" => Ok(Codec::DenseF32),
            "f16" => Ok(Codec::F16),
            other => Err(ProtocolError::Codec(format!(
                "unknown codec `{other}` (known: dense-f32, f16)"
            ))),
        }
    }

    /// Encodes `values` (laid out as some [`AdapterSpec`]).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let width = match self {
            Codec::DenseF32 => 4,
            Codec::F16 => 2,
        };
        let mut out = Vec::with_capacity(HEADER_LEN + width * values.len());
        out.push(self.id());
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&(values.len() as u32).to_le_bytes());
        match self {
            Codec::DenseF32 => {
                for v in values {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Codec::F16 => {
                for v in values {
                    out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes());
                }
            }
        }
        out
    }

    /// Decodes bytes made by [`Codec::encode`] into an adapter of `spec`. The codec is read from
    /// the header; `expected`, when given, must match it.
    pub fn decode(
        bytes: &[u8],
        spec: &AdapterSpec,
        expected: Option<Codec>,
    ) -> Result<FlatAdapter, ProtocolError> {
        if bytes.len() < HEADER_LEN {
            return Err(ProtocolError::Codec(
                "encoding shorter than its header".into(),
            ));
        }
        let codec = Codec::from_id(bytes[0])?;
        if let Some(e) = expected {
            if e != codec {
                return Err(ProtocolError::Codec(format!(
                    "round expects codec {}, upload used {}",
                    e.name(),
                    codec.name()
                )));
            }
        }
        if bytes[1] != FORMAT_VERSION {
            return Err(ProtocolError::Codec(format!(
                "unsupported {} format version {}",
                codec.name(),
                bytes[1]
            )));
        }
        let n = u32::from_le_bytes(bytes[2..6].try_into().expect("4 bytes")) as usize;
        if n != spec.numel() {
            return Err(ProtocolError::ShapeMismatch {
                expected: spec.numel(),
                got: n,
            });
        }
        let body = &bytes[HEADER_LEN..];
        let width = match codec {
            Codec::DenseF32 => 4,
            Codec::F16 => 2,
        };
        if body.len() != n * width {
            return Err(ProtocolError::Codec(format!(
                "{} body is {} bytes, expected {}",
                codec.name(),
                body.len(),
                n * width
            )));
        }
        let values: Vec<f32> = match codec {
            Codec::DenseF32 => body
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
            Codec::F16 => body
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        };
        if values.iter().any(|v| !v.is_finite()) {
            return Err(ProtocolError::Codec("non-finite value in update".into()));
        }
        FlatAdapter::new(spec.clone(), values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::TensorSpec;

    fn spec(n: usize) -> AdapterSpec {
        AdapterSpec::new(vec![TensorSpec {
            name: "t".into(),
            shape: vec![n],
        }])
        .unwrap()
    }

    #[test]
    fn dense_is_lossless() {
        let v: Vec<f32> = (0..100).map(|i| (i as f32).sin() * 1e-3 + 1e7).collect();
        let bytes = Codec::DenseF32.encode(&v);
        assert_eq!(bytes.len(), 6 + 400);
        let back = Codec::decode(&bytes, &spec(100), Some(Codec::DenseF32)).unwrap();
        assert_eq!(back.values(), &v[..]);
    }

    #[test]
    fn f16_error_is_within_half_ulp() {
        let v: Vec<f32> = (0..1000)
            .map(|i| ((i as f32) * 0.37).sin() * 0.01)
            .collect();
        let bytes = Codec::F16.encode(&v);
        assert_eq!(bytes.len(), 6 + 2000);
        let back = Codec::decode(&bytes, &spec(1000), None).unwrap();
        for (a, b) in v.iter().zip(back.values()) {
            // f16 has 11 significant bits: relative error ≤ 2^-11 for normal numbers,
            // absolute error ≤ 2^-25 in the subnormal range.
            assert!(
                (a - b).abs() <= a.abs() * 2f32.powi(-11) + 2f32.powi(-25),
                "{a} {b}"
            );
        }
    }

    #[test]
    fn bad_encodings_refused() {
        let bytes = Codec::DenseF32.encode(&[1.0, 2.0]);
        assert!(Codec::decode(&bytes, &spec(3), None).is_err());
        assert!(Codec::decode(&bytes[..5], &spec(2), None).is_err());
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(Codec::decode(&trailing, &spec(2), None).is_err());
        assert!(Codec::decode(&bytes, &spec(2), Some(Codec::F16)).is_err());
        let mut unknown = bytes.clone();
        unknown[0] = 99;
        assert!(Codec::decode(&unknown, &spec(2), None).is_err());
        let nan = Codec::DenseF32.encode(&[f32::NAN, 0.0]);
        assert!(Codec::decode(&nan, &spec(2), None).is_err());
    }
}
