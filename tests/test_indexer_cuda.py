"""The indexer's CUDA select (``kernels/indexer/cuda/select_sm90.cuh``).

CPU: the kernel's own source, compiled with the host compiler against ``cuda_emu/simt.h`` (one
thread per CUDA thread, real barriers, ballots and shuffles), against a stable-sort reference on
rows that reach each of its paths; and, under the real entry point's name, behind the library's
own launcher (``cuda_impl.select_cuda``) inside ``indexer_topk_triton`` on CPU tensors. GPU
(``-m gpu``): the compiled kernel against the Triton select on real indexer scores, and the
public function's ``cuda`` backend against its ``triton`` one.
"""

import ctypes
import multiprocessing
import os
import re
import subprocess
import sys

import pytest
import torch

from megatron_dsa.kernels.cuda_build import LoadedLibrary

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "cuda_emu"))
from emu_lib import build_simt  # noqa: E402

sys.path.pop(0)
KERNEL_DIR = os.path.join(os.path.dirname(HERE), "megatron_dsa", "kernels", "indexer", "cuda")


def _build_emu(tmp_path_factory, name, sources, opt="-O2"):
    """The select's emulated library (``emu_lib.build_simt`` with the indexer's kernel folder)."""
    return build_simt(tmp_path_factory, name, sources, KERNEL_DIR, opt)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    lib = _build_emu(tmp_path_factory, "select_emu.so", ["select_emu.cpp"], opt="-O1")
    fn = lib.emu_indexer_select
    fn.restype = ctypes.c_int
    vp, ll, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
    fn.argtypes = [vp, ll, ll, vp, vp, ll, ll, i32, i32, i32, i32, i32, i32, i32, vp, vp, ll, ll]
    return fn


def _run(fn, buf, row0, T, S, K, starts=None, ends=None, global_ids=False, timeout=120):
    """Select rows [row0, row0 + n) (buf [B, n, S] holds their scores) into fresh [B, T, K] outputs.

    The emulated launch runs in a forked child writing shared-memory outputs, so that a kernel
    bug that deadlocks its barriers or corrupts memory fails this test instead of hanging it."""
    B, n, _ = buf.shape
    idx = torch.full((B, T, K), -7, dtype=torch.int32).share_memory_()
    vals = torch.full((B, T, K), float("nan")).share_memory_()
    causal = starts is None
    if causal:
        starts = ends = torch.zeros(1, 1, dtype=torch.int32)

    def child():
        err = fn(buf.data_ptr(), buf.stride(0), buf.stride(1), starts.data_ptr(), ends.data_ptr(),
                 starts.stride(0), starts.stride(1), int(causal), int(global_ids), row0, n, B, S, K,
                 idx.data_ptr(), vals.data_ptr(), idx.stride(0), idx.stride(1))
        os._exit(err)

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        pytest.fail(f"the emulated select did not finish in {timeout} s")
    assert proc.exitcode == 0, f"the emulated select failed: exit code {proc.exitcode}"
    return idx, vals


def _check(buf, idx, vals, row0, K, windows, global_ids=False):
    """Each row's ids: the first K of a stable descending sort of its window (ties: lowest
    index), padded with -1 / -inf; every value is its key's score."""
    B, n, S = buf.shape
    for b in range(B):
        for r in range(n):
            t = row0 + r
            st, en = windows(b, t)
            row = buf[b, r, st:en]
            order = torch.sort(row, descending=True, stable=True).indices[:K]
            want = (order + st + (b * S if global_ids else 0)).to(torch.int32)
            got = idx[b, t]
            m = min(K, en - st)
            assert torch.equal(got[:m].sort().values, want.sort().values), (b, t)
            assert bool((got[m:] == -1).all()) and bool((vals[b, t, m:] == float("-inf")).all()), (b, t)
            local = got[:m].long() - st - (b * S if global_ids else 0)
            assert torch.equal(vals[b, t, :m], row[local]), (b, t)  # -0.0 == 0.0


def _bits(i):
    """fp32 values with the given int32 bit patterns."""
    return i.to(torch.int32).view(torch.float32)


def _causal(S):
    return lambda b, t: (0, min(t + 1, S))


@pytest.mark.parametrize("rows", [(0, 3), (250, 4), (1500, 2), (2998, 2)])
def test_emulated_select_causal_random(emu, rows):
    """Random scores: rows at, below and above k keys (k = 256), one digit level."""
    row0, n = rows
    S, K = 3000, 256
    buf = torch.randn(2, n, S)
    idx, vals = _run(emu, buf, row0, row0 + n, S, K)
    _check(buf, idx, vals, row0, K, _causal(S))


def test_emulated_select_windows_global_ids(emu):
    S, K, T = 2500, 100, 6
    buf = torch.randn(2, T, S) * 3
    st = torch.randint(0, 1200, (2, T), dtype=torch.int32)
    en = (st + torch.tensor([[0, 50, 100, 101, 1300, 1200]] * 2, dtype=torch.int32)).clamp(max=S)
    idx, vals = _run(emu, buf, 0, T, S, K, st, en, global_ids=True)
    _check(buf, idx, vals, 0, K, lambda b, t: (int(st[b, t]), int(en[b, t])), global_ids=True)


def test_emulated_select_paths(emu):
    """Rows built to reach each path: a first-digit bucket too large for the candidate list
    (a second global level), one that fits it (two shared-memory levels), one holding exactly the missing count (taken whole), a row of one
    value (ties down to the last digit: the lowest ids win), integer scores (ties at the last
    shared-memory level), signed zeros and negatives. Rows of 8000 keys: longer than the
    candidate list, shorter than path B's rows (path C). A second run gives the same slot
    order."""
    S, K = 8000, 2048
    rows = [
        1.0 + 0.25 * torch.rand(S),  # one first digit for all: 8000 > 6144 candidates
        torch.cat([_bits(0x3F800000 + (torch.randint(0, 2048, (64,))[torch.randint(0, 64, (5000,))] << 10)
                         + torch.randint(0, 1024, (5000,))),
                   0.5 * torch.rand(S - 5000)])[torch.randperm(S)],  # 5000 in one first digit, spread over
        # 64 second digits of ~80 keys: both shared-memory levels, the last one among several buckets
        torch.cat([100 + torch.rand(K), torch.rand(S - K)])[torch.randperm(S)],  # exactly K in the top bucket
        torch.full((S,), 0.5),
        torch.randint(0, 40, (S,)).float(),
        torch.where(torch.rand(S) < 0.5, torch.tensor(-0.0), torch.tensor(0.0)) + (torch.rand(S) < 0.1) * torch.randn(S),
    ]
    buf = torch.stack(rows)[None]
    win = (torch.zeros(1, len(rows), dtype=torch.int32), torch.full((1, len(rows)), S, dtype=torch.int32))
    idx, vals = _run(emu, buf, 0, len(rows), S, K, *win)
    _check(buf, idx, vals, 0, K, lambda b, t: (0, S))
    again, _ = _run(emu, buf, 0, len(rows), S, K, *win)
    assert torch.equal(again, idx)  # the slot order too: no thread-timing dependence


def _sampled(L):
    """The positions path B of the select samples in a row of L keys (select_sm90.cuh,
    sample_bound: 256 runs of 8 keys, run i from i (L - 8) // 255)."""
    return torch.tensor([i * (L - 8) // 255 + o for i in range(256) for o in range(8)])


def test_emulated_select_sampled_rows(emu):
    """Path B (rows of >= 8192 keys, 2 k <= 6144) on rows that start at every offset from a
    16-byte boundary (a row stride of 16411 keys, windows from 0..3 keys) and end mid-group (its
    first and last groups load key by key, the rest as float4 pairs): random scores, integer
    scores (ties at the bound and at the k-th key), a row of one value and two rows whose sample
    misleads the bound: large keys exactly where it samples (too few keys reach the bound), and
    everywhere but there (too many); those three take path C. A second run gives the same slot
    order."""
    S, K = 16411, 2048
    st = torch.tensor([[0, 0, 0, 0, 2, 1, 3]], dtype=torch.int32)  # rows 0..3 start 0, 3, 2, 1 keys past a boundary
    en = torch.tensor([[S - 8, S - 8, S - 8, S - 8, S - 5, S - 1, S]], dtype=torch.int32)
    at = torch.zeros(S, dtype=torch.bool)
    at[_sampled(S)] = True
    rows = [torch.randn(S), torch.randn(S) * 3, torch.randint(-50, 50, (S,)).float(), torch.randn(S),
            torch.full((S,), 0.5), torch.where(at, 10 + torch.rand(S), torch.rand(S)),
            torch.where(at, torch.rand(S), 10 + torch.rand(S))]
    buf = torch.stack(rows)[None]
    pos = torch.arange(S)
    outside = (pos < st[0, :, None]) | (pos >= en[0, :, None])
    buf[0][outside] = 1e6  # keys outside the windows (also just before rows 1..3 and after each row) never selected
    idx, vals = _run(emu, buf, 0, len(rows), S, K, st, en, global_ids=True)
    window = lambda b, t: (int(st[b, t]), int(en[b, t]))  # noqa: E731
    _check(buf, idx, vals, 0, K, window, global_ids=True)
    again, _ = _run(emu, buf, 0, len(rows), S, K, st, en, global_ids=True)
    assert torch.equal(again, idx)


def _in_process_with_deadline(fn, timeout=300):
    """fn() in this process (it runs torch ops, which a forked child of a threaded torch may
    deadlock on), with a deadline: past it, faulthandler prints the stacks and ends the run,
    so a hung emulated kernel fails CI instead of hanging it."""
    import faulthandler

    faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        return fn()
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def lib_emu(tmp_path_factory):
    """The emulated select under the real entry point's name and signature (``cuda_impl._declare``
    declares it), for the library's own launcher."""
    from megatron_dsa.kernels.indexer import cuda_impl

    lib = _build_emu(tmp_path_factory, "indexer_emu.so", ["select_emu.cpp"])
    cuda_impl._declare(lib)
    return lib


@pytest.mark.parametrize("kind", ["causal", "windows"])
def test_emulated_select_through_the_launcher(lib_emu, monkeypatch, kind):
    """``indexer_topk_triton(select_kernel="cuda")`` on the CPU (the Triton score kernel in
    Triton's interpreter), with ``cuda_impl.select_cuda`` calling the emulated kernel instead of
    the GPU library: the arguments, strides, row chunks (``chunk_bytes=1``: one score tile of rows
    per chunk, so row0 > 0), windows and global ids as the real launch passes them. The ids are
    the first k of a stable sort of the same Triton scores."""
    from megatron_dsa.kernels.indexer import cuda_impl
    from megatron_dsa.kernels.indexer import triton_impl as ti

    monkeypatch.setattr(cuda_impl, "LIBRARY", LoadedLibrary(lib_emu))
    monkeypatch.setattr(cuda_impl, "_stream", lambda device: None)
    B, T, S, H, D, K = 2, 70, 70, 2, 16, 20
    q, k, w = torch.randn(B, T, H, D), torch.randn(B, S, D), torch.randn(B, T, H)
    if kind == "causal":
        st = en = None
        window = _causal(S)
    else:
        a, c = torch.randint(0, S + 1, (B, T)), torch.randint(0, S + 1, (B, T))
        st, en = torch.minimum(a, c), torch.maximum(a, c)  # int64: the launcher converts
        window = lambda b, t: (int(st[b, t]), int(en[b, t]))  # noqa: E731
    global_ids = kind == "windows"
    scores = _in_process_with_deadline(lambda: ti.indexer_scores_triton(q, k, w, st, en, True))
    assert ti._score_cfg().block_t < T  # several chunks
    idx, vals = _in_process_with_deadline(lambda: ti.indexer_topk_triton(
        q, k, w, K, st, en, True, global_ids, chunk_bytes=1, select_kernel="cuda"))
    _check(scores, idx, vals, 0, K, window, global_ids)


def _gpu_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from megatron_dsa.kernels.indexer import cuda_impl

    why = cuda_impl.LIBRARY.error()
    if why is not None:
        pytest.skip(why)


@pytest.mark.gpu
@pytest.mark.parametrize("kind,S", [("causal", 8192), ("packed", 8192), ("packed", 20480)])
def test_gpu_cuda_select_equals_triton_select(kind, S):
    """Real indexer scores (bf16 q / k, 64 heads of 128, k = 2048): the CUDA select gives the
    Triton select's sets and values, in one launch and inside a CUDA graph. At S = 20480 the
    longest rows (>= 16K keys) take path B, in a document that starts 3 keys past a 16-byte
    boundary."""
    _gpu_or_skip()
    from megatron_dsa.kernels.indexer import triton_impl as ti
    from megatron_dsa.kernels.indexer.reference import packed_causal_window

    H, D, K = 64, 128, 2048
    q = torch.randn(1, S, H, D, device="cuda").bfloat16()
    k = torch.randn(1, S, D, device="cuda").bfloat16()
    w = torch.randn(1, S, H, device="cuda") * H**-0.5
    st = en = None
    if kind == "packed":
        docs = [0, 1000, 1001, 5000, S] if S == 8192 else [0, 3, S]
        st, en = packed_causal_window(torch.tensor(docs, device="cuda"))
        st, en = st.expand(1, S).contiguous(), en.expand(1, S).contiguous()
    q, k, w, st, en, causal = ti._prep(q, k, w, st, en)
    buf = torch.empty(1, S, S, device="cuda")
    ti._launch_scores(q, k, w, st, en, causal, True, buf, 0, S, ti._score_cfg())
    scr = torch.empty(1, S, ti.scratch_cap(S, K), dtype=torch.int32, device="cuda")
    outs = {}
    for kernel in ("triton", "cuda"):
        idx = torch.full((1, S, K), -7, dtype=torch.int32, device="cuda")
        vals = torch.full((1, S, K), float("nan"), device="cuda")
        ti.launch_select(buf, scr, st, en, idx, vals, 0, S, S, causal, True, ti._SELECT_CFG_GPU, kernel=kernel)
        outs[kernel] = (idx.sort(-1).values, vals.sort(-1).values)
    assert torch.equal(outs["cuda"][0], outs["triton"][0])
    assert torch.equal(outs["cuda"][1], outs["triton"][1])
    idx = torch.empty(1, S, K, dtype=torch.int32, device="cuda")
    vals = torch.empty(1, S, K, device="cuda")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ti.launch_select(buf, scr, st, en, idx, vals, 0, S, S, causal, True, ti._SELECT_CFG_GPU, kernel="cuda")
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(idx.sort(-1).values, outs["triton"][0])


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_gpu_public_indexer_cuda_backend(precision):
    """``indexer_topk(..., backend="cuda")`` (Triton score, CUDA select) against the ``triton``
    backend: the same scores, and both selects are exact with one tie rule, so the same sets and
    values row by row; ``auto`` on sm_90 is the ``cuda`` one."""
    _gpu_or_skip()
    from megatron_dsa.kernels.indexer import indexer_topk
    from megatron_dsa.kernels.indexer.dispatch import select_backend

    if torch.cuda.get_device_capability() == (9, 0):
        assert select_backend("auto", torch.device("cuda"), torch.bfloat16, 128).forward == "cuda"
    S, H, D, K = 4096, 64, 128, 2048
    q = torch.randn(1, S, H, D, device="cuda").bfloat16()
    k = torch.randn(1, S, D, device="cuda").bfloat16()
    w = torch.randn(1, S, H, device="cuda") * H**-0.5
    a, av = indexer_topk(q, k, w, K, backend="cuda", precision=precision)
    b, bv = indexer_topk(q, k, w, K, backend="triton", precision=precision)
    assert torch.equal(a.sort(-1).values, b.sort(-1).values)
    assert torch.equal(av.sort(-1).values, bv.sort(-1).values)


def test_cuda_select_compiles_without_spills(tmp_path):
    """With a real nvcc (skipped without one): the select compiles for sm_90a without spills."""
    from megatron_dsa.kernels.cuda_build import find_nvcc

    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc")
    proc = subprocess.run([nvcc, "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v",
                           "-c", os.path.join(KERNEL_DIR, "select_sm90.cu"), "-o", str(tmp_path / "k.o")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert " 0 bytes spill stores" in proc.stderr and "bytes spill stores" not in proc.stderr.replace(
        " 0 bytes spill stores", "")
    # 40 registers: 3 CTAs of 512 threads per SM (__launch_bounds__)
    regs = int(re.search(r"Used (\d+) registers", proc.stderr).group(1))
    assert regs <= 40, regs
