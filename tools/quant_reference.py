#!/usr/bin/env python3
"""Writes tests/fixtures/llm/quant_reference.safetensors: ggml blocks made by the `gguf`
package's own quantizers (`gguf.quants.quantize`, bit-exact with ggml-quants.c), which
`train/tests/llm/llm_quant_base.rs` compares with fedlora's requantization byte for byte.

What is quantized:
- `synthetic` (f32, [blocks, 32]): seeded normal blocks at several scales, plus the cases a
  quantizer gets wrong first: a constant block (d = 0), all zeros, values on the half steps of
  the Q4_1 grid, one outlier, f16-subnormal magnitudes, large magnitudes, all-negative and
  all-positive blocks. Its blocks as Q8_0 and Q4_1: `synthetic_q8_0`, `synthetic_q4_1` (u8).
- the two matrices of tests/fixtures/llm/llama.gguf that a Q4_1 base requantizes on load: the
  F16 `blk.1.attn_output.weight` (`attn_output_q4_1`, and as Q8_0 `attn_output_q8_0`) and the
  Q8_0 `token_embd.weight` dequantized (`token_embd_q4_1`).

Needs: gguf, numpy, safetensors (none of them in CI; the output is committed).
Run from the repository root: `python3 tools/quant_reference.py`.
"""

import importlib.metadata

import gguf
import numpy as np
import safetensors.numpy
from gguf import GGMLQuantizationType as Q

OUT = "tests/fixtures/llm/quant_reference.safetensors"


def synthetic():
    rng = np.random.default_rng(20261206)
    blocks = [rng.normal(0, s, 32) for s in (1e-3, 0.02, 0.1, 1.0, 30.0) for _ in range(8)]
    blocks.append(np.full(32, 0.375))
    blocks.append(np.zeros(32))
    # values on the half steps of a 0..15 grid (d = 1): the rounding rule decides them
    blocks.append(np.concatenate([np.arange(16) + 0.5, np.arange(16)]) / 1.0)
    outlier = rng.normal(0, 0.01, 32)
    outlier[7] = 4.0
    blocks.append(outlier)
    blocks.append(rng.normal(0, 1e-6, 32))  # scales that are f16 subnormals
    blocks.append(rng.normal(0, 2000.0, 32))
    blocks.append(-np.abs(rng.normal(0, 1.0, 32)) - 0.5)
    blocks.append(np.abs(rng.normal(0, 1.0, 32)) + 0.5)
    return np.stack(blocks).astype(np.float32)


def tensor(reader, name):
    t = next(t for t in reader.tensors if t.name == name)
    values = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.ascontiguousarray(values, dtype=np.float32)


def main():
    syn = synthetic()
    reader = gguf.GGUFReader("tests/fixtures/llm/llama.gguf")
    attn = tensor(reader, "blk.1.attn_output.weight")
    embd = tensor(reader, "token_embd.weight")
    out = {
        "synthetic": syn,
        "synthetic_q8_0": gguf.quants.quantize(syn, Q.Q8_0),
        "synthetic_q4_1": gguf.quants.quantize(syn, Q.Q4_1),
        "attn_output_q4_1": gguf.quants.quantize(attn, Q.Q4_1),
        "attn_output_q8_0": gguf.quants.quantize(attn, Q.Q8_0),
        "token_embd_q4_1": gguf.quants.quantize(embd, Q.Q4_1),
    }
    out = {k: np.ascontiguousarray(v) for k, v in out.items()}
    safetensors.numpy.save_file(out, OUT, metadata={"gguf": importlib.metadata.version("gguf")})
    for k, v in out.items():
        print(k, v.dtype, v.shape)


if __name__ == "__main__":
    main()
