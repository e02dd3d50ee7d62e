#!/usr/bin/env python3
"""The PyTorch + PEFT peer of `fedlora bench train-step`: one LoRA training step of the byte-level
reference LM, same shape and adapter, timed by the same phases (forward with the loss, backward,
Adam), medians.

    python3 tools/peer_train_step.py [THREADS] [REPS]

The model is `train/src/model.rs`'s: 256 byte values, d_model 128, 4 pre-norm blocks of 4 heads
(LayerNorm, causal attention, LayerNorm, fc1 512, exact erf-GELU, fc2), learned positions, a final
LayerNorm and a linear head, every projection with a bias. LoRA rank 8, alpha 16 on q and v (PEFT),
batch 32 windows of 64 + 1 bytes from the first client role of tiny Shakespeare (GLOUCESTER), f32
on the CPU, Adam at lr 1e-3. Weights are random (speed does not depend on them). Needs torch and
peft.

`fedlora bench train-step` times its whole local step: it also builds the model from the global
adapter and computes the delta afterwards; those are a small share of the step at this shape.
"""

import json
import os
import sys

import peft
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_common import gloucester, peak_rss_mib, time_steps  # noqa: E402

VOCAB, D, LAYERS, HEADS, FF, CTX, BATCH = 256, 128, 4, 4, 512, 64, 32


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(D)
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.ln2 = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, FF)
        self.fc2 = nn.Linear(FF, D)

    def forward(self, x):
        b, t, d = x.shape
        y = self.ln1(x)
        heads = lambda z: z.view(b, t, HEADS, d // HEADS).transpose(1, 2)
        ctx = nn.functional.scaled_dot_product_attention(
            heads(self.q(y)), heads(self.k(y)), heads(self.v(y)), is_causal=True
        )
        x = x + self.o(ctx.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class Lm(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D)
        self.pos = nn.Embedding(CTX, D)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, tokens):
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def main():
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    torch.set_num_threads(threads)
    torch.manual_seed(7)
    model = peft.get_peft_model(
        Lm(), peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q", "v"])
    )
    data = gloucester().encode()
    batch = torch.tensor([list(data[i * (CTX + 1) : (i + 1) * (CTX + 1)]) for i in range(BATCH)])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()

    def loss_fn():
        logits = model(batch[:, :CTX])
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))

    phases = time_steps(loss_fn, opt, 3, reps)
    print(json.dumps({
        "peer": f"torch {torch.__version__}, peft {peft.__version__}",
        "threads": threads, "reps": reps,
        "phases_ms": phases,
        "step_ms": phases["total_ms"], "tokens_per_s": BATCH * CTX / (phases["total_ms"] / 1e3),
        "peak_rss_mib": peak_rss_mib(),
    }))


if __name__ == "__main__":
    main()
