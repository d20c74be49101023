"""Hopper (sm_90a) CUDA forward and backward for sparse MLA: eligibility, library, launchers.

The kernels (``cuda/``) cover DeepSeek-V3.2's shapes: bf16, d_qk = 576, d_v = 512, any head
count, int32 indices.

* Forward, H <= 16 (tensor-parallel shards): ``cuda/sparse_mla_fwd16_sm90.cu``, the transposed
  problem (keys as wgmma's M), one persistent CTA per SM whose warpgroups gather into a
  10-slot ring, issue S^T, run the softmax and accumulate O^T.
* Forward, H > 16: ``cuda/sparse_mla_fwd_pp_sm90.cu``, one CTA per (row, 64 heads; the last
  tile masked), after FlashMLA's schedule: a producer warpgroup gathers 64-key blocks into two kv
  buffers and two math warpgroups ping-pong over them (each the S and softmax of every other
  block, P V of every block for its half of the output channels).
* Backward, any H: ``cuda/sparse_mla_bwd_sm90.cu``, one CTA per (row, 64 heads) keeping the
  row's Q and dO in shared memory; dq written once, dkv added into an fp32 workspace whose
  columns are permuted. Two kernels (:func:`bwd_block_keys`): the 64-key one (two warpgroups,
  ``[64 keys, 64 channels]`` dKV tiles, full-line adds, :func:`unpermute_dkv64`; L2 cache hints
  where :func:`l2_hints` holds) in both modes, and the
  32-key one with its producer warpgroup (:func:`unpermute_dkv`) on request. Its per-head
  statistics (logZ, Delta, d_sink) come from the Triton stats kernel
  (:func:`.triton_impl.bwd_stats`). Deterministic (``deterministic=True``): the 64-key kernel
  twice, a bound pass and then integer dkv adds in per-key power-of-two quanta
  (:func:`det_bound_scale`, :func:`det_quanta`; the same bits on every sm_90 GPU); with
  ``block_keys=32`` (or beyond :data:`DET_MAX_KEYS` keys) the 32-key kernel on a persistent grid
  of one CTA per SM, CTA j taking rows j, j + grid, ... in order and adding into its own
  workspace lane, the lanes summed in a fixed order (:func:`det_lanes`).
  With row packing (``packed=True``, <= 32 heads) either kernel serves a group of 64 / 16 or
  64 / 32 rows per CTA over the union of their keys (:mod:`.packing`); so does the ping-pong
  forward's second instantiation (``sparse_mla_fwd_cuda(..., packed=True)``, any H <= 32).
* Every kernel stops a row at its effective length (:func:`effective_lengths`,
  ``cuda/row_lengths.cu``).

The library is built by :mod:`megatron_dsa.kernels.cuda_build` (cached, one builder per node)
as a plain shared library with C entry points, launched through ``ctypes`` on the current
stream: no PyTorch headers, no host synchronization, graph-capturable. Which inputs it takes is
:func:`unsupported_reason`; the dispatch (``dispatch.py``) decides whether it runs.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional, Tuple

import torch

from .._validate import check_positive_scale
from ..backends import cuda_capability
from ..cuda_build import CudaBuildError, build_library
from ..triton_common import LOG2E
from .packing import MAX_PACK_HEADS, PackedRows, heads_padded, pack_rows_triton, packed_shape
from .triton_impl import bwd_stats

__all__ = ["unsupported_reason", "library", "library_error", "sparse_mla_fwd_cuda", "sparse_mla_bwd_cuda",
           "effective_lengths", "unpermute_dkv", "unpermute_dkv64", "build", "pack_rows_cuda", "det_lanes", "packed_chunk_rows",
           "det_head_max", "det_bound_scale", "det_quanta", "det_finish", "det_target",
           "l2_order", "l2_order_launch_ctas", "l2_hints", "bwd_block_keys", "det_block_keys", "sort_row_ids", "sort_row_ids_torch", "MAX_HEADS16",
           "FWD_PACK_MAX_KEYS", "fwd_pack_max_keys"]

_DIR = Path(__file__).with_name("cuda")
SOURCES = (_DIR / "sparse_mla_fwd_pp_sm90.cu", _DIR / "sparse_mla_bwd_sm90.cu", _DIR / "row_lengths.cu",
           _DIR / "sparse_mla_fwd16_sm90.cu", _DIR / "pack_rows.cu",
           _DIR / "sort_rows.cu")
HEADERS = (_DIR / "sm90_common.cuh", _DIR / "pack_rows.cuh")
ARCH = "sm_90a"
# The largest head count routed to the 16-head forward; more heads run the 64-head (ping-pong)
# forward, the last tile masked. Measured (H100, S = 16K, k = 2048) with the 64-head kernel before
# it: 9.30 ms at 32 heads against Triton's 10.33; the ping-pong kernel computes the same whole
# 64-row tiles and is faster still (8.30 vs 9.45 ms at 32 heads, 8.05 ms at 17; 1.09-1.17x at
# 64 and 128 heads).
MAX_HEADS16 = 16
# The row-packed forward (the ping-pong kernel over each group's union, packing included) is
# the default up to this many keys, by the packed tile's heads per row (<= 16, <= 32). H100,
# k = 2048, random causal ids, against the unpacked forward: 16 heads 0.90 vs 1.46 ms (4K),
# 4.98 vs 5.97 (16K), 12.36 vs 12.06 (32K: 11.91 vs 12.13 in an earlier run), 29.7 vs 25.8
# (64K), 64.0 vs 53.6 (128K); 32 heads 1.26 vs 1.70, 6.37 vs 7.14, 14.06 vs 15.46 (32K), 33.8 vs
# 34.5 (64K), 69.9 vs 70.4 (128K). On random ids a group's union grows toward all its slots with
# the length (0.85 of them at 64K, 16 heads), where packing only adds work; rows sharing keys
# (union 0.27 - 0.59) ran 1.46-1.96x faster packed.
FWD_PACK_MAX_KEYS = {16: 16384, 32: 32768}


def fwd_pack_max_keys(heads: int) -> int:
    """The most keys at which ``row_packing`` auto packs the forward of ``heads`` (<= 32) heads."""
    return FWD_PACK_MAX_KEYS[16 if heads <= 16 else 32]


_LIB = None
_LIB_ERROR: Optional[CudaBuildError] = None


def build(force: bool = False) -> Path:
    """Build the library into the cache (or find it there); raises :class:`CudaBuildError`."""
    return build_library("sparse_mla", SOURCES, HEADERS, arch=ARCH, force=force)


def _load(path: Path):
    lib = ctypes.CDLL(str(path))
    ll, i32, vp, f32 = ctypes.c_longlong, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    for name in ("dsa_sparse_mla_fwd_pp_sm90", "dsa_sparse_mla_fwd16_sm90"):
        fn = getattr(lib, name)
        fn.restype = i32
        fn.argtypes = [vp] * 7 + [ll] * 6 + [i32] * 4 + [f32, vp]
    for name in ("dsa_sparse_mla_bwd_sm90", "dsa_sparse_mla_bwd64_sm90"):
        fn = getattr(lib, name)
        fn.restype = i32
        fn.argtypes = [vp] * 10 + [ll] * 8 + [i32] * 7 + [f32, vp]
    for name in ("dsa_sparse_mla_bwd_packed_sm90", "dsa_sparse_mla_bwd64_packed_sm90"):
        fn = getattr(lib, name)
        fn.restype = i32
        fn.argtypes = [vp] * 11 + [ll] * 8 + [i32] * 9 + [f32, vp]
    # the deterministic 64-key entries: the arguments above, then hq, hdo, bound, bound_scale, inv_q
    lib.dsa_sparse_mla_bwd64_det_sm90.restype = i32
    lib.dsa_sparse_mla_bwd64_det_sm90.argtypes = [vp] * 10 + [ll] * 8 + [i32] * 7 + [f32] + [vp] * 6
    lib.dsa_sparse_mla_bwd64_det_packed_sm90.restype = i32
    lib.dsa_sparse_mla_bwd64_det_packed_sm90.argtypes = [vp] * 11 + [ll] * 8 + [i32] * 9 + [f32] + [vp] * 6
    packed_fwd = lib.dsa_sparse_mla_fwd_pp_packed_sm90
    packed_fwd.restype = i32
    packed_fwd.argtypes = [vp] * 8 + [ll] * 6 + [i32] * 5 + [f32, vp]
    lens = lib.dsa_row_lengths
    lens.restype = i32
    lens.argtypes = [vp, ll, vp, i32, i32, vp, vp]
    pack = lib.dsa_pack_rows
    pack.restype = i32
    pack.argtypes = [vp, ll, vp, i32, i32, i32, i32, vp, vp, vp, vp]
    sort = lib.dsa_sort_rows
    sort.restype = i32
    sort.argtypes = [vp, ll, vp, i32, i32, i32, vp, vp, vp, vp]
    unperm = lib.dsa_unpermute_add
    unperm.restype = i32
    unperm.argtypes = [vp, vp, i32, i32, vp, vp]
    lib.dsa_sort_rows_max_k.restype = i32
    lib.dsa_sort_rows_max_k.argtypes = []
    pack_smem = lib.dsa_pack_rows_smem
    pack_smem.restype = ll
    pack_smem.argtypes = [i32, i32, i32]
    for name in ("dsa_sparse_mla_fwd_pp_smem_bytes", "dsa_sparse_mla_bwd_smem_bytes",
                 "dsa_sparse_mla_bwd64_smem_bytes"):
        fn = getattr(lib, name)
        fn.restype = i32
        fn.argtypes = []
    return lib


def library():
    """The loaded library, built on first use; raises the (cached) build error."""
    global _LIB, _LIB_ERROR
    if _LIB is None:
        if _LIB_ERROR is not None:
            raise _LIB_ERROR
        try:
            _LIB = _load(build())
        except CudaBuildError as exc:
            _LIB_ERROR = exc
            raise
        except OSError as exc:  # the library exists but does not load
            _LIB_ERROR = CudaBuildError(f"cannot load the CUDA library: {exc}")
            raise _LIB_ERROR from exc
    return _LIB


def library_error() -> Optional[str]:
    """Why the library is unavailable (building it if it was not tried yet), or ``None``."""
    try:
        library()
    except CudaBuildError as exc:
        return str(exc)
    return None


def unsupported_reason(device: torch.device, dtype: torch.dtype, d_qk: int, d_v: int,
                       num_keys: Optional[int] = None) -> Optional[str]:
    """Why the CUDA kernels cannot run these inputs on ``device`` (``None`` when they can).

    Cheap checks first; the library is built (or loaded) only when everything else fits.
    """
    if device.type != "cuda":
        return f"the CUDA kernels need an sm_90 GPU (the inputs are on {device.type})"
    major, minor = cuda_capability(device)
    if (major, minor) != (9, 0):
        return f"the CUDA kernels are built for sm_90a (Hopper); this GPU is sm_{major}{minor}"
    if dtype != torch.bfloat16 or d_qk != 576 or d_v != 512:
        return (f"the CUDA kernels cover bf16 with d_qk = 576 and d_v = 512; got "
                f"{str(dtype).replace('torch.', '')}, d_qk = {d_qk}, d_v = {d_v}")
    if num_keys is not None and num_keys * 576 >= 2**31:
        return f"the CUDA backward addresses kv with int32 offsets: needs Tk * 576 < 2^31, got Tk = {num_keys}"
    return library_error()


def _rows16(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit channel stride and 16-byte aligned rows (the kernels' 16-byte loads)."""
    if t.stride(-1) != 1 or any(st % 8 for st in t.stride()[:-1]) or t.data_ptr() % 16:
        return t.contiguous()
    return t


def _check_ids(indices: torch.Tensor) -> None:
    if indices.dtype != torch.int32 or indices.stride(-1) != 1:
        raise ValueError(f"the CUDA launchers take int32 indices with unit column stride, got {indices.dtype} "
                         f"with strides {indices.stride()} (the public sparse_mla converts)")


def _check(err: int, what: str) -> None:
    if err != 0:
        raise RuntimeError(f"CUDA sparse MLA {what} launch failed: cudaError {err}")


def effective_lengths(indices: torch.Tensor, topk_length: Optional[torch.Tensor]) -> torch.Tensor:
    """Per row, one past the last slot holding an id >= 0 (capped by ``topk_length``): int32 [T].

    Device-side, no host sync. Causal rows t < k end in -1 padding; the kernels skip the blocks
    past this length instead of computing them masked. One launch of ``cuda/row_lengths.cu``
    (indices int32 with unit column stride); :func:`effective_lengths_torch` is its reference.
    """
    _check_ids(indices)
    T, K = indices.shape
    cap = topk_length.to(torch.int32).contiguous() if topk_length is not None else None
    out = torch.empty(T, dtype=torch.int32, device=indices.device)
    with torch.cuda.device(indices.device):
        _check(library().dsa_row_lengths(indices.data_ptr(), indices.stride(0),
                                         cap.data_ptr() if cap is not None else None, T, K, out.data_ptr(),
                                         torch.cuda.current_stream(indices.device).cuda_stream), "row length")
    return out


def effective_lengths_torch(indices: torch.Tensor, topk_length: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`effective_lengths` in plain PyTorch (the kernel's reference)."""
    K = indices.shape[1]
    pos = torch.arange(1, K + 1, device=indices.device, dtype=torch.int32)
    last = torch.where(indices >= 0, pos, 0).amax(1) if K > 0 else torch.zeros(
        indices.shape[0], dtype=torch.int32, device=indices.device)
    if topk_length is not None:
        last = torch.minimum(last, topk_length.to(torch.int32).clamp(0, K))
    return last.to(torch.int32).contiguous()


def sparse_mla_fwd_cuda(q, kv, indices, softmax_scale, topk_length=None, sink=None,
                        packed: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``(out [T, H, 512] bf16, lse [T, H] fp32)``; the contract of ``reference.py``.
    ``indices`` int32 with unit column stride. ``H <= MAX_HEADS16``: the 16-head kernel; more: the
    ping-pong 64-head kernel. ``packed``: row packing (``H <= 32``): the packed 64-head kernel
    over groups of rows and the union of their keys. Unpacked, where kv exceeds the L2
    (:func:`l2_order` with :data:`FWD_KEY_BYTES`), each row's ids are sorted first."""
    _check_ids(indices)
    softmax_scale = check_positive_scale("softmax_scale", softmax_scale)
    lib = library()
    T, H, _ = q.shape
    if packed and not 1 <= H <= MAX_PACK_HEADS:
        raise ValueError(f"row packing takes 1..{MAX_PACK_HEADS} heads, got {H}")
    if packed and (indices.shape[1] == 0 or kv.shape[0] == 0):
        packed = False  # no key to pack (every row is empty): the unpacked kernels take empty rows
    q, kv = _rows16(q), _rows16(kv)
    if sink is not None:
        sink = sink.float().contiguous()
    out = torch.empty(T, H, 512, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    if packed:  # rows in chunks of at most PACK_CHUNK_BYTES of packing (as the packed backward)
        for c, pk in _packed_chunks(indices, kv.shape[0], H, topk_length):
            qc, oc, lc = q[c], out[c], lse[c]
            with torch.cuda.device(q.device):
                _check(lib.dsa_sparse_mla_fwd_pp_packed_sm90(
                    qc.data_ptr(), kv.data_ptr(), pk.uid.data_ptr(), pk.count.data_ptr(), pk.uslot.data_ptr(),
                    sink.data_ptr() if sink is not None else None, oc.data_ptr(), lc.data_ptr(),
                    qc.stride(0), qc.stride(1), kv.stride(0), pk.uid.shape[1], oc.stride(0), oc.stride(1),
                    c.stop - c.start, H, kv.shape[0], pk.uid.shape[0], pk.hshift, softmax_scale * LOG2E,
                    torch.cuda.current_stream(q.device).cuda_stream), "packed forward")
            del pk  # (freed before the next chunk packs)
        return out, lse
    if l2_order(q.device, kv.shape[0], FWD_KEY_BYTES):  # ids ascending: the gathers stay in a band of kv
        indices, _, kv_len = sort_row_ids(indices, topk_length, kv.shape[0])
    else:
        kv_len = effective_lengths(indices, topk_length)
    args = (q.data_ptr(), kv.data_ptr(), indices.data_ptr(), kv_len.data_ptr(),
            sink.data_ptr() if sink is not None else None, out.data_ptr(), lse.data_ptr(),
            q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), out.stride(0), out.stride(1),
            T, H, kv.shape[0], indices.shape[1], float(softmax_scale) * LOG2E)
    kernel = lib.dsa_sparse_mla_fwd16_sm90 if H <= MAX_HEADS16 else lib.dsa_sparse_mla_fwd_pp_sm90
    with torch.cuda.device(q.device):
        _check(kernel(*args, torch.cuda.current_stream(q.device).cuda_stream), "forward")
    return out, lse


def pack_rows_cuda(indices: torch.Tensor, num_keys: int, heads: int,
                   topk_length: Optional[torch.Tensor] = None) -> PackedRows:
    """``packing.pack_rows`` for the CUDA kernels: one CTA per group, its bitmaps over the keys in
    shared memory (``cuda/pack_rows.cu``). ``indices`` int32 with unit column stride. Where one
    group's bitmaps exceed the device's shared memory (about 270K keys at 16 heads), the Triton
    kernel, which keeps them in global scratch."""
    _check_ids(indices)
    lib = library()
    T, K, hpad, R, G = packed_shape(indices, heads)
    dev = indices.device
    if lib.dsa_pack_rows_smem(R, K, num_keys) > torch.cuda.get_device_properties(dev).shared_memory_per_block_optin:
        return pack_rows_triton(indices, num_keys, heads, topk_length)
    uid = torch.empty(G, R * K, dtype=torch.int32, device=dev)
    uslot = torch.empty(G, R, R * K, dtype=torch.int16, device=dev)
    count = torch.empty(G, dtype=torch.int32, device=dev)
    lens = topk_length.to(torch.int32).contiguous() if topk_length is not None else None
    if T > 0:
        with torch.cuda.device(dev):
            _check(lib.dsa_pack_rows(indices.data_ptr(), indices.stride(0), lens.data_ptr() if lens is not None else None,
                                     T, K, num_keys, R, uid.data_ptr(), uslot.data_ptr(), count.data_ptr(),
                                     torch.cuda.current_stream(dev).cuda_stream), "row packing")
    return PackedRows(uid, uslot, count, R, hpad)


# The deterministic backward's dkv lanes may take at most this share of the device's memory
DET_WORKSPACE_SHARE = 0.1
# The row-packed backward packs (and runs) at most this many bytes of packing at a time
PACK_CHUNK_BYTES = 1 << 30
# Long sequences (l2_order): CTAs per launch of the backward at Tk <= L2_ORDER_REF_KEYS,
# unpacked (rows x head blocks) and row-packed (groups); fewer in proportion beyond
# (l2_order_launch_ctas). H100, S = 32K, rows' ids sorted: 64 heads 61.6 ms in launches of 4096
# CTAs against 86.0 in one launch of random-order ids; 128 heads 123.8 against 144.2; 16 heads
# packed 48.9 in launches of 2048 groups against 65.2 in one; at 128K 16 heads packed 237 / 250
# / 273 ms in launches of 512 / 1024 / 2048 groups (docs/kernels_sparse_mla.md, 3.3)
L2_ORDER_CTAS = 4096
L2_ORDER_PACKED_CTAS = 2048
L2_ORDER_REF_KEYS = 32768
# the forward's l2_order row: one bf16 kv row
FWD_KEY_BYTES = 576 * 2
# rows per torch.sort call of sort_row_ids_torch (bounds its transient memory)
SORT_CHUNK_ROWS = 4096


def l2_order(device: torch.device, num_keys: int, key_bytes: int = 576 * 4) -> bool:
    """Whether a kernel walks its rows in L2 order: true when ``num_keys x key_bytes`` exceeds the
    device's L2. The (non-deterministic) backward asks with the fp32 dkv workspace's row (the
    default): every row's ids are then walked ascending (sorted by :func:`sort_row_ids`; a
    packed group's union already is) and the rows run in launches of at most
    :func:`l2_order_launch_ctas` CTAs, so that the CTAs of a
    launch, started together, walk the keys in step and their dkv adds and kv gathers stay in
    the part of the workspace the L2 holds. The (unpacked) forward asks with kv's bf16 row
    (1152 bytes) and sorts the ids only (its launches are persistent or short already). A
    function of the device model and the shape."""
    return num_keys * key_bytes > torch.cuda.get_device_properties(device).L2_cache_size


def l2_hints(device: torch.device, num_keys: int) -> bool:
    """Whether the 64-key backward sends its dkv adds to the L2 as ``evict_last`` and its kv
    gathers as ``evict_first``: where the fp32 dkv workspace fits the device's L2 but not beside
    kv (``num_keys x (2304 + 1152)`` bytes exceed it) and the rows do not run in L2 order
    (:func:`l2_order`). The gathered rows then give way to the workspace's lines, each of which
    takes many adds. H100, S = 16K, 64 heads: 29.2 vs 30.7 ms (128 heads 57.5 vs 58.2); at 4K
    (everything fits) and at 32K (L2 order) the hints were 1% slower. A function of the device
    model and the shape."""
    return l2_order(device, num_keys, 576 * 4 + FWD_KEY_BYTES) and not l2_order(device, num_keys)


def l2_order_launch_ctas(num_keys: int, packed: bool) -> int:
    """CTAs (packed: groups) per launch of the backward in L2 order: :data:`L2_ORDER_CTAS` (packed:
    :data:`L2_ORDER_PACKED_CTAS`) up to :data:`L2_ORDER_REF_KEYS` keys, in proportion to
    ``L2_ORDER_REF_KEYS / num_keys`` beyond (a launch's band of keys widens with the keys each row
    spans), at least 256."""
    base = L2_ORDER_PACKED_CTAS if packed else L2_ORDER_CTAS
    return max(min(256, base), min(base, base * L2_ORDER_REF_KEYS // max(num_keys, 1)))


def sort_row_ids(indices: torch.Tensor, topk_length: Optional[torch.Tensor], num_keys: int,
                 with_perm: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """``(ids, perm, lengths)``: each row's valid ids (in ``[0, num_keys)``, at a slot below
    ``topk_length``) ascending, then -1; ``perm`` (int32, with ``with_perm``) the input slot of
    each sorted one (``ids[t, j] = indices[t, perm[t, j]]`` where valid; equal ids and the
    invalid slots in slot order); ``lengths`` int32 [T] the valid count per row. Repeated ids
    stay repeated. ``cuda/sort_rows.cu`` (one CTA per row, a block radix sort) for rows of up
    to 4096 slots; :func:`sort_row_ids_torch` beyond. No host sync."""
    _check_ids(indices)
    lib = library()
    T, K = indices.shape
    if K > lib.dsa_sort_rows_max_k():
        return sort_row_ids_torch(indices, topk_length, num_keys, with_perm)
    dev = indices.device
    out = torch.empty(T, K, dtype=torch.int32, device=dev)
    perm = torch.empty(T, K, dtype=torch.int32, device=dev) if with_perm else None
    lengths = torch.empty(T, dtype=torch.int32, device=dev)
    cap = topk_length.to(torch.int32).contiguous() if topk_length is not None else None
    with torch.cuda.device(dev):
        _check(lib.dsa_sort_rows(indices.data_ptr(), indices.stride(0), cap.data_ptr() if cap is not None else None,
                                 T, K, max(int(num_keys), 1), out.data_ptr(),
                                 perm.data_ptr() if perm is not None else None, lengths.data_ptr(),
                                 torch.cuda.current_stream(dev).cuda_stream), "row sort")
    return out, perm, lengths


def sort_row_ids_torch(indices: torch.Tensor, topk_length: Optional[torch.Tensor], num_keys: int,
                       with_perm: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """:func:`sort_row_ids` in PyTorch (the CUDA kernel's reference; any row length): a stable
    sort of each row with the invalid slots keyed past every id, :data:`SORT_CHUNK_ROWS` rows at
    a time."""
    T, K = indices.shape
    big = torch.iinfo(torch.int32).max
    out = torch.empty(T, K, dtype=torch.int32, device=indices.device)
    perm = torch.empty(T, K, dtype=torch.int32, device=indices.device) if with_perm else None
    lengths = torch.empty(T, dtype=torch.int32, device=indices.device)
    slots = torch.arange(K, device=indices.device, dtype=torch.int32)
    for r0 in range(0, T, SORT_CHUNK_ROWS):
        c = slice(r0, min(T, r0 + SORT_CHUNK_ROWS))
        ids = indices[c]
        valid = (ids >= 0) & (ids < num_keys)
        if topk_length is not None:
            valid &= slots[None, :] < topk_length[c].to(torch.int32)[:, None]
        v, p = torch.where(valid, ids, big).sort(dim=1, stable=True)
        out[c] = torch.where(v == big, -1, v)
        lengths[c] = valid.sum(1, dtype=torch.int32)
        if perm is not None:
            perm[c] = p
    return out, perm, lengths


def _packed_chunks(indices: torch.Tensor, num_keys: int, heads: int, topk_length: Optional[torch.Tensor]):
    """``(rows slice, its packing)`` per chunk of :func:`packed_chunk_rows` rows, in order. The
    caller launches on a chunk's packing and drops it (``del``) before asking for the next, so
    that its memory is reused (stream-ordered) for the next chunk's."""
    T = indices.shape[0]
    rows = packed_chunk_rows(T, indices.shape[1], heads)
    for r0 in range(0, T, rows) if T > 0 else ():
        c = slice(r0, min(T, r0 + rows))
        pk = pack_rows_cuda(indices[c], num_keys, heads, topk_length[c] if topk_length is not None else None)
        yield c, pk
        pk = None


def packed_chunk_rows(T: int, K: int, heads: int, budget: Optional[int] = None) -> int:
    """Query rows per launch of the row-packed backward: a whole number of groups (``R`` rows)
    whose packing (``uid`` int32 and ``uslot`` int16: ``K (4 + 2 R)`` bytes a row) fits
    ``budget`` (default :data:`PACK_CHUNK_BYTES`), at least one group; ``T`` when all rows fit.
    A function of the shape only, so the chunks (and the deterministic mode's add order) are
    the same on every run."""
    budget = PACK_CHUNK_BYTES if budget is None else budget
    R = 64 // heads_padded(heads)
    rows = max(1, budget // max(K * (4 + 2 * R), 1) // R) * R
    return T if rows >= T else rows


def det_lanes(device: torch.device, num_keys: int) -> int:
    """The deterministic backward's dkv lanes (= its persistent CTAs): one per SM, each adding
    into its own fp32 ``[Tk, 576]`` lane, as long as the ``lanes * Tk * 2304`` bytes stay within
    :data:`DET_WORKSPACE_SHARE` of the device's memory (132 lanes, 4.6 GiB at Tk = 16K); fewer
    lanes (a slower backward) beyond. A function of the device model and Tk only, so a shape
    sums its lanes the same way on every run."""
    props = torch.cuda.get_device_properties(device)
    fit = int(DET_WORKSPACE_SHARE * props.total_memory) // (max(num_keys, 1) * 576 * 4)
    return max(1, min(props.multi_processor_count, fit))


def bwd_block_keys(deterministic: bool) -> int:
    """Keys per block of the CUDA backward, unpacked or row-packed: 64 in both modes
    (``dsa_sparse_mla_bwd64_sm90`` / ``dsa_sparse_mla_bwd64_packed_sm90``: two warpgroups, [64 keys,
    64 channels] dKV tiles; faster than the 32-key kernel at every measured S and head count,
    ``docs/kernels_sparse_mla.md`` section 3.3b). Deterministic, the 64-key kernel's integer adds
    (:func:`det_bound_scale`): the same bits on every run, schedule and sm_90 GPU, and faster and
    smaller than the 32-key kernel's fp32 lanes (:func:`det_lanes`; H100, S = 16K: 128 heads 136.2
    vs 149.8 ms, 2.6 vs 7.0 GiB peak; 16 heads 47.4 vs 49.2 ms, 0.7 vs 5.3 GiB; section 6). ``block_keys=32``
    with ``deterministic=True`` still takes the lanes, and so does the automatic choice beyond
    :data:`DET_MAX_KEYS` keys (:func:`det_block_keys`)."""
    return 64


def det_block_keys(num_keys: Optional[int]) -> int:
    """The deterministic backward's keys per block for ``num_keys`` kv rows (``None``: unknown):
    :func:`bwd_block_keys`'s, except 32 (the lanes) beyond :data:`DET_MAX_KEYS` keys, which the
    integer adds cannot address."""
    keys = bwd_block_keys(True)
    return 32 if keys == 64 and num_keys is not None and num_keys > DET_MAX_KEYS else keys


# The deterministic 64-key backward (docs/kernels_sparse_mla.md section 6): each key's dkv is
# added as int32 multiples of a per-key power-of-two quantum q_s = 2^(e_s - DET_QUANTUM_BITS),
# where 2^e_s bounds |dkv[s, c]| (a first pass of the kernel sums the bound as u64 fixed point
# with DET_BOUND_BITS bits of headroom over the whole problem); the target as u64 multiples of
# 2^-DET_TARGET_BITS. Integer adds are associative: the bits do not depend on the add order.
DET_QUANTUM_BITS = 30
DET_BOUND_BITS = 62
DET_TARGET_BITS = 40
# (the integer adds hold a key's id and its quantum's exponent in one register: ids < 2^23)
DET_MAX_KEYS = 1 << 23


def _pow2(exponent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2 ** exponent`` exactly (integer exponents in the dtype's normal range), from the bits."""
    if dtype == torch.float32:
        return ((exponent.to(torch.int32) + 127) << 23).view(torch.float32)
    return ((exponent.to(torch.int64) + 1023) << 52).view(torch.float64)


def det_head_max(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``[T, H]``: max over the channels of ``|x[t, h, :]|`` (the deterministic bound's q
    and dO factors; exact: the max of bf16 values is one of them)."""
    return torch.linalg.vector_norm(x, ord=float("inf"), dim=-1).float()


def det_bound_scale(kv: torch.Tensor, dout: torch.Tensor, hq: torch.Tensor, hdo: torch.Tensor,
                    softmax_scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The bound pass's fixed-point scale (fp32 ``[1]``, a power of two, on the device) and a
    ``bad`` flag (bool ``[]``: the inputs are not finite or too large, dkv is NaN).

    One (row, head)'s term of a key's bound, ``|dS| max|q| + P max|dO|``, is at most ``c =
    2 scale max||dO|| max||v|| max|q| + max|dO|`` (``P <= 1``, ``|dP - Delta| <= 2 ||dO|| max||v||``,
    ``||dO|| <= sqrt(512) max|dO|``: no second pass over dO); with a factor 2 for roundings, ``T H
    c`` bounds the sum over all of them, which the scale maps to at most ``2^DET_BOUND_BITS``
    units (each term rounded up to whole units). No host sync."""
    T, H = hq.shape
    zero = torch.zeros((), dtype=torch.float64, device=kv.device)
    vn = torch.linalg.vector_norm(kv[:, :512], dim=-1, dtype=torch.float32).amax().double() if kv.shape[0] else zero
    qm = hq.amax().double() if T * H else zero
    dm = hdo.amax().double() if T * H else zero
    don = dm * 512 ** 0.5
    total = 2.0 * (2.0 * softmax_scale * don * vn * qm + dm) * float(max(T * H, 1))
    e = torch.frexp(total).exponent  # total <= 2^e
    bad = ~torch.isfinite(total) | (e > DET_BOUND_BITS + 126)
    e = torch.where(bad | (total == 0), torch.full_like(e, DET_BOUND_BITS), e)
    scale = _pow2((DET_BOUND_BITS - e).clamp(-126, 126), torch.float32).reshape(1)
    return scale, bad


def det_quanta(bound: torch.Tensor, scale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per key, from the bound pass's sums (int64 ``[Tk]``, u64 units) and its scale: ``(inv_q
    fp32, q fp64)``, ``q = 2^(e - DET_QUANTUM_BITS)`` with ``2^e`` >= the bound (exponents clamped
    to fp32's normal range). A function of integers: the same on every run."""
    B = bound.double() / scale.double()
    e = torch.frexp(B).exponent.clamp(-96, 126 + DET_QUANTUM_BITS)
    return _pow2(DET_QUANTUM_BITS - e, torch.float32), _pow2(e - DET_QUANTUM_BITS, torch.float64)


def det_finish(ws: torch.Tensor, q: torch.Tensor, bad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dkv in channel order and ``dtype`` from the integer workspace (``[Tk, 576]`` int32 in the
    dkv64 layout, each channel pair one u64 sum ``x_1 2^32 + x_0``, ``cuda/sparse_mla_bwd_sm90.cu``,
    "DET_INT") and the keys' quanta: exact in fp64, one rounding to fp32, then to ``dtype``; NaN
    where ``bad``."""
    Tk = ws.shape[0]
    t = ws.view(torch.int64)  # [Tk, 288]: (sum of the odd channel) 2^32 + (sum of the even one)
    lo = (t << 32) >> 32
    f = torch.stack((lo, (t - lo) >> 32), -1).reshape(Tk, 576)
    f = (f.double() * q[:, None]).float()
    f = torch.where(bad, torch.full_like(f, float("nan")), f)
    return unpermute_dkv64(f, dtype)


def det_target(fx: torch.Tensor) -> torch.Tensor:
    """The target (fp32) from its u64 sums (int64 views) in units of ``2^-DET_TARGET_BITS``."""
    return (fx.double() * 2.0 ** -DET_TARGET_BITS).float()


def sparse_mla_bwd_cuda(q, kv, indices, softmax_scale, topk_length, sink, out, lse, dout, dlse=None,
                        target_out=None, packed: bool = False, deterministic: bool = False,
                        block_keys: Optional[int] = None):
    """Backward: ``(dq [T, H, 576] bf16, dkv [Tk, 576] bf16, d_sink fp32 [H] or None)``.

    The Triton stats kernel forms logZ / Delta / the d_sink terms, then the CUDA kernel.
    ``target_out`` (fp32 ``[T, K]``, contiguous, zero-filled): += the head-summed P per slot
    (the indexer loss's target). ``indices`` int32 with unit column stride. ``packed``: row
    packing (``H <= 32``): the rows of a 64-row tile walk the union of their keys; the rows are
    packed and run in chunks of at most :data:`PACK_CHUNK_BYTES` of packing (:func:`packed_chunk_rows`).
    ``deterministic``: bit-reproducible dkv and target. By default (``block_keys`` 64) the 64-key
    kernel runs twice: a bound pass (each key's bound on ``|dkv|``, summed as integers), then the
    backward adding dkv as integer multiples of each key's power-of-two quantum and the target as
    u64 multiples of ``2^-40`` (:func:`det_bound_scale`, :func:`det_quanta`): the same bits on
    every run, device and schedule. With ``block_keys=32`` (and automatically beyond
    :data:`DET_MAX_KEYS` keys) the 32-key kernel on a persistent grid adding into fp32 lanes
    (:func:`det_lanes`): the same bits for a given device model and shape when each row's valid
    ids are distinct (slower, more memory: :func:`bwd_block_keys`). dq and d_sink are
    deterministic in both modes (no atomics). Otherwise, where :func:`l2_order` holds (the dkv
    workspace exceeds the L2), each row's ids are walked ascending and the rows run in launches
    of a bounded number of CTAs (the packed path's unions are ascending already).
    ``block_keys``: the keys per block of the kernel, ``None`` (auto: :func:`bwd_block_keys`,
    deterministic :func:`det_block_keys`); 64 (the 64-key kernel, unpacked or packed rows;
    deterministic: its integer adds, at most :data:`DET_MAX_KEYS` keys) or 32.
    """
    _check_ids(indices)
    if block_keys is None:
        block_keys = det_block_keys(kv.shape[0]) if deterministic else bwd_block_keys(False)
    if block_keys not in (32, 64):
        raise ValueError(f"block_keys must be 32 or 64 (or None: auto), got {block_keys}")
    if deterministic and block_keys == 64 and kv.shape[0] > DET_MAX_KEYS:
        raise ValueError(f"deterministic=True with block_keys=64 takes at most {DET_MAX_KEYS} keys (kv rows), "
                         f"got {kv.shape[0]}")
    lib = library()
    T, H, Dqk = q.shape
    if packed and not 1 <= H <= MAX_PACK_HEADS:
        raise ValueError(f"row packing takes 1..{MAX_PACK_HEADS} heads, got {H}")
    if packed and (indices.shape[1] == 0 or kv.shape[0] == 0):
        packed = False  # no key to pack (every row is empty): the unpacked kernels take empty rows
    q, kv, dout = _rows16(q), _rows16(kv), _rows16(dout)
    if dlse is not None:
        dlse = dlse.contiguous()
    lse = lse.contiguous()
    # packed: rows in chunks of at most PACK_CHUNK_BYTES of packing, each with its own stats
    rows = packed_chunk_rows(T, indices.shape[1], H) if packed else T
    stats = torch.empty(2 * rows * H, dtype=torch.float32, device=q.device)
    dsink_t = torch.empty(T, H, dtype=torch.float32, device=q.device) if sink is not None else None
    dq = torch.empty(T, H, Dqk, dtype=q.dtype, device=q.device)
    det64 = deterministic and block_keys == 64
    lanes = det_lanes(q.device, kv.shape[0]) if deterministic and not det64 else 0
    l2 = not lanes and l2_order(q.device, kv.shape[0])
    stream = torch.cuda.current_stream(q.device).cuda_stream
    Tk, K = kv.shape[0], indices.shape[1]
    if det64:  # the bound pass's inputs and outputs, the integer workspace, the target's sums
        hq, hdo = det_head_max(q), det_head_max(dout)
        bscale, bad = det_bound_scale(kv, dout, hq, hdo, float(softmax_scale))
        bound = torch.zeros(Tk, dtype=torch.int64, device=q.device)
        dkv = torch.zeros(1, Tk, Dqk, dtype=torch.int32, device=q.device)
        tfx = torch.zeros(T, K, dtype=torch.int64, device=q.device) if target_out is not None else None
    else:  # permuted columns; deterministic: one lane per persistent CTA
        dkv = torch.zeros(max(lanes, 1), Tk, Dqk, dtype=torch.float32, device=q.device)
        tfx = None

    def det_args(stage, r0, r1):  # the deterministic entries' trailing arguments
        return (stage, l2_order_launch_ctas(Tk, packed) if l2 else 0, float(softmax_scale),
                hq[r0:r1].data_ptr(), hdo[r0:r1].data_ptr(), bound.data_ptr(), bscale.data_ptr(),
                inv_q.data_ptr() if stage == 2 else None, stream)

    inv_q = qs = None
    for stage in ((1, 2) if det64 else (0,)) if packed else ():
        if stage == 2:
            inv_q, qs = det_quanta(bound, bscale)
        for c, pk in _packed_chunks(indices, Tk, H, topk_length):
            n = c.stop - c.start
            st = stats[: 2 * n * H]
            bwd_stats(st, dsink_t[c] if sink is not None else None, out[c], dout[c], lse[c],
                      dlse[c] if dlse is not None else None, sink, 512)
            args = (q[c].data_ptr(), kv.data_ptr(), pk.uid.data_ptr(), pk.count.data_ptr(), pk.uslot.data_ptr(),
                    dout[c].data_ptr(), st.data_ptr(), lse[c].data_ptr(), dq[c].data_ptr(), dkv.data_ptr())
            dims = (q.stride(0), q.stride(1), kv.stride(0), pk.uid.shape[1], dout.stride(0), dout.stride(1),
                    dq.stride(0), dq.stride(1), n, H, Tk, K, pk.uid.shape[0], pk.hshift, int(sink is not None))
            with torch.cuda.device(q.device):
                if det64:
                    _check(lib.dsa_sparse_mla_bwd64_det_packed_sm90(
                        *args, tfx[c].data_ptr() if tfx is not None else None, *dims, *det_args(stage, c.start, c.stop)),
                        "packed backward (deterministic)")
                else:
                    # (the 64-key kernel takes its L2 hints where the 32-key kernel takes its lanes)
                    entry, mode = ((lib.dsa_sparse_mla_bwd64_packed_sm90, int(l2_hints(q.device, Tk)))
                                   if block_keys == 64 else (lib.dsa_sparse_mla_bwd_packed_sm90, lanes))
                    _check(entry(*args, target_out[c].data_ptr() if target_out is not None else None, *dims, mode,
                                 l2_order_launch_ctas(Tk, True) if l2 else 0, float(softmax_scale), stream),
                           "packed backward")
            del pk  # (freed before the next chunk packs)
    if T > 0 and not packed:
        bwd_stats(stats, dsink_t, out, dout, lse, dlse, sink, 512)
        perm = tgt = None
        if l2:  # each row's ids ascending; the target is added at the sorted slots, then moved back
            indices, perm, kv_len = sort_row_ids(indices, topk_length, kv.shape[0], with_perm=target_out is not None)
            # (deterministic 64: the target's integer sums are converted after the launches)
            tgt = torch.zeros_like(target_out) if target_out is not None and not det64 else None
        else:
            tgt = target_out
            kv_len = effective_lengths(indices, topk_length)
        args = (q.data_ptr(), kv.data_ptr(), indices.data_ptr(), kv_len.data_ptr(), dout.data_ptr(),
                stats.data_ptr(), lse.data_ptr(), dq.data_ptr(), dkv.data_ptr())
        dims = (q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), dout.stride(0), dout.stride(1),
                dq.stride(0), dq.stride(1), T, H, Tk, K, int(sink is not None))
        with torch.cuda.device(q.device):
            if det64:
                for stage in (1, 2):
                    if stage == 2:
                        inv_q, qs = det_quanta(bound, bscale)
                    _check(lib.dsa_sparse_mla_bwd64_det_sm90(
                        *args, tfx.data_ptr() if tfx is not None else None, *dims, *det_args(stage, 0, T)),
                        "backward (deterministic)")
            else:
                # (the 64-key kernel takes its L2 hints where the deterministic kernel takes its lanes)
                entry, mode = ((lib.dsa_sparse_mla_bwd64_sm90, int(l2_hints(q.device, Tk))) if block_keys == 64
                               else (lib.dsa_sparse_mla_bwd_sm90, lanes))
                _check(entry(*args, tgt.data_ptr() if tgt is not None else None, *dims, mode,
                             l2_order_launch_ctas(Tk, False) if l2 else 0, float(softmax_scale), stream), "backward")
        if tfx is not None:  # the target's integer sums (at the sorted slots where perm)
            if perm is None:
                target_out += det_target(tfx)
            else:
                tgt = det_target(tfx)
        if perm is not None:  # target_out[t, perm[t, j]] += tgt[t, j]: one add per slot
            with torch.cuda.device(q.device):
                _check(lib.dsa_unpermute_add(tgt.data_ptr(), perm.data_ptr(), T, indices.shape[1],
                                             target_out.data_ptr(), torch.cuda.current_stream(q.device).cuda_stream),
                       "target unpermute")
    d_sink = dsink_t.sum(0).to(sink.dtype) if sink is not None else None
    if det64:
        if packed and tfx is not None:
            target_out += det_target(tfx)
        if qs is None:  # (no row ran)
            qs = torch.ones(Tk, dtype=torch.float64, device=q.device)
        return dq, det_finish(dkv[0], qs, bad, kv.dtype), d_sink
    # (the lanes are summed in index order: torch's reduction over a leading dim has no atomics)
    if block_keys == 64:
        return dq, unpermute_dkv64(dkv[0], kv.dtype), d_sink
    return dq, unpermute_dkv(dkv[0] if lanes == 0 else dkv.sum(0), kv.dtype), d_sink


def unpermute_dkv(ws: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The backward kernel's fp32 dkv workspace ``[Tk, 576]`` (columns permuted, see
    ``cuda/sparse_mla_bwd_sm90.cu``, "dkv workspace") in channel order, cast to ``dtype``.

    Value channels ``128 pp + 64 a + 16 w + 8 i + r`` are stored at ``128 pp + 32 w + 4 r + 2 a + i``;
    rope channels ``512 + 16 w + 8 i + r`` at ``512 + 16 w + 2 r + i``. One strided copy per part."""
    if ws.dim() != 2 or ws.shape[1] != 576 or ws.dtype != torch.float32 or not ws.is_contiguous():
        raise ValueError(f"expected the contiguous fp32 [Tk, 576] workspace, got {ws.dtype} {tuple(ws.shape)}")
    Tk = ws.shape[0]
    out = torch.empty(Tk, 576, dtype=dtype, device=ws.device)
    # stored (pp, w, r, a, i) -> channel order (pp, a, w, i, r)
    out[:, :512].view(Tk, 4, 2, 4, 2, 8).copy_(ws[:, :512].view(Tk, 4, 4, 8, 2, 2).permute(0, 1, 4, 2, 5, 3))
    # stored (w, r, i) -> (w, i, r)
    out[:, 512:].view(Tk, 4, 2, 8).copy_(ws[:, 512:].view(Tk, 4, 8, 2).permute(0, 1, 3, 2))
    return out


def unpermute_dkv64(ws: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 64-key backward kernel's fp32 dkv workspace ``[Tk, 576]`` (columns permuted within
    each 32-channel line, ``cuda/sparse_mla_bwd_sm90.cu``, "dkv64 workspace") in channel order,
    cast to ``dtype``: channel ``32 L + 16 s + 8 jl + 2 c2 + bb`` is stored at
    ``32 L + 16 s + 4 c2 + 2 jl + bb``. One strided copy."""
    if ws.dim() != 2 or ws.shape[1] != 576 or ws.dtype != torch.float32 or not ws.is_contiguous():
        raise ValueError(f"expected the contiguous fp32 [Tk, 576] workspace, got {ws.dtype} {tuple(ws.shape)}")
    Tk = ws.shape[0]
    out = torch.empty(Tk, 576, dtype=dtype, device=ws.device)
    # stored (L, s, c2, jl, bb) -> channel order (L, s, jl, c2, bb)
    out.view(Tk, 18, 2, 2, 4, 2).copy_(ws.view(Tk, 18, 2, 4, 2, 2).permute(0, 1, 2, 4, 3, 5))
    return out
