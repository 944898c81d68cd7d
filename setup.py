"""Builds rlkern._C, the C++ CPU kernels in csrc/, and ships the top-level kernels/ as rlkern.kernels.

Install with `pip install --no-build-isolation -e .` (or build a wheel the same way) against an
installed torch: the extension links against that torch's libc10/libtorch_cpu.
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))

# -O3 plus GCC vector extensions: csrc/simd.h writes 16-lane float code that each kernel compiles
# for AVX-512, AVX2+FMA and baseline x86-64 via target_clones, picked at load time by the CPU.
CXX_FLAGS = ["-O3", "-std=c++20", "-Wno-psabi", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wall",
             "-Wno-unused-function"]

# csrc/ reads the kernel codes from rlkern/codes.py through a generated header (one table for
# Python, Triton and C++). The file imports nothing, so it runs here before rlkern is built.
GENERATED = os.path.join(HERE, "build", "generated")
_codes: dict = {}
exec(open(os.path.join(HERE, "rlkern", "codes.py")).read(), _codes)
os.makedirs(GENERATED, exist_ok=True)
_header = os.path.join(GENERATED, "rlkern_codes.h")
if not os.path.exists(_header) or open(_header).read() != _codes["cpp_header"]():
    with open(_header, "w") as f:
        f.write(_codes["cpp_header"]())

ext = CppExtension(
    name="rlkern._C",
    sources=sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cpp"))),
    include_dirs=[os.path.join(HERE, "csrc"), GENERATED],
    extra_compile_args={"cxx": CXX_FLAGS},
    extra_link_args=["-fopenmp"],
)

setup(
    packages=["rlkern", "rlkern.ops", "rlkern.compat", "rlkern.train", "rlkern.kernels"],
    package_dir={"rlkern": "rlkern", "rlkern.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
