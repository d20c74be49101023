"""A/B of the CUDA kernels: this tree's library against the library built from the same
sources at a git revision, in one process (alternating calls, the GPU idle before each), with
the results compared call for call.

  python benchmarks/ab_revision.py --rev HEAD~1 --ops fwd --cases 16384:64,16384:128
  python benchmarks/ab_revision.py --rev main --ops bwd --cases 16384:16,16384:64 --flashmla
  python benchmarks/ab_revision.py --rev main --ops topk,select --cases 32768:64,131072:64
  python benchmarks/ab_revision.py --rev main --export .gpu/rev_main      # here: the sources only
  python benchmarks/ab_revision.py --rev-dir .gpu/rev_main --ops fwd      # there: from that folder

A GPU machine that receives a copy of the working tree may hold a git history older than the
tree's (the device machines here do: their ``HEAD~1`` is not this checkout's), so ``--export``
writes the revision's kernel sources (at their paths in the repository, so that their relative
includes resolve) and a ``REVISION`` file (hash, subject) into a folder to carry, and
``--rev-dir`` builds from it; the resolved revision is printed first either way.

Both libraries are built by ``megatron_dsa.kernels.cuda_build`` (the revision's copy under its own
cache name). Sparse MLA (cases ``S:H``, H attention heads; k = 2048 random causal ids per row,
``bench_sparse_mla.make_case``): ``fwd`` times ``cuda_impl.sparse_mla_fwd_cuda`` and compares
out / lse; ``bwd`` times ``sparse_mla_bwd_cuda`` (row-packed at <= 32 heads, as the default
routing does) from one forward of this tree and compares dq / dkv. The indexer (cases ``S:H``,
H indexer heads of 128, ``bench_indexer.inputs``): ``topk`` times the public
``indexer_topk`` (the Triton score kernel and the CUDA select) with either select library;
``select`` times the CUDA select alone on the scores of the last row chunk (the longest rows).
Both compare the selected sets and their scores row by row (``idx_same_sets``). A row reports
both medians (``rev_ms``, ``tree_ms``), ``speedup`` = revision / tree (> 1: the tree is faster),
and per output whether the two results are bit-identical (``*_bit_identical``) and their
relative difference (``*_rel``); dkv is summed by fp32 atomics in no fixed order, so it has a
relative difference only (about 1e-5 - 1e-4 between two calls of the same kernel).
``--deterministic`` and ``--bwd-block-keys`` pass the backward's options to both libraries (the
deterministic mode, on the 32-key kernel's lanes or the 64-key kernel's integer adds).
``--flashmla`` adds FlashMLA's sparse forward (``flashmla_ms``) to the fwd rows at 64 / 128
heads. The Python launchers are this tree's for both libraries, so the tool refuses a revision
that lacks one of the tree's ``extern "C"`` entry points or defines it with another parameter
list: ctypes would pass it the tree's arguments. Entry points the revision has and the tree
does not (an older select's second entry point) are never called, and ignored.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]


def sources_at(rev: str, paths: Sequence[Path], dest: Path, repo: Path = REPO, missing_ok: bool = False) -> List[Path]:
    """The files ``paths`` (inside ``repo``) as they are at git revision ``rev``, written under
    ``dest`` at their paths in the repository; raises ``ValueError`` naming the revision or the file (with
    ``missing_ok``, a file the revision lacks is left out: a header added since)."""
    try:
        subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", f"{rev}^{{commit}}"], check=True,
                       capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        raise ValueError(f"--rev {rev!r} is not a commit of {repo}: {e.stderr.strip()}") from e
    out = []
    for p in paths:
        rel = Path(p).resolve().relative_to(repo.resolve()).as_posix()
        proc = subprocess.run(["git", "-C", str(repo), "show", f"{rev}:{rel}"], capture_output=True)
        if proc.returncode != 0:
            if missing_ok:
                continue
            raise ValueError(f"{rel} does not exist at --rev {rev!r}")
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(proc.stdout)
        out.append(target)
    return out


def export_sources(rev: str, paths: Sequence[Path], headers: Sequence[Path], dest: Path, repo: Path = REPO,
                   optional: Sequence[Path] = ()) -> str:
    """``rev``'s kernel sources (and those of ``headers`` and ``optional`` it has) into ``dest``
    with a ``REVISION`` file: its full hash and subject, which is also returned."""
    dest.mkdir(parents=True, exist_ok=True)
    sources_at(rev, paths, dest, repo)
    sources_at(rev, list(headers) + list(optional), dest, repo, missing_ok=True)
    line = subprocess.run(["git", "-C", str(repo), "log", "-1", "--format=%H %s", rev], capture_output=True,
                          text=True, check=True).stdout.strip()
    (dest / "REVISION").write_text(line + "\n")
    return line


def _in(folder: Path, p: Path, repo: Path = REPO) -> Path:
    return folder / Path(p).resolve().relative_to(repo.resolve())


def sources_in(folder: Path, paths: Sequence[Path], headers: Sequence[Path]) -> Tuple[List[Path], List[Path], str]:
    """The sources an ``--export`` wrote into ``folder``: (sources, headers present, the
    ``REVISION`` line); raises ``ValueError`` naming ``--rev-dir`` and a missing source."""
    folder = Path(folder)
    rev_file = folder / "REVISION"
    if not rev_file.is_file():
        raise ValueError(f"--rev-dir {str(folder)!r} has no REVISION file (write it with --export)")
    missing = [p.name for p in paths if not _in(folder, p).is_file()]
    if missing:
        raise ValueError(f"--rev-dir {str(folder)!r} lacks {', '.join(missing)}")
    return ([_in(folder, p) for p in paths],
            [_in(folder, h) for h in headers if _in(folder, h).is_file()], rev_file.read_text().strip())


def parse_cases(text: str) -> List[Tuple[int, int]]:
    """``"S:H,S:H"`` -> ``[(S, H), ...]``; raises ``ValueError`` naming ``--cases``."""
    cases = []
    for item in text.split(","):
        try:
            s, h = (int(x) for x in item.split(":"))
        except ValueError:
            raise ValueError(f"--cases takes S:H pairs separated by commas, got {item!r}") from None
        if s < 1 or h < 1:
            raise ValueError(f"--cases: S and H must be positive, got {item!r}")
        cases.append((s, h))
    return cases


def _time(fns: Dict[str, Callable], reps: int, rest: float) -> Dict[str, float]:
    """Median ms of each of ``fns``, called in turn ``reps`` times (after one warm-up each), the GPU
    idle ``rest`` seconds before every call (``common.time_cuda`` times each call)."""
    import torch
    from common import time_cuda

    ts = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(reps):
        for k, f in fns.items():
            torch.cuda.synchronize()
            time.sleep(rest)
            ts[k].append(time_cuda(f, warmup=0, reps=1))
    return {k: round(statistics.median(v), 3) for k, v in ts.items()}


def entry_points(paths: Sequence[Path]) -> Dict[str, str]:
    """``{name: parameter list}`` of the ``dsa_*`` C entry points defined in ``paths``
    (whitespace normalized)."""
    out = {}
    for p in paths:
        text = Path(p).read_text()
        for m in re.finditer(r"^(?:int|long long|void)\s+(dsa_\w+)\s*\(([^)]*)\)\s*\{", text, re.M):
            out[m.group(1)] = " ".join(m.group(2).split())
    return out


def entry_point_mismatch(ours: Dict[str, str], theirs: Dict[str, str]) -> List[str]:
    """The tree's entry points (``ours``, from :func:`entry_points`) that the revision's
    (``theirs``) lacks or defines with another parameter list, sorted; the revision's other entry
    points are ignored (the tree's launchers never call them)."""
    return sorted(n for n in ours if theirs.get(n) != ours[n])


def _rel(x, y, rows: int = 4096) -> float:
    """``|x - y| / |y|`` over the entries finite in both, in fp64 sums over fp32 row chunks."""
    import torch

    num = den = 0.0
    x2, y2 = (t.reshape(t.shape[0] if t.dim() else 1, -1) for t in (x, y))
    for r0 in range(0, x2.shape[0], rows):
        a, b = x2[r0:r0 + rows].float(), y2[r0:r0 + rows].float()
        fin = a.isfinite() & b.isfinite()
        num += float(torch.where(fin, a - b, 0.0).double().square().sum())
        den += float(torch.where(fin, b, 0.0).double().square().sum())
    return (num / den) ** 0.5 if den > 0 else float(num > 0)


def _compare(names: Sequence[str], a, b, exact: Sequence[str]) -> dict:
    """Per output pair its relative difference and, for the ``exact`` ones (no atomics: the same
    code gives the same bits), whether they are bit-identical."""
    import torch

    out = {}
    for name, x, y in zip(names, a, b):
        if x is None or y is None:
            continue
        if name in exact:
            out[f"{name}_bit_identical"] = bool(torch.equal(x, y))
        out[f"{name}_rel"] = _rel(x, y)
    return out


def summary(rows: List[dict]) -> str:
    """The table printed after the rows."""
    lines = [f"{'op':6s} {'S':>6s} {'H':>4s} {'rev ms':>9s} {'tree ms':>9s} {'speedup':>8s}  same bits / rel. diff"]
    for r in rows:
        cmp = [f"{k[:-4]} {'same bits' if r.get(k[:-4] + '_bit_identical') else format(v, '.1e')}"
               for k, v in r.items() if k.endswith("_rel")]
        if "idx_same_sets" in r:
            cmp.append("same sets" if r["idx_same_sets"] else "DIFFERENT SETS")
        lines.append(f"{r['op']:6s} {r['S']:6d} {r['H']:4d} {r['rev_ms']:9.3f} {r['tree_ms']:9.3f} "
                     f"{r['speedup']:8.4f}  {', '.join(cmp) or '-'}")
    return "\n".join(lines)


SPARSE_OPS, INDEXER_OPS = ("fwd", "bwd"), ("topk", "select")


def kernel_sets() -> Dict[str, Tuple[Tuple[Path, ...], Tuple[Path, ...]]]:
    """``{set: (sources, headers)}`` of the two CUDA libraries: sparse MLA's and the indexer's."""
    from megatron_dsa.kernels.indexer import cuda_impl as ii
    from megatron_dsa.kernels.sparse_mla import cuda_impl as ci

    return {"sparse_mla": (tuple(ci.SOURCES), tuple(ci.HEADERS)),
            "indexer": (tuple(ii.LIBRARY.sources), tuple(ii.LIBRARY.headers))}


def _same_sets(a, b) -> dict:
    """Whether two selections (idx, scores) hold the same sets row by row."""
    import torch

    return {"idx_same_sets": bool(torch.equal(a[0].sort(-1).values, b[0].sort(-1).values)
                                  and torch.equal(a[1].sort(-1).values, b[1].sort(-1).values))}


def indexer_rows(S: int, H: int, ops: Sequence[str], k: int, base, tree, reps: int, rest: float, rev_name: str):
    """The ``topk`` / ``select`` rows of one case (``base`` / ``tree``: loaded select libraries)."""
    import torch
    from bench_indexer import inputs

    from megatron_dsa.kernels.indexer import cuda_impl as ii
    from megatron_dsa.kernels.indexer import indexer_topk
    from megatron_dsa.kernels.indexer import triton_impl as ti

    q, kk, w = inputs(S, H, 128)
    rows = []
    for op in ops:
        if op == "topk":
            def run(lib):
                ii.LIBRARY = lib
                return indexer_topk(q, kk, w, k, backend="cuda")
            result = run
        else:  # the CUDA select alone on the last row chunk's scores, as the pipeline chunks them
            n_rows = ti._plan(1, S, S, k, ti._score_cfg().block_t, ti.DEFAULT_CHUNK_BYTES, scratch=False)[0]
            row0 = (S - 1) // n_rows * n_rows
            n = S - row0
            qp, kp, wp, st, en, causal = ti._prep(q, kk, w, None, None)
            buf = torch.empty(1, n_rows, S, device="cuda")
            ti._launch_scores(qp, kp, wp, st, en, causal, True, buf, row0, n, ti._score_cfg())
            idx = torch.empty(1, S, k, dtype=torch.int32, device="cuda")
            vals = torch.empty(1, S, k, device="cuda")

            def run(lib, buf=buf, st=st, en=en, idx=idx, vals=vals, row0=row0, n=n, causal=causal):
                ii.LIBRARY = lib
                ii.select_cuda(buf, st, en, idx, vals, row0, n, S, causal, False)

            def result(lib, idx=idx, vals=vals, row0=row0):
                run(lib)
                return idx[:, row0:].clone(), vals[:, row0:].clone()
        check = _same_sets(result(base), result(tree))
        row = _time({"rev_ms": lambda: run(base), "tree_ms": lambda: run(tree)}, reps, rest)
        row.update(op=op, S=S, H=H, revision=rev_name, speedup=round(row["rev_ms"] / row["tree_ms"], 4), **check)
        print(json.dumps(row), flush=True)
        rows.append(row)
        run = result = buf = None
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", default="HEAD", help="the git revision whose kernel sources are the baseline")
    ap.add_argument("--rev-dir", default=None, help="the baseline's sources from a folder --export wrote (not --rev)")
    ap.add_argument("--export", default=None, metavar="DIR",
                    help="write --rev's kernel sources and REVISION into DIR and exit (no GPU needed)")
    ap.add_argument("--ops", default="fwd,bwd", help="comma list of fwd, bwd (sparse MLA), topk, select (indexer)")
    ap.add_argument("--cases", default="16384:64,16384:128",
                    help="S:H pairs, comma separated (H: attention heads for fwd / bwd, indexer heads "
                         "for topk / select)")
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rest", type=float, default=0.4, help="seconds the GPU idles before each timed call")
    ap.add_argument("--flashmla", action="store_true", help="FlashMLA's forward beside (64 / 128 heads)")
    ap.add_argument("--deterministic", action="store_true",
                    help="bwd: the deterministic mode in both libraries (the integer adds; "
                         "--bwd-block-keys 32: the lanes)")
    ap.add_argument("--bwd-block-keys", type=int, choices=(32, 64), default=None,
                    help="bwd: the backward's kernel (deterministic 32: the lanes, 64: the integer adds)")
    ap.add_argument("--out", default=None, help="a JSON file for the rows")
    a = ap.parse_args(argv)
    if a.export is not None:
        sets = kernel_sets()
        if a.rev_dir is not None:
            ap.error("--export writes --rev's sources; --rev-dir reads them: give one")
        try:
            line = export_sources(a.rev, *sets["sparse_mla"], Path(a.export), optional=sum(sets["indexer"], ()))
        except ValueError as e:
            ap.error(str(e))
        print(f"exported {line} into {a.export}")
        return 0
    ops = [o for o in a.ops.split(",") if o]
    bad = [o for o in ops if o not in SPARSE_OPS + INDEXER_OPS]
    if bad or not ops:
        ap.error(f"--ops takes fwd, bwd, topk and / or select, got {a.ops!r}")
    try:
        cases = parse_cases(a.cases)
    except ValueError as e:
        ap.error(str(e))
    bwd_kw = {"block_keys": a.bwd_block_keys, "deterministic": a.deterministic}

    import torch

    if not torch.cuda.is_available():
        print("ab_revision: needs a CUDA device (sm_90)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_sparse_mla import make_case

    from megatron_dsa.kernels.cuda_build import LoadedLibrary, build_library
    from megatron_dsa.kernels.indexer import cuda_impl as ii
    from megatron_dsa.kernels.sparse_mla import cuda_impl as ci

    sets = kernel_sets()
    wanted = [name for name, set_ops in (("sparse_mla", SPARSE_OPS), ("indexer", INDEXER_OPS))
              if any(o in set_ops for o in ops)]
    tree = ci.library() if "sparse_mla" in wanted else None
    tree_ix = ii.LIBRARY
    what = f"--rev-dir {a.rev_dir!r}" if a.rev_dir is not None else f"--rev {a.rev!r}"
    base = base_ix = None
    with tempfile.TemporaryDirectory() as d:
        folder = Path(a.rev_dir) if a.rev_dir is not None else Path(d)
        try:
            line = (export_sources(a.rev, *sets["sparse_mla"], folder, optional=sum(sets["indexer"], ()))
                    if a.rev_dir is None else None)
            for name in wanted:
                srcs, hdrs, line = sources_in(folder, *sets[name])
                diff = entry_point_mismatch(entry_points(sets[name][0]), entry_points(srcs))
                if diff:
                    ap.error(f"{what}: the tree's C entry points {', '.join(diff)} are missing from it or take "
                             "other parameters; this tree's launchers cannot call them")
                rev_name = line.split()[0][:10]
                if name == "sparse_mla":
                    base = ci._load(build_library(f"sparse_mla_rev_{rev_name}", tuple(srcs), tuple(hdrs), arch=ci.ARCH))
                else:
                    import ctypes

                    lib = ctypes.CDLL(str(build_library(f"indexer_rev_{rev_name}", tuple(srcs), tuple(hdrs),
                                                        arch=tree_ix.arch)))
                    ii._declare(lib)
                    base_ix = LoadedLibrary(lib)
        except ValueError as e:
            ap.error(str(e))
        print(f"baseline ({what}): {line}", flush=True)
    scale = 576 ** -0.5
    rows = []
    try:
        for S, H in cases:
            if base_ix is not None:
                ix_ops = [o for o in ops if o in INDEXER_OPS]
                rows += indexer_rows(S, H, ix_ops, a.k, base_ix, LoadedLibrary(tree_ix.get()), a.reps, a.rest, rev_name)
            if base is None:
                continue
            torch.manual_seed(0)
            q, kv, idx, dout = make_case(S, H, a.k)
            for op in [o for o in ops if o in SPARSE_OPS]:
                if op == "fwd":
                    def call(lib):
                        ci._LIB = lib
                        return ci.sparse_mla_fwd_cuda(q, kv, idx, scale)
                    names, exact = ("out", "lse"), ("out", "lse")
                else:
                    ci._LIB = tree
                    out, lse = ci.sparse_mla_fwd_cuda(q, kv, idx, scale)
                    packed = H <= ci.MAX_PACK_HEADS

                    def call(lib, out=out, lse=lse, packed=packed):
                        ci._LIB = lib
                        return ci.sparse_mla_bwd_cuda(q, kv, idx, scale, None, None, out, lse, dout, packed=packed,
                                                      **bwd_kw)
                    names, exact = ("dq", "dkv", "d_sink"), ("dq",)
                fns = {"rev_ms": lambda: call(base), "tree_ms": lambda: call(tree)}
                if op == "fwd" and a.flashmla and H in (64, 128):
                    from flash_mla import flash_mla_sparse_fwd

                    kv3, idx3 = kv.unsqueeze(1), idx.unsqueeze(1).contiguous()
                    fns["flashmla_ms"] = lambda: flash_mla_sparse_fwd(q, kv3, idx3, scale, d_v=512)
                check = _compare(names, call(base), call(tree), exact)
                row = _time(fns, a.reps, a.rest)
                row.update(op=op, S=S, H=H, revision=rev_name, speedup=round(row["rev_ms"] / row["tree_ms"], 4),
                           **check)
                print(json.dumps(row), flush=True)
                rows.append(row)
                fns = call = out = lse = kv3 = idx3 = None  # (nothing of this case stays on the GPU)
            del q, kv, idx, dout
            torch.cuda.empty_cache()
    finally:
        if tree is not None:
            ci._LIB = tree
        ii.LIBRARY = tree_ix
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    print("\n" + summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
