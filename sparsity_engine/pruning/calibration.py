"""Calibration data: token-id windows [nsamples, seqlen] from text, jsonl, or pre-tokenised tensors.

Sources:

* ``.txt``: the whole file, tokenised once with the model's tokenizer;
* ``.jsonl``: one JSON object per line, its ``"text"`` field (or a plain JSON string per line);
* ``.pt`` / ``.safetensors``: a LongTensor of token ids [N, L] (or 1-D [T], one long stream);
  a ``.safetensors`` file uses its ``input_ids`` tensor (or its only tensor);
* ``None``: the English corpus bundled with the package (``sparsity_engine/data/corpus.txt``).

From a token stream, ``nsamples`` windows of ``seqlen`` tokens start at random offsets drawn from a
``torch.Generator`` seeded with ``seed`` (SparseGPT's recipe); a stream shorter than one window is cycled.
From a pre-tokenised [N, L] tensor, ``nsamples`` rows are drawn (without replacement while N allows) and
cut to ``seqlen``. For encoders (a tokenizer with [CLS]/[SEP]), each window is wrapped in them.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional

import torch

from .._validate import check_int

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
CORPUS_FILE = "corpus.txt"
HELDOUT_FILE = "heldout.txt"


class CalibrationError(ValueError):
    """A calibration source that cannot be read or is too small; the message says which and why."""


def bundled_corpus_path() -> str:
    return os.path.join(DATA_DIR, CORPUS_FILE)


def bundled_text() -> str:
    with open(bundled_corpus_path(), encoding="utf-8") as f:
        return f.read()


def heldout_sentences(limit: Optional[int] = None) -> List[str]:
    """Held-out English sentences (never in the calibration corpus), one per line, in related pairs."""
    with open(os.path.join(DATA_DIR, HELDOUT_FILE), encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    return lines if limit is None else lines[:limit]


def read_text(path: str) -> str:
    """The text of a .txt file, or the concatenated ``text`` fields of a .jsonl file; a missing, binary
    (NUL bytes or not UTF-8) or empty file is refused, naming it."""
    if not os.path.isfile(path):
        raise CalibrationError(f"calibration file {path!r} does not exist or is not a file")
    with open(path, "rb") as f:
        raw = f.read()
    if b"\x00" in raw:
        raise CalibrationError(f"calibration file {path!r} is not a text file (it holds NUL bytes: binary data); "
                               "pass UTF-8 text, or token ids as .pt / .safetensors")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"calibration file {path!r} is not a text file (not UTF-8: {exc})") from None
    if path.endswith(".jsonl"):
        text = "\n\n".join(_jsonl_texts(text.splitlines(), path))
    if not text.strip():
        raise CalibrationError(f"calibration file {path!r} holds no text")
    return text


def _jsonl_texts(f, path: str) -> List[str]:
    texts = []
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if isinstance(obj, str):
            texts.append(obj)
        elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
            texts.append(obj["text"])
        else:
            raise CalibrationError(f"{path}:{lineno}: expected a JSON string or an object with a 'text' string")
    return texts


def load_token_tensor(path: str) -> torch.Tensor:
    """A pre-tokenised LongTensor from .pt or .safetensors (``input_ids`` or the only tensor)."""
    if not os.path.isfile(path):
        raise CalibrationError(f"calibration file {path!r} does not exist or is not a file")
    if path.endswith(".safetensors"):
        from ..io import SafetensorsReader

        try:
            with SafetensorsReader(path) as reader:
                tensors = {k: reader.get(k) for k in reader.keys()}
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"calibration file {path!r} cannot be read: {exc}") from None
        if "input_ids" in tensors:
            ids = tensors["input_ids"]
        elif len(tensors) == 1:
            ids = next(iter(tensors.values()))
        else:
            raise CalibrationError(f"{path}: expected an 'input_ids' tensor (or exactly one tensor), "
                                   f"found {sorted(tensors)}")
    else:
        ids = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(ids, dict) and "input_ids" in ids:
            ids = ids["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dim() not in (1, 2):
        raise CalibrationError(f"{path}: expected an integer tensor of token ids [N, L] or [T]")
    return ids.long()


def _windows_from_stream(stream: torch.Tensor, nsamples: int, seqlen: int, gen: torch.Generator) -> torch.Tensor:
    if stream.numel() == 0:
        raise CalibrationError("the calibration source holds no tokens")
    if stream.numel() < seqlen:
        reps = -(-seqlen // stream.numel()) + 1
        stream = stream.repeat(reps)
    starts = torch.randint(0, stream.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([stream[s:s + seqlen] for s in starts.tolist()])


def _rows_from_matrix(ids: torch.Tensor, nsamples: int, seqlen: int, gen: torch.Generator) -> torch.Tensor:
    if ids.shape[1] < seqlen:
        raise CalibrationError(f"pre-tokenised rows have {ids.shape[1]} tokens, fewer than seqlen={seqlen}")
    n = ids.shape[0]
    if nsamples <= n:
        rows = torch.randperm(n, generator=gen)[:nsamples]
    else:
        rows = torch.randint(0, n, (nsamples,), generator=gen)
    return ids[rows, :seqlen].contiguous()


def _special_ids(tokenizer):
    cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    return (cls, sep) if cls is not None and sep is not None else (None, None)


def tokenize_text(text: str, tokenizer) -> torch.Tensor:
    """One long 1-D stream of token ids (no special tokens) for ``text``."""
    if tokenizer is None:
        raise CalibrationError("text calibration data needs the model's tokenizer, and none was found in the "
                               "model folder; pass pre-tokenised ids (.pt / .safetensors) instead")
    enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return torch.tensor(enc["input_ids"], dtype=torch.long)


def calibration_ids(source: Optional[str], tokenizer, *, nsamples: int = 128, seqlen: int = 2048,
                    seed: int = 0, vocab_size: Optional[int] = None) -> torch.Tensor:
    """LongTensor [nsamples, seqlen] of token ids for calibration (see the module docstring)."""
    nsamples = check_int("nsamples", nsamples, minimum=1)
    seqlen = check_int("seqlen", seqlen, minimum=1)
    gen = torch.Generator().manual_seed(int(seed))
    cls, sep = _special_ids(tokenizer)
    wrap = cls is not None and seqlen >= 3
    inner = seqlen - 2 if wrap else seqlen
    if source is not None and source.endswith((".pt", ".safetensors", ".bin")):
        ids = load_token_tensor(source)
        ids = _rows_from_matrix(ids, nsamples, seqlen, gen) if ids.dim() == 2 else \
            _windows_from_stream(ids, nsamples, seqlen, gen)
    else:
        text = bundled_text() if source is None else read_text(source)
        ids = _windows_from_stream(tokenize_text(text, tokenizer), nsamples, inner, gen)
        if wrap:
            ids = torch.cat([torch.full((nsamples, 1), cls), ids, torch.full((nsamples, 1), sep)], dim=1)
    if vocab_size is not None and ids.numel() and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        raise CalibrationError(f"calibration token ids must lie in [0, {vocab_size}) for this model, "
                               f"got [{int(ids.min())}, {int(ids.max())}]")
    return ids
