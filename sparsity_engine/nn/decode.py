"""Decode-speed measurement: a minimal LLaMA decoder (static KV cache, one token per step, capturable in one CUDA
graph) whose linear layers are plain nn.Linear, so ``sparsify_linears_`` converts them like any model's.

Used by ``benchmarks/bench_decode.py`` and ``sparsity-engine bench-decode``: the dense (masked) model and its
sparse conversion are timed the same way (a CUDA graph of one greedy decode step, replayed), batch 1.

The modules follow transformers' LlamaForCausalLM names (``model.layers.0.self_attn.q_proj`` ...), so a LLaMA
model folder's safetensors load into it directly (:func:`load_folder`); :func:`build_random` makes one with
random weights from a ``transformers.LlamaConfig`` (or any object with its fields) on the GPU.
"""
from __future__ import annotations

import os
import time
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg, device, dtype):
        super().__init__()
        d, self.heads, self.kv_heads = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = d // self.heads
        kw = dict(bias=False, device=device, dtype=dtype)
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, **kw)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, **kw)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, **kw)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, **kw)

    def forward(self, x, cos, sin, pos, cache_k, cache_v, mask):
        q = self.q_proj(x).view(1, 1, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(1, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(1, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        cache_k.index_copy_(2, pos, k)
        cache_v.index_copy_(2, pos, v)
        rep = self.heads // self.kv_heads
        keys = cache_k.repeat_interleave(rep, 1) if rep > 1 else cache_k
        vals = cache_v.repeat_interleave(rep, 1) if rep > 1 else cache_v
        out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(1, 1, self.heads * self.head_dim))


def _rotate(t, cos, sin):
    half = t.shape[-1] // 2
    rot = torch.cat((-t[..., half:], t[..., :half]), -1)
    return t * cos + rot * sin


class MLP(nn.Module):
    def __init__(self, cfg, device, dtype):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, device, dtype):
        super().__init__()
        eps = getattr(cfg, "rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, device, dtype)
        self.self_attn = Attention(cfg, device, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, device, dtype)
        self.mlp = MLP(cfg, device, dtype)


class _Model(nn.Module):
    def __init__(self, cfg, device, dtype):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, device, dtype) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, getattr(cfg, "rms_norm_eps", 1e-6), device, dtype)


class DecodeLlama(nn.Module):
    """LLaMA for greedy decoding at batch 1 with a static KV cache: ``step()`` reads the token and position
    buffers, writes the next token and advances the position, all on the GPU (one CUDA graph replays it)."""

    def __init__(self, cfg, device="cuda", dtype=torch.bfloat16):
        super().__init__()
        self.cfg = cfg
        self.model = _Model(cfg, device, dtype)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device=device, dtype=dtype)
        self.cache = None

    def setup_cache(self, max_len: int) -> None:
        """KV caches, rotary tables and the token / position buffers (plain attributes: not weights)."""
        cfg, dev = self.cfg, self.lm_head.weight.device
        dtype = self.lm_head.weight.dtype
        attn = self.model.layers[0].self_attn
        shape = (1, attn.kv_heads, max_len, attn.head_dim)
        theta = float(getattr(cfg, "rope_theta", 10000.0) or 10000.0)
        inv = 1.0 / theta ** (torch.arange(0, attn.head_dim, 2, device=dev, dtype=torch.float32) / attn.head_dim)
        freqs = torch.outer(torch.arange(max_len, device=dev, dtype=torch.float32), inv)
        emb = torch.cat((freqs, freqs), -1)
        self.cache = dict(k=[torch.zeros(shape, device=dev, dtype=dtype) for _ in self.model.layers],
                          v=[torch.zeros(shape, device=dev, dtype=dtype) for _ in self.model.layers],
                          cos=emb.cos().to(dtype), sin=emb.sin().to(dtype), max_len=max_len,
                          token=torch.zeros(1, 1, dtype=torch.long, device=dev),
                          pos=torch.zeros(1, dtype=torch.long, device=dev),
                          steps=torch.arange(max_len, device=dev))
        self.logits = None

    def reset(self, token: int = 1) -> None:
        self.cache["token"].fill_(token)
        self.cache["pos"].zero_()
        for t in self.cache["k"] + self.cache["v"]:
            t.zero_()

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        c = self.cache
        pos = c["pos"]
        cos = c["cos"].index_select(0, pos).view(1, 1, 1, -1)
        sin = c["sin"].index_select(0, pos).view(1, 1, 1, -1)
        mask = (c["steps"] <= pos).view(1, 1, 1, -1)
        h = self.model.embed_tokens(c["token"])
        for i, layer in enumerate(self.model.layers):
            h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, pos, c["k"][i], c["v"][i], mask)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = self.lm_head(self.model.norm(h))
        c["token"].copy_(logits.argmax(-1))
        pos.add_(1)
        return logits


def build_random(cfg, device="cuda", dtype=torch.bfloat16, seed: int = 0) -> DecodeLlama:
    """A DecodeLlama with random weights (nn.Linear's default init, norms at 1), built on ``device``."""
    torch.manual_seed(seed)
    with torch.no_grad():
        return DecodeLlama(cfg, device, dtype).eval()


def load_folder(model_dir: str, device="cuda", dtype=torch.bfloat16) -> DecodeLlama:
    """A LLaMA model folder (config.json + *.safetensors, transformers' names) as a DecodeLlama; no download."""
    from transformers import LlamaConfig

    from ..io import SafetensorsReader

    cfg = LlamaConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):
        model = DecodeLlama(cfg, "meta", dtype)
    model = model.to_empty(device=device)
    with SafetensorsReader(model_dir) as reader:   # the index or the one file; headers checked
        state = {k: reader.get(k).to(device=device, dtype=dtype) for k in reader.keys()
                 if not k.endswith("rotary_emb.inv_freq")}
    if "lm_head.weight" not in state and getattr(cfg, "tie_word_embeddings", False):
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def magnitude_prune_(model: nn.Module, sparsity: float, sample: int = 1 << 20) -> None:
    """Zero the ``sparsity`` fraction of smallest |w| of every block linear (lm_head and embeddings kept). The
    threshold is the (sparsity + 0.002) quantile of a random sample of 2^20 entries per layer: the sample's
    quantile is within ~0.0005 of the layer's, so every layer ends at or just above ``sparsity`` (a layer
    pruned to 49.9% would stay dense under a format rule that starts at 50%)."""
    gen = torch.Generator(device=model.lm_head.weight.device).manual_seed(1)
    for layer in model.model.layers:
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                    layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            if not isinstance(lin, nn.Linear):
                raise TypeError("magnitude_prune_ needs the dense model (its linears are already converted)")
            w = lin.weight
            flat = w.view(-1)
            idx = torch.randint(0, flat.numel(), (min(sample, flat.numel()),), device=w.device, generator=gen)
            thr = flat[idx].float().abs().quantile(min(1.0, sparsity + 0.002)) if sparsity > 0 else None
            if thr is not None:
                w.masked_fill_(w.abs() <= thr.to(w.dtype), 0)


def weight_bytes(model: nn.Module) -> Dict[str, int]:
    """Bytes of every parameter and buffer (the KV cache is not one), and of the block linears alone."""
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    blocks = sum(t.numel() * t.element_size() for t in list(model.model.layers.parameters())
                 + list(model.model.layers.buffers()))
    norms = sum(m.weight.numel() * m.weight.element_size() for m in model.model.layers.modules()
                if isinstance(m, RMSNorm))
    return {"total": total, "linears": blocks - norms}


@torch.no_grad()
def decode_ms(model: DecodeLlama, steps: int = 64, graph: bool = True, repeats: int = 3) -> float:
    """Median ms per decoded token (batch 1) over ``repeats`` runs of ``steps`` steps from an empty cache."""
    if model.cache is None or model.cache["max_len"] < steps + 1:
        model.setup_cache(steps + 1)
    model.reset()
    for _ in range(2):  # warm up: extension loading, kernel attributes, cuBLAS handles
        model.step()
    if not model.lm_head.weight.is_cuda:  # a CPU smoke test: wall clock, no graph
        model.reset()
        t0 = time.perf_counter()
        for _ in range(steps):
            model.step()
        return (time.perf_counter() - t0) / steps * 1e3
    torch.cuda.synchronize()
    run = model.step
    g = None
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model.reset()
            model.step()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            model.step()
        run = g.replay
    times = []
    for _ in range(repeats):
        model.reset()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / steps)
    del g
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def first_logits(model: DecodeLlama, token: int = 1) -> torch.Tensor:
    """The logits of one eager step from an empty cache (for comparing a sparse model with its dense one)."""
    if model.cache is None:
        model.setup_cache(8)
    model.reset(token)
    return model.step().float().reshape(-1)


def summary_row(label: str, model: DecodeLlama, ms: float, eager_ms: Optional[float], dense: Optional[dict],
                logits_ref: Optional[torch.Tensor]) -> dict:
    """One comparison row: ms/token (graph and eager), tokens/s, weight bytes, ratios to the dense row."""
    wb = weight_bytes(model)
    row = dict(model=label, ms_per_token=ms, tokens_per_s=1e3 / ms, eager_ms_per_token=eager_ms,
               weight_gb=wb["total"] / 1e9, linears_gb=wb["linears"] / 1e9)
    if dense is not None:
        row.update(speedup=dense["ms_per_token"] / ms, weight_ratio=row["weight_gb"] / dense["weight_gb"],
                   linears_ratio=row["linears_gb"] / dense["linears_gb"])
    if logits_ref is not None:
        got = first_logits(model)
        row["logits_rel_err"] = float((got - logits_ref).norm() / logits_ref.norm())
        row["top1_same"] = bool(got.argmax() == logits_ref.argmax())
    return row


def llama7b_config():
    """LLaMA-7B shapes: hidden 4096, intermediate 11008, 32 layers, 32 heads, vocabulary 32000."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, rms_norm_eps=1e-5, max_position_embeddings=4096)


def compare(model: DecodeLlama, sparsities, formats=("auto",), steps: int = 64, eager: bool = True,
            prune: bool = True, log=print) -> list:
    """Rows for the dense model and each (sparsity, format) conversion, all timed the same way (graphs)."""
    import copy

    from .convert import sparsify_linears_

    rows = []
    for sp in sparsities:
        if prune:
            magnitude_prune_(model, sp)
        t0 = time.perf_counter()
        ref = first_logits(model)
        dense = summary_row(f"dense (masked {sp:.0%})", model, decode_ms(model, steps),
                            decode_ms(model, max(8, steps // 4), graph=False, repeats=1) if eager else None, None, None)
        from ..metrics import sparsity as measured_sparsity

        dense.update(sparsity=sp, measured_sparsity=round(measured_sparsity(model.model.layers), 4))
        rows.append(dense)
        log(_fmt_row(dense))
        for fmt in formats:
            sparse = copy.deepcopy(model)
            sparse.cache = None
            names = sparsify_linears_(sparse, format=fmt, min_sparsity=0.0, exclude=["lm_head"])
            kinds = {}
            for name, module in sparse.named_modules():
                if name in names:
                    kinds[type(module).__name__] = kinds.get(type(module).__name__, 0) + 1
            try:
                row = summary_row(f"{fmt} ({sp:.0%})", sparse, decode_ms(sparse, steps),
                                  decode_ms(sparse, max(8, steps // 4), graph=False, repeats=1) if eager else None,
                                  dense, ref)
            except RuntimeError as exc:  # one format failing (a capture error, say) must not lose the others
                row = dict(model=f"{fmt} ({sp:.0%})", error=f"{type(exc).__name__}: {exc}"[:300])
            row.update(sparsity=sp, converted=kinds, seconds=round(time.perf_counter() - t0, 1))
            rows.append(row)
            log(_fmt_row(row))
            del sparse
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


def bench_decode(model_dir: Optional[str] = None, sparsities: Optional[Sequence[float]] = (0.5, 0.7),
                 formats: Sequence[str] = ("auto",), steps: int = 64, layers: Optional[int] = None,
                 device: str = "cuda", log=print) -> list:
    """The decode comparison: a model folder (``sparsities=None``: as pruned there) or a random LLaMA-7B-shaped
    model (``layers`` overrides the depth, for a quicker run) magnitude-pruned to each sparsity."""
    if model_dir is not None and not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model folder {model_dir!r} does not exist")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench-decode times CUDA graphs: it needs a CUDA GPU, and none is visible to torch")
    if model_dir is not None:
        model = load_folder(model_dir, device)
    else:
        cfg = llama7b_config()
        if layers is not None:
            cfg.num_hidden_layers = layers
        model = build_random(cfg, device)
    prune = sparsities is not None
    if not prune:
        from ..metrics import sparsity as measured_sparsity

        sparsities = [measured_sparsity(model.model.layers)]
    return compare(model, sparsities, formats, steps=steps, prune=prune, log=log)


def _fmt_row(row: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


__all__ = ["DecodeLlama", "build_random", "load_folder", "magnitude_prune_", "weight_bytes", "decode_ms",
           "compare", "llama7b_config", "bench_decode"]
