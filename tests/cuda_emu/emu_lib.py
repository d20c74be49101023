"""Building and driving an emulated CUDA kernel library (shared by the ``*_emu`` tests).

A kernel's own sources (its ``.cu`` and ``sm90_common.cuh``, or modified copies for mutants) are
rewritten by :func:`ptx_source.emulated_source` into a fresh folder and compiled by the host
compiler with a wrapper ``.cpp`` of this folder that includes ``sm90_emu.h``, the rewritten
kernel and ``emu_api.h``. The library exports the kernel's own entry points and the emulator's
controls (``emu_reset``, ``emu_hazards``, ``emu_aborted``, ``emu_message``)."""

import ctypes
import os
import shutil
import subprocess

import pytest

from ptx_source import emulated_source

EMU_DIR = os.path.dirname(os.path.abspath(__file__))
KERNEL_DIR = os.path.join(os.path.dirname(os.path.dirname(EMU_DIR)), "megatron_dsa", "kernels", "sparse_mla", "cuda")
COMMON = "sm90_common.cuh"


def read_kernel(name):
    """The text of a shipped kernel source (``KERNEL_DIR/name``)."""
    with open(os.path.join(KERNEL_DIR, name)) as f:
        return f.read()


def build_emulated(tmp_path_factory, tag, wrapper, kernel, kernel_text=None, common_text=None):
    """The emulated library of ``kernel`` (a file of ``KERNEL_DIR``) with ``wrapper`` (a ``.cpp``
    of this folder); ``kernel_text`` / ``common_text`` replace the shipped texts (mutants).
    Skips without a host C++ compiler or C++20."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    d = tmp_path_factory.mktemp(f"emu_{tag}")
    (d / kernel).write_text(emulated_source(kernel_text if kernel_text is not None else read_kernel(kernel)))
    (d / COMMON).write_text(emulated_source(common_text if common_text is not None else read_kernel(COMMON)))
    out = d / (os.path.splitext(wrapper)[0] + ".so")
    # -fno-gnu-unique, -Bsymbolic: each build keeps its own inline functions' statics (the parsed
    # PTX of each asm statement); a mutant loaded after the shipped build must not bind to its
    proc = subprocess.run([cxx, "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-fno-gnu-unique",
                           "-Wl,-Bsymbolic", f"-I{d}", f"-I{os.path.join(EMU_DIR, 'include')}", f"-I{EMU_DIR}",
                           os.path.join(EMU_DIR, wrapper), "-o", str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0 and "c++20" in proc.stderr:
        pytest.skip(f"{cxx} lacks C++20 support")
    assert proc.returncode == 0, proc.stderr[-4000:]
    lib = ctypes.CDLL(str(out))
    lib.emu_reset.argtypes = [ctypes.c_uint, ctypes.c_double]
    lib.emu_reset.restype = None
    lib.emu_hazards.restype = ctypes.c_long
    lib.emu_aborted.restype = ctypes.c_int
    lib.emu_message.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.emu_message.restype = ctypes.c_int
    return lib


def build_simt(tmp_path_factory, name, sources, include_dir, opt="-O2"):
    """One loaded library of ``sources`` (``.cpp`` files of this folder that include a kernel's
    own SIMT source from ``include_dir`` through ``simt.h``, unrewritten: no inline PTX). Skips
    without a host C++ compiler or C++20 ``<barrier>``."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    out = tmp_path_factory.mktemp("emu") / name
    proc = subprocess.run([cxx, "-std=c++20", opt, "-shared", "-fPIC", "-pthread", f"-I{include_dir}",
                           *(os.path.join(EMU_DIR, src) for src in sources), "-o", str(out)],
                          capture_output=True, text=True)
    if proc.returncode != 0 and "barrier" in proc.stderr:
        pytest.skip(f"{cxx} lacks C++20 <barrier>")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ctypes.CDLL(str(out))


def messages(lib):
    """The emulator's reports since the last ``emu_reset``."""
    msgs, buf, i = [], ctypes.create_string_buffer(2048), 0
    while lib.emu_message(i, buf, len(buf)) >= 0:
        msgs.append(buf.value.decode())
        i += 1
    return msgs


def assert_rewrite_complete(*names):
    """``emulated_source`` leaves no inline PTX and no ``<<<>>>`` launch in these sources."""
    for name in names:
        text = emulated_source(read_kernel(name))
        code = "\n".join(line.split("//")[0] for line in text.splitlines())
        assert "asm volatile" not in code and "asm(" not in code and "<<<" not in code, name
