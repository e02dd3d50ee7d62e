//! The cryptographic pieces of secure aggregation, from well-kept crates: X25519 (x25519-dalek,
//! static secrets so mask keys can be secret-shared), HKDF-SHA256 with the round id and purpose
//! in `info`, ChaCha20-Poly1305 (ring) for share messages, Shamir over GF(256) (blahaj), ECDSA
//! P-256 signatures of advertised keys (ring), and the mask PRG: the raw ChaCha20 keystream.

use chacha20::cipher::{KeyIvInit, StreamCipher};
use hkdf::Hkdf;
use ring::aead::{self, LessSafeKey, UnboundKey};
use sha2::Sha256;

use super::SecAggError;

/// What a derived key is for (part of the HKDF `info`, so keys of different purposes differ).
#[derive(Clone, Copy, Debug)]
pub enum Purpose {
    /// The pairwise mask between two clients.
    PairwiseMask,
    /// Encryption of share messages between two clients.
    ShareEncryption,
}

/// HKDF-SHA256 of a Diffie–Hellman secret with `info = "fedlora secagg v1" ‖ purpose ‖ round`.
pub fn derive(shared: &[u8; 32], purpose: Purpose, round: u64) -> [u8; 32] {
    let hk = Hkdf::<Sha256>::new(Some(b"fedlora-secagg-salt-v1"), shared);
    let tag: &[u8] = match purpose {
        Purpose::PairwiseMask => b"pairwise-mask",
        Purpose::ShareEncryption => b"share-encryption",
    };
    let mut info = b"fedlora secagg v1/".to_vec();
    info.extend_from_slice(tag);
    info.extend_from_slice(&round.to_be_bytes());
    let mut out = [0u8; 32];
    hk.expand(&info, &mut out)
        .expect("32 bytes is a valid HKDF length");
    out
}

/// The mask PRG: `len` values of `bits` bits from the raw ChaCha20 keystream of `seed` (nonce 0),
/// each taken from the next ⌈bits/8⌉ keystream bytes, little-endian, reduced to `bits` bits —
/// uniform on `[0, 2^bits)`.
pub fn prg(seed: &[u8; 32], len: usize, bits: u32) -> Vec<u64> {
    let width = bits.div_ceil(8) as usize;
    let mut stream = vec![0u8; len * width];
    let mut c = chacha20::ChaCha20::new(seed.into(), &[0u8; 12].into());
    c.apply_keystream(&mut stream);
    let mask = super::modulus_mask(bits);
    stream
        .chunks_exact(width)
        .map(|b| {
            let mut v = [0u8; 8];
            v[..width].copy_from_slice(b);
            u64::from_le_bytes(v) & mask
        })
        .collect()
}

/// Adds (or subtracts) [`prg`]`(seed, out.len(), bits)` into `out` mod 2^bits, streaming the
/// keystream in chunks instead of materialising the mask.
pub fn prg_apply(seed: &[u8; 32], out: &mut [u64], bits: u32, add: bool) {
    apply_masks(out, &[Mask { seed: *seed, add }], bits, 1);
}

/// One mask to apply: the [`prg`] stream of `seed`, added (`add`) or subtracted.
#[derive(Clone)]
pub struct Mask {
    /// The PRG seed.
    pub seed: [u8; 32],
    /// Add the stream (true) or subtract it.
    pub add: bool,
}

impl Drop for Mask {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.seed.zeroize();
    }
}

/// Values per chunk of [`apply_masks`]: the chunk of `out` (32 KiB) and one keystream block
/// stay in the L1/L2 cache while every mask is applied to it.
const MASK_CHUNK: usize = 4096;

/// Below this many values [`apply_masks`] stays on the calling thread.
const PARALLEL_MIN: usize = 1 << 16;

/// Applies every mask of `masks` to `out` mod 2^bits in **one pass** over `out`: each chunk of
/// 4,096 values receives all masks while it is in cache, and the keystreams are read at their
/// native width (⌈bits ÷ 8⌉ bytes per value, 1 to 8) with no per-peer vector. With `threads > 1` and a
/// long vector, contiguous parts of `out` run on scoped threads, each seeking every ChaCha20
/// stream to its part's offset, so the result is bit-identical to one thread's.
pub fn apply_masks(out: &mut [u64], masks: &[Mask], bits: u32, threads: usize) {
    if masks.is_empty() || out.is_empty() {
        return;
    }
    let threads = threads.clamp(1, out.len().div_ceil(PARALLEL_MIN).max(1));
    if threads == 1 {
        apply_masks_at(out, 0, masks, bits);
        return;
    }
    // parts aligned to whole chunks
    let part = out.len().div_ceil(threads).div_ceil(MASK_CHUNK) * MASK_CHUNK;
    std::thread::scope(|s| {
        for (i, o) in out.chunks_mut(part).enumerate() {
            s.spawn(move || apply_masks_at(o, i * part, masks, bits));
        }
    });
}

/// [`apply_masks`] on `out`, the values from index `offset` of the streams.
fn apply_masks_at(out: &mut [u64], offset: usize, masks: &[Mask], bits: u32) {
    use chacha20::cipher::StreamCipherSeek;
    let width = bits.div_ceil(8) as usize;
    let mask = super::modulus_mask(bits);
    let mut ciphers: Vec<chacha20::ChaCha20> = masks
        .iter()
        .map(|m| {
            let mut c = chacha20::ChaCha20::new((&m.seed).into(), &[0u8; 12].into());
            c.seek((offset * width) as u64);
            c
        })
        .collect();
    let mut buf = zeroize::Zeroizing::new(vec![0u8; MASK_CHUNK * width]);
    for block in out.chunks_mut(MASK_CHUNK) {
        let b = &mut buf[..block.len() * width];
        for (c, m) in ciphers.iter_mut().zip(masks) {
            b.fill(0);
            c.apply_keystream(b);
            // every width at its own constant, so each is one vectorisable loop (a 19-bit
            // modulus reads 3 bytes per value: that width once took a per-value copy)
            match width {
                1 => combine::<1>(block, b, m.add),
                2 => combine::<2>(block, b, m.add),
                3 => combine::<3>(block, b, m.add),
                4 => combine::<4>(block, b, m.add),
                5 => combine::<5>(block, b, m.add),
                6 => combine::<6>(block, b, m.add),
                7 => combine::<7>(block, b, m.add),
                _ => combine::<8>(block, b, m.add),
            }
        }
        // sums mod 2^64 reduce to sums mod 2^bits (2^bits divides 2^64): one reduction per
        // value after all masks, not one per mask
        if mask != u64::MAX {
            for o in block.iter_mut() {
                *o &= mask;
            }
        }
    }
}

/// `out[i] ± stream[i]` mod 2^64, the stream read as little-endian `W`-byte values.
#[inline(always)]
fn combine<const W: usize>(out: &mut [u64], stream: &[u8], add: bool) {
    let (words, _) = stream.as_chunks::<W>();
    let read = |w: &[u8; W]| {
        let mut v = [0u8; 8];
        v[..W].copy_from_slice(w);
        u64::from_le_bytes(v)
    };
    if add {
        for (o, w) in out.iter_mut().zip(words) {
            *o = o.wrapping_add(read(w));
        }
    } else {
        for (o, w) in out.iter_mut().zip(words) {
            *o = o.wrapping_sub(read(w));
        }
    }
}

fn nonce(from: &str, to: &str) -> aead::Nonce {
    // one message per (sender, recipient) pair per round key, so a hash of both names is unique
    let d = ring::digest::digest(&ring::digest::SHA256, format!("{from}\u{0}{to}").as_bytes());
    let mut n = [0u8; 12];
    n.copy_from_slice(&d.as_ref()[..12]);
    aead::Nonce::assume_unique_for_key(n)
}

/// Encrypts a share message from `from` to `to` with ChaCha20-Poly1305 under `key`.
pub fn seal(key: &[u8; 32], from: &str, to: &str, plaintext: &[u8]) -> Vec<u8> {
    let k = LessSafeKey::new(UnboundKey::new(&aead::CHACHA20_POLY1305, key).expect("32-byte key"));
    let mut buf = plaintext.to_vec();
    k.seal_in_place_append_tag(nonce(from, to), aead::Aad::from(b"fedlora share"), &mut buf)
        .expect("sealing cannot fail for small messages");
    buf
}

/// Decrypts what [`seal`] made; a tampered or misrouted message is an error.
pub fn open(
    key: &[u8; 32],
    from: &str,
    to: &str,
    ciphertext: &[u8],
) -> Result<Vec<u8>, SecAggError> {
    let k = LessSafeKey::new(UnboundKey::new(&aead::CHACHA20_POLY1305, key).expect("32-byte key"));
    let mut buf = zeroize::Zeroizing::new(ciphertext.to_vec());
    let pt = k
        .open_in_place(nonce(from, to), aead::Aad::from(b"fedlora share"), &mut buf)
        .map_err(|_| SecAggError::PeerMisbehaved(format!("share from {from} does not decrypt")))?;
    Ok(pt.to_vec())
}

/// Shamir-shares `secret` t-of-n (n ≤ 255); share i (1-based x coordinate) goes to recipient i.
pub fn shamir_split<R: rand::CryptoRng>(
    secret: &[u8],
    t: usize,
    n: usize,
    rng: &mut R,
) -> Vec<Vec<u8>> {
    let sharks = blahaj::Sharks(t as u8);
    sharks
        .dealer_rng(secret, rng)
        .take(n)
        .map(|s| Vec::from(&s))
        .collect()
}

/// Recovers a secret from at least `t` shares made by [`shamir_split`].
pub fn shamir_recover<S: AsRef<[u8]>>(shares: &[S], t: usize) -> Result<Vec<u8>, SecAggError> {
    let parsed = shares
        .iter()
        .map(|b| blahaj::Share::try_from(b.as_ref()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SecAggError::PeerMisbehaved(format!("malformed share: {e}")))?;
    blahaj::Sharks(t as u8)
        .recover(parsed.iter())
        .map_err(|e| SecAggError::Threshold(e.to_string()))
}

/// Signs with a client's ECDSA P-256 certificate key.
pub trait KeySigner {
    /// The signature of `msg`.
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, SecAggError>;
}

/// Checks a peer's signature with the key of its certificate (which the driver verified chains
/// to the federation CA and names that client).
pub trait PeerVerifier {
    /// Whether `sig` is `client`'s signature of `msg`.
    fn verify(&self, client: &str, msg: &[u8], sig: &[u8]) -> bool;
}

/// An ECDSA P-256 (SHA-256, fixed-length signatures) signer from a PKCS#8 key.
pub struct EcdsaP256Signer(ring::signature::EcdsaKeyPair);

impl EcdsaP256Signer {
    /// Parses a PKCS#8 DER private key.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, SecAggError> {
        let rng = ring::rand::SystemRandom::new();
        ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            der,
            &rng,
        )
        .map(Self)
        .map_err(|e| SecAggError::Config(format!("signing key: {e}")))
    }

    /// The uncompressed SEC1 public key.
    pub fn public_key(&self) -> Vec<u8> {
        use ring::signature::KeyPair;
        self.0.public_key().as_ref().to_vec()
    }
}

impl KeySigner for EcdsaP256Signer {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, SecAggError> {
        let rng = ring::rand::SystemRandom::new();
        self.0
            .sign(&rng, msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| SecAggError::Config("signing failed".into()))
    }
}

/// Verifies against a table of (client → uncompressed SEC1 P-256 public key).
pub struct P256Verifier(pub std::collections::BTreeMap<String, Vec<u8>>);

impl PeerVerifier for P256Verifier {
    fn verify(&self, client: &str, msg: &[u8], sig: &[u8]) -> bool {
        let Some(pk) = self.0.get(client) else {
            return false;
        };
        ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, pk)
            .verify(msg, sig)
            .is_ok()
    }
}
