"""mergekit's current release (0.1.5) for the parity tests: its source archive (for its own tests) and its package.

Nothing of mergekit is stored in this repository: the source archive is fetched at test time with pip (once,
then cached outside the repository, checked against its published sha256), and the package comes from the
``test`` extras. A test that needs either fails, not skips, when it is missing: the parity promise is not
checked otherwise.
"""
import hashlib
import os
import subprocess
import sys
import tarfile

VERSION = "0.1.5"
SDIST = f"mergekit-{VERSION}.tar.gz"
SDIST_SHA256 = "caa51dbbfa493bcd62218d17f2bc7bb1c7a2a2e4baf4e2f34a29d73c66c594aa"  # PyPI's digest of SDIST


def _cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "sparsity_engine_tests")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sdist_path() -> str:
    """The release's source archive: $SE_MERGEKIT_SDIST, the cache, or ``pip download`` into the cache.

    Raises RuntimeError (never skips) when it cannot be had or its digest is not PyPI's."""
    given = os.environ.get("SE_MERGEKIT_SDIST")
    path = given or os.path.join(_cache_dir(), SDIST)
    if not given and not os.path.isfile(path):
        os.makedirs(_cache_dir(), exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
               f"mergekit=={VERSION}", "-d", _cache_dir()]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode != 0 or not os.path.isfile(path):
            raise RuntimeError(f"could not download mergekit {VERSION}'s source archive ({' '.join(cmd)}):\n"
                               f"{res.stdout[-2000:]}\n{res.stderr[-2000:]}\nset SE_MERGEKIT_SDIST to a local copy")
    digest = _sha256(path)
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{path} has sha256 {digest}, not mergekit {VERSION}'s published {SDIST_SHA256}")
    return path


def extract_test(name: str, dest: str) -> str:
    """Write the release's tests/<name> into ``dest``; returns its path."""
    member = f"mergekit-{VERSION}/tests/{name}"
    with tarfile.open(sdist_path(), "r:gz") as tar:
        data = tar.extractfile(tar.getmember(member)).read()
    out = os.path.join(dest, name)
    with open(out, "wb") as f:
        f.write(data)
    return out


def require_package():
    """The installed mergekit package (the test extras pin it); AssertionError naming the fix if absent."""
    try:
        import mergekit  # noqa: F401
        from importlib.metadata import version
    except ImportError as exc:
        raise AssertionError(f"mergekit=={VERSION} is needed for the parity tests (pip install -e '.[test]' on "
                             f"Python >= 3.10): {exc}") from None
    installed = version("mergekit")
    assert installed == VERSION, f"the parity tests are for mergekit {VERSION}, {installed} is installed"
    return mergekit
