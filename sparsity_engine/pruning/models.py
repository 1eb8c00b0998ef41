"""Find the transformer blocks of a Hugging Face model and the Linear / Conv1D layers inside each block.

Known layouts (attribute path of the block list):

=====================  ==========================================
LLaMA / Mistral / Qwen2  ``model.layers``
OPT                      ``model.decoder.layers``
GPT-2                    ``transformer.h`` (linears are ``Conv1D``)
BERT-style encoders      ``encoder.layer`` / ``bert.encoder.layer``
=====================  ==========================================

An unknown model falls back to the largest ``nn.ModuleList`` of identical blocks that hold linears; a
model with no such list raises a ValueError naming its class. Everything outside the blocks (embeddings,
final norms, ``lm_head``, poolers) is never pruned by the pipeline.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

# attribute paths tried in order; the first that resolves to an nn.ModuleList wins
KNOWN_BLOCK_PATHS = (
    "model.layers",            # LLaMA, Mistral, Qwen2, Gemma, Phi-3 (CausalLM wrappers)
    "layers",                  # the same bare models (LlamaModel ...)
    "model.decoder.layers",    # OPT (OPTForCausalLM)
    "decoder.layers",          # OPTModel
    "transformer.h",           # GPT-2, GPT-J, BLOOM-like (LMHead wrappers)
    "h",                       # GPT2Model
    "bert.encoder.layer",      # BertFor*
    "roberta.encoder.layer",
    "encoder.layer",           # BertModel, RobertaModel, MiniLM sentence encoders
)

DEFAULT_SKIP = ("lm_head", "*embed*", "*wte*", "*wpe*", "*pooler*")


@dataclass
class BlockLayout:
    """Where the blocks are: ``blocks`` is the ModuleList, ``prefix`` its qualified name in the model."""

    model_class: str
    prefix: str
    blocks: nn.ModuleList

    def __len__(self) -> int:
        return len(self.blocks)

    def block_name(self, index: int) -> str:
        return f"{self.prefix}.{index}" if self.prefix else str(index)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer whose weight is stored [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "weight") and hasattr(module, "nf")


def is_prunable_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight in [out_features, in_features] orientation (a view for Conv1D)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def set_weight_out_in_(module: nn.Module, w: torch.Tensor) -> None:
    """Copy ``w`` ([out, in]) into the module's weight, whatever its storage orientation."""
    with torch.no_grad():
        target = module.weight.t() if is_conv1d(module) else module.weight
        target.copy_(w.to(target.dtype))


def _resolve(model: nn.Module, path: str) -> Optional[nn.Module]:
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _has_linears(module: nn.Module) -> bool:
    return any(is_prunable_linear(m) for m in module.modules())


def _fallback_blocks(model: nn.Module) -> Optional[BlockLayout]:
    """The largest ModuleList of same-class children that contain linears (the usual block stack)."""
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 1:
            continue
        classes = {type(child) for child in mod}
        if len(classes) != 1 or not _has_linears(mod[0]):
            continue
        if best is None or len(mod) > len(best[1]):
            best = (name, mod)
    if best is None:
        return None
    return BlockLayout(type(model).__name__, best[0], best[1])


def find_blocks(model: nn.Module) -> BlockLayout:
    """The transformer block stack of ``model``; ValueError naming the class if none is recognised."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for path in KNOWN_BLOCK_PATHS:
        mod = _resolve(model, path)
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and _has_linears(mod[0]):
            return BlockLayout(type(model).__name__, path, mod)
    layout = _fallback_blocks(model)
    if layout is None:
        raise ValueError(
            f"cannot find the transformer blocks of {type(model).__name__}: none of the known layouts "
            f"({', '.join(KNOWN_BLOCK_PATHS)}) and no nn.ModuleList of identical blocks holding Linear/Conv1D "
            "layers; supported: LLaMA / Mistral / Qwen2, OPT, GPT-2, BERT-style encoders")
    return layout


def find_linears(block: nn.Module, *, prefix: str = "") -> Dict[str, nn.Module]:
    """Every nn.Linear / Conv1D inside ``block``, keyed by qualified name (``prefix.`` prepended)."""
    found = {}
    for name, mod in block.named_modules():
        if is_prunable_linear(mod):
            found[f"{prefix}.{name}" if prefix else name] = mod
    return found


def matches(name: str, patterns: Iterable[str]) -> bool:
    """fnmatch of a qualified layer name against patterns; a bare pattern also matches as a name suffix."""
    for pat in patterns:
        if fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(name, f"*.{pat}"):
            return True
    return False


def non_block_modules(model: nn.Module, layout: BlockLayout) -> List[str]:
    """Names of the top-level-ish parameters outside the block stack (embeddings, norms, heads)."""
    prefix = layout.prefix + "."
    return [n for n, _ in model.named_parameters() if not n.startswith(prefix)]


def describe(model: nn.Module, layout: Optional[BlockLayout] = None) -> str:
    layout = layout or find_blocks(model)
    lin = find_linears(layout.blocks[0])
    return (f"{layout.model_class}: {len(layout)} blocks at '{layout.prefix}', "
            f"{len(lin)} linears per block ({', '.join(lin)})")


def unique_names(names: Sequence[str]) -> List[str]:
    seen, out = set(), []
    for n in names:
        if n not in seen:
            seen.add(n)
            out.append(n)
    return out
