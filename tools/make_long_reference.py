#!/usr/bin/env python3
"""Writes `reference_long.safetensors` beside the parity fixtures of tests/fixtures/llm/: what
Hugging Face transformers computes for a [2, 128] input, so that the parity test covers
positions past the short reference's 11 tokens (RoPE at length; for the llama3 fixture, past
its rope_scaling's original_max_position_embeddings of 64, where the scaled frequencies
matter) and causal masking over a long window.

The models are the committed fixtures (made by tools/make_fixtures.py), loaded afresh in
float32 as a user would load them; nothing is regenerated.

Needs: torch, transformers, gguf, safetensors (none of them in CI; the output is committed).
Run from the repository root: `python3 tools/make_long_reference.py`.
"""

import importlib.metadata
import json
import os

import safetensors.torch
import torch
import transformers

OUT = "tests/fixtures/llm"
SEED = 4321
LENGTH = 128
VOCAB = 400


def inputs():
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(3, VOCAB, (2, LENGTH), generator=g)


def save(model, path, ids):
    model = model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().contiguous()
    safetensors.torch.save_file({"input_ids": ids.to(torch.int64), "logits": logits}, path)
    print(path, tuple(logits.shape))


def reproduces_the_short_reference(model, path):
    """This environment computes the committed [2, 11] reference to float rounding: the long
    reference then comes from the same computation."""
    ref = safetensors.torch.load_file(path)
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"]).logits.float()
    err = (logits - ref["logits"]).abs().max().item()
    assert err < 1e-5, f"{path}: this environment is {err} away from the committed reference"


def main():
    ids = inputs()
    for name in ["llama", "llama3", "qwen2"]:
        model = transformers.AutoModelForCausalLM.from_pretrained(f"{OUT}/{name}", dtype=torch.float32).eval()
        reproduces_the_short_reference(model, f"{OUT}/{name}/reference.safetensors")
        save(model, f"{OUT}/{name}/reference_long.safetensors", ids)
    from_gguf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.abspath(OUT), gguf_file="llama.gguf", dtype=torch.float32
    ).eval()
    reproduces_the_short_reference(from_gguf, f"{OUT}/llama_gguf_reference.safetensors")
    save(from_gguf, f"{OUT}/llama_gguf_reference_long.safetensors", ids)
    versions = {p: importlib.metadata.version(p) for p in ["torch", "transformers", "gguf"]}
    print("versions:", json.dumps(versions))


if __name__ == "__main__":
    main()
