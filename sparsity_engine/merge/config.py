"""mergekit's YAML merge configuration: parsed, checked, and resolved per tensor (mergekit 0.1.5 semantics).

Supported, as mergekit reads it::

    merge_method: ties                 # see methods.METHODS
    base_model: path/to/base           # local folders
    models:
      - model: path/to/finetune_a
        parameters: {weight: 1.0, density: 0.5}
    parameters: {normalize: true}      # global parameters; per-model names here apply to every model
    dtype: float32                     # inputs converted to it on load (default: as stored, promoted per tensor)
    out_dtype: bfloat16                # output dtype (default: the compute dtype)
    tokenizer_source: base             # optional; the base's tokenizer is kept (vocabularies must agree)

``slices:`` with a single slice whose sources each cover all of their model's layers (the usual slerp config)
is the same merge as ``models:`` and is accepted. A parameter value is a number / bool, a gradient (a list of
numbers interpolated over the layers: layer i of L gets t = i / (L - 1); tensors outside the layers get t = 0),
or a list of ``{filter: SUBSTRING, value: ...}`` conditions (the first whose filter is in the tensor name, or is
absent / '*', applies). Precedence: the model's own parameters, then the slice's, then the global ones, then
the method's default.

Our addition, ignored by mergekit (its configuration ignores unknown top-level keys)::

    sparsity_engine:
      sparsification: sparsegpt        # prune each block-linear delta with SparseGPT instead of the method's own
      calibration: {file: FILE, nsamples: 128, seqlen: 2048, seed: 0, hessian: per-model,
                    batch_size: 8, blocksize: 128, percdamp: 0.01}

Anything else (other methods, several slices or partial layer ranges, ``modules``, ``tokenizer:``,
``chat_template``, LoRA or hub references, unknown keys or parameters) is refused by :func:`load_config` with a
:class:`MergeConfigError` naming it, before any tensor is read.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .methods import METHODS, MethodSpec, Param

__all__ = ["MergeConfigError", "ModelRef", "MergeConfig", "SparseGPTOptions", "load_config", "parse_config",
           "DTYPES"]

DTYPES = ("float32", "float16", "bfloat16")
_TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "sparsity_engine", "modules", "tokenizer", "chat_template"}
_UNSUPPORTED_KEYS = {
    "modules": "'modules' (per-module merges of multimodal models)",
    "tokenizer": "'tokenizer:' (vocabulary surgery); use tokenizer_source: base or leave it out",
    "chat_template": "'chat_template'",
}
CALIBRATION_DEFAULTS = {"file": None, "nsamples": 128, "seqlen": 2048, "seed": 0, "hessian": "per-model",
                        "batch_size": 8, "blocksize": 128, "percdamp": 0.01}


class MergeConfigError(ValueError):
    """The configuration cannot be run: what is wrong or not supported, by name."""


@dataclass(frozen=True)
class ModelRef:
    """One input model: its folder and its own parameters (as written: scalars, gradients or conditions)."""
    path: str
    parameters: Dict[str, Any] = field(default_factory=dict)

    def __hash__(self):
        return hash(self.path)


@dataclass(frozen=True)
class SparseGPTOptions:
    """SparseGPT sparsification of the task vectors (our addition): calibration text and SparseGPT settings."""
    file: Optional[str] = None   # .txt / .jsonl / token ids (.pt, .safetensors); None: the bundled corpus
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    hessian: str = "per-model"
    batch_size: int = 8
    blocksize: int = 128
    percdamp: float = 0.01


@dataclass
class MergeConfig:
    """A checked configuration. ``inputs``: the models in mergekit's order (the listed models, then the base
    if it is not among them); ``base``: index into ``inputs`` or None."""
    method: str
    inputs: List[ModelRef]
    base: Optional[int]
    global_params: Dict[str, Any]
    slice_params: Dict[str, Any]
    dtype: Optional[str]
    out_dtype: Optional[str]
    tokenizer_source: Optional[str]
    sparsegpt: Optional[SparseGPTOptions]
    source_text: str = ""

    @property
    def spec(self) -> MethodSpec:
        return METHODS[self.method]

    @property
    def base_ref(self) -> Optional[ModelRef]:
        return None if self.base is None else self.inputs[self.base]

    def uses_gradients(self) -> bool:
        """Whether any parameter is a gradient (a list of numbers), which needs the layer of each tensor."""
        scopes = [self.global_params, self.slice_params] + [m.parameters for m in self.inputs]
        return any(_has_gradient(v) for s in scopes for v in s.values())

    def resolve(self, tensor_name: str, t: float) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
        """(shared parameters, one dict of per-input parameters per input) for one tensor at layer position t.

        Per-input dicts hold the method's input-scoped parameters (for the base only those of scope 'input').
        Raises MergeConfigError for a required parameter that no scope sets, or a value of the wrong type."""
        spec = self.spec
        shared = {p.name: _resolve(p, (self.slice_params, self.global_params), tensor_name, t, "")
                  for p in spec.params if p.scope == "shared"}
        per_input = []
        for i, ref in enumerate(self.inputs):
            scopes = (ref.parameters, self.slice_params, self.global_params)
            per_input.append({p.name: _resolve(p, scopes, tensor_name, t, f" of model {ref.path!r}")
                              for p in spec.params
                              if p.scope == "input" or (p.scope == "non_base" and i != self.base)})
        return shared, per_input


# ------------------------------------------------------------------ parameter values

def _is_scalar(v) -> bool:
    return isinstance(v, (bool, int, float, str))


def _is_condition(v) -> bool:
    return isinstance(v, dict) and "value" in v and set(v) <= {"value", "filter"}


def _has_gradient(v) -> bool:
    if isinstance(v, list):
        return (len(v) > 1 and all(_is_scalar(e) for e in v)) or any(_has_gradient(e) for e in v)
    if isinstance(v, dict):
        return _has_gradient(v.get("value"))
    return False


def _check_setting(name: str, v, where: str) -> None:
    """The shapes mergekit accepts: scalar, list of scalars, condition dict, list of conditions."""
    if _is_scalar(v) or v is None:
        return
    if _is_condition(v):
        _check_setting(name, v["value"], where)
        if v.get("filter") is not None and not isinstance(v["filter"], str):
            raise MergeConfigError(f"parameter {name!r}{where}: a filter must be a string, got {v['filter']!r}")
        return
    if isinstance(v, list) and v and (all(_is_scalar(e) for e in v) or all(_is_condition(e) for e in v)):
        for e in v:
            _check_setting(name, e, where)
        return
    raise MergeConfigError(f"parameter {name!r}{where}: expected a number, a bool, a list of numbers (a gradient) or "
                           f"a list of {{filter, value}} conditions, got {v!r}")


def _convert(p: Param, value, where: str):
    """A value as the parameter's type (mergekit validates with pydantic's lax rules: numeric strings are
    numbers, 'true' / 'false' are bools)."""
    if p.kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise MergeConfigError(f"parameter {p.name!r}{where} must be true or false, got {value!r}")
    if isinstance(value, bool):
        raise MergeConfigError(f"parameter {p.name!r}{where} must be a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise MergeConfigError(f"parameter {p.name!r}{where} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise MergeConfigError(f"parameter {p.name!r}{where} must be finite, got {value!r}")
    return out


def _evaluate(p: Param, setting, tensor_name: str, t: float, where: str):
    """mergekit's evaluate_setting: conditions by filter, gradients interpolated at t; None if nothing applies."""
    if _is_condition(setting):
        setting = [setting]
    if _is_scalar(setting):
        return _convert(p, setting, where)
    if not setting:
        return None
    if all(_is_scalar(e) for e in setting):
        values = [_convert(p, e, where) for e in setting]
        if p.kind is bool:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return _convert(p, (1 - frac) * values[i0] + frac * values[i1], where)
    for cond in setting:
        flt = cond.get("filter")
        if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
            return _evaluate(p, cond["value"], tensor_name, t, where)
    return None


def _resolve(p: Param, scopes: Sequence[Dict[str, Any]], tensor_name: str, t: float, where: str):
    for scope in scopes:
        if p.name in scope:
            value = _evaluate(p, scope[p.name], tensor_name, t, where)
            if value is not None:
                return value
    if p.required:
        raise MergeConfigError(f"method needs parameter {p.name!r}{where} for tensor {tensor_name!r}, and no "
                               "model, slice or global parameters set it")
    return p.default


# ------------------------------------------------------------------ the file

def load_config(path: str) -> MergeConfig:
    """Read and check a mergekit YAML file (see the module docstring); MergeConfigError if it cannot run."""
    if not os.path.isfile(path):
        raise MergeConfigError(f"config file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return parse_config(text, source=path)


def parse_config(text: str, *, source: str = "<config>") -> MergeConfig:
    """Parse YAML text (see :func:`load_config`)."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MergeConfigError(f"{source} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise MergeConfigError(f"{source} must be a YAML mapping with merge_method, models, ...; got "
                               f"{type(data).__name__}")
    cfg = _from_dict(data)
    cfg.source_text = text
    return cfg


def _from_dict(data: Dict[str, Any]) -> MergeConfig:
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise MergeConfigError(f"unknown configuration key(s) {', '.join(map(repr, unknown))}; known: "
                               f"{', '.join(sorted(_TOP_KEYS - set(_UNSUPPORTED_KEYS)))}")
    for key, what in _UNSUPPORTED_KEYS.items():
        if data.get(key) is not None:
            raise MergeConfigError(f"{what} is not supported by sparsity-engine merge")
    method = data.get("merge_method")
    if method not in METHODS:
        raise MergeConfigError(f"merge_method {method!r} is not supported; supported: {', '.join(METHODS)}")
    spec = METHODS[method]
    base = _model_path(data["base_model"], "base_model") if data.get("base_model") is not None else None
    models, slice_params = _inputs(data)
    inputs = list(models)
    paths = [m.path for m in inputs]
    if len(set(paths)) != len(paths):
        raise MergeConfigError("a model is listed twice in models (duplicate merge inputs)")
    base_index = None
    if base is not None:
        base_index = paths.index(base) if base in paths else len(inputs)
        if base not in paths:
            inputs.append(ModelRef(base, {}))
    global_params = _params(data.get("parameters"), "parameters")
    cfg = MergeConfig(method=method, inputs=inputs, base=base_index, global_params=global_params,
                      slice_params=slice_params, dtype=_dtype(data.get("dtype"), "dtype"),
                      out_dtype=_dtype(data.get("out_dtype"), "out_dtype"),
                      tokenizer_source=_tokenizer_source(data.get("tokenizer_source"), base),
                      sparsegpt=_sparsegpt(data.get("sparsity_engine"), spec))
    _check_contract(cfg)
    _check_parameter_names(cfg)
    return cfg


def _model_path(ref, where: str) -> str:
    if isinstance(ref, dict):  # mergekit's long form: {model: {path: ..., revision: ...}, lora: ...}
        if ref.get("lora"):
            raise MergeConfigError(f"{where}: LoRA adapters are not supported; merge the adapter into its model first")
        inner = ref.get("model", ref)
        if isinstance(inner, dict):
            if inner.get("revision"):
                raise MergeConfigError(f"{where}: revisions are not supported; give a local folder")
            inner = inner.get("path")
        ref = inner
    if not isinstance(ref, str) or not ref:
        raise MergeConfigError(f"{where}: expected a model folder path, got {ref!r}")
    if os.path.isdir(ref):
        return os.path.abspath(ref)
    if "+" in ref:
        raise MergeConfigError(f"{where}: {ref!r} looks like model+LoRA, which is not supported; merge the adapter "
                               "into its model first")
    raise MergeConfigError(f"{where}: {ref!r} is not a local folder (hub references are not downloaded; fetch the "
                           "model first and give its folder)")


def _params(value, where: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MergeConfigError(f"{where} must be a mapping of parameter name to value, got {value!r}")
    for name, v in value.items():
        _check_setting(str(name), v, f" in {where}")
    return dict(value)


def _inputs(data) -> Tuple[List[ModelRef], Dict[str, Any]]:
    models, slices = data.get("models"), data.get("slices")
    if bool(models) == bool(slices):
        raise MergeConfigError("exactly one of 'models' or 'slices' must be given")
    if models:
        if not isinstance(models, list):
            raise MergeConfigError("models must be a list of {model: PATH, parameters: {...}}")
        return [_model_entry(m, f"models[{i}]") for i, m in enumerate(models)], {}
    if not isinstance(slices, list) or len(slices) != 1:
        raise MergeConfigError("several slices (layer stacking / frankenmerges) are not supported: only one slice "
                               "whose sources cover every layer")
    sl = slices[0]
    if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
        raise MergeConfigError("slices[0] must have a non-empty 'sources' list")
    extra = sorted(set(sl) - {"sources", "parameters"})
    if extra:
        raise MergeConfigError(f"slices[0]: {', '.join(extra)} not supported (only sources and parameters)")
    refs = []
    for i, src in enumerate(sl["sources"]):
        where = f"slices[0].sources[{i}]"
        if not isinstance(src, dict) or "layer_range" not in src:
            raise MergeConfigError(f"{where} must have model and layer_range")
        ref = _model_entry({k: v for k, v in src.items() if k != "layer_range"}, where)
        _check_full_range(ref.path, src["layer_range"], where)
        refs.append(ref)
    return refs, _params(sl.get("parameters"), "slices[0].parameters")


def _model_entry(entry, where: str) -> ModelRef:
    if isinstance(entry, str):
        return ModelRef(_model_path(entry, where))
    if not isinstance(entry, dict) or "model" not in entry:
        raise MergeConfigError(f"{where} must be a mapping with 'model' (and optional 'parameters')")
    extra = sorted(set(entry) - {"model", "parameters"})
    if extra:
        raise MergeConfigError(f"{where}: unknown key(s) {', '.join(extra)}")
    return ModelRef(_model_path(entry["model"], f"{where}.model"),
                    _params(entry.get("parameters"), f"{where}.parameters"))


def num_layers(model_dir: str) -> Optional[int]:
    """The layer count in a model folder's config.json (num_hidden_layers / n_layer / num_layers), or None."""
    import json

    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None


def _check_full_range(path: str, layer_range, where: str) -> None:
    n = num_layers(path)
    if not (isinstance(layer_range, list) and len(layer_range) == 2 and all(isinstance(x, int) for x in layer_range)):
        raise MergeConfigError(f"{where}.layer_range must be [start, end], got {layer_range!r}")
    if n is None or list(layer_range) != [0, n]:
        raise MergeConfigError(f"{where}.layer_range {layer_range} is a partial layer range (the model has "
                               f"{n if n is not None else 'an unknown number of'} layers); only [0, {n}] is supported")


def _dtype(value, where: str) -> Optional[str]:
    if value is None:
        return None
    name = value[len("torch."):] if isinstance(value, str) and value.startswith("torch.") else value
    if name not in DTYPES:
        raise MergeConfigError(f"{where} {value!r} is not supported; expected one of {', '.join(DTYPES)}")
    return name


def _tokenizer_source(value, base: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    if value == "base":
        if base is None:
            raise MergeConfigError("tokenizer_source: base needs a base_model")
        return "base"
    raise MergeConfigError(f"tokenizer_source {value!r} is not supported (only 'base', or leave it out)")


def _sparsegpt(block, spec: MethodSpec) -> Optional[SparseGPTOptions]:
    if block is None:
        return None
    if not isinstance(block, dict):
        raise MergeConfigError("sparsity_engine must be a mapping (sparsification, calibration)")
    extra = sorted(set(block) - {"sparsification", "calibration"})
    if extra:
        raise MergeConfigError(f"sparsity_engine: unknown key(s) {', '.join(extra)}")
    spars = block.get("sparsification")
    if spars is None:
        if block.get("calibration") is not None:
            raise MergeConfigError("sparsity_engine.calibration is only used with sparsification: sparsegpt")
        return None
    if spars != "sparsegpt":
        raise MergeConfigError(f"sparsity_engine.sparsification {spars!r} is not supported (only 'sparsegpt')")
    if not spec.task_arithmetic:
        raise MergeConfigError("sparsification: sparsegpt needs a method of the task-arithmetic family "
                               "(task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della, "
                               "della_linear)")
    cal = block.get("calibration") or {}
    if not isinstance(cal, dict):
        raise MergeConfigError("sparsity_engine.calibration must be a mapping")
    extra = sorted(set(cal) - set(CALIBRATION_DEFAULTS))
    if extra:
        raise MergeConfigError(f"sparsity_engine.calibration: unknown key(s) {', '.join(extra)}; known: "
                               f"{', '.join(CALIBRATION_DEFAULTS)}")
    opts = dict(CALIBRATION_DEFAULTS, **cal)
    for key in ("nsamples", "seqlen", "batch_size", "blocksize"):
        if isinstance(opts[key], bool) or not isinstance(opts[key], int) or opts[key] < 1:
            raise MergeConfigError(f"sparsity_engine.calibration.{key} must be a positive integer, got {opts[key]!r}")
    if isinstance(opts["seed"], bool) or not isinstance(opts["seed"], int) or not 0 <= opts["seed"] < 2**32:
        raise MergeConfigError(f"sparsity_engine.calibration.seed must be an integer in [0, 2**32), "
                               f"got {opts['seed']!r}")
    if opts["hessian"] not in ("per-model", "shared"):
        raise MergeConfigError(f"sparsity_engine.calibration.hessian must be 'per-model' or 'shared', got "
                               f"{opts['hessian']!r}")
    pd = opts["percdamp"]
    if isinstance(pd, bool) or not isinstance(pd, (int, float)) or not (0 < pd < 1):
        raise MergeConfigError(f"sparsity_engine.calibration.percdamp must be in (0, 1), got {pd!r}")
    if opts["file"] is not None:
        if not isinstance(opts["file"], str) or not os.path.isfile(opts["file"]):
            raise MergeConfigError(f"sparsity_engine.calibration.file {opts['file']!r} is not a file")
        opts["file"] = os.path.abspath(opts["file"])
    return SparseGPTOptions(**opts)


def _check_contract(cfg: MergeConfig) -> None:
    """mergekit's input contract of the method: base required / ignored, numbers of inputs."""
    spec = cfg.spec
    n, has_base = len(cfg.inputs), cfg.base is not None
    if spec.base == "required" and not has_base:
        raise MergeConfigError(f"merge_method {cfg.method} needs a base_model")
    if spec.base == "ignored":
        has_base = False
    non_base = n - int(has_base)
    if n < spec.min_inputs:
        raise MergeConfigError(f"merge_method {cfg.method} needs at least {spec.min_inputs} input models "
                               f"(base included), got {n}")
    if spec.max_inputs is not None and n > spec.max_inputs:
        raise MergeConfigError(f"merge_method {cfg.method} takes at most {spec.max_inputs} input models "
                               f"(base included), got {n}")
    if spec.non_base is not None and non_base != spec.non_base:
        raise MergeConfigError(f"merge_method {cfg.method} needs exactly {spec.non_base} models besides the base, "
                               f"got {non_base}")


_ALL_PARAMS = {p.name for s in METHODS.values() for p in s.params}


def _check_parameter_names(cfg: MergeConfig) -> None:
    """Names that no supported method knows are refused (a typo would be silently ignored by mergekit);
    names of other methods' parameters are ignored, as mergekit ignores them."""
    scopes = [("parameters", cfg.global_params), ("slices[0].parameters", cfg.slice_params)]
    scopes += [(f"parameters of {m.path!r}", m.parameters) for m in cfg.inputs]
    for where, scope in scopes:
        unknown = sorted(k for k in scope if k not in _ALL_PARAMS)
        if unknown:
            known = ", ".join(p.name for p in cfg.spec.params)
            raise MergeConfigError(f"unknown parameter(s) {', '.join(map(repr, unknown))} in {where}; "
                                   f"{cfg.method} takes: {known}")


# ------------------------------------------------------------------ layers of a tensor

_LAYER_RE = re.compile(r"^(.*?)(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


def layer_of(name: str) -> Optional[Tuple[str, int]]:
    """(prefix of the layer stack, layer index) of a tensor name such as 'model.layers.3.mlp.up_proj.weight',
    or None for tensors outside the layers (embeddings, final norm, LM head)."""
    m = _LAYER_RE.match(name)
    return (m.group(1), int(m.group(2))) if m else None
