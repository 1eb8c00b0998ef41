"""Perplexity with the protocol of the SparseGPT / GPTQ papers, streamed block by block like the prune job.

The text is tokenized once with the tokenizer's defaults and cut into consecutive windows of ``seqlen`` tokens;
the first ``nsamples`` windows (default: all) are used; perplexity = exp(mean over windows of the causal-LM
loss), each window's loss as transformers computes it (``model(input_ids=w, labels=w).loss``).

Streaming: the embeddings run once to capture block 0's inputs; each block is then read from disk, run on the
windows' activations and released, so the model never has to fit host memory; at the end the model's own
forward runs again with every block replaced by a replay of the activations already computed, so the final
norm, the head and the loss are exactly transformers' (logit scaling, soft-capping and all).

Default text: ``sparsity_engine/data/eval.txt``, English prose written for this package and held out from the
calibration corpus.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .capture import BlockInputs, capture_block_inputs, first_output
from .settings import ConfigError, InputError

EVAL_FILE = "eval.txt"
DEFAULT_SEQLEN = 2048
_REPLAY_ROWS = 2         # windows per replayed forward: bounds the [rows, seqlen, vocab] logits


def check_causal_lm(model: nn.Module) -> None:
    """Perplexity needs a language-model head (a ...ForCausalLM / ...LMHeadModel class)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ConfigError(f"perplexity needs a causal language model with a head; {type(model).__name__} has "
                          "none (an encoder or a bare model)")


def bundled_eval_path() -> str:
    from .calibration import DATA_DIR

    return os.path.join(DATA_DIR, EVAL_FILE)


def token_stream(path: Optional[str], tokenizer) -> torch.Tensor:
    """The whole text as one 1-D stream of token ids (tokenizer defaults), or pre-tokenised ids (.pt /
    .safetensors, [T] or [1, T])."""
    from .calibration import CalibrationError, load_token_tensor, read_text

    try:
        if path is not None and path.endswith((".pt", ".safetensors")):
            ids = load_token_tensor(path)
            if ids.dim() == 2 and ids.shape[0] != 1:
                raise CalibrationError(f"{path}: evaluation ids must be one stream [T] or [1, T], got "
                                       f"{list(ids.shape)}")
            return ids.reshape(-1)
        text = read_text(path or bundled_eval_path())
    except CalibrationError as exc:
        raise InputError(str(exc).replace("calibration", "evaluation")) from None
    if tokenizer is None:
        raise InputError("evaluating text needs the model's tokenizer and the model folder has none; pass "
                         "pre-tokenised ids (--text ids.pt)")
    return torch.as_tensor(tokenizer(text, return_tensors="pt")["input_ids"]).reshape(-1).long()


def eval_windows(folder, tokenizer, path: Optional[str], *, seqlen: Optional[int] = None,
                 nsamples: Optional[int] = None) -> torch.Tensor:
    """[n, seqlen] consecutive windows of the text (the first ``nsamples``; all when None)."""
    from .jobstate import check_seqlen

    limit = folder.max_positions()
    seqlen = seqlen if seqlen is not None else min(DEFAULT_SEQLEN, limit or DEFAULT_SEQLEN)
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise ConfigError(f"eval seqlen must be an integer >= 2, got {seqlen!r}")
    check_seqlen(folder, seqlen, "eval seqlen")
    stream = token_stream(path, tokenizer)
    vocab = getattr(folder.config, "vocab_size", None)
    if vocab is not None and stream.numel() and (int(stream.max()) >= vocab or int(stream.min()) < 0):
        raise InputError(f"evaluation token ids must lie in [0, {vocab}) for this model")
    available = stream.numel() // seqlen
    if available == 0:
        raise InputError(f"the evaluation text has {stream.numel()} tokens, fewer than one window of {seqlen}; "
                         "use a longer text or a shorter seqlen")
    if nsamples is not None:
        if isinstance(nsamples, bool) or not isinstance(nsamples, int) or nsamples < 1:
            raise ConfigError(f"eval nsamples must be a positive integer, got {nsamples!r}")
        if nsamples > available:
            raise ConfigError(f"eval nsamples {nsamples} asks for more windows than the text holds "
                              f"({available} of {seqlen} tokens)")
        available = nsamples
    return stream[:available * seqlen].reshape(available, seqlen).clone()


class PerplexityRun:
    """The windows' activations, advanced one block at a time (``step``), then scored (:func:`score`)."""

    def __init__(self, ids: torch.Tensor, inputs: BlockInputs):
        self.ids = ids
        self.inputs = inputs
        self._tuple_len: Optional[int] = None

    @torch.no_grad()
    def step(self, block: nn.Module) -> None:
        x = self.inputs
        for b in range(len(x.hidden)):
            out = block(x.batch(b), *x.extra_args[b], **x.kwargs[b])
            self._tuple_len = len(out) if isinstance(out, (tuple, list)) else None
            x.replace(b, first_output(out))


class PerplexityPair:
    """Dense and pruned perplexity in one pass of a prune job: both start from one capture of block 0's
    inputs; ``dense.step`` runs each block before it is pruned, ``pruned.step`` after. With ``dist`` (several
    processes) ``ids`` are this rank's windows and the scores are summed over the ranks."""

    def __init__(self, model: nn.Module, layout, ids: torch.Tensor, device, batch_size: int, dist=None):
        x = capture_block_inputs(model, layout, ids, device=device, batch_size=batch_size, move=False)
        y = BlockInputs([h.clone() for h in x.hidden], x.extra_args, x.kwargs, device=x.device)
        self.model, self.layout, self.ids, self.device, self.dist = model, layout, ids, device, dist
        self.dense, self.pruned = PerplexityRun(ids, x), PerplexityRun(ids, y)

    def inputs(self) -> List[BlockInputs]:
        return [self.dense.inputs, self.pruned.inputs]

    def finish(self, loader, tensors, outside: List[str]) -> Dict[str, Any]:
        from .capture import move_outside_blocks

        tensors.set(loader.place(loader.submit(outside).result()))
        move_outside_blocks(self.model, self.layout, self.device)
        try:
            return {"dense": score(self.model, self.layout, self.dense, dist=self.dist),
                    "pruned": score(self.model, self.layout, self.pruned, dist=self.dist)}
        finally:
            tensors.release(outside)


class _Replay(nn.Module):
    """Stands in for a block during scoring: the last block returns the activations already computed for the
    rows being scored, every other block passes its input through, in the block's own output format."""

    def __init__(self, last: bool, run: PerplexityRun):
        super().__init__()
        self.last, self.run, self.rows = last, run, None

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.last:
            b, r0, r1 = self.rows
            hidden = self.run.inputs.batch(b)[r0:r1]
        n = self.run._tuple_len
        return hidden if n is None else (hidden,) + (None,) * (n - 1)


@torch.no_grad()
def score(model: nn.Module, layout, run: PerplexityRun, dist=None) -> Dict[str, Any]:
    """exp(mean window loss) with the model's own forward over replayed blocks (module docstring). With ``dist``
    the windows' summed losses and counts are summed over the ranks first (a rank may hold no window)."""
    from .capture import _forward_kwargs

    blocks = layout.blocks
    originals = list(blocks)
    replays = [_Replay(j == len(originals) - 1, run) for j in range(len(originals))]
    for j, r in enumerate(replays):
        blocks[j] = r
    total, count, start = 0.0, 0, 0
    try:
        for b, h in enumerate(run.inputs.hidden):
            n = h.shape[0]
            for r0 in range(0, n, _REPLAY_ROWS):
                r1 = min(n, r0 + _REPLAY_ROWS)
                replays[-1].rows = (b, r0, r1)
                ids = run.ids[start + r0:start + r1].to(run.inputs.device)
                loss = model(**_forward_kwargs(model, ids), labels=ids).loss
                total += float(loss) * (r1 - r0)
                count += r1 - r0
            start += n
    finally:
        for j, m in enumerate(originals):
            blocks[j] = m
    if dist is not None:
        total, count = dist.sum([total, count], "summing the evaluation losses")
        count = int(count)
    mean = total / count
    return {"perplexity": math.exp(mean), "loss": mean, "windows": count, "seqlen": int(run.ids.shape[1])}


def run_eval(model_dir: str, *, text: Optional[str] = None, seqlen: Optional[int] = None,
             nsamples: Optional[int] = None, device: Optional[str] = None, batch_size: int = 8,
             progress=None, dist=None) -> Dict[str, Any]:
    """Perplexity of the model in ``model_dir`` (streamed; never written to). Returns the result dict.

    ``dist`` (:func:`.distributed.launch`): one of several processes, on ``dist.device``, running its share of
    the windows; every rank returns the same perplexity (memory and bytes are this process's)."""
    from .model_io import ModelFolder, ModelTensors, WeightLoader, device_description, layout_of, move_buffers
    from .progress import Progress
    from .report import device_memory_peak, peak_rss_bytes

    progress = progress or Progress(False)
    t0 = time.perf_counter()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    from .model_io import resolve_device

    dev = resolve_device(device) if dist is None else dist.device
    folder = ModelFolder(model_dir)
    model = folder.skeleton()
    check_causal_lm(model)
    layout = layout_of(model)
    tensors = ModelTensors(model, folder.reader, folder.path)
    ids = eval_windows(folder, folder.tokenizer(), text, seqlen=seqlen, nsamples=nsamples)
    if dist is not None:
        ids = dist.share(ids)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    loader = WeightLoader(folder.reader, tensors, dev)
    outside = tensors.outside(layout)
    names = [tensors.under(layout.block_name(i)) for i in range(len(layout))]
    try:
        from .capture import move_outside_blocks

        tensors.set(loader.place(loader.submit(outside).result()))
        move_outside_blocks(model, layout, dev)
        nxt = loader.submit(names[0])
        run = PerplexityRun(ids, capture_block_inputs(model, layout, ids, device=dev, batch_size=batch_size,
                                                      move=False))
        bar = progress.bar(len(layout), "blocks")
        for i, block in enumerate(layout.blocks):
            tensors.set(loader.place(nxt.result()))
            nxt = loader.submit(names[i + 1]) if i + 1 < len(layout) else None
            move_buffers(block, dev)
            run.step(block)
            tensors.release(names[i])
            bar.update(1)
        bar.close()
        result = score(model, layout, run, dist=dist)
    finally:
        loader.close()
    result.update(model_dir=folder.path, text=text or bundled_eval_path(), device=device_description(dev),
                  seconds=time.perf_counter() - t0, peak_rss_bytes=peak_rss_bytes(),
                  peak_gpu_bytes=device_memory_peak(dev), bytes_read=folder.reader.bytes_read)
    return result
