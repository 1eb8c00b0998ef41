"""Tiny LLaMA checkpoints for the merge tests: a base and fine-tunes (base + small random deltas), written
with transformers' save_pretrained (safetensors), and a helper that runs mergekit 0.1.5's own merge."""
import os
import shutil

import torch


def llama_config(vocab=24, hidden=8, layers=2, intermediate=16, tie=False):
    import transformers

    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                    num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                    max_position_embeddings=64, tie_word_embeddings=tie)


def write_llama(path, *, seed, base=None, delta_scale=0.05, dtype=torch.float32, tokenizer_dir=None, **cfg):
    """Save a tiny LlamaForCausalLM at ``path``: random (seeded) or ``base``'s weights + N(0, delta_scale^2)
    per entry (a fine-tune). Returns the path. ``tokenizer_dir``: tokenizer files copied next to it."""
    import transformers

    gen = torch.Generator().manual_seed(seed)
    config = llama_config(**cfg)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if base is not None:
                p.copy_(base[name] + delta_scale * torch.randn(p.shape, generator=gen))
            elif "norm" in name:  # norms of random size, so they take part in the merge like any weight
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    for f in os.listdir(tokenizer_dir) if tokenizer_dir else ():
        if f.startswith("tokenizer") or f in ("vocab.txt", "special_tokens_map.json"):
            shutil.copy(os.path.join(tokenizer_dir, f), os.path.join(path, f))
    return str(path)


def state_dict(path):
    """Every tensor of a model folder (any safetensors layout), read with the package's one reader."""
    from sparsity_engine.io import SafetensorsReader

    with SafetensorsReader(path) as r:
        return {k: r.get(k) for k in r.keys()}


def write_models(root, n_finetuned=3, **kw):
    """(base path, [fine-tuned paths]) under ``root``."""
    base = write_llama(os.path.join(root, "base"), seed=100, **kw)
    sd = state_dict(base)
    kw.pop("dtype", None)
    fts = [write_llama(os.path.join(root, f"ft{i}"), seed=200 + i, base={k: v.float() for k, v in sd.items()},
                       **kw) for i in range(n_finetuned)]
    return base, fts


def run_mergekit(config_text, out_dir, *, seed=None, device="cpu"):
    """mergekit 0.1.5's own merge (run_merge, as mergekit-yaml runs it) of a YAML config; returns out_dir."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(yaml.safe_load(config_text))
    run_merge(config, str(out_dir), options=MergeOptions(device=device, random_seed=seed, quiet=True,
                                                         write_model_card=False, copy_tokenizer=False))
    return str(out_dir)
