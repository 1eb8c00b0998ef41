"""Build hook: compiles csrc/ into sparsity_engine._C when nvcc is found; pure Python otherwise.

The extension is plain CUDA C++ bound with pybind11 (no libtorch), so it builds on any machine with nvcc,
GPU or not. The same builder (sparsity_engine/_build.py, stdlib only) serves the just-in-time path.
"""
import importlib.util
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_builder():
    spec = importlib.util.spec_from_file_location("_se_build", os.path.join(HERE, "sparsity_engine", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class NvccBuildExt(build_ext):
    """Builds the one extension with nvcc + ninja instead of the C compiler setuptools would use."""

    def build_extension(self, ext):
        builder = _load_builder()
        output = os.path.abspath(self.get_ext_fullpath(ext.name))
        builder.build_extension(
            source_dir=os.path.join(HERE, "csrc"),
            output=output,
            build_dir=os.path.abspath(os.path.join(self.build_temp, "se_ext")),
            archs=builder.archs_from_env(default=builder.DEFAULT_AOT_ARCHS),
            verbose=self.verbose,
        )


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package (sparsity_engine/_csrc) so an installed wheel can build just in time."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads the repository's csrc/ directly
            return
        target = os.path.join(self.build_lib, "sparsity_engine", "_csrc")
        self.mkpath(target)
        for name in sorted(os.listdir(os.path.join(HERE, "csrc"))):
            if name.endswith((".cu", ".cpp", ".h", ".cuh", ".hpp", ".md")):
                self.copy_file(os.path.join(HERE, "csrc", name), os.path.join(target, name))


builder = _load_builder()
nvcc = builder.find_nvcc()
# pip runs this file once per build hook; say it once, in the hook that builds (not egg_info / dist_info)
_building = not {"egg_info", "dist_info"} & set(sys.argv[1:])
if nvcc and os.environ.get("SPARSITY_ENGINE_NO_EXT", "0") != "1":
    ext_modules = [Extension("sparsity_engine._C", sources=[])]
    if _building:
        print(f"sparsity_engine: building the CUDA extension with {nvcc}", file=sys.stderr)
else:
    ext_modules = []
    if _building:
            print("sparsity_engine: nvcc not found (or SPARSITY_ENGINE_NO_EXT=1): installing pure Python (reference + "
              "Triton backends; the CUDA extension builds just in time where nvcc appears)", file=sys.stderr)

setup(ext_modules=ext_modules, cmdclass={"build_ext": NvccBuildExt, "build_py": BuildPyWithSources})
