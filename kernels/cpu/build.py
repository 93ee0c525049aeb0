"""Build the CPU kernels ahead of time: `python -m sgl.kernels.cpu.build` (run by `make setup`).

Writes kernels/cpu/_sgl_cpu_quant*.so and _build_info.json (the ISA compiled in, checked at load).
AVX2+FMA+F16C when the build machine has them (x86-64), else the portable scalar path. Exit code 0
even when the compiler fails (the package then runs on the torch reference path) unless --strict."""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import shutil
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = [HERE / "quant_gemm.cpp", HERE / "decode_attention.cpp", HERE / "rms_norm.cpp", HERE / "decode_layer.cpp",
           HERE / "decode_rows.cpp", HERE / "thread_pool.cpp"]


def isa_flags() -> tuple[str, list[str]]:
    if platform.machine() in ("x86_64", "AMD64"):
        try:
            flags = set(next(ln.split(":", 1)[1].split()
                             for ln in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                             if ln.startswith("flags")))
        except (OSError, StopIteration):
            flags = set()
        if {"avx2", "fma", "f16c"} <= flags:
            if "avx_vnni" in flags:  # vpdpwssd: the q16-activation dot's multiply-add in one instruction
                return "avx2+avxvnni", ["-mavx2", "-mfma", "-mf16c", "-mavxvnni"]
            return "avx2", ["-mavx2", "-mfma", "-mf16c"]
    return "scalar", []


def build(force_scalar: bool = False, profile_rows: bool = False) -> pathlib.Path:
    from setuptools import setup
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    isa, flags = ("scalar", []) if force_scalar else isa_flags()
    defines = ["-DSGL_ROWS_PROFILE"] if profile_rows else []  # decode_rows' per-phase timers (rows_profile.h)
    ext = CppExtension("_sgl_cpu_quant", [str(s) for s in SOURCES],
                       extra_compile_args=["-O3", "-fopenmp", "-Wno-unused-label", *flags, *defines], extra_link_args=["-fopenmp"])
    for old in HERE.glob("_sgl_cpu_quant*.so"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        setup(name="sgl_cpu_quant", ext_modules=[ext], cmdclass={"build_ext": BuildExtension},
              script_args=["-q", "build_ext", "--build-lib", str(HERE), "--build-temp", tmp])
    (HERE / "_build_info.json").write_text(json.dumps({"isa": isa, "flags": flags}) + "\n")
    shutil.rmtree(HERE / "build", ignore_errors=True)
    return next(HERE.glob("_sgl_cpu_quant*.so"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--scalar", action="store_true", help="build the portable path even on an AVX2 machine")
    p.add_argument("--profile-rows", action="store_true",
                   help="decode_rows' per-phase timers, printed at exit (kernels/cpu/rows_profile.h); not for use")
    p.add_argument("--strict", action="store_true", help="fail (exit 1) when the build fails")
    args = p.parse_args()
    try:
        path = build(args.scalar, args.profile_rows)
    except (Exception, SystemExit) as e:  # setuptools raises SystemExit on compiler errors
        print(f"sgl.kernels.cpu: building the C++ extension failed ({e}); the torch reference path will be used",
              file=sys.stderr)
        return 1 if args.strict else 0
    print(f"sgl.kernels.cpu: built {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
