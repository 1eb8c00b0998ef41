"""One job over several processes: ``torchrun --nproc-per-node N -m sparsity_engine prune|eval ...``.

torch.distributed does the communication: NCCL between GPUs (one process per GPU, on ``cuda:LOCAL_RANK``),
gloo between CPU processes (``--device cpu``; what the tests run). Without torchrun's environment, or with one
process, nothing here runs and the job is the single-process pipeline. What each process (rank) does:

* it reads and checks everything (settings, model folder, calibration ids) exactly as one process does, so a
  bad setting fails on every rank before any work;
* rank 0 alone opens the output folder (:mod:`sparsity_engine.io.jobdir`) and tells the others what it holds,
  or why it was refused (:meth:`Dist.open_job`); rank 0 alone writes the shards, the job file and the report;
* every rank streams each block from disk and runs its contiguous share of the calibration sequences (and of
  the evaluation windows) through it (:meth:`Dist.share`); the next block's inputs stay on that rank;
* Hessians (:meth:`Dist.sum_hessians`): a rank's accumulator holds SparseGPT's running average over its n_r
  batch rows, ``H_r = 2/n_r sum_r X^T X``; all_reduce sums the un-normalised ``H_r * n_r`` and the counts, and
  ``H = sum / N`` is normalised once: the single-process Hessian up to the order of the sums;
* a block's layers are pruned in parallel: each layer has one owner (:meth:`Dist.owners`), every rank prunes the
  layers it owns, then each pruned weight and its loss numbers are broadcast from the owner, in the block's
  layer order (:meth:`Dist.broadcast_`);
* evaluation sums the windows' losses and counts over the ranks (:meth:`Dist.sum`).

A process that dies or stops answering ends the job: a collective on the other ranks fails at once (gloo sees
the closed connection; torchrun's agent stops the other processes when one exits) or after the process group's
timeout (``--dist-timeout``; on NCCL its watchdog ends the process), and :class:`DistributedError` says so. The
blocks already on disk stay finished: ``--resume`` continues, with any number of processes (the number of
processes changes only rounding, so it is a runtime setting of the job file, never an output setting).

The environment (NCCL_*, e.g. ``NCCL_NVLS_ENABLE=0``) is left exactly as the launcher set it. Tested on one
machine (gloo on the CPU); over several machines every process must see the model folder, and on a resume the
output folder, at the same path (a shared file system).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .settings import ConfigError

DEFAULT_TIMEOUT_S = 600.0
# what torchrun sets for every process (torch.distributed's env:// rendezvous reads the last two)
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """Another process of the job died, or did not answer within the timeout (command line: exit 4)."""


def _env_int(name: str) -> int:
    text = os.environ.get(name)
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"environment variable {name}={text!r}: torchrun sets it to a non-negative integer; "
                          "start several processes with torchrun --nproc-per-node N -m sparsity_engine ...") from None
    if value < 0:
        raise ConfigError(f"environment variable {name}={text!r} must be a non-negative integer")
    return value


def world_from_env() -> Optional[Tuple[int, int, int]]:
    """(rank, world size, local rank) from torchrun's environment; None without it or with one process."""
    if os.environ.get("WORLD_SIZE") in (None, ""):
        return None
    world = _env_int("WORLD_SIZE")
    if world <= 1:
        return None
    missing = [v for v in ENV_VARS if not os.environ.get(v)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                          "not: start several processes with torchrun --nproc-per-node N -m sparsity_engine ...")
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    if rank >= world:
        raise ConfigError(f"environment variable RANK={rank} must be below WORLD_SIZE={world}")
    return rank, world, local


def check_timeout(timeout_s) -> float:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < float("inf"):
        raise ConfigError(f"dist-timeout must be a positive number of seconds, got {timeout_s!r}")
    return float(timeout_s)


def process_device(device: Optional[str], local_rank: int, world: int) -> torch.device:
    """The device of this process: 'cpu' stays the CPU (gloo); a GPU ('cuda', or none given on a machine with
    GPUs) is ``cuda:LOCAL_RANK``, one process per GPU (NCCL). ConfigError when that GPU does not exist."""
    from .model_io import resolve_device

    dev = resolve_device(device)
    if dev.type != "cuda":
        return dev
    if dev.index is not None:
        raise ConfigError(f"device {device!r}: with {world} processes each one uses cuda:LOCAL_RANK; pass --device "
                          "cuda (or leave it out), and choose the GPUs with CUDA_VISIBLE_DEVICES")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"process with LOCAL_RANK={local_rank} needs cuda:{local_rank} but torch sees "
                          f"{torch.cuda.device_count()} GPU(s); start at most that many processes per machine")
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def launch(device: Optional[str], timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[Optional["Dist"]]:
    """The job's process group from torchrun's environment, or None (one process: the single-process path).

    Checks the environment, the device and the timeout before anything starts; on a GPU it selects
    ``cuda:LOCAL_RANK`` (``torch.cuda.set_device``) and joins an NCCL group bound to it, else a gloo group. The
    group is destroyed when the block ends normally; after an error it is left to the process's exit (a group
    whose peer died may not shut down cleanly).
    """
    import torch.distributed as dist

    timeout_s = check_timeout(timeout_s)
    found = world_from_env()
    if found is None:
        yield None
        return
    rank, world, local = found
    dev = process_device(device, local, world)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    kwargs: Dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
    if dev.type == "cuda":
        kwargs["device_id"] = dev          # NCCL: bind the communicator to this GPU, connect eagerly
    try:
        dist.init_process_group(**kwargs)
    except TypeError:                      # torch < 2.3 has no device_id
        kwargs.pop("device_id", None)
        dist.init_process_group(**kwargs)
    except Exception as exc:               # noqa: BLE001 - rendezvous failures come in many types
        raise DistributedError(f"process {rank} of {world} could not join the others ({exc})") from None
    handle = Dist(rank, world, local, backend, dev, timeout_s)
    yield handle
    dist.destroy_process_group()


class Dist:
    """This process's place in the job and the collectives the pipeline needs (module docstring)."""

    def __init__(self, rank: int, world: int, local_rank: int, backend: str, device: torch.device,
                 timeout_s: float):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.backend, self.device, self.timeout_s = backend, device, timeout_s

    def __repr__(self) -> str:
        return f"Dist(rank={self.rank}, world={self.world}, backend={self.backend}, device={self.device})"

    @property
    def writes(self) -> bool:
        """Whether this process writes the output (rank 0)."""
        return self.rank == 0

    # ----------------------------------------------------------------------------------------- work split
    def share(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of ``rows`` (dim 0): rows [n r / W, n (r+1) / W). Shares differ by at most
        one row; with fewer rows than ranks some shares are empty."""
        n = rows.shape[0]
        return rows[n * self.rank // self.world:n * (self.rank + 1) // self.world]

    def check_calibration(self, nsamples: int) -> None:
        """Every rank needs at least one calibration sequence (it must hold every layer's Hessian to sum them)."""
        if nsamples < self.world:
            raise ConfigError(f"nsamples {nsamples} is fewer than the {self.world} processes; each process needs at "
                              f"least one calibration sequence (use nsamples >= {self.world} or fewer processes)")

    def owners(self, layers: Sequence[Tuple[str, Tuple[int, int], str]]) -> Dict[str, int]:
        """{layer: rank that prunes it} for ``layers`` = [(name, (rows, cols), method)], the same on every rank.

        Longest first onto the least-loaded rank (ties: the lower rank, then block order), by the cost of
        SparseGPT, ~ rows cols^2 (the error compensation) + cols^3 (the Cholesky factorisations), or rows cols for
        Wanda and magnitude. With as many layers as ranks and equal costs this is one layer per rank in turn.
        """
        def cost(shape, method):
            rows, cols = shape
            return rows * cols * cols + cols ** 3 if method == "sparsegpt" else rows * cols

        order = sorted(range(len(layers)), key=lambda i: (-cost(layers[i][1], layers[i][2]), i))
        load = [0] * self.world
        out: Dict[str, int] = {}
        for i in order:
            r = min(range(self.world), key=lambda k: (load[k], k))
            out[layers[i][0]] = r
            load[r] += cost(layers[i][1], layers[i][2])
        return {name: out[name] for name, _, _ in layers}

    # ----------------------------------------------------------------------------------------- collectives
    @contextlib.contextmanager
    def _collective(self, what: str):
        """Turn a failed collective (a process died, or did not answer in time) into a DistributedError."""
        try:
            yield
        except (RuntimeError, ConnectionError, OSError) as exc:
            cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DistributedError(
                f"process {self.rank} of {self.world}: {what} failed: another process of the job died or did not "
                f"answer within the timeout of {self.timeout_s:g}s ({cause}). A prune job keeps the blocks already "
                "on disk: continue it with --resume, with any number of processes") from None

    def sum_hessians(self, accumulators: Dict[str, Any]) -> None:
        """Replace each HessianAccumulator's running average over this rank's rows by the average over every
        rank's rows: counts summed, then ``H <- (sum_r H_r n_r) / N`` (accumulators shared by several layers are
        reduced once). Every rank passes the same layers in the same order."""
        import torch.distributed as dist

        accs = list({id(a): a for a in accumulators.values()}.values())
        if not accs:
            return
        with self._collective("summing the Hessians' sample counts"):
            counts = torch.tensor([a.nsamples for a in accs], dtype=torch.float64, device=self.device)
            dist.all_reduce(counts)
        totals = [int(c) for c in counts.tolist()]
        with self._collective("summing the Hessians"):
            for acc, total in zip(accs, totals):
                H = acc.H
                H.mul_(float(acc.nsamples))
                dist.all_reduce(H)
                H.div_(float(total))
                acc.nsamples = total

    def broadcast_(self, tensor: torch.Tensor, src: int, what: str = "sharing a pruned layer") -> torch.Tensor:
        """``tensor`` (on this process's device) takes rank ``src``'s values, in place."""
        import torch.distributed as dist

        buf = tensor if tensor.is_contiguous() else tensor.contiguous()
        with self._collective(what):
            dist.broadcast(buf, src)
        if buf is not tensor:
            tensor.copy_(buf)
        return tensor

    def sum(self, values: Sequence[float], what: str = "summing results") -> List[float]:
        """The sums over every rank of ``values`` (float64)."""
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        with self._collective(what):
            dist.all_reduce(t)
        return t.tolist()

    def _broadcast_object(self, obj: Any, what: str) -> Any:
        import torch.distributed as dist

        box = [obj]
        with self._collective(what):
            dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def open_job(self, opener: Callable[[], Any]):
        """Rank 0 runs ``opener`` (io.jobdir's open_job); the other ranks get a read-only view of the folder it
        opened (:class:`FollowerJob`), or raise the same error as rank 0 when it was refused."""
        if self.writes:
            try:
                job = opener()
            except BaseException as exc:
                self._broadcast_object(("error", exc), "opening the output folder")
                raise
            self._broadcast_object(("ok", job.out_dir, job.data), "opening the output folder")
            return job
        outcome = self._broadcast_object(None, "opening the output folder")
        if outcome[0] == "error":
            raise outcome[1]
        return FollowerJob(outcome[1], outcome[2])


class FollowerJob:
    """What a rank other than 0 knows of the job folder rank 0 opened: its state when it was opened, and paths
    inside it to read from (a resumed job replays its finished blocks from the shards there). It never writes."""

    def __init__(self, out_dir: str, data: Dict[str, Any]):
        from ..io.jobdir import Job

        self._job = Job(out_dir, data, made=[], lock_fd=None, resumed=False)
        self.out_dir = out_dir

    @property
    def done(self) -> Dict[str, Any]:
        return self._job.done

    @property
    def finished(self) -> bool:
        return self._job.finished

    def path(self, rel: str) -> str:
        return self._job.path(rel)

    def __enter__(self) -> "FollowerJob":
        return self

    def __exit__(self, *exc) -> None:
        return None
