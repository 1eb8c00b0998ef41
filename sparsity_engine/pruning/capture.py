"""Calibration activations: capture the inputs of block 0, run a block on them, accumulate layer Hessians.

The model's own forward computes everything before the first block (embeddings, masks, rotary position
embeddings); a forward pre-hook on block 0 records the block's arguments and raises a private exception, so
nothing past the embeddings runs. From then on each block is called directly on the recorded arguments.

Where the activations live (``BlockInputs.offload``): on the compute device when they fit, else in pinned
host memory, copied to the device one batch at a time (asynchronously) and back after the block ran.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .models import BlockLayout, weight_out_in


class _StopForward(Exception):
    """Raised by the block-0 pre-hook once its inputs are recorded: nothing past the embeddings runs."""


@dataclass
class BlockInputs:
    """The activations entering the current block, one entry per batch.

    ``hidden[b]``: [batch, seqlen, hidden] (on ``device``, or in pinned host memory when ``offload``);
    ``extra_args[b]`` / ``kwargs[b]``: the block's other positional and keyword arguments for that batch
    (masks, position embeddings ...), on the compute device.
    """

    hidden: List[torch.Tensor]
    extra_args: List[tuple]
    kwargs: List[dict]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    offload: bool = False

    @property
    def nsamples(self) -> int:
        return sum(h.shape[0] for h in self.hidden)

    @property
    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden)

    def batch(self, b: int) -> torch.Tensor:
        """Batch ``b``'s hidden states on the compute device."""
        h = self.hidden[b]
        return h.to(self.device, non_blocking=True) if self.offload else h

    def replace(self, b: int, out: torch.Tensor) -> None:
        if self.offload:
            self.hidden[b].copy_(out, non_blocking=True)
        else:
            self.hidden[b] = out

    def move_to_host(self) -> None:
        """Keep the hidden states in pinned host memory from now on (they do not fit the device)."""
        if self.offload or self.device.type != "cuda":
            return
        self.hidden = [h.to("cpu").pin_memory() for h in self.hidden]
        self.offload = True


def modules_outside(model: nn.Module, layout: BlockLayout) -> List[nn.Module]:
    """Every module of ``model`` that is not inside the block stack (embeddings, norms, heads, rotary tables)."""
    inside = {id(m) for m in layout.blocks.modules()}
    return [m for m in model.modules() if id(m) not in inside]


def _move_own_tensors(module: nn.Module, device) -> None:
    for key, p in module._parameters.items():
        if p is not None and p.device != torch.device(device):
            p.data = p.data.to(device)
    for key, b in module._buffers.items():
        if b is not None:
            module._buffers[key] = b.to(device)


def move_outside_blocks(model: nn.Module, layout: BlockLayout, device) -> None:
    """Move embeddings, norms, heads, rotary tables (everything but the blocks) to ``device``."""
    for mod in modules_outside(model, layout):
        _move_own_tensors(mod, device)


def _forward_kwargs(model: nn.Module, ids: torch.Tensor) -> Dict[str, Any]:
    kw: Dict[str, Any] = {"input_ids": ids}
    params = inspect.signature(model.forward).parameters
    if "attention_mask" in params:
        kw["attention_mask"] = torch.ones_like(ids)
    if "use_cache" in params:
        kw["use_cache"] = False
    return kw


@torch.no_grad()
def capture_block_inputs(model: nn.Module, layout: BlockLayout, ids: torch.Tensor, *, device,
                         batch_size: int = 8, move: bool = True) -> BlockInputs:
    """Run the model's head on ``ids`` [nsamples, seqlen] and record block 0's inputs per batch.

    With ``move`` the modules outside the blocks are moved to ``device`` for the capture and back to the CPU
    after it; without, they must already be on ``device`` (the streaming job loads them there).
    """
    device = torch.device(device)
    record = BlockInputs([], [], [], device=device)

    def hook(module, args, kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        record.hidden.append(hidden.detach())
        record.extra_args.append(rest)
        record.kwargs.append(dict(kwargs))
        raise _StopForward

    if move:
        move_outside_blocks(model, layout, device)
    handle = layout.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start:start + batch_size].to(device)
            try:
                model(**_forward_kwargs(model, batch))
            except _StopForward:
                continue
            raise RuntimeError(f"{type(model).__name__}'s forward never reached block 0 "
                               f"('{layout.block_name(0)}'); cannot capture calibration inputs")
    finally:
        handle.remove()
        if move:
            move_outside_blocks(model, layout, "cpu")
    return record


def first_output(out):
    """A block's hidden-state output (blocks return a tensor or a tuple whose first entry it is)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, *, replace: bool) -> None:
    """Forward every batch through ``block``; with ``replace`` the outputs become the inputs of the next block."""
    for b in range(len(inputs.hidden)):
        out = first_output(block(inputs.batch(b), *inputs.extra_args[b], **inputs.kwargs[b]))
        if replace:
            inputs.replace(b, out)


@torch.no_grad()
def collect_hessians(block: nn.Module, layers: Dict[str, nn.Module], inputs: BlockInputs, *,
                     device, backend: Optional[str] = None) -> Dict[str, Any]:
    """One forward pass of ``block`` with hooks: a HessianAccumulator per distinct input of ``layers``.

    Returns {layer name: accumulator}; layers that read the very same tensor (q/k/v, gate/up) share one, so
    its ``X^T X`` is accumulated once. No host synchronisation: the hooks only queue device work.
    """
    from ..ops.hessian import HessianAccumulator

    accs: Dict[str, Any] = {}
    leader: Dict[str, str] = {}          # layer -> layer whose accumulator it shares (decided on batch 0)
    # input identity -> (first layer that saw it, the tensor): holding the tensor until the batch ends keeps
    # its address from being reused by a later, different input of the same shape
    seen: Dict[tuple, tuple] = {}

    def make_hook(name: str, columns: int):
        def hook(module, args, output):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), x.dtype)
            first = seen.setdefault(key, (name, x))[0]
            if name not in leader:
                leader[name] = first
            elif first != leader[name]:
                raise RuntimeError(f"layer {name} shared its input with {leader[name]} on the first batch "
                                   f"but not on a later one; cannot share its Hessian")
            if leader[name] == name:
                if name not in accs:
                    accs[name] = HessianAccumulator(columns, device=device, backend=backend)
                accs[name].add_batch(x)
        return hook

    handles = [mod.register_forward_hook(make_hook(name, weight_out_in(mod).shape[1]))
               for name, mod in layers.items()]
    try:
        for b in range(len(inputs.hidden)):
            seen.clear()
            block(inputs.batch(b), *inputs.extra_args[b], **inputs.kwargs[b])
    finally:
        for h in handles:
            h.remove()
    return {name: accs[leader[name]] for name in layers if name in leader}
