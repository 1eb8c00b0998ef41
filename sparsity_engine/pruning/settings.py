"""Pruning settings: one N:M convention, per-layer targets, the job's configuration, checked before any work.

N:M always means *keep N of every M* consecutive weights along the input dimension (2:4 keeps 2, 1:4 keeps 1,
as in NVIDIA's 2:4 and the command line). SparseGPT's op counts the other way (``prune_n`` weights *pruned*
of every ``prune_m``); :meth:`NMPattern.sparsegpt_args` is the one place that converts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .._validate import check_fraction, check_int
from .models import DEFAULT_SKIP, matches

METHODS = ("sparsegpt", "wanda", "magnitude")


class ConfigError(ValueError):
    """A bad setting, alone or for this model (command line: exit 2). The message names the setting."""


class InputError(ValueError):
    """A model folder, calibration file or output folder that cannot be used (command line: exit 3)."""


@dataclass(frozen=True)
class NMPattern:
    """Keep ``n`` of every ``m`` consecutive weights along the input dimension (0 < n < m)."""

    n: int
    m: int

    def __post_init__(self):
        for name, v in (("N", self.n), ("M", self.m)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"pattern {name} must be an int, got {v!r}")
        if not 0 < self.n < self.m:
            raise ConfigError(f"pattern N:M keeps N of every M weights and needs 0 < N < M, got {self.n}:{self.m}")

    @classmethod
    def parse(cls, value: Union[str, Sequence[int], "NMPattern"]) -> "NMPattern":
        """From 'N:M', (N, M) or an NMPattern."""
        if isinstance(value, NMPattern):
            return value
        if isinstance(value, str):
            n_s, sep, m_s = value.strip().partition(":")
            if not (sep and n_s.strip().isdigit() and m_s.strip().isdigit()):
                raise ConfigError(f"pattern must be N:M with integers (keep N of every M), e.g. 2:4, "
                                  f"got {value!r}")
            return cls(int(n_s), int(m_s))
        try:
            n, m = value
        except (TypeError, ValueError):
            raise ConfigError(f"pattern must be 'N:M' or (N, M), got {value!r}") from None
        return cls(n, m)

    @property
    def density(self) -> float:
        return self.n / self.m

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def label(self) -> str:
        return f"{self.n}:{self.m}"

    def sparsegpt_args(self) -> Dict[str, int]:
        """The one conversion to SparseGPT's op arguments: it prunes ``m - n`` of every ``m``."""
        return {"prune_n": self.m - self.n, "prune_m": self.m}


def as_pattern(value) -> Optional[NMPattern]:
    return None if value is None else NMPattern.parse(value)


@dataclass(frozen=True)
class LayerSpec:
    """What to do to one layer: a method and a target, ``sparsity`` (fraction zeroed) or an N:M ``pattern``."""

    method: str
    sparsity: float = 0.5
    pattern: Optional[NMPattern] = None

    @property
    def structured(self) -> bool:
        return self.pattern is not None

    def target(self) -> str:
        return self.pattern.label() if self.pattern is not None else f"{self.sparsity:g}"

    def label(self) -> str:
        return f"{self.method} {self.target()}"

    def skips(self) -> bool:
        return self.pattern is None and self.sparsity == 0


def parse_target(text: str, method: str) -> LayerSpec:
    """'0.5' -> unstructured 50%; '2:4' -> keep 2 of every 4; 'wanda:0.5' / 'magnitude:2:4' also set the method."""
    text = str(text).strip()
    head, _, rest = text.partition(":")
    if head in METHODS:
        method, text = head, rest
    if ":" in text:
        p = NMPattern.parse(text)
        return LayerSpec(method, p.sparsity, p)
    try:
        sparsity = float(text)
    except ValueError:
        raise ConfigError(f"a target must be a sparsity in [0, 1) or an N:M pattern, got {text!r}") from None
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"a target sparsity must be in [0, 1), got {sparsity}")
    return LayerSpec(method, sparsity)


def _checked(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def check_percdamp(value) -> float:
    return _checked(check_fraction, "percdamp", value, low=0.0, low_inclusive=False, high=math.inf,
                    high_inclusive=False)


def check_blocksize_fits(blocksize: int, pattern: Optional[NMPattern], where: str) -> None:
    """SparseGPT picks N:M inside its column blocks: the block must hold whole groups of M."""
    if pattern is not None and blocksize % pattern.m:
        raise ConfigError(f"blocksize {blocksize} must be a multiple of M={pattern.m} for the {pattern.label()} "
                          f"pattern of {where} (SparseGPT chooses N:M inside each block of columns)")


@dataclass
class PruneConfig:
    """What to prune and how. ``pattern`` (N:M, keep N of every M) overrides ``sparsity``; ``overrides`` maps a
    layer-name pattern (fnmatch, or a name suffix) to a target such as '0.3', '2:4' or 'wanda:0.6' (first match
    wins; a target of 0 skips the layer); ``skip`` patterns are never pruned. ``batch_size`` (None: chosen from
    the device's memory) and ``backend`` change only rounding; everything else changes the output
    (:meth:`output_settings`)."""

    method: str = "sparsegpt"
    sparsity: float = 0.5
    pattern: Optional[NMPattern] = None
    overrides: List[Tuple[str, str]] = field(default_factory=list)
    skip: Tuple[str, ...] = DEFAULT_SKIP
    blocksize: int = 128
    percdamp: float = 0.01
    batch_size: Optional[int] = 8
    backend: Optional[str] = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        self.sparsity = _checked(check_fraction, "sparsity", self.sparsity, high=1.0, high_inclusive=False)
        self.pattern = as_pattern(self.pattern)
        self.blocksize = _checked(check_int, "blocksize", self.blocksize, minimum=1)
        self.percdamp = check_percdamp(self.percdamp)
        if self.batch_size is not None:
            self.batch_size = _checked(check_int, "batch_size", self.batch_size, minimum=1)
        self.skip = tuple(self.skip)
        self.overrides = [tuple(o) for o in self.overrides]
        self._override_specs = [(pat, parse_target(t, self.method)) for pat, t in self.overrides]
        for where, spec in [("the job", self.default_spec())] + [(f"--override {p}", s)
                                                                for p, s in self._override_specs]:
            if spec.method == "sparsegpt":
                check_blocksize_fits(self.blocksize, spec.pattern, where)

    def default_spec(self) -> LayerSpec:
        if self.pattern is not None:
            return LayerSpec(self.method, self.pattern.sparsity, self.pattern)
        return LayerSpec(self.method, self.sparsity)

    def spec_for(self, name: str) -> Optional[LayerSpec]:
        """The target of layer ``name`` (qualified), None when it is skipped."""
        if matches(name, self.skip):
            return None
        for pat, spec in self._override_specs:
            if matches(name, [pat]):
                return None if spec.skips() else spec
        spec = self.default_spec()
        return None if spec.skips() else spec

    def needs_calibration(self, names: Sequence[str]) -> bool:
        """Whether any of these layers uses a method that reads activations (magnitude does not)."""
        return any(s is not None and s.method != "magnitude" for s in map(self.spec_for, names))

    def output_settings(self) -> Dict[str, Any]:
        """Every setting that changes the pruned weights (compared when a job resumes)."""
        return {"method": self.method, "sparsity": self.sparsity,
                "pattern": None if self.pattern is None else self.pattern.label(),
                "overrides": [list(o) for o in self.overrides], "skip": list(self.skip),
                "blocksize": self.blocksize, "percdamp": self.percdamp}

    def to_dict(self) -> Dict[str, Any]:
        return {**self.output_settings(), "batch_size": self.batch_size, "backend": self.backend}
