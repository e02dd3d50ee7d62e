//! Turning a round's uploads into the next global adapter: FedAvg of decoded deltas, or, for the
//! modular codec, the decoded **sum** of the integer payloads (the only thing secure masking
//! reveals). The QUIC server and the simulation harness both call these, so a simulated round
//! aggregates exactly as a deployed one.

use fedlora_protocol::{fedavg, AdapterSpec, Codec, CodecContext, FlatAdapter, ModularSum};

use crate::error::{CoordinatorError, Result};

/// The next global from `global` and the round's payloads `(weight, bytes)`, in the order
/// given (the coordinator passes them by client id). Modular payloads are summed mod 2^m and
/// only the sum is decoded; every other codec is decoded per upload and averaged with
/// [`fedavg`].
pub fn aggregate_payloads<'a>(
    global: &FlatAdapter,
    codec: &Codec,
    spec: &AdapterSpec,
    ctx: &CodecContext,
    payloads: impl IntoIterator<Item = (f64, &'a [u8])>,
) -> Result<FlatAdapter> {
    if let Codec::Modular(p) = codec {
        let mut sum: Option<ModularSum> = None;
        for (_, bytes) in payloads {
            let ints = codec.modular_payload(bytes, spec)?;
            sum.get_or_insert_with(|| ModularSum::new(ints.len(), p.modulus_bits()))
                .add(&ints)?;
        }
        let sum = sum.ok_or_else(|| CoordinatorError::Storage("no uploads".into()))?;
        return apply_modular_sum(global, codec, spec, ctx, &sum);
    }
    let mut deltas = Vec::new();
    for (weight, bytes) in payloads {
        deltas.push((weight, Codec::decode(bytes, spec, Some(codec), ctx)?));
    }
    Ok(fedavg(global, &deltas)?)
}

/// `global` plus the weighted mean decoded from a modular sum (from plain modular uploads, or
/// unmasked by secure aggregation). Fails when the decoded weight is not positive.
pub fn apply_modular_sum(
    global: &FlatAdapter,
    codec: &Codec,
    spec: &AdapterSpec,
    ctx: &CodecContext,
    sum: &ModularSum,
) -> Result<FlatAdapter> {
    let (total, weight) = codec.decode_modular_sum(sum, spec, ctx)?;
    if !(weight > 0.0 && weight.is_finite()) {
        return Err(CoordinatorError::Storage(format!(
            "decoded weight sum {weight} is not positive"
        )));
    }
    let spec = total.spec().clone();
    let mean: Vec<f32> = total
        .into_values()
        .into_iter()
        .map(|x| (f64::from(x) / weight) as f32)
        .collect();
    let mut next = global.clone();
    next.apply_delta(&FlatAdapter::new(spec, mean)?)?;
    Ok(next)
}
