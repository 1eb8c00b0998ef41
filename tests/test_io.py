"""io: atomic writes, safetensors round trips and sharding, the reader, planned shards (the job folder: test_jobdir)."""
import json
import os

import pytest
import torch
from safetensors import safe_open

from sparsity_engine import io as se_io


def _files(folder):
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------- atomic writes

def test_atomic_write_bytes_and_text(tmp_path):
    p = tmp_path / "a.bin"
    with se_io.atomic_write(p, "wb") as f:
        f.write(b"\x00\x01hello")
    assert p.read_bytes() == b"\x00\x01hello"
    with se_io.atomic_write(str(p), "w") as f:
        f.write("héllo")
    assert p.read_text(encoding="utf-8") == "héllo"
    assert _files(tmp_path) == ["a.bin"]  # no temporary file left


def test_atomic_write_crash_leaves_no_file(tmp_path):
    p = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with se_io.atomic_write(p) as f:
            f.write(b"partial data")
            raise RuntimeError("boom")
    assert _files(tmp_path) == []


def test_atomic_write_crash_keeps_old_content(tmp_path):
    p = tmp_path / "out.txt"
    p.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with se_io.atomic_write(p, "w") as f:
            f.write("new but incomplete")
            raise KeyboardInterrupt
    assert p.read_text() == "old"
    assert _files(tmp_path) == ["out.txt"]


def test_atomic_write_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with se_io.atomic_write(tmp_path / "x", "ab"):
            pass
    with pytest.raises(FileNotFoundError, match="does not exist"):
        with se_io.atomic_write(tmp_path / "missing" / "x"):
            pass
    with pytest.raises(TypeError, match="path"):
        with se_io.atomic_write(3):
            pass


def test_write_json_atomic(tmp_path):
    p = tmp_path / "r.json"
    se_io.write_json_atomic(p, {"a": [1, 2.5, None], "b": "x"})
    assert json.loads(p.read_text()) == {"a": [1, 2.5, None], "b": "x"}
    with pytest.raises(TypeError, match="JSON"):
        se_io.write_json_atomic(tmp_path / "bad.json", {"t": object()})
    with pytest.raises(TypeError, match="JSON"):
        se_io.write_json_atomic(tmp_path / "nan.json", {"x": float("nan")})
    assert _files(tmp_path) == ["r.json"]


# ---------------------------------------------------------------- safetensors

def _tensors():
    base = torch.randn(6, 10)
    return {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c.t": torch.randn(4, 6).t(),             # non-contiguous
        "tied.0": base, "tied.1": base,           # shared storage
        "slice": base[2:4],                       # view of part of a storage
        "ints": torch.arange(5, dtype=torch.int64),
        "empty": torch.empty(0, 3),
        "half": torch.randn(2, 2).half(),
    }


def _assert_same(got, expected):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected)


def test_save_safetensors_atomic_round_trip(tmp_path):
    ts = _tensors()
    p = se_io.save_safetensors_atomic(ts, tmp_path / "x.safetensors", metadata={"note": "hi"})
    assert _files(tmp_path) == ["x.safetensors"]
    with safe_open(p, framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "hi"}
        for k, v in ts.items():
            _assert_same(f.get_tensor(k), v)
    assert ts["c.t"].is_contiguous() is False  # the input is never modified


def test_save_safetensors_bad_input_leaves_no_file(tmp_path):
    with pytest.raises(TypeError, match="metadata"):
        se_io.save_safetensors_atomic({"a": torch.ones(2)}, tmp_path / "x.safetensors", metadata={"k": 1})
    with pytest.raises(TypeError, match="'a'"):
        se_io.save_safetensors_atomic({"a": [1, 2]}, tmp_path / "x.safetensors")
    assert _files(tmp_path) == []


def test_sharded_writer_single_shard(tmp_path):
    ts = _tensors()
    w = se_io.ShardedSafetensorsWriter(tmp_path)
    for k, v in ts.items():
        w.add(k, v)
    index = w.close()
    assert _files(tmp_path) == ["model.safetensors"]
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ts.values())
    r = se_io.SafetensorsReader(tmp_path)
    assert sorted(r.keys()) == sorted(ts) and r.metadata == {"format": "pt"} and len(r) == len(ts)
    for k, v in ts.items():
        _assert_same(r.get(k), v)


@pytest.mark.parametrize("max_bytes", [1, 40, 64, 100, 4 * 25 - 1])
def test_sharded_writer_boundaries(tmp_path, max_bytes):
    # five fp32 tensors of 25 elements (100 bytes) and one of 10 (40 bytes)
    ts = {f"w{i}": torch.randn(25) for i in range(5)}
    ts["small"] = torch.randn(10)
    with se_io.ShardedSafetensorsWriter(tmp_path, max_shard_bytes=max_bytes) as w:
        for k, v in ts.items():
            w.add(k, v)
    files = _files(tmp_path)
    index = json.loads((tmp_path / se_io.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    # any limit below 2 tensors' size gives one tensor per shard, a tensor over the limit alone in its shard
    assert len(shards) == 6
    assert shards == [se_io.shard_name(i, 6) for i in range(1, 7)] and shards[0] == "model-00001-of-00006.safetensors"
    assert files == sorted(shards + [se_io.INDEX_FILE])
    assert index["metadata"]["total_size"] == 5 * 100 + 40
    r = se_io.SafetensorsReader(tmp_path)
    assert set(r.keys()) == set(ts)
    for k, v in ts.items():
        _assert_same(r.get(k), v)


def test_sharded_writer_packs_up_to_limit(tmp_path):
    ts = {f"w{i}": torch.randn(25) for i in range(5)}  # 100 bytes each
    with se_io.ShardedSafetensorsWriter(tmp_path, max_shard_bytes=200) as w:
        for k, v in ts.items():
            w.add(k, v)
    index = json.loads((tmp_path / se_io.INDEX_FILE).read_text())
    assert index["weight_map"] == {"w0": "model-00001-of-00003.safetensors", "w1": "model-00001-of-00003.safetensors",
                                   "w2": "model-00002-of-00003.safetensors", "w3": "model-00002-of-00003.safetensors",
                                   "w4": "model-00003-of-00003.safetensors"}
    with safe_open(str(tmp_path / "model-00002-of-00003.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"} and sorted(f.keys()) == ["w2", "w3"]


def test_sharded_writer_holds_one_shard(tmp_path, monkeypatch):
    writer = se_io.ShardedSafetensorsWriter(tmp_path, max_shard_bytes=250)
    peak = 0
    for i in range(8):
        writer.add(f"w{i}", torch.randn(25))
        peak = max(peak, writer._current_bytes)
        assert len(writer._current) <= 2
    writer.close()
    assert peak <= 250


def test_sharded_writer_replaces_other_layout(tmp_path):
    with se_io.ShardedSafetensorsWriter(tmp_path, max_shard_bytes=100) as w:
        for i in range(3):
            w.add(f"w{i}", torch.randn(25))
    assert len(_files(tmp_path)) == 4
    with se_io.ShardedSafetensorsWriter(tmp_path) as w:  # same folder, now one shard
        w.add("only", torch.ones(3))
    assert _files(tmp_path) == ["model.safetensors"]
    assert se_io.SafetensorsReader(tmp_path).keys() == ["only"]


def test_sharded_writer_removes_partials_of_a_killed_writer(tmp_path):
    (tmp_path / ".shard-00001.safetensors.partial").write_bytes(b"half a shard")
    (tmp_path / "config.json").write_text("{}")
    with se_io.ShardedSafetensorsWriter(tmp_path) as w:
        w.add("a", torch.ones(2))
    assert _files(tmp_path) == ["config.json", "model.safetensors"]


def test_sharded_writer_errors_and_abort(tmp_path):
    w = se_io.ShardedSafetensorsWriter(tmp_path, max_shard_bytes=50)
    w.add("a", torch.randn(25))
    with pytest.raises(ValueError, match="already added"):
        w.add("a", torch.randn(2))
    w.add("b", torch.randn(25))  # writes shard 1 to a temporary name
    with pytest.raises(RuntimeError):
        with w:
            raise RuntimeError("crash")
    assert _files(tmp_path) == []  # abort removed the temporary shard
    with pytest.raises(RuntimeError, match="after close"):
        w.add("c", torch.ones(1))
    with pytest.raises(ValueError, match="max_shard_bytes"):
        se_io.ShardedSafetensorsWriter(tmp_path, max_shard_bytes=0)


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        se_io.SafetensorsReader(tmp_path / "nope")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="pytorch_model.bin|pickle"):
        se_io.SafetensorsReader(tmp_path)
    se_io.save_safetensors_atomic({"a": torch.ones(2)}, tmp_path / "model.safetensors")
    r = se_io.SafetensorsReader(tmp_path)
    with pytest.raises(KeyError, match="'zz'"):
        r.get("zz")
    # an index naming a missing shard
    sub = tmp_path / "sharded"
    sub.mkdir()
    se_io.write_json_atomic(sub / se_io.INDEX_FILE,
                            {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors"}})
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002"):
        se_io.SafetensorsReader(sub)


def test_reader_single_file_path_and_other_name(tmp_path):
    p = se_io.save_safetensors_atomic({"x": torch.arange(3.0)}, tmp_path / "adapter.safetensors")
    assert se_io.SafetensorsReader(p).get("x").tolist() == [0.0, 1.0, 2.0]
    assert se_io.SafetensorsReader(tmp_path).keys() == ["x"]


# ---------------------------------------------------------------- corrupt files, reads into buffers, planned shards

def test_truncated_or_corrupt_file_is_refused_naming_it(tmp_path):
    p = se_io.save_safetensors_atomic({"a": torch.randn(64, 8), "b": torch.randn(3)}, tmp_path / "model.safetensors")
    good = open(p, "rb").read()
    for what, data in (("truncated", good[:-5]), ("short", good[:6]), ("header", good[:8] + b"{oops" + good[13:]),
                       ("length", (10**9).to_bytes(8, "little") + good[8:])):
        with open(p, "wb") as f:
            f.write(data)
        with pytest.raises(se_io.SafetensorsFileError, match="model.safetensors.*truncated or corrupt"):
            se_io.SafetensorsReader(tmp_path)


def test_index_pointing_outside_its_folder_is_refused(tmp_path):
    outside = tmp_path / "secret"
    outside.mkdir()
    se_io.save_safetensors_atomic({"a": torch.ones(2)}, outside / "x.safetensors")
    model = tmp_path / "model"
    model.mkdir()
    for target in ("../secret/x.safetensors", str(outside / "x.safetensors")):
        se_io.write_json_atomic(model / se_io.INDEX_FILE, {"metadata": {}, "weight_map": {"a": target}})
        with pytest.raises(ValueError, match="outside the model folder"):
            se_io.SafetensorsReader(model)


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    se_io.save_safetensors_atomic({"a": torch.ones(2)}, tmp_path / "s1.safetensors")
    se_io.write_json_atomic(tmp_path / se_io.INDEX_FILE, {"weight_map": {"a": "s1.safetensors",
                                                                         "b": "s1.safetensors"}})
    with pytest.raises(se_io.SafetensorsFileError, match="s1.safetensors.*'b'"):
        se_io.SafetensorsReader(tmp_path)


def test_read_into_a_preallocated_buffer(tmp_path):
    t = torch.randn(5, 7).to(torch.bfloat16)
    se_io.save_safetensors_atomic({"t": t}, tmp_path / "model.safetensors")
    r = se_io.SafetensorsReader(tmp_path)
    info = r.info("t")
    assert info.dtype == torch.bfloat16 and info.shape == (5, 7) and info.nbytes == 70
    buf = torch.full((35,), float("nan"), dtype=torch.bfloat16)
    got = r.read_into("t", buf)
    assert torch.equal(got, t) and got.data_ptr() == buf.data_ptr() and r.bytes_read == 70
    with pytest.raises(ValueError, match="70 bytes"):
        r.read_into("t", torch.empty(3, dtype=torch.bfloat16))


@pytest.mark.parametrize("max_bytes", [10**9, 300])
def test_planned_shards_filled_in_any_order(tmp_path, max_bytes):
    ts = {f"w{i}": torch.randn(5, 10).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(6)}
    ts["i"] = torch.arange(4)
    plan = se_io.ShardPlan.make([(k, v.dtype, v.shape) for k, v in ts.items()], max_bytes)
    w = se_io.PlannedShardWriter(tmp_path, plan)
    for k in reversed(list(ts)):
        assert w.write(k, ts[k])
    index = w.close()
    files = _files(tmp_path)
    if len(plan.shards) == 1:
        assert files == ["model.safetensors"]
    else:
        assert se_io.INDEX_FILE in files and not [f for f in files if f.endswith(".partial")]
    r = se_io.SafetensorsReader(tmp_path)
    assert set(r.keys()) == set(ts) and index["metadata"]["total_size"] == sum(
        v.numel() * v.element_size() for v in ts.values())
    for k, v in ts.items():
        _assert_same(r.get(k), v)
        with safe_open(r.file_of(k), framework="pt") as f:      # the reference reader agrees
            _assert_same(f.get_tensor(k), v)


def test_planned_shards_resume_a_partial_shard(tmp_path):
    ts = {f"w{i}": torch.randn(20) for i in range(4)}
    plan = se_io.ShardPlan.make([(k, v.dtype, v.shape) for k, v in ts.items()], 10**6)
    w = se_io.PlannedShardWriter(tmp_path, plan)
    w.write("w0", ts["w0"])
    w.write("w1", ts["w1"])
    w.sync()
    w.abort()                                        # the process dies here
    assert _files(tmp_path) == [".model.safetensors.partial"]
    w = se_io.PlannedShardWriter(tmp_path, plan)
    w.written(["w0", "w1"])
    w.write("w2", ts["w2"])
    w.write("w3", ts["w3"])
    w.close()
    r = se_io.SafetensorsReader(tmp_path)
    for k, v in ts.items():
        _assert_same(r.get(k), v)
    other = se_io.ShardPlan.make([(k, v.dtype, v.shape) for k, v in ts.items()][:3], 10**6)
    (tmp_path / ".model.safetensors.partial").write_bytes(b"x" * 20)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(se_io.SafetensorsFileError, match="does not match"):
        se_io.PlannedShardWriter(tmp_path, other)
