"""The CUDA library build: cache key, one builder per cache folder, logged failures.

A stand-in compiler (a shell script that answers ``--version``, counts its builds and writes
the output file) makes these tests independent of a real CUDA toolkit; the real build runs in
the GPU tests."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest

from megatron_dsa.kernels import cuda_build

FAKE_NVCC = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "fake nvcc {version}"; exit 0; fi
echo build >> "{count}"
sleep {sleep}
{action}
"""
WRITE_OUTPUT = """out=""
prev=""
for a in "$@"; do if [ "$prev" = "-o" ]; then out="$a"; fi; prev="$a"; done
echo library > "$out"
exit 0"""
FAIL = 'echo "error: something the log must keep" >&2; exit 2'


def fake_nvcc(tmp_path, version="1.0", fail=False, sleep=0.0, name="nvcc"):
    count = tmp_path / f"{name}.count"
    path = tmp_path / name
    path.write_text(FAKE_NVCC.format(version=version, count=count, sleep=sleep,
                                     action=FAIL if fail else WRITE_OUTPUT))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path), count


def builds(count_file) -> int:
    return len(count_file.read_text().splitlines()) if count_file.exists() else 0


@pytest.fixture
def sources(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_DSA_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "k.cu"
    src.write_text("// kernel\n")
    return [src]


def test_cache_location_is_the_environment_variable(sources, tmp_path):
    assert cuda_build.cache_dir() == tmp_path / "cache"


def test_key_covers_compiler_version_arch_and_sources(sources, tmp_path):
    nvcc1, _ = fake_nvcc(tmp_path, "1.0", name="nvcc1")
    nvcc2, _ = fake_nvcc(tmp_path, "2.0", name="nvcc2")
    base = cuda_build.library_path("lib", sources, nvcc=nvcc1)
    assert base.parent == tmp_path / "cache" and "sm_90a" in base.name
    assert cuda_build.library_path("lib", sources, nvcc=nvcc1) == base
    assert cuda_build.library_path("lib", sources, nvcc=nvcc2) != base  # compiler version
    assert cuda_build.library_path("lib", sources, arch="sm_100a", nvcc=nvcc1) != base  # architecture
    sources[0].write_text("// kernel, changed\n")
    assert cuda_build.library_path("lib", sources, nvcc=nvcc1) != base  # sources


def test_build_is_cached(sources, tmp_path):
    nvcc, count = fake_nvcc(tmp_path)
    first = cuda_build.build_library("lib", sources, nvcc=nvcc)
    assert first.read_text() == "library\n"
    assert cuda_build.build_library("lib", sources, nvcc=nvcc) == first
    assert builds(count) == 1
    cuda_build.build_library("lib", sources, nvcc=nvcc, force=True)
    assert builds(count) == 2


def test_failed_build_names_its_log(sources, tmp_path):
    nvcc, _ = fake_nvcc(tmp_path, fail=True)
    with pytest.raises(cuda_build.CudaBuildError) as err:
        cuda_build.build_library("lib", sources, nvcc=nvcc)
    log = err.value.log_path
    assert log is not None and str(log) in str(err.value)
    text = log.read_text()
    assert "something the log must keep" in text and "exit code 2" in text
    assert not list((tmp_path / "cache").glob("*.so"))


def test_missing_compiler_is_a_clear_error(sources, tmp_path):
    with pytest.raises(cuda_build.CudaBuildError, match="cannot run"):
        cuda_build.build_library("lib", sources, nvcc=str(tmp_path / "no-such-nvcc"))


@pytest.mark.parametrize("fail", [True, False])
def test_library_remembers_its_failure(sources, tmp_path, monkeypatch, fail):
    """``CudaLibrary``: a failed build (or a file that does not load as a library) is an error
    that names the library, returned again without a second build."""
    nvcc, count = fake_nvcc(tmp_path, fail=fail)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    declared = []
    lib = cuda_build.CudaLibrary("lib", sources, (), "sm_90a", declared.append)
    why = lib.error()
    assert why is not None and ("nvcc failed" in why if fail else "cannot load the CUDA library lib" in why)
    assert lib.error() == why and builds(count) == 1 and not declared
    with pytest.raises(cuda_build.CudaBuildError):
        lib.get()


# the child loads cuda_build.py by path: it needs neither torch nor the package (fast start)
CHILD = textwrap.dedent("""
    import importlib.util, sys
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("cuda_build", sys.argv[3])
    cuda_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cuda_build)
    try:
        print("OK", cuda_build.build_library("lib", [Path(sys.argv[1])], nvcc=sys.argv[2]))
    except cuda_build.CudaBuildError as exc:
        print("ERR", exc)
""")


def _race(sources, nvcc, n=3):
    env = dict(os.environ)
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(sources[0]), nvcc, cuda_build.__file__], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    return [o[0].strip().splitlines()[-1] for o in outs]


def test_one_builder_per_cache_folder(sources, tmp_path):
    """Three processes ask for the library at once: one compiles, the others wait on the file
    lock and load what it wrote."""
    nvcc, count = fake_nvcc(tmp_path, sleep=1.0)
    lines = _race(sources, nvcc)
    assert builds(count) == 1
    assert len(set(lines)) == 1 and lines[0].startswith("OK "), lines


def test_waiters_share_a_failed_build(sources, tmp_path):
    """A failed build is not repeated by the processes that waited for it: they raise its error."""
    nvcc, count = fake_nvcc(tmp_path, fail=True, sleep=1.0)
    lines = _race(sources, nvcc)
    assert builds(count) == 1, lines
    assert all(line.startswith("ERR ") and "build log:" in line for line in lines), lines
