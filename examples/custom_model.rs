//! Your own burn model with `LoraLinear` in place of `Linear`: the same adapter extraction, spec
//! hash, delta and training as fedlora's LM.
//!
//! A small MLP classifies the Breast Cancer Wisconsin data (`data/`, see its README): its two
//! hidden projections carry rank-4 adapters; the frozen base is a randomly initialised network
//! (in practice you would load pretrained weights). We train only the adapters for a few hundred
//! steps, extract them as a flat named buffer, take the delta against the initial adapter (what a
//! client would upload), and load it back into a fresh model.
//!
//! Run: `cargo run --release --example custom_model`

use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::{relu, sigmoid};
use burn::tensor::{Device, Tensor, TensorData};
use fedlora_train::adapter::{adapter_spec, extract_adapter, load_adapter};
use fedlora_train::lora::{LoraConfig, LoraLinear, LoraLinearConfig};

#[derive(Module, Debug)]
struct Mlp {
    fc1: LoraLinear,
    fc2: LoraLinear,
    out: LoraLinear,
}

impl Mlp {
    fn new(lora: &LoraConfig, device: &Device) -> Self {
        device.seed(3);
        let l = |i, o, adapt: bool| {
            LoraLinearConfig::new(i, o)
                .with_lora(adapt.then(|| lora.clone()))
                .init(device)
        };
        let m = Self {
            fc1: l(30, 64, true),
            fc2: l(64, 64, true),
            out: l(64, 1, false),
        };
        lora.freeze_base(m)
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let h = relu(self.fc1.forward(x));
        let h = relu(self.fc2.forward(h));
        sigmoid(self.out.forward(h))
    }
}

fn load_data() -> (Vec<f32>, Vec<f32>, usize) {
    let text = include_str!("../data/breast_cancer_wisconsin_diagnostic.csv");
    let rows: Vec<Vec<f32>> = text
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect();
    // standardise each feature
    let n = rows.len();
    let mut x = vec![0f32; n * 30];
    for j in 0..30 {
        let mean = rows.iter().map(|r| r[j]).sum::<f32>() / n as f32;
        let sd = (rows.iter().map(|r| (r[j] - mean).powi(2)).sum::<f32>() / n as f32).sqrt();
        for (i, r) in rows.iter().enumerate() {
            x[i * 30 + j] = (r[j] - mean) / sd.max(1e-6);
        }
    }
    let y = rows.iter().map(|r| r[30]).collect();
    (x, y, n)
}

fn main() {
    let device = Device::flex().autodiff();
    let lora = LoraConfig::new()
        .with_rank(4)
        .with_targets(vec!["fc1".into(), "fc2".into()]);
    let (x, y, n) = load_data();
    let xt = Tensor::<2>::from_data(TensorData::new(x, [n, 30]), &device);
    let yt = Tensor::<2>::from_data(TensorData::new(y, [n, 1]), &device);

    let mut model = Mlp::new(&lora, &device);
    let spec = adapter_spec(&model, &lora);
    println!(
        "adapter: {} tensors, {} values, spec {}",
        spec.tensors().len(),
        spec.numel(),
        spec.short_hash()
    );
    let initial = extract_adapter(&model, &lora);
    let accuracy = |m: &Mlp| {
        let p = m.forward(xt.clone()).greater_elem(0.5).float();
        p.equal(yt.clone()).float().mean().into_scalar::<f32>()
    };
    println!("training-set accuracy before: {:.3}", accuracy(&model));
    let mut opt = AdamConfig::new().init();
    for _ in 0..300 {
        let p = model.forward(xt.clone()).clamp(1e-6, 1.0 - 1e-6);
        let loss = (yt.clone() * p.clone().log()
            + (yt.clone().neg() + 1.0) * (p.neg() + 1.0).log())
        .mean()
        .neg();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = opt.step(1e-2, model, grads);
    }
    println!(
        "training-set accuracy after training only the adapters: {:.3}",
        accuracy(&model)
    );

    // what a client would upload: the delta of the adapter, as named flat f32 buffers
    let trained = extract_adapter(&model, &lora);
    let delta = trained.delta_from(&initial).unwrap();
    println!(
        "delta: {} values, L2 norm {:.4}",
        delta.values().len(),
        fedlora_dp::l2_norm(delta.values())
    );
    // applying it to a fresh copy of the model reproduces the trained one
    let mut global = initial.clone();
    global.apply_delta(&delta).unwrap();
    let fresh = load_adapter(Mlp::new(&lora, &device), &lora, &global).unwrap();
    println!(
        "fresh model + delta: training-set accuracy {:.3}",
        accuracy(&fresh)
    );
}
