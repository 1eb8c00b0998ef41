"""Progress output of jobs: tqdm bars when tqdm is installed and output is wanted, else one line per step."""
from __future__ import annotations

from typing import Optional


class Progress:
    """tqdm bars when tqdm is installed and ``enabled``; otherwise silent (or one line per block)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        self._tqdm = tqdm if enabled else None

    def bar(self, total: int, desc: str, *, leave: bool = True, position: int = 0, initial: int = 0):
        if self._tqdm is None:
            return _NullBar(desc if self.enabled and leave else None)
        return self._tqdm(total=total, desc=desc, leave=leave, position=position, initial=initial,
                          dynamic_ncols=True)

    def write(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.write(msg)
        else:
            print(msg, flush=True)


class _NullBar:
    def __init__(self, desc: Optional[str]):
        self.desc, self.n = desc, 0

    def update(self, k: int = 1) -> None:
        self.n += k

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass
