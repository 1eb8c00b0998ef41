"""io.jobdir: each rule of the job-folder contract (module docstring), on real folders."""
import json
import os
import subprocess
import sys

import pytest
from tiny_models import snapshot

from sparsity_engine.io import jobdir
from sparsity_engine.io.jobdir import JOB_FILE, JobFolderError, open_job

SETTINGS = {"method": "sparsegpt", "config": {"sparsity": 0.5, "pattern": None}, "seed": 0}


_snapshot = snapshot


@pytest.fixture
def model(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"a": 1}')
    (d / "model.safetensors").write_bytes(b"weights")
    return d


def _open(out, model, **kw):
    kw.setdefault("settings", SETTINGS)
    return open_job(out, kind="prune", inputs={"model folder": model}, version="1.0", **kw)


def _write(job, rel, data=b"x"):
    with open(job.output(rel), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------- rule 1: never the input

@pytest.mark.parametrize("where", ["same", "inside", "around", "link_inside"])
def test_output_never_overlaps_an_input(tmp_path, model, where):
    before = _snapshot(tmp_path)
    if where == "link_inside":
        (tmp_path / "ln").symlink_to(model)
        before = _snapshot(tmp_path)
    out = {"same": model, "inside": model / "pruned", "around": tmp_path,
           "link_inside": tmp_path / "ln" / "pruned"}[where]
    with pytest.raises(JobFolderError, match="model folder"):
        _open(out, model, overwrite=True)
    assert _snapshot(tmp_path) == before


# ---------------------------------------------------------------- rule 2: new or empty, job file first

def test_new_path_gets_the_job_file_before_any_work(tmp_path, model):
    out = tmp_path / "a" / "b" / "out"
    with _open(out, model, runtime={"device": "cpu"}) as job:
        data = json.loads((out / JOB_FILE).read_text())
        assert data["tool"] == "sparsity-engine" and data["job"] == "prune" and data["version"] == "1.0"
        assert data["settings"] == SETTINGS and data["runtime"] == {"device": "cpu"}
        assert data["finished"] is False and data["files"] == [] and data["done"] == {}
        fp = data["inputs"]["model folder"]
        assert fp["path"] == os.path.realpath(model)
        st = os.stat(model / "model.safetensors")
        assert fp["files"]["model.safetensors"] == [st.st_size, st.st_mtime_ns]
        _write(job, "model.safetensors")
        job.mark_done(0)
        job.finish(report="r.json")
    data = json.loads((out / JOB_FILE).read_text())
    assert data["finished"] is True and data["files"] == ["model.safetensors"] and data["report"] == "r.json"


def test_existing_empty_folder_is_taken(tmp_path, model):
    out = tmp_path / "out"
    out.mkdir()
    with _open(out, model) as job:
        assert not job.resumed
    assert (out / JOB_FILE).is_file()


# ---------------------------------------------------------------- rule 3: not ours -> untouched

@pytest.mark.parametrize("flags", [{}, {"resume": True}, {"overwrite": True}])
@pytest.mark.parametrize("content", ["other_model", "foreign_job_file", "other_kind", "corrupt_job_file"])
def test_foreign_folder_is_refused_and_left_byte_for_byte(tmp_path, model, flags, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"someone else's weights")
    (out / ".model.safetensors.abcd1234.tmp").write_bytes(b"their temp file")
    if content == "foreign_job_file":
        (out / JOB_FILE).write_text(json.dumps({"finished": False, "settings": {}}))   # an older/other tool
    elif content == "other_kind":
        with open_job(tmp_path / "m", kind="merge", settings={}, inputs={"model folder": model}, version="1.0"):
            pass
        os.replace(tmp_path / "m" / JOB_FILE, out / JOB_FILE)
    elif content == "corrupt_job_file":
        (out / JOB_FILE).write_text("{half")
    before = _snapshot(out)
    with pytest.raises(JobFolderError, match="left as it was"):
        _open(out, model, **flags)
    assert _snapshot(out) == before


# ---------------------------------------------------------------- rule 4: resume

def _unfinished(tmp_path, model, settings=SETTINGS):
    out = tmp_path / "out"
    with _open(out, model, settings=settings) as job:
        _write(job, "work/block_0.bin")
        job.mark_done(0, {"err": 0.5})
    return out


def test_our_folder_without_flags_is_refused(tmp_path, model):
    out = _unfinished(tmp_path, model)
    before = _snapshot(out)
    with pytest.raises(JobFolderError, match="unfinished prune job.*--resume.*--overwrite"):
        _open(out, model)
    assert _snapshot(out) == before


def test_resume_continues_with_same_settings_and_other_runtime(tmp_path, model):
    out = _unfinished(tmp_path, model)
    with _open(out, model, resume=True, runtime={"device": "cuda", "batch_size": 3}) as job:
        assert job.resumed and not job.finished and job.done == {"0": {"err": 0.5}}
        assert job.files == ["work/block_0.bin"]
        job.finish()
    with _open(out, model, resume=True) as job:      # a finished job is reported as done, folder untouched
        before = _snapshot(out)
        assert job.finished
    assert _snapshot(out) == before


def test_resume_names_only_what_differs(tmp_path, model):
    out = _unfinished(tmp_path, model)
    before = _snapshot(out)
    other = {"method": "sparsegpt", "config": {"sparsity": 0.9, "pattern": None}, "seed": 0}
    with pytest.raises(JobFolderError) as e:
        _open(out, model, settings=other, resume=True)
    msg = str(e.value)
    assert "config.sparsity: 0.5 -> 0.9" in msg and "method" not in msg and "seed" not in msg
    with pytest.raises(JobFolderError, match="version: '1.0' -> '2.0'"):
        open_job(out, kind="prune", settings=SETTINGS, inputs={"model folder": model}, version="2.0", resume=True)
    (model / "model.safetensors").write_bytes(b"new weights!")
    with pytest.raises(JobFolderError, match="model folder files: model.safetensors changed"):
        _open(out, model, resume=True)
    assert _snapshot(out) == before


def test_resume_or_overwrite_on_a_new_folder_starts_the_job(tmp_path, model):
    for i, flags in enumerate(({"resume": True}, {"overwrite": True})):
        with _open(tmp_path / f"new{i}", model, **flags) as job:
            assert not job.resumed
            job.mark_done(0)


def test_resume_and_overwrite_together_are_refused(tmp_path, model):
    with pytest.raises(JobFolderError, match="contradict"):
        _open(tmp_path / "out", model, resume=True, overwrite=True)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- rule 5: overwrite removes only ours

def test_overwrite_removes_only_what_the_job_wrote(tmp_path, model):
    out = tmp_path / "out"
    with _open(out, model) as job:
        _write(job, "model.safetensors")
        _write(job, "merged/model.safetensors")
        job.output_dir("merged/1_Pooling")
        _write(job, "merged/1_Pooling/config.json")
        job.mark_done(0)
        job.finish()
    (out / "my_notes.txt").write_text("mine")
    (out / "merged" / "mine.txt").write_text("also mine")
    with _open(out, model, overwrite=True) as job:
        assert job.files == [] and not job.resumed
        left = _snapshot(out)
    assert set(left) == {JOB_FILE, "my_notes.txt", "merged", "merged/mine.txt"}
    assert json.loads((out / JOB_FILE).read_text())["done"] == {}


def test_overwrite_of_a_stale_subfolder_removes_it(tmp_path, model):
    out = tmp_path / "out"
    with _open(out, model) as job:
        _write(job, "merged/model.safetensors")
        job.mark_done(0)
    with _open(out, model, overwrite=True):
        pass
    assert not (out / "merged").exists()


# ---------------------------------------------------------------- rule 6: temporary files

def test_temporary_files_of_a_killed_write_are_removed_in_our_folder(tmp_path, model):
    out = _unfinished(tmp_path, model)
    (out / ".model.safetensors.x1y2_z3a.tmp").write_bytes(b"half")
    (out / "work" / ".block_1.bin.Qwe_r7yu.tmp").write_bytes(b"half")
    (out / ".shard-00002.safetensors.partial").write_bytes(b"half")
    (out / "keep.tmp").write_bytes(b"not ours by name")
    with _open(out, model, resume=True):
        pass
    assert set(_snapshot(out)) == {JOB_FILE, "work", "work/block_0.bin", "keep.tmp"}


def test_a_killed_atomic_write_leaves_a_name_that_rule_6_matches(tmp_path):
    from sparsity_engine.io import atomic_path

    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "model.safetensors") as tmp:
            name = os.path.basename(tmp)
            raise RuntimeError
    assert jobdir._TMP_RE.match(name)


# ---------------------------------------------------------------- rule 7: a failed start

def test_failed_start_in_a_new_folder_leaves_nothing(tmp_path, model):
    out = tmp_path / "new" / "out"
    with pytest.raises(KeyError):
        with _open(out, model) as job:
            _write(job, "config.json")
            raise KeyError("model load failed")
    assert not (tmp_path / "new").exists()
    with _open(out, model) as job:          # the next run is not blocked
        job.mark_done(0)


def test_failed_start_in_an_empty_folder_keeps_the_folder(tmp_path, model):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError):
        with _open(out, model) as job:
            _write(job, "sub/config.json")
            raise ValueError
    assert out.is_dir() and os.listdir(out) == []


def test_failure_after_progress_keeps_everything_for_resume(tmp_path, model):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with _open(out, model) as job:
            _write(job, "work/block_0.bin")
            job.mark_done(0)
            raise RuntimeError("crash in block 1")
    assert set(_snapshot(out)) == {JOB_FILE, "work", "work/block_0.bin"}
    with _open(out, model, resume=True) as job:
        assert job.done == {"0": {}}


def test_failed_resume_start_after_progress_keeps_the_job(tmp_path, model):
    out = _unfinished(tmp_path, model)
    before = _snapshot(out)
    with pytest.raises(OSError):
        with _open(out, model, resume=True):
            raise OSError("calibration file vanished")
    assert _snapshot(out) == before


# ---------------------------------------------------------------- rule 8: symlinks

def test_symlinks_in_the_output_folder_are_never_followed(tmp_path, model):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.bin").write_bytes(b"precious")
    out = tmp_path / "out"
    with _open(out, model) as job:
        _write(job, "precious.bin")
        job.output_dir("work")
        job.mark_done(0)
    # someone replaces our file and our folder by links to the victim's
    os.remove(out / "precious.bin")
    (out / "precious.bin").symlink_to(victim / "precious.bin")
    os.rmdir(out / "work")
    (out / "work").symlink_to(victim)
    with _open(out, model, resume=True) as job:
        with pytest.raises(JobFolderError, match="symlink"):
            job.output("work/precious.bin")
        with pytest.raises(JobFolderError, match="symlink"):
            job.path("precious.bin")
        with pytest.raises(JobFolderError, match="leaves"):
            job.output("../victim/precious.bin")
    with _open(out, model, overwrite=True):
        pass
    assert (victim / "precious.bin").read_bytes() == b"precious"      # only the links went
    assert not os.path.lexists(out / "precious.bin")


def test_output_folder_given_as_a_symlink_is_resolved(tmp_path, model):
    real_out = tmp_path / "real_out"
    real_out.mkdir()
    (tmp_path / "alias").symlink_to(real_out)
    with _open(tmp_path / "alias", model) as job:
        assert job.out_dir == os.path.realpath(real_out)
        job.mark_done(0)
    assert (real_out / JOB_FILE).is_file()


# ---------------------------------------------------------------- rule 9: one job at a time

def test_a_second_job_in_the_same_folder_is_refused(tmp_path, model):
    out = tmp_path / "out"
    with _open(out, model) as job:
        job.mark_done(0)
        code = (f"import sys; sys.path.insert(0, {os.getcwd()!r});\n"
                "from sparsity_engine.io.jobdir import open_job, JobFolderError\n"
                f"try:\n    open_job({str(out)!r}, kind='prune', settings={SETTINGS!r}, "
                f"inputs={{'model folder': {str(model)!r}}}, version='1.0', resume=True)\n"
                "except JobFolderError as e:\n    print('refused', e)\n")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert "refused" in res.stdout and "another job" in res.stdout, res.stderr


def test_existing_file_as_output_is_refused(tmp_path, model):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(JobFolderError, match="not a folder"):
        _open(f, model)
    assert f.read_text() == "x"
