"""Build the sm_90a CUDA kernels ahead of time, and report which kernel each op runs.

    python -m megatron_dsa.build             # build (or find) the libraries in the cache
    python -m megatron_dsa.build --force     # rebuild
    python -m megatron_dsa.build --status    # which kernel each op runs here, and why

Two libraries: the sparse MLA kernels and the indexer's select. They go to
``$MEGATRON_DSA_CACHE`` (default ``~/.cache/megatron_dsa``), keyed by the sources, the ``nvcc``
version and the architecture; see :mod:`megatron_dsa.kernels.cuda_build`.
Run it once per node (or once into a shared cache) before training; at first use without it,
one process per node builds while the others wait on a file lock.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_dsa.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if the cached library exists")
    ap.add_argument("--status", action="store_true", help="print which kernel each op runs on this machine")
    args = ap.parse_args(argv)

    from .kernels.cuda_build import CudaBuildError, cache_dir, find_nvcc, nvcc_version
    from .kernels.indexer import cuda_impl as indexer_cuda
    from .kernels.sparse_mla import cuda_impl

    if args.status:
        from .kernels import format_status

        print(format_status())
        return 0
    nvcc = find_nvcc()
    print(f"cache: {cache_dir()}")
    if nvcc is None:
        print("error: nvcc not found: put it on PATH or set CUDA_HOME", file=sys.stderr)
        return 1
    try:
        print(f"nvcc: {nvcc} ({nvcc_version(nvcc).splitlines()[-1]})")
        paths = [cuda_impl.build(force=args.force), indexer_cuda.LIBRARY.build(force=args.force)]
    except CudaBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"built: {path} ({cuda_impl.ARCH})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
