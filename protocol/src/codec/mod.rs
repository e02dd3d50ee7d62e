//! Update codecs: how a flat adapter (or delta) becomes bytes on the wire and back.
//!
//! Every encoding starts with a six-byte header, `[codec id, format version, value count u32
//! LE]`, then the codec's body. A decoder refuses an unknown id or version, a count that differs
//! from the spec's, a body of the wrong length, trailing bytes and non-finite values.
//!
//! | codec | body | bytes for n values |
//! |---|---|---|
//! | `dense-f32` | f32 LE | 4n |
//! | `f16` | IEEE half LE | 2n |
//! | `qB` (B ∈ 1,2,4,8) | rotation seed u64 (if rotated), f32 scale per block, B-bit levels packed | ≈ n·B/8 + 4n/block |
//! | `topk:F` | k varint, ascending index gaps varint, f16 values | ≈ k·(2 + ~1.5) |
//! | `subset:F` | f16 values at the round's shared coordinates | 2k |
//! | `modular` | (k+1) integers mod 2^m bit-packed at m bits (see [`modular`]) | (k+1)·m/8 |

pub mod bits;
pub mod modular;
pub mod quant;
pub mod skellam;
pub mod sparse;

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::adapter::{AdapterSpec, FlatAdapter};
use crate::error::ProtocolError;
pub use modular::{ModularParams, ModularSum};
pub use skellam::SkellamParams;
pub use sparse::ErrorFeedback;

/// The codecs a round config can choose.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Codec {
    /// IEEE-754 `f32`: lossless, the baseline every ratio is measured against.
    #[default]
    DenseF32,
    /// IEEE-754 half precision, round-to-nearest-even.
    F16,
    /// Unbiased stochastic quantization to `bits` ∈ {1, 2, 4, 8} with an f32 scale per `block`
    /// values, optionally after a randomized Hadamard rotation (`block` a power of two).
    Quantized {
        /// Bits per value.
        bits: u8,
        /// Values per scale.
        block: u32,
        /// Randomized Hadamard rotation first.
        rotate: bool,
    },
    /// The largest `fraction` of values by magnitude (client-specific support), f16 values and
    /// varint index gaps. Biased alone: use it with error feedback (the client SDK does).
    TopK {
        /// Share of values sent.
        fraction: f64,
    },
    /// The same random `fraction` of coordinates for every client of a round (from the round's
    /// codec seed), f16 values.
    SharedSubset {
        /// Share of values sent.
        fraction: f64,
    },
    /// Integers mod 2^m whose sum the coordinator decodes (secure-masking compatible).
    Modular(ModularParams),
    /// Distributed DP: clipped, rotated, scaled and conditionally rounded integers mod 2^m that
    /// carry the client's share of Skellam noise; only their sum is decoded ([`skellam`]).
    Skellam(SkellamParams),
}

/// Per-round public context of an encoding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CodecContext {
    /// The round's codec seed (shared subsets); derived by the coordinator from its seed and the
    /// round id, sent in the offer.
    pub round_seed: u64,
}

/// Encoding statistics a client reports locally.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EncodeStats {
    /// Values clamped by a modular encoding.
    pub clamped: usize,
    /// Conditional rounding attempts of a Skellam encoding (0 for other codecs).
    pub rounding_tries: usize,
    /// A Skellam encoding whose rounding never met its bound sent the zero vector.
    pub sent_zero: bool,
}

const HEADER_LEN: usize = 2 + 4;
const FORMAT_VERSION: u8 = 1;

fn codec_err(m: impl Into<String>) -> ProtocolError {
    ProtocolError::Codec(m.into())
}

impl Codec {
    fn id(&self) -> u8 {
        match self {
            Codec::DenseF32 => 1,
            Codec::F16 => 2,
            Codec::Quantized { .. } => 3,
            Codec::TopK { .. } => 4,
            Codec::SharedSubset { .. } => 5,
            Codec::Modular(_) => 6,
            Codec::Skellam(_) => 7,
        }
    }

    /// Short name used in reports (parseable by [`Codec::from_name`]).
    pub fn name(&self) -> String {
        match self {
            Codec::DenseF32 => "dense-f32".into(),
            Codec::F16 => "f16".into(),
            Codec::Quantized {
                bits,
                block,
                rotate,
            } => format!(
                "q{bits}{}{}",
                if *block == 256 {
                    String::new()
                } else {
                    format!(":{block}")
                },
                if *rotate { "" } else { "-norot" }
            ),
            Codec::TopK { fraction } => format!("topk:{fraction}"),
            Codec::SharedSubset { fraction } => format!("subset:{fraction}"),
            Codec::Modular(p) => format!(
                "modular:{}:{}:{}:{}",
                p.value_bits, p.clamp, p.fraction, p.max_weight
            ),
            Codec::Skellam(p) => format!(
                "skellam:{}:{}:{}:{}:{}:{}",
                p.bits, p.clip, p.scale, p.l2_bound, p.share, p.expected_clients
            ),
        }
    }

    /// Parses `dense-f32`, `f16`, `q8`/`q4`/`q2`/`q1` (block 256, rotated; `qB:BLOCK`,
    /// `qB-norot`), `topk:FRACTION`, `subset:FRACTION`,
    /// `modular[:VALUE_BITS[:CLAMP[:FRACTION[:MAX_WEIGHT]]]]`.
    pub fn from_name(name: &str) -> Result<Self, ProtocolError> {
        let (head, rest) = name.split_once(':').unwrap_or((name, ""));
        let num = |s: &str| -> Result<f64, ProtocolError> {
            s.parse::<f64>()
                .map_err(|_| codec_err(format!("bad number `{s}` in codec `{name}`")))
        };
        let c = match head {
            "dense-f32" | "dense" | "f32" => Codec::DenseF32,
            "f16" => Codec::F16,
            "topk" => Codec::TopK {
                fraction: num(rest)?,
            },
            "subset" => Codec::SharedSubset {
                fraction: num(rest)?,
            },
            "modular" => {
                let mut p = ModularParams::default();
                let parts: Vec<&str> = rest.split(':').filter(|s| !s.is_empty()).collect();
                if let Some(v) = parts.first() {
                    p.value_bits = num(v)? as u8;
                }
                if let Some(v) = parts.get(1) {
                    p.clamp = num(v)?;
                }
                if let Some(v) = parts.get(2) {
                    p.fraction = num(v)?;
                }
                if let Some(v) = parts.get(3) {
                    p.max_weight = num(v)? as u64;
                }
                Codec::Modular(p)
            }
            "skellam" => {
                let parts: Vec<&str> = rest.split(':').collect();
                if parts.len() != 6 {
                    return Err(codec_err(format!(
                        "codec `{name}`: skellam:BITS:CLIP:SCALE:L2_BOUND:SHARE:EXPECTED_CLIENTS \
                         (set by the privacy plan)"
                    )));
                }
                Codec::Skellam(SkellamParams {
                    bits: num(parts[0])? as u8,
                    clip: num(parts[1])?,
                    scale: num(parts[2])?,
                    l2_bound: num(parts[3])?,
                    share: num(parts[4])?,
                    expected_clients: num(parts[5])?,
                })
            }
            q if q.starts_with('q') => {
                let (b, rotate) = match q.strip_suffix("-norot") {
                    Some(b) => (b, false),
                    None => (q, true),
                };
                let bits = b[1..]
                    .parse::<u8>()
                    .map_err(|_| codec_err(format!("unknown codec `{name}`")))?;
                let block = if rest.is_empty() {
                    256
                } else {
                    num(rest.trim_end_matches("-norot"))? as u32
                };
                let rotate = rotate && !rest.ends_with("-norot");
                Codec::Quantized {
                    bits,
                    block,
                    rotate,
                }
            }
            _ => {
                return Err(codec_err(format!(
                    "unknown codec `{name}` (dense-f32, f16, q8, q4, q2, q1, topk:F, subset:F, modular)"
                )))
            }
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks the parameters.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        match self {
            Codec::Quantized {
                bits,
                block,
                rotate,
            } => {
                if ![1, 2, 4, 8].contains(bits) {
                    return Err(codec_err("quantization bits must be 1, 2, 4 or 8"));
                }
                if *block == 0 || (*rotate && !block.is_power_of_two()) {
                    return Err(codec_err(
                        "block must be positive (a power of two when rotated)",
                    ));
                }
            }
            Codec::TopK { fraction } | Codec::SharedSubset { fraction } => {
                if !(*fraction > 0.0 && *fraction <= 1.0) {
                    return Err(codec_err("fraction must be in (0, 1]"));
                }
            }
            Codec::Modular(p) => p.validate()?,
            Codec::Skellam(p) => p.validate()?,
            Codec::DenseF32 | Codec::F16 => {}
        }
        Ok(())
    }

    /// The codec's stated error bound on an update's L2 norm, as a share τ of `bound`: any
    /// `n` values `x` with ‖x‖₂ ≤ `bound` decode to `x̂` with ‖x̂‖₂ ≤ `bound`·(1 + τ).
    /// `None` for a codec without such a bound (stochastic quantization: one value's error can
    /// reach its block's scale).
    ///
    /// - dense f32: 2⁻²³ (the f32 rounding of values scaled in f64);
    /// - f16, top-k, shared subset: 2⁻¹¹ relative (round to nearest, normal range) plus
    ///   √n·2⁻²⁵ absolute (subnormals); a subset's norm is at most the whole's;
    /// - modular: clamping only shrinks values and stochastic rounding moves each of the k
    ///   kept values by less than one step `clamp / levels`, so √k·step absolute.
    pub fn norm_tolerance(&self, n: usize, bound: f64) -> Option<f64> {
        let f16_tau = 2f64.powi(-11) + (n as f64).sqrt() * 2f64.powi(-25) / bound;
        match self {
            Codec::DenseF32 => Some(2f64.powi(-23)),
            Codec::F16 | Codec::TopK { .. } | Codec::SharedSubset { .. } => Some(f16_tau),
            Codec::Quantized { .. } | Codec::Skellam(_) => None,
            Codec::Modular(p) => {
                let k = sparse::kept(n, p.fraction) as f64;
                Some(k.sqrt() * (p.clamp / p.levels() as f64) / bound + 2f64.powi(-23))
            }
        }
    }

    /// Whether the coordinator can add encodings of this codec without decoding them one by
    /// one (required under secure masking).
    pub fn is_summable(&self) -> bool {
        self.modulus_bits().is_some()
    }

    /// m of a summable codec: its integers (and their sum) are kept mod 2^m.
    pub fn modulus_bits(&self) -> Option<u32> {
        match self {
            Codec::Modular(p) => Some(p.modulus_bits()),
            Codec::Skellam(p) => Some(u32::from(p.bits)),
            _ => None,
        }
    }

    /// Integers per upload of a summable codec for `n` values (what secure aggregation masks).
    pub fn summed_len(&self, n: usize) -> Option<usize> {
        match self {
            Codec::Modular(p) => Some(sparse::kept(n, p.fraction) + 1),
            Codec::Skellam(_) => Some(SkellamParams::dim(n)),
            _ => None,
        }
    }

    /// Whether the codec drops information that error feedback should carry to the next round.
    pub fn wants_error_feedback(&self) -> bool {
        matches!(self, Codec::TopK { .. } | Codec::SharedSubset { .. })
    }

    /// Encodes with a fixed-seed RNG: for deterministic codecs (dense, f16) and tests.
    pub fn encode(&self, values: &[f32]) -> Vec<u8> {
        let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(0);
        self.encode_with(values, &CodecContext::default(), 1, &mut rng)
            .0
    }

    /// Encodes `values`. `rng` drives stochastic rounding and rotation seeds (the OS CSPRNG in
    /// deployments, seeded in tests); `weight` is only carried by [`Codec::Modular`].
    pub fn encode_with<R: Rng + ?Sized>(
        &self,
        values: &[f32],
        ctx: &CodecContext,
        weight: u64,
        rng: &mut R,
    ) -> (Vec<u8>, EncodeStats) {
        let n = values.len();
        let mut out = Vec::with_capacity(HEADER_LEN + 4 * n);
        out.push(self.id());
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&(n as u32).to_le_bytes());
        let mut stats = EncodeStats::default();
        let f16 = |out: &mut Vec<u8>, v: f32| {
            out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes())
        };
        match self {
            Codec::DenseF32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Codec::F16 => values.iter().for_each(|v| f16(&mut out, *v)),
            Codec::Quantized {
                bits,
                block,
                rotate,
            } => {
                let block = *block as usize;
                let mut x = values.to_vec();
                if *rotate {
                    let seed = rng.next_u64();
                    out.extend_from_slice(&seed.to_le_bytes());
                    x.resize(n.div_ceil(block) * block, 0.0);
                    quant::rotate(&mut x, block, seed);
                }
                let (scales, q) = quant::quantize(&x, block, u32::from(*bits), rng);
                scales
                    .iter()
                    .for_each(|s| out.extend_from_slice(&s.to_le_bytes()));
                bits::pack(q, u32::from(*bits), &mut out);
            }
            Codec::TopK { fraction } => {
                let idx = sparse::top_k(values, sparse::kept(n, *fraction));
                bits::put_varint(idx.len() as u64, &mut out);
                let mut prev = 0usize;
                for (j, &i) in idx.iter().enumerate() {
                    bits::put_varint((i - if j == 0 { 0 } else { prev + 1 }) as u64, &mut out);
                    prev = i;
                }
                idx.iter().for_each(|&i| f16(&mut out, values[i]));
            }
            Codec::SharedSubset { fraction } => {
                let idx = sparse::shared_subset(n, sparse::kept(n, *fraction), ctx.round_seed);
                idx.iter().for_each(|&i| f16(&mut out, values[i]));
            }
            Codec::Modular(p) => {
                let idx = sparse::shared_subset(n, sparse::kept(n, p.fraction), ctx.round_seed);
                let sub: Vec<f32> = idx.iter().map(|&i| values[i]).collect();
                let (ints, clamped) = p.to_ints(&sub, weight, rng);
                stats.clamped = clamped;
                bits::pack(ints, p.modulus_bits(), &mut out);
            }
            Codec::Skellam(p) => match p.to_ints(values, ctx.round_seed, rng) {
                Ok((ints, st)) => {
                    stats.rounding_tries = st.rounding_tries;
                    stats.sent_zero = st.sent_zero;
                    bits::pack(ints, u32::from(p.bits), &mut out);
                }
                // unreachable for validated parameters; an empty body is refused by every
                // decoder and carries nothing of the update
                Err(_) => stats.sent_zero = true,
            },
        }
        (out, stats)
    }

    /// Decodes bytes made by [`Codec::encode_with`] into an adapter of `spec`. `expected`, when
    /// given, must be the codec that made them (parameters included).
    pub fn decode(
        bytes: &[u8],
        spec: &AdapterSpec,
        expected: Option<&Codec>,
        ctx: &CodecContext,
    ) -> Result<FlatAdapter, ProtocolError> {
        let (codec, n, body) = Self::parse_header(bytes, spec, expected)?;
        let values = match &codec {
            Codec::Modular(p) => {
                let ints = codec.modular_ints(body, n)?;
                let (sub, _) = p.from_ints(&ints);
                scatter(
                    n,
                    &sparse::shared_subset(n, sparse::kept(n, p.fraction), ctx.round_seed),
                    &sub,
                )
            }
            Codec::Skellam(p) => {
                let ints = codec.modular_ints(body, n)?;
                p.from_ints(&ints, n, ctx.round_seed)
            }
            _ => codec.decode_body(body, n, ctx)?,
        };
        if values.iter().any(|v| !v.is_finite()) {
            return Err(codec_err("non-finite value in update"));
        }
        FlatAdapter::new(spec.clone(), values)
    }

    fn parse_header<'a>(
        bytes: &'a [u8],
        spec: &AdapterSpec,
        expected: Option<&Codec>,
    ) -> Result<(Codec, usize, &'a [u8]), ProtocolError> {
        if bytes.len() < HEADER_LEN {
            return Err(codec_err("encoding shorter than its header"));
        }
        let codec = match expected {
            Some(e) if e.id() == bytes[0] => e.clone(),
            Some(e) => {
                return Err(codec_err(format!(
                    "round expects codec {}, upload used codec id {}",
                    e.name(),
                    bytes[0]
                )))
            }
            None => match bytes[0] {
                1 => Codec::DenseF32,
                2 => Codec::F16,
                other => {
                    return Err(codec_err(format!(
                        "codec id {other} needs its parameters from the round config"
                    )))
                }
            },
        };
        if bytes[1] != FORMAT_VERSION {
            return Err(codec_err(format!(
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
        Ok((codec, n, &bytes[HEADER_LEN..]))
    }

    fn decode_body(
        &self,
        body: &[u8],
        n: usize,
        ctx: &CodecContext,
    ) -> Result<Vec<f32>, ProtocolError> {
        let len_err = |what: &str| codec_err(format!("{} body: {what}", self.name()));
        let f16s = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect()
        };
        Ok(match self {
            Codec::DenseF32 => {
                if body.len() != 4 * n {
                    return Err(len_err("wrong length"));
                }
                body.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect()
            }
            Codec::F16 => {
                if body.len() != 2 * n {
                    return Err(len_err("wrong length"));
                }
                f16s(body)
            }
            Codec::Quantized {
                bits,
                block,
                rotate,
            } => {
                let block = *block as usize;
                let padded = if *rotate {
                    n.div_ceil(block) * block
                } else {
                    n
                };
                let nblocks = padded.div_ceil(block);
                let mut pos = 0;
                let seed = if *rotate {
                    let s = body.get(0..8).ok_or_else(|| len_err("truncated"))?;
                    pos = 8;
                    Some(u64::from_le_bytes(s.try_into().expect("8 bytes")))
                } else {
                    None
                };
                let sb = body
                    .get(pos..pos + 4 * nblocks)
                    .ok_or_else(|| len_err("truncated"))?;
                let scales: Vec<f32> = sb
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect();
                if scales.iter().any(|s| !s.is_finite() || *s < 0.0) {
                    return Err(len_err("bad scale"));
                }
                let q = bits::unpack(&body[pos + 4 * nblocks..], padded, u32::from(*bits))
                    .ok_or_else(|| len_err("wrong length"))?;
                let mut x = quant::dequantize(&scales, &q, block, u32::from(*bits));
                if let Some(seed) = seed {
                    quant::unrotate(&mut x, block, seed);
                }
                x.truncate(n);
                x
            }
            Codec::TopK { .. } => {
                let mut pos = 0;
                let k =
                    bits::get_varint(body, &mut pos).ok_or_else(|| len_err("truncated"))? as usize;
                if k > n {
                    return Err(len_err("more indices than values"));
                }
                let mut idx = Vec::with_capacity(k);
                let mut next = 0u64;
                for _ in 0..k {
                    let gap =
                        bits::get_varint(body, &mut pos).ok_or_else(|| len_err("truncated"))?;
                    let i = next
                        .checked_add(gap)
                        .filter(|i| *i < n as u64)
                        .ok_or_else(|| len_err("index out of range"))?;
                    idx.push(i as usize);
                    next = i + 1;
                }
                if body.len() - pos != 2 * k {
                    return Err(len_err("wrong length"));
                }
                scatter(n, &idx, &f16s(&body[pos..]))
            }
            Codec::SharedSubset { fraction } => {
                let idx = sparse::shared_subset(n, sparse::kept(n, *fraction), ctx.round_seed);
                if body.len() != 2 * idx.len() {
                    return Err(len_err("wrong length"));
                }
                scatter(n, &idx, &f16s(body))
            }
            Codec::Modular(_) | Codec::Skellam(_) => {
                return Err(codec_err("summable codecs are decoded by the caller"))
            }
        })
    }

    fn modular_ints(&self, body: &[u8], n: usize) -> Result<Vec<u64>, ProtocolError> {
        let (Some(len), Some(m)) = (self.summed_len(n), self.modulus_bits()) else {
            return Err(codec_err("not a summable codec"));
        };
        bits::unpack(body, len, m)
            .ok_or_else(|| codec_err(format!("{} body has the wrong length", self.name())))
    }

    /// The integers of a modular encoding (for summing without decoding each upload).
    pub fn modular_payload(
        &self,
        bytes: &[u8],
        spec: &AdapterSpec,
    ) -> Result<Vec<u64>, ProtocolError> {
        let (codec, n, body) = Self::parse_header(bytes, spec, Some(self))?;
        codec.modular_ints(body, n)
    }

    /// Decodes a [`ModularSum`] of a round's modular encodings into the summed adapter (dense
    /// over the spec; zero outside the shared subset) and the summed weight.
    pub fn decode_modular_sum(
        &self,
        sum: &ModularSum,
        spec: &AdapterSpec,
        ctx: &CodecContext,
    ) -> Result<(FlatAdapter, f64), ProtocolError> {
        let n = spec.numel();
        let p = match self {
            Codec::Modular(p) => p,
            Codec::Skellam(p) => {
                let len = SkellamParams::dim(n);
                if sum.ints().len() != len {
                    return Err(ProtocolError::ShapeMismatch {
                        expected: len,
                        got: sum.ints().len(),
                    });
                }
                let values = p.from_ints(sum.ints(), n, ctx.round_seed);
                return Ok((FlatAdapter::new(spec.clone(), values)?, p.expected_clients));
            }
            _ => return Err(codec_err("not a summable codec")),
        };
        let (sub, w) = p.from_ints(sum.ints());
        let idx = sparse::shared_subset(n, sparse::kept(n, p.fraction), ctx.round_seed);
        if sub.len() != idx.len() {
            return Err(ProtocolError::ShapeMismatch {
                expected: idx.len(),
                got: sub.len(),
            });
        }
        Ok((FlatAdapter::new(spec.clone(), scatter(n, &idx, &sub))?, w))
    }
}

fn scatter(n: usize, idx: &[usize], vals: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; n];
    for (&i, &v) in idx.iter().zip(vals) {
        out[i] = v;
    }
    out
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

    fn sample(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32) * 0.37).sin() * 0.01 + if i % 97 == 0 { 0.05 } else { 0.0 })
            .collect()
    }

    fn ctx() -> CodecContext {
        CodecContext { round_seed: 77 }
    }

    fn rng(s: u64) -> rand::rngs::ChaCha20Rng {
        rand::rngs::ChaCha20Rng::seed_from_u64(s)
    }

    #[test]
    fn dense_is_lossless_and_f16_within_half_ulp() {
        let v: Vec<f32> = (0..100).map(|i| (i as f32).sin() * 1e-3 + 1e7).collect();
        let bytes = Codec::DenseF32.encode(&v);
        assert_eq!(bytes.len(), 6 + 400);
        let back = Codec::decode(&bytes, &spec(100), Some(&Codec::DenseF32), &ctx()).unwrap();
        assert_eq!(back.values(), &v[..]);
        let v = sample(1000);
        let bytes = Codec::F16.encode(&v);
        assert_eq!(bytes.len(), 6 + 2000);
        let back = Codec::decode(&bytes, &spec(1000), None, &ctx()).unwrap();
        for (a, b) in v.iter().zip(back.values()) {
            assert!(
                (a - b).abs() <= a.abs() * 2f32.powi(-11) + 2f32.powi(-25),
                "{a} {b}"
            );
        }
    }

    #[test]
    fn quantizers_are_unbiased_and_within_the_bound() {
        let n = 700;
        let v = sample(n);
        for bits in [1u8, 2, 4, 8] {
            for rotate in [false, true] {
                let c = Codec::Quantized {
                    bits,
                    block: 64,
                    rotate,
                };
                let reps = 400;
                let mut mean = vec![0f64; n];
                for s in 0..reps {
                    let (b, _) = c.encode_with(&v, &ctx(), 1, &mut rng(s));
                    let d = Codec::decode(&b, &spec(n), Some(&c), &ctx()).unwrap();
                    // per-encoding error bound: |x̂ − x| ≤ 2s/L per coordinate in the (rotated)
                    // domain, so ‖err‖₂ ≤ √n · 2·s_max/L (orthonormal rotation keeps L2 norms)
                    let levels = ((1u32 << bits) - 1) as f32;
                    let smax = if rotate {
                        // rotated scales are bounded by the block's L2 norm
                        v.chunks(64)
                            .map(|b| b.iter().map(|x| x * x).sum::<f32>().sqrt())
                            .fold(0.0, f32::max)
                    } else {
                        v.iter().fold(0f32, |m, x| m.max(x.abs()))
                    };
                    let err: f32 = v
                        .iter()
                        .zip(d.values())
                        .map(|(a, b)| (a - b) * (a - b))
                        .sum::<f32>()
                        .sqrt();
                    assert!(
                        err <= (n as f32).sqrt() * 2.0 * smax / levels * 1.001 + 1e-6,
                        "{bits} {rotate}: {err}"
                    );
                    for (m, x) in mean.iter_mut().zip(d.values()) {
                        *m += f64::from(*x) / reps as f64;
                    }
                }
                // unbiased: the mean of 400 encodings is within 6 standard errors of the input
                let levels = ((1u32 << bits) - 1) as f64;
                let smax = v.iter().fold(0f32, |m, x| m.max(x.abs())) as f64
                    * if rotate { 8.0 } else { 1.0 };
                let tol = 6.0 * (smax / levels) / (reps as f64).sqrt() + 1e-6;
                for (m, x) in mean.iter().zip(&v) {
                    assert!(
                        (m - f64::from(*x)).abs() <= tol,
                        "bits {bits} rot {rotate}: {m} vs {x}"
                    );
                }
                let bytes = c.encode(&v).len();
                assert!(
                    bytes
                        < 6 + 8
                            + 4 * n.div_ceil(64)
                            + (n.div_ceil(64) * 64 * bits as usize).div_ceil(8)
                            + 1
                );
            }
        }
    }

    #[test]
    fn sparse_codecs_round_trip_their_support() {
        let n = 1000;
        let v = sample(n);
        let c = Codec::TopK { fraction: 0.05 };
        let b = c.encode(&v);
        let d = Codec::decode(&b, &spec(n), Some(&c), &ctx()).unwrap();
        let kept: Vec<usize> = (0..n).filter(|&i| d.values()[i] != 0.0).collect();
        assert_eq!(kept.len(), 50);
        let mut mags: Vec<f32> = v.iter().map(|x| x.abs()).collect();
        mags.sort_by(|a, b| b.total_cmp(a));
        assert!(kept.iter().all(|&i| v[i].abs() >= mags[49]));
        assert!(b.len() < 6 + 2 + 50 * 4);
        let s = Codec::SharedSubset { fraction: 0.1 };
        let b1 = s.encode_with(&v, &ctx(), 1, &mut rng(1)).0;
        let b2 = s
            .encode_with(
                &sample(n).iter().map(|x| -x).collect::<Vec<_>>(),
                &ctx(),
                1,
                &mut rng(2),
            )
            .0;
        assert_eq!(b1.len(), 6 + 200);
        let d1 = Codec::decode(&b1, &spec(n), Some(&s), &ctx()).unwrap();
        let d2 = Codec::decode(&b2, &spec(n), Some(&s), &ctx()).unwrap();
        let supp = |d: &FlatAdapter| (0..n).filter(|&i| d.values()[i] != 0.0).collect::<Vec<_>>();
        assert_eq!(
            supp(&d1),
            supp(&d2),
            "same support for every client of a round"
        );
        let other = CodecContext { round_seed: 78 };
        let d3 = Codec::decode(&b1, &spec(n), Some(&s), &other).unwrap();
        assert_ne!(supp(&d1), supp(&d3), "a new round draws a new subset");
    }

    #[test]
    fn error_feedback_conserves_the_sum() {
        let n = 300;
        let c = Codec::TopK { fraction: 0.1 };
        let mut ef = ErrorFeedback::new(n);
        let mut sent_sum = vec![0f64; n];
        let mut true_sum = vec![0f64; n];
        for round in 0..20u32 {
            let delta: Vec<f32> = (0..n)
                .map(|i| ((i as f32 + 1.0) * 0.1 * (round + 1) as f32).cos() * 0.01)
                .collect();
            let comp = ef.compensate(&delta);
            let b = c.encode(&comp);
            let sent = Codec::decode(&b, &spec(n), Some(&c), &ctx()).unwrap();
            ef.update(&comp, sent.values());
            for i in 0..n {
                sent_sum[i] += f64::from(sent.values()[i]);
                true_sum[i] += f64::from(delta[i]);
            }
        }
        for i in 0..n {
            let lhs = sent_sum[i] + f64::from(ef.residual()[i]);
            assert!(
                (lhs - true_sum[i]).abs() < 1e-5,
                "{i}: {lhs} vs {}",
                true_sum[i]
            );
        }
    }

    #[test]
    fn modular_sum_decodes_exactly_to_the_sum_of_quantized_values() {
        let n = 500;
        let p = ModularParams {
            value_bits: 8,
            clamp: 0.02,
            fraction: 0.25,
            max_weight: 64,
        };
        let c = Codec::Modular(p.clone());
        assert_eq!(p.modulus_bits(), 8 + 1 + 6);
        let k = sparse::kept(n, 0.25);
        // the worst case: max_weight clients, every value at +clamp (and at −clamp)
        for sign in [1.0f32, -1.0] {
            let mut sum = ModularSum::new(k + 1, p.modulus_bits());
            let mut expect = vec![0i64; k];
            for client in 0..p.max_weight {
                let v = vec![sign * 0.05; n];
                let (b, st) = c.encode_with(&v, &ctx(), 1, &mut rng(client));
                assert_eq!(st.clamped, k);
                let ints = c.modular_payload(&b, &spec(n)).unwrap();
                sum.add(&ints).unwrap();
                for (e, i) in expect.iter_mut().zip(&ints[..k]) {
                    let m = p.modulus_bits();
                    *e += if i >> (m - 1) & 1 == 1 {
                        *i as i64 - (1 << m)
                    } else {
                        *i as i64
                    };
                }
            }
            let (total, w) = c.decode_modular_sum(&sum, &spec(n), &ctx()).unwrap();
            assert_eq!(w, p.max_weight as f64);
            let idx = sparse::shared_subset(n, k, 77);
            for (j, &i) in idx.iter().enumerate() {
                let exact = expect[j] as f64 * p.clamp / p.levels() as f64;
                assert_eq!(total.values()[i], exact as f32);
                assert_eq!(expect[j].abs(), p.max_weight as i64 * p.levels());
            }
        }
        // random inputs: decoded sum = sum of each client's decoded values
        let mut sum = ModularSum::new(k + 1, p.modulus_bits());
        let mut acc = vec![0f64; n];
        for client in 0..20u64 {
            let v: Vec<f32> = sample(n)
                .iter()
                .map(|x| x * (client as f32 - 9.5) / 10.0)
                .collect();
            let (b, _) = c.encode_with(&v, &ctx(), 1, &mut rng(100 + client));
            sum.add(&c.modular_payload(&b, &spec(n)).unwrap()).unwrap();
            let d = Codec::decode(&b, &spec(n), Some(&c), &ctx()).unwrap();
            for (a, x) in acc.iter_mut().zip(d.values()) {
                *a += f64::from(*x);
            }
        }
        let (total, w) = c.decode_modular_sum(&sum, &spec(n), &ctx()).unwrap();
        assert_eq!(w, 20.0);
        for (t, a) in total.values().iter().zip(&acc) {
            assert!((f64::from(*t) - a).abs() < 1e-6, "{t} {a}");
        }
        // bit-packed: (k+1)·m bits, not one u32 per value
        let (b, _) = c.encode_with(&sample(n), &ctx(), 1, &mut rng(0));
        assert_eq!(
            b.len(),
            6 + ((k + 1) * p.modulus_bits() as usize).div_ceil(8)
        );
        assert!(ModularParams {
            value_bits: 30,
            max_weight: 1 << 40,
            ..p
        }
        .validate()
        .is_err());
    }

    #[test]
    fn bad_encodings_refused() {
        let bytes = Codec::DenseF32.encode(&[1.0, 2.0]);
        assert!(Codec::decode(&bytes, &spec(3), None, &ctx()).is_err());
        assert!(Codec::decode(&bytes[..5], &spec(2), None, &ctx()).is_err());
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(Codec::decode(&trailing, &spec(2), None, &ctx()).is_err());
        assert!(Codec::decode(&bytes, &spec(2), Some(&Codec::F16), &ctx()).is_err());
        let mut unknown = bytes.clone();
        unknown[0] = 99;
        assert!(Codec::decode(&unknown, &spec(2), None, &ctx()).is_err());
        let nan = Codec::DenseF32.encode(&[f32::NAN, 0.0]);
        assert!(Codec::decode(&nan, &spec(2), None, &ctx()).is_err());
        let t = Codec::TopK { fraction: 0.5 };
        let mut b = t.encode(&[1.0, 2.0, 3.0, 4.0]);
        b[7] = 200; // first index gap out of range
        assert!(Codec::decode(&b, &spec(4), Some(&t), &ctx()).is_err());
        for name in ["q3", "topk:0", "subset:2", "modular:40", "zip"] {
            assert!(Codec::from_name(name).is_err(), "{name}");
        }
        for name in [
            "dense-f32",
            "f16",
            "q4",
            "q2:128",
            "q8-norot",
            "topk:0.05",
            "subset:0.1",
            "modular:8:0.05:0.125:64",
        ] {
            let c = Codec::from_name(name).unwrap();
            assert_eq!(Codec::from_name(&c.name()).unwrap(), c, "{name}");
        }
    }
}
