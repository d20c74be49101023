"""Building the CUDA kernel library with ``nvcc``: cached, one builder per node, logged failures.

* **Where**: ``$MEGATRON_DSA_CACHE`` (the only environment variable the package reads), else
  ``$XDG_CACHE_HOME/megatron_dsa``, else ``~/.cache/megatron_dsa``.
* **Cache key**: the sources and headers, the ``nvcc --version`` text, the target architecture
  (``sm_90a``) and the flags. A new compiler, GPU architecture or source gives a new file.
* **One builder per node**: a build holds an exclusive ``fcntl`` lock on
  ``<library>.lock``; other processes (the other ranks of a node, at first use) wait on it and
  then load what the builder wrote. If the builder failed, the waiters raise the same error
  instead of compiling again.
* **Failures** leave ``<library>.log`` (the command and the compiler's output); the raised
  :class:`CudaBuildError` names it.

``python -m megatron_dsa.build`` builds ahead of time (a job script runs it once per node or
into a shared cache before training starts).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["CudaBuildError", "CudaLibrary", "LoadedLibrary", "cache_dir", "find_nvcc", "nvcc_version",
           "build_library", "library_path"]


class CudaBuildError(RuntimeError):
    """The CUDA library could not be built; ``log_path`` holds the compiler's output, if any."""

    def __init__(self, message: str, log_path: Optional[Path] = None):
        super().__init__(message if log_path is None else f"{message} (build log: {log_path})")
        self.log_path = log_path


def cache_dir() -> Path:
    """The build cache folder (``$MEGATRON_DSA_CACHE``, else the user's cache folder)."""
    root = os.environ.get("MEGATRON_DSA_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        root = os.path.join(base, "megatron_dsa")
    return Path(root)


def find_nvcc() -> Optional[str]:
    """``nvcc`` on ``PATH``, else in the CUDA toolkit PyTorch found (``CUDA_HOME``)."""
    found = shutil.which("nvcc")
    if found:
        return found
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception:  # pragma: no cover - torch without cpp_extension
        CUDA_HOME = None
    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return None


def nvcc_version(nvcc: str) -> str:
    """The compiler's ``--version`` text (part of the cache key)."""
    try:
        proc = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CudaBuildError(f"cannot run {nvcc} --version: {exc}") from exc
    if proc.returncode != 0:
        raise CudaBuildError(f"{nvcc} --version failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return proc.stdout.strip()


def _flags(arch: str) -> list:
    number = arch.removeprefix("sm_")
    return ["-O3", "-shared", "-Xcompiler", "-fPIC", "-std=c++17",
            f"-gencode=arch=compute_{number},code={arch}"]


def library_path(name: str, sources: Sequence[Path], headers: Sequence[Path] = (), arch: str = "sm_90a",
                 nvcc: Optional[str] = None) -> Path:
    """Where the library for these sources, this compiler and ``arch`` lives in the cache."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise CudaBuildError("nvcc not found: put it on PATH or set CUDA_HOME")
    h = hashlib.sha256()
    for f in (*sources, *headers):
        h.update(Path(f).name.encode())
        h.update(Path(f).read_bytes())
    h.update(nvcc_version(nvcc).encode())
    h.update(" ".join(_flags(arch)).encode())
    return cache_dir() / f"{name}-{arch}-{h.hexdigest()[:16]}.so"


def build_library(name: str, sources: Sequence[Path], headers: Sequence[Path] = (), arch: str = "sm_90a",
                  force: bool = False, nvcc: Optional[str] = None) -> Path:
    """Compile ``sources`` into a shared library in the cache (or return the cached one).

    Raises :class:`CudaBuildError` (naming the build log) on failure. ``nvcc``: the compiler to
    use (default: :func:`find_nvcc`). ``force``: rebuild even if the library exists.
    """
    nvcc = nvcc or find_nvcc()
    out = library_path(name, sources, headers, arch, nvcc)
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log")
    waited_since = time.time()
    with open(out.with_suffix(".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per cache folder; the others wait here
        try:
            if out.exists() and not force:
                return out  # another process built it while we waited
            if log.exists() and log.stat().st_mtime >= waited_since and not force:
                raise CudaBuildError(f"building {out.name} failed in another process", log)
            cmd = [nvcc, *_flags(arch), "-o", "<tmp>", *map(str, sources)]
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
            os.close(fd)
            cmd[cmd.index("<tmp>")] = tmp
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    log.write_text(f"$ {' '.join(cmd)}\n# exit code {proc.returncode}\n{proc.stdout}{proc.stderr}")
                    raise CudaBuildError(f"nvcc failed with exit code {proc.returncode} building {out.name}", log)
                os.replace(tmp, out)
                if log.exists():
                    log.unlink()
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return out


class CudaLibrary:
    """A library of C entry points built on first use and loaded with ``ctypes``.

    ``declare(lib)`` sets the entry points' argument and result types. A failed build or load
    is remembered: later calls raise the same error without compiling again.
    """

    def __init__(self, name: str, sources: Sequence[Path], headers: Sequence[Path], arch: str, declare):
        self.name, self.sources, self.headers, self.arch, self._declare = name, sources, headers, arch, declare
        self._lib = None
        self._error: Optional[CudaBuildError] = None

    def build(self, force: bool = False) -> Path:
        """Build the library into the cache (or find it there); raises :class:`CudaBuildError`."""
        return build_library(self.name, self.sources, self.headers, arch=self.arch, force=force)

    def get(self):
        """The loaded library, built on first use; raises the (remembered) build error."""
        if self._lib is None:
            if self._error is not None:
                raise self._error
            import ctypes

            try:
                lib = ctypes.CDLL(str(self.build()))
                self._declare(lib)
            except CudaBuildError as exc:
                self._error = exc
                raise
            except (OSError, AttributeError) as exc:  # does not load, or lacks an entry point
                self._error = CudaBuildError(f"cannot load the CUDA library {self.name}: {exc}")
                raise self._error from exc
            self._lib = lib
        return self._lib

    def error(self) -> Optional[str]:
        """Why the library is unavailable (building it if it was not tried yet), or ``None``."""
        try:
            self.get()
        except CudaBuildError as exc:
            return str(exc)
        return None


class LoadedLibrary:
    """:class:`CudaLibrary`'s interface (``get``, ``error``) over a library already loaded with
    ``ctypes`` and declared: what a launcher that calls ``LIBRARY.get()`` is pointed at to run
    another build of the same entry points (a revision's, an emulated one)."""

    def __init__(self, lib):
        self.lib = lib

    def get(self):
        return self.lib

    def error(self) -> Optional[str]:
        return None
