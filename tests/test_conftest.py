"""The test set-up itself: the run's SE_TEST_SEED is shown under the README's `pytest -q` too."""
import os
import subprocess
import sys


def test_seed_is_shown_under_quiet(tmp_path):
    (tmp_path / "test_one.py").write_text("def test_one():\n    assert True\n")
    here = os.path.dirname(os.path.abspath(__file__))
    (tmp_path / "conftest.py").write_text(open(os.path.join(here, "conftest.py")).read())
    env = dict(os.environ, SE_TEST_SEED="424242")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "SE_TEST_SEED=424242" in res.stdout, res.stdout
