"""The README's pruning-job command lines parse (its Python snippets run in test_readme)."""
import os
import re
import shlex

from sparsity_engine.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _section(title):
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index(title)
    end = text.find("\n### ", start + len(title))
    return text[start:end if end > 0 else None]


def test_pruning_job_command_lines_parse():
    blocks = re.findall(r"```bash\n(.*?)```", _section("### Pruning job"), re.S)
    lines = [ln.split("#")[0].strip() for b in blocks for ln in b.splitlines() if ln.startswith("sparsity-engine")]
    assert len(lines) >= 5
    parser = build_parser()
    for ln in lines:
        argv = shlex.split(ln)[1:]
        if "--help" not in argv:
            parser.parse_args(argv)
