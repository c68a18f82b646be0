"""The optional C extension graftlm._qkernels (graftlm/kernels/cpu/qkernels.c).

Everything else is in pyproject.toml. The extension needs only a C compiler and Python's headers;
it is built with OpenMP when the compiler has it, without otherwise, and an install without any
compiler still succeeds: graftlm then runs on torch's own kernels (`graftlm inspect` says which).
No -march flag: the AVX2 code paths carry target attributes and are chosen at run time.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

FLAGS = [
    "-O3",
    "-std=c11",
    "-ffp-contract=off",
]  # no fused multiply-add: dequantize matches gguf-py bit for bit


class OptionalOpenMP(build_ext):
    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001 - any compiler failure: retry without OpenMP
            if "-fopenmp" not in ext.extra_compile_args:
                raise
            self.warn(f"building {ext.name} with OpenMP failed ({e}); building it single-threaded")
            ext.extra_compile_args = [a for a in ext.extra_compile_args if a != "-fopenmp"]
            ext.extra_link_args = [a for a in ext.extra_link_args if a != "-fopenmp"]
            super().build_extension(ext)


setup(
    ext_modules=[
        Extension(
            "graftlm._qkernels",
            sources=["graftlm/kernels/cpu/qkernels.c"],
            extra_compile_args=[*FLAGS, "-fopenmp"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": OptionalOpenMP},
)
