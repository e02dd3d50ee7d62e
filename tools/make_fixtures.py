#!/usr/bin/env python3
"""Writes the real-LLM parity fixtures under tests/fixtures/llm/ (issue 12).

Everything here comes from the reference implementations, so the Rust tests compare fedlora's
loaders, tokenizers and model against them:

- a small byte-level BPE tokenizer trained with Hugging Face `tokenizers` (SmolLM2's
  pre-tokenizer) and reference token ids of a tricky text for every pre-tokenizer fedlora maps
  from GGUF metadata (`smollm`, `llama-bpe`, `qwen2`);
- tiny random models from Hugging Face `transformers`: a Llama with GQA and tied embeddings, a
  Llama with Llama 3.2's `llama3` RoPE scaling, separate embeddings, bf16 weights and a sharded
  checkpoint, and a Qwen2 with q/k/v bias;
- the first Llama written as GGUF the way llama.cpp's converter writes it (q/k rows permuted,
  Q8_0 token embedding, Q4_1 and F16 linear weights, F32 norms, tokenizer metadata), with the
  `gguf` package;
- reference logits of fixed inputs from transformers, for the directories and for the GGUF as
  transformers itself loads it; the `gguf` package's dequantized values of four GGUF tensors;
  the chat template rendered by transformers.

Needs: torch, transformers, tokenizers, gguf, peft, safetensors, numpy (none of them in CI).
Run from the repository root: `python3 tools/make_fixtures.py`. The output is deterministic for a
given set of package versions (printed into tests/fixtures/llm/versions.json).
"""

import json
import os
import shutil

import gguf
import numpy as np
import peft
import safetensors.torch
import tokenizers
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

OUT = "tests/fixtures/llm"
SEED = 1234
VOCAB = 400
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# SmolLM2's chat template (from its tokenizer_config.json / GGUF metadata).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TRICKY = (
    "Hello wörld! 12345 naïve café — 日本語   three   spaces\n\n\ttab 3.14159 and 1,000,000 "
    "<|im_start|>user\nWhat's   up?<|im_end|>\n  emoji 🙂🙂 don't I'LL we've x  \n\n\n end"
)

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def pre_tokenizer(name):
    """The Hugging Face pre-tokenizer each GGUF `tokenizer.ggml.pre` name stands for."""
    if name == "smollm":
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    split = {"llama-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}[name]
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )


def train_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer("smollm")
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    with open("../shared/data/tiny_shakespeare.txt", encoding="utf-8") as f:
        text = f.read()[:200_000]
    lines = text.split("\n") + ["naïve café 日本語 🙂 — 3.14159", "don't I'll we've"] * 20
    tok.train_from_iterator(lines, trainer)
    return tok


def variant(base, pre, bos, nfc=False, ignore_merges=False):
    """`base`'s vocabulary and merges with another pre-tokenizer / BOS / normalizer."""
    spec = json.loads(base.to_str())
    tok = Tokenizer.from_str(json.dumps(spec))
    if ignore_merges:
        spec["model"]["ignore_merges"] = True
        tok = Tokenizer.from_str(json.dumps(spec))
    tok.pre_tokenizer = pre_tokenizer(pre)
    tok.normalizer = normalizers.NFC() if nfc else None
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def save_dir(model, tok, path, dtype=torch.float32, shard=None):
    os.makedirs(path, exist_ok=True)
    model.to(dtype).save_pretrained(path, max_shard_size=shard) if shard else model.to(dtype).save_pretrained(path)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>"}, f, indent=1)
    for junk in ("generation_config.json",):
        p = os.path.join(path, junk)
        if os.path.exists(p):
            os.remove(p)


def classic_rope_config(path):
    """Rewrites a config.json in the layout the Hub's Llama 3.2 checkpoints use (`rope_theta` and
    `rope_scaling` at the top level) instead of transformers 5's `rope_parameters`, so the loader
    is tested on both."""
    with open(path) as f:
        c = json.load(f)
    rope = c.pop("rope_parameters")
    c["rope_theta"] = rope.pop("rope_theta")
    c["rope_scaling"] = rope
    with open(path, "w") as f:
        json.dump(c, f, indent=2)


def inputs():
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(3, VOCAB, (2, 11), generator=g)


def reference_logits(model, path, ids):
    """Logits of `model` (an in-memory model, or a saved directory that transformers loads
    afresh in float32, as a user would) for `ids`."""
    if isinstance(model, str):
        model = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    model = model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().contiguous()
    safetensors.torch.save_file({"input_ids": ids.to(torch.int64), "logits": logits}, path)


def llama_config(**kw):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=2,
    )
    base.update(kw)
    return transformers.LlamaConfig(**base)


def random_model(cls, cfg):
    torch.manual_seed(SEED)
    m = cls(cfg)
    with torch.no_grad():  # larger than the default init, so layers matter in the logits
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return m.eval()


def permute(w, n_head, n_head_kv):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def add_tokenizer_metadata(w, tok, pre, bos_id=None, template=None):
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    specials = {a["id"] for a in spec["added_tokens"] if a["special"]}
    types = [gguf.TokenType.CONTROL if i in specials else gguf.TokenType.NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(2)
    if bos_id is not None:
        w.add_bos_token_id(bos_id)
    w.add_add_bos_token(bos_id is not None)
    if template:
        w.add_chat_template(template)


def write_gguf(model, cfg, tok, path):
    """The Llama as llama.cpp's converter writes it: permuted q/k, ggml names, mixed types."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("fedlora tiny llama fixture")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    add_tokenizer_metadata(w, tok, "smollm", bos_id=0, template=CHAT_TEMPLATE)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    dequant = {}

    def put(name, arr, qtype):
        data = gguf.quants.quantize(arr, qtype) if qtype not in (Q.F32,) else arr.astype(np.float32)
        w.add_tensor(name, data, raw_dtype=qtype)
        if name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.0.ffn_up.weight", "blk.1.attn_output.weight"):
            dequant[name] = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, qtype)).astype(np.float32))

    put("token_embd.weight", sd["model.embed_tokens.weight"], Q.Q8_0)
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            suffix = "weight"
            arr = sd[f"model.layers.{i}.{hf}.{suffix}"]
            if hf == "self_attn.q_proj":
                arr = permute(arr, cfg.num_attention_heads, cfg.num_attention_heads)
            if hf == "self_attn.k_proj":
                arr = permute(arr, cfg.num_attention_heads, cfg.num_key_value_heads)
            if "norm" in hf:
                qtype = Q.F32
            elif i == 1 and hf == "self_attn.o_proj":
                qtype = Q.F16
            else:
                qtype = Q.Q4_1
            put(f"blk.{i}.{gg}.weight", arr, qtype)
    put("output_norm.weight", sd["model.norm.weight"], Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dequant


def tokenizer_only_gguf(tok, pre, path):
    w = gguf.GGUFWriter(path, "llama")
    add_tokenizer_metadata(w, tok, pre)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    torch.manual_seed(SEED)
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    base = train_tokenizer()
    ids = inputs()
    expected = {"text": TRICKY, "ids": {}}

    # 1. Llama: GQA, tied embeddings, f32; tokenizer adds BOS (<|endoftext|>)
    llama_tok = variant(base, "smollm", bos="<|endoftext|>")
    cfg = llama_config()
    llama = random_model(transformers.LlamaForCausalLM, cfg)
    save_dir(llama, llama_tok, f"{OUT}/llama")
    reference_logits(f"{OUT}/llama", f"{OUT}/llama/reference.safetensors", ids)
    expected["ids"]["llama"] = llama_tok.encode(TRICKY).ids

    # 1b. a PEFT LoRA adapter on it (random A and B), and the logits PEFT computes with it
    torch.manual_seed(SEED + 1)
    base_for_peft = transformers.AutoModelForCausalLM.from_pretrained(f"{OUT}/llama", dtype=torch.float32)
    lcfg = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    peft.get_peft_model(base_for_peft, lcfg).save_pretrained(f"{OUT}/llama_adapter")
    adapted = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(f"{OUT}/llama", dtype=torch.float32), f"{OUT}/llama_adapter"
    )
    reference_logits(adapted, f"{OUT}/llama_adapter/reference.safetensors", ids)
    os.remove(f"{OUT}/llama_adapter/README.md") if os.path.exists(f"{OUT}/llama_adapter/README.md") else None

    # 2. the same Llama as GGUF, and what transformers computes from that GGUF
    dequant = write_gguf(llama, cfg, llama_tok, f"{OUT}/llama.gguf")
    safetensors.torch.save_file(dequant, f"{OUT}/gguf_dequant.safetensors")
    from_gguf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.abspath(OUT), gguf_file="llama.gguf", dtype=torch.float32
    )
    reference_logits(from_gguf, f"{OUT}/llama_gguf_reference.safetensors", ids)
    with torch.no_grad():  # sanity: quantization noise only (a wrong q/k permutation is far off)
        drift = (from_gguf(input_ids=ids).logits - llama(input_ids=ids).logits).abs().max().item()
    print(f"GGUF vs f32 llama, max |logit diff| = {drift:.4f}")

    # 3. Llama 3.2 style: llama3 RoPE scaling, separate lm_head, bf16 weights, sharded
    cfg3 = llama_config(
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    llama3 = random_model(transformers.LlamaForCausalLM, cfg3).to(torch.bfloat16)
    save_dir(llama3, variant(base, "llama-bpe", bos="<|endoftext|>", ignore_merges=True), f"{OUT}/llama3", torch.bfloat16, "60KB")
    classic_rope_config(f"{OUT}/llama3/config.json")
    reference_logits(f"{OUT}/llama3", f"{OUT}/llama3/reference.safetensors", ids)

    # 4. Qwen2: q/k/v bias, NFC + Qwen2's split, no BOS
    qcfg = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
    )
    qwen = random_model(transformers.Qwen2ForCausalLM, qcfg)
    qwen_tok = variant(base, "qwen2", bos=None, nfc=True)
    save_dir(qwen, qwen_tok, f"{OUT}/qwen2")
    reference_logits(f"{OUT}/qwen2", f"{OUT}/qwen2/reference.safetensors", ids)
    expected["ids"]["qwen2"] = qwen_tok.encode(TRICKY).ids

    # 5. the GGUF-metadata tokenizers of the other two pre-tokenizer names
    for pre, kw in (("llama-bpe", dict(ignore_merges=True)), ("qwen2", dict(nfc=True))):
        tokenizer_only_gguf(base, pre, f"{OUT}/tok_{pre}.gguf")
        expected["ids"][f"gguf_{pre}"] = variant(base, pre, bos=None, **kw).encode(TRICKY).ids
    expected["ids"]["llama3"] = variant(base, "llama-bpe", bos="<|endoftext|>", ignore_merges=True).encode(TRICKY).ids

    # 6. the chat template as transformers renders it
    hf_tok = transformers.AutoTokenizer.from_pretrained(f"{OUT}/llama")
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    expected["chat"] = {
        "messages": messages,
        "rendered": hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
    }
    with open(f"{OUT}/expected.json", "w") as f:
        json.dump(expected, f, indent=1, ensure_ascii=False)
    with open(f"{OUT}/versions.json", "w") as f:
        json.dump(
            {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__,
                "gguf": getattr(gguf, "__version__", "0.19.0"),
                "peft": peft.__version__,
            },
            f,
            indent=1,
        )
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
