"""The sparsity-engine command: exit codes and messages for bad usage, info, help."""
import json

import pytest
import torch

from sparsity_engine.cli import EXIT_INPUT, EXIT_OK, EXIT_USAGE, build_parser, main


def _err(capsys):
    return capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["prune", "m", "--out", "o", "--sparsity", "1.5"], "--sparsity"),
    (["prune", "m", "--out", "o", "--sparsity", "-0.1"], "--sparsity"),
    (["prune", "m", "--out", "o", "--sparsity", "half"], "--sparsity"),
    (["prune", "m", "--out", "o", "--pattern", "4:2"], "--pattern"),
    (["prune", "m", "--out", "o", "--pattern", "2-4"], "--pattern"),
    (["prune", "m", "--out", "o", "--pattern", "2:4", "--sparsity", "0.5"], "not allowed with"),
    (["prune", "m", "--out", "o", "--method", "random"], "--method"),
    (["prune", "m", "--out", "o", "--nsamples", "0"], "--nsamples"),
    (["prune", "m", "--out", "o", "--seqlen", "x"], "--seqlen"),
    (["prune", "m", "--out", "o", "--override", "nonsense"], "--override"),
    (["prune", "m", "--out", "o", "--resume", "--overwrite"], "not allowed with"),
    (["prune", "m"], "--out"),
    (["prune-task-vectors", "--base", "b", "--finetuned", "f", "--out", "o", "--density", "0"], "--density"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_message(argv, needle, capsys):
    assert main(argv) == EXIT_USAGE
    assert needle in _err(capsys)


def test_bad_override_target_is_usage_error(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    rc = main(["prune", str(tmp_path / "m"), "--out", str(tmp_path / "o"), "--override", "*.q=2:x", "--device", "cpu"])
    assert rc == EXIT_USAGE and "N:M" in _err(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_usage_error(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    assert main(["prune", str(tmp_path / "m"), "--out", str(tmp_path / "o"), "--device", "cuda"]) == EXIT_USAGE
    assert "no CUDA GPU" in _err(capsys)


def test_missing_inputs_exit_3(tmp_path, capsys):
    assert main(["prune", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--device", "cpu"]) == EXIT_INPUT
    assert "does not exist" in _err(capsys)
    (tmp_path / "m").mkdir()
    assert main(["prune", str(tmp_path / "m"), "--out", str(tmp_path / "o2"), "--device", "cpu",
                 "--calib", str(tmp_path / "missing.txt")]) == EXIT_INPUT
    assert "calibration file" in _err(capsys)
    assert main(["prune", str(tmp_path / "m"), "--out", str(tmp_path / "o3"), "--device", "cpu"]) == EXIT_INPUT
    assert "config.json" in _err(capsys)


def test_no_command_and_help(capsys):
    assert main([]) == EXIT_USAGE
    assert main(["--help"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "prune" in out and "exit codes" in out
    assert main(["prune", "--help"]) == EXIT_OK


def test_info(capsys):
    assert main(["info"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "torch" in out and "reference" in out
    assert main(["info", "--json"]) == EXIT_OK
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["reference"]["available"] is True


def test_console_script_declared():
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert 'sparsity-engine = "sparsity_engine.cli:main"' in open(os.path.join(root, "pyproject.toml")).read()
    assert build_parser().prog == "sparsity-engine"
