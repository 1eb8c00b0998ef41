"""Streaming pruning (issue 17): host memory bounded by a few blocks whatever the depth, output equal to the
in-memory pipeline's bit for bit, the report's timings, memory and bytes."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparsity_engine.io import SafetensorsReader  # noqa: E402
from sparsity_engine.pruning import calibration, pipeline  # noqa: E402
from sparsity_engine.pruning.settings import PruneConfig  # noqa: E402

BLOCKS = 24
VOCAB = 64        # small embeddings, so the blocks' weights dominate the model and the bound means something


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep")
    torch.manual_seed(4321)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=BLOCKS,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "model", safe_serialization=True)
    ids = torch.randint(0, VOCAB, (6, 16))
    torch.save(ids, root / "ids.pt")
    torch.save(torch.randint(0, VOCAB, (200,)), root / "eval_ids.pt")     # one stream of 200 tokens
    return str(root / "model"), str(root / "ids.pt")


CONFIG = dict(method="sparsegpt", sparsity=0.5, batch_size=2, backend="reference")


@pytest.fixture(scope="module")
def streamed(deep_model, tmp_path_factory):
    """One streamed job (several shards), shared by the tests below."""
    model_dir, ids_path = deep_model
    out = tmp_path_factory.mktemp("streamed") / "out"
    res = pipeline.run_prune_job(model_dir, str(out), PruneConfig(**CONFIG), calib=ids_path, nsamples=6, seqlen=16,
                                 device="cpu", max_shard_bytes=200_000)
    return out, res


def _bytes(reader, names):
    return sum(reader.info(n).nbytes for n in names)


def test_streaming_holds_a_few_blocks_and_equals_the_in_memory_pipeline(deep_model, streamed):
    model_dir, ids_path = deep_model
    out, res = streamed
    src = SafetensorsReader(model_dir)
    block = _bytes(src, [n for n in src.keys() if n.startswith("model.layers.0.")])
    outside = _bytes(src, [n for n in src.keys() if not n.startswith("model.layers.")])
    total = _bytes(src, src.keys())
    peak = res.report["memory"]["peak_loader_host_bytes"]
    assert total > outside + 20 * block                      # the blocks are most of the model ...
    assert peak <= outside + 4 * block, (peak, outside, block)   # ... and at most 4 of them were ever held
    assert res.report["io"]["bytes_read"] == total

    model = transformers.LlamaForCausalLM.from_pretrained(model_dir).eval()
    ids = calibration.calibration_ids(ids_path, None, nsamples=6, seqlen=16, seed=0, vocab_size=VOCAB)
    pipeline.prune_model(model, ids, PruneConfig(**CONFIG), device="cpu")
    written = SafetensorsReader(str(out))
    sd = model.state_dict()
    assert set(written.keys()) == set(sd)                    # this model's head is not tied to its embeddings
    for k in written.keys():
        assert torch.equal(written.get(k), sd[k]), k


def test_report_has_phases_per_block_memory_and_bytes(streamed):
    out, _ = streamed
    report = json.load(open(out / pipeline.REPORT_JSON))
    per_block = report["timings"]["per_block"]
    assert sorted(per_block, key=int) == [str(i) for i in range(BLOCKS)]
    for t in per_block.values():
        for phase in ("read_s", "hessian_s", "prune_s", "propagate_s", "write_s"):
            assert t[phase] >= 0
    phases = report["timings"]["phases"]
    assert phases["prune_s"] > 0 and phases["capture_s"] > 0 and report["timings"]["total_s"] > phases["prune_s"]
    assert report["memory"]["peak_rss_bytes"] > 0 and report["memory"]["peak_gpu_bytes"] is None
    shards = list(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    header = sum(8 + int.from_bytes(open(f, "rb").read(8), "little") for f in shards)
    assert report["io"]["bytes_written"] == sum(f.stat().st_size for f in shards) - header
    assert report["files"]["weights"]["metadata"]["total_size"] == report["io"]["bytes_written"]


@pytest.mark.cuda
@pytest.mark.parametrize("offload", [False, True])
def test_streaming_on_the_gpu_equals_the_in_memory_pipeline(deep_model, tmp_path, monkeypatch, offload):
    """Pinned buffers, non-blocking copies, the background writer and (offload) activations kept in pinned
    host memory: the reference backend makes every product deterministic, so the outputs must be equal."""
    model_dir, ids_path = deep_model
    if offload:
        monkeypatch.setattr(pipeline._StreamingRun, "ACTIVATIONS_ON_GPU", 0.0)
    out = tmp_path / "out"
    res = pipeline.run_prune_job(model_dir, str(out), PruneConfig(**CONFIG), calib=ids_path, nsamples=6, seqlen=16,
                                 device="cuda", evaluate=True, eval_text=ids_path.replace("ids.pt", "eval_ids.pt"),
                                 eval_seqlen=16)
    assert res.report["memory"]["peak_gpu_bytes"] > 0
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir).eval()
    ids = calibration.calibration_ids(ids_path, None, nsamples=6, seqlen=16, seed=0, vocab_size=VOCAB)
    pipeline.prune_model(model, ids, PruneConfig(**CONFIG), device="cuda")
    written = SafetensorsReader(str(out))
    sd = model.state_dict()
    for k in written.keys():
        assert torch.equal(written.get(k), sd[k].cpu()), k
    ev = res.report["eval"]
    assert ev["dense"]["windows"] == 12 and ev["pruned"]["perplexity"] > 0


@pytest.mark.cuda
def test_streaming_on_the_gpu_with_the_fast_backends(deep_model, tmp_path):
    model_dir, ids_path = deep_model
    out = tmp_path / "out"
    res = pipeline.run_prune_job(model_dir, str(out), PruneConfig(method="sparsegpt", pattern="2:4"), calib=ids_path,
                                 nsamples=6, seqlen=16, device="cuda")
    written = SafetensorsReader(str(out))
    for r in res.report["layers"]:
        w = written.get(r["name"] + ".weight")
        assert r["sparsity"] == pytest.approx(float((w == 0).double().mean()))
        assert int((w != 0).reshape(w.shape[0], -1, 4).sum(-1).max()) <= 2
