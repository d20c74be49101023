"""FP8 (e4m3) selection numerics for the indexer (``DSAPluginConfig.indexer_precision``)."""

import pytest
import torch

from megatron_dsa.kernels.indexer import indexer_topk

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
from megatron_dsa.kernels.indexer.fp8 import E4M3_MAX, fp8_selection_inputs, quantize_e4m3


def test_quantize_round_trip_and_scales():
    x = torch.randn(5, 3, 64) * torch.tensor([1e-3, 1.0, 300.0]).view(1, 3, 1)
    x[0, 0] = 0.0
    x8, scale = quantize_e4m3(x)
    assert x8.dtype == torch.float8_e4m3fn and scale.shape == (5, 3, 1)
    assert scale[0, 0, 0] == 1.0  # an all-zero row
    back = x8.float() * scale
    assert (back.abs().amax(-1) <= x.abs().amax(-1) * (1 + 1e-6)).all()
    assert torch.allclose(back.abs().amax(-1)[1:], x.abs().amax(-1)[1:], rtol=1e-6)  # amax maps to 448
    rel = (back - x).abs() / x.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    assert rel.max() <= 2.0**-4  # e4m3: 3 mantissa bits


def test_quantize_in_chunks_equals_one_pass(monkeypatch):
    """The chunked quantization (bounded temporaries) gives the one-pass result bit for bit,
    with chunks that split the rows unevenly and a non-contiguous input."""
    from megatron_dsa.kernels.indexer import fp8

    x = (torch.randn(7, 5, 48) * torch.rand(7, 5, 1) * 100).transpose(0, 1)
    x[1, 2] = 0.0
    whole8, whole_s = fp8.quantize_e4m3(x)
    monkeypatch.setattr(fp8, "_CHUNK_ELEMS", 48 * 3)   # three rows per chunk: 35 rows in 12 chunks
    part8, part_s = fp8.quantize_e4m3(x)
    assert torch.equal(part8.view(torch.uint8), whole8.view(torch.uint8)) and torch.equal(part_s, whole_s)
    amax = x.abs().amax(-1, keepdim=True)
    assert torch.equal(whole_s, torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax)))


def _quantization_cases():
    """Inputs of the bit-for-bit checks: every e4m3 value, the midpoints between neighbours
    (ties to even) and the floats next to them, subnormals, -0.0, all-zero rows, NaN / inf rows,
    a head dim that is not a power of two, non-contiguous rows, bf16 / fp16 / fp32."""
    vals = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    vals = vals[~vals.isnan()].unique()
    mids = (vals[1:] + vals[:-1]) / 2
    y = torch.cat([vals, mids, mids.nextafter(torch.tensor(1e9)), mids.nextafter(torch.tensor(-1e9))])
    y = y[y.abs() <= E4M3_MAX]
    grid = torch.cat([y, torch.zeros((-y.numel()) % 64)]).view(-1, 64)
    grid[:, 0] = E4M3_MAX                      # scale exactly 1: the grid is what gets rounded
    yield grid
    g = torch.Generator().manual_seed(1)
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        x = (torch.randn(3, 9, 4, 128, generator=g) * torch.rand(3, 9, 4, 1, generator=g) ** 6 * 50).to(dt)
        x[0, 3, 1] = 0.0
        x[1, 2, 0, :5] = -0.0
        yield x
        yield x.transpose(1, 2)                # non-contiguous rows
    x = torch.randn(6, 48, generator=g)
    x[0, 3], x[1, 5], x[2, 7], x[3] = float("nan"), float("inf"), -float("inf"), 0.0
    yield x


def _check_quantization_bits(device):
    from megatron_dsa.kernels.indexer.fp8 import quantize_e4m3_triton

    for x in _quantization_cases():
        a8, a_s = quantize_e4m3_triton(x.to(device))
        r8, r_s = quantize_e4m3(x)
        assert a8.shape == r8.shape and a8.dtype == r8.dtype and a_s.shape == r_s.shape
        assert torch.equal(_nan_unsigned(a8.cpu()), _nan_unsigned(r8))
        assert torch.equal(a_s.cpu(), r_s)


def _nan_unsigned(x8):
    """e4m3 bytes with NaN's sign bit cleared: a GPU's arithmetic makes its NaNs positive
    (inf / inf), x86's negative; every other byte must agree."""
    b = x8.view(torch.uint8)
    return torch.where((b & 0x7F) == 0x7F, torch.full_like(b, 0x7F), b)


def test_triton_quantization_equals_torch_bit_for_bit():
    """The one-pass Triton quantization (the Triton backend's) gives torch's e4m3 bytes and
    scales (the integer path here; the GPU's own conversion on sm_89+: the GPU test below)."""
    _check_quantization_bits("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
def test_gpu_triton_quantization_equals_torch_bit_for_bit():
    """The GPU's e4m3 conversion (cvt.rn.satfinite) gives torch's bytes (CPU) on every case."""
    _check_quantization_bits("cuda")


def _check_kernel_inputs(device):
    """``fp8_kernel_inputs`` (one launch for queries, keys and the folded weights) gives the bytes
    and scales of the per-tensor quantization and ``w.float() * sq`` exactly, for bf16 and fp32
    inputs, non-contiguous ones and a NaN / all-zero row."""
    from megatron_dsa.kernels.indexer.fp8 import fp8_kernel_inputs

    g = torch.Generator().manual_seed(3)
    B, T, S, H, D = 2, 37, 41, 3, 32
    for dtype in (torch.float32, torch.bfloat16):
        q = (torch.randn(B, H, T, D, generator=g) * 5).to(dtype).transpose(1, 2)  # non-contiguous rows
        k = (torch.randn(B, S, D, generator=g) * 0.1).to(dtype)
        w = torch.randn(B, H, T, generator=g).to(dtype).transpose(1, 2)
        q[0, 3, 1] = 0.0
        q[1, 2, 0, 4] = float("nan")
        k[1, 5] = 0.0
        q8, k8, ws, ks = fp8_kernel_inputs(q.to(device), k.to(device), w.to(device))
        r_q8, r_sq = quantize_e4m3(q)
        r_k8, r_sk = quantize_e4m3(k)
        assert q8.shape == q.shape and k8.shape == k.shape and ws.shape == w.shape and ks.shape == (B, S)
        assert torch.equal(_nan_unsigned(q8.cpu()), _nan_unsigned(r_q8))
        assert torch.equal(_nan_unsigned(k8.cpu()), _nan_unsigned(r_k8))
        assert torch.equal(ks.cpu(), r_sk.squeeze(-1))
        assert ws.dtype == torch.float32 and torch.equal(ws.cpu(), w.float() * r_sq.squeeze(-1))


def test_fp8_kernel_inputs_equal_per_tensor_quantization():
    _check_kernel_inputs("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
def test_gpu_fp8_kernel_inputs_equal_per_tensor_quantization():
    _check_kernel_inputs("cuda")


def _fp8_scores(q, k, w):
    """Scores of DeepSeek's e4m3 selection written out: e4m3 dot products, then the scales."""
    q8, sq = quantize_e4m3(q)
    k8, sk = quantize_e4m3(k)
    dots = torch.einsum("bthd,bsd->bths", q8.double(), k8.double())
    return torch.einsum("bth,bths->bts", (w.double() * sq.squeeze(-1).double()),
                        torch.relu(dots) * sk.squeeze(-1).double().unsqueeze(1).unsqueeze(1))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_selection_is_the_e4m3_selection(backend):
    """The folded inputs give the top-k of e4m3 scores (scales applied after the dot), on every
    backend; they differ from the bf16 selection only where scores are close."""
    g = torch.Generator().manual_seed(0)
    B, T, H, D, K = 1, 96, 4, 32, 16
    q = torch.randn(B, T, H, D, generator=g)
    k = torch.randn(B, T, D, generator=g) * 3
    w = torch.randn(B, T, H, generator=g)
    idx, _ = indexer_topk(q, k, w, K, backend=backend, precision="fp8")  # triton: the e4m3 score kernel
    folded, _ = indexer_topk(*fp8_selection_inputs(q, k, w), K, backend=backend)
    assert torch.equal(idx.sort(-1).values, folded.sort(-1).values)
    want = _fp8_scores(q, k, w)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    want = want.masked_fill(~causal, float("-inf"))
    for t in range(K, T):  # rows with more candidates than k
        got = set(idx[0, t].tolist())
        top = want[0, t].topk(K)
        kth = top.values[-1]
        sure = set(torch.nonzero(want[0, t] > kth + 1e-6 * kth.abs()).flatten().tolist())
        assert sure <= got, t  # every key clearly above the k-th e4m3 score is selected
    bf16, _ = indexer_topk(q, k, w, K, backend=backend)
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(idx[0, K:], bf16[0, K:])) / ((T - K) * K)
    assert 0.7 < recall < 1.0


def test_layer_uses_fp8_selection(mcore):
    """indexer_precision="fp8" changes the layer's selected keys to the e4m3 selection and leaves
    the indexer loss on the unquantized projections."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_dsa.config import DSAPluginConfig, set_plugin_config
    from megatron_dsa.spec import get_dsa_attention_spec

    from helpers import tiny_config

    with pytest.raises(ValueError, match="indexer_precision"):
        DSAPluginConfig(indexer_precision="fp4")
    cfg = tiny_config(dsa_indexer_topk=8)
    attn = build_module(get_dsa_attention_spec(cfg), config=cfg, layer_number=1)
    calls = []
    orig = attn.core_attention.select_topk

    def spy(q, k, w, *a, **kw):
        out = orig(q, k, w, *a, **kw)
        calls.append((q.detach().clone(), k.detach().clone(), w.detach().clone(), out))
        return out

    attn.core_attention.select_topk = spy
    x = torch.randn(24, 1, 64)
    for precision in ("bf16", "fp8"):
        set_plugin_config(cfg, indexer_precision=precision)
        with torch.no_grad():
            attn(x, None)
    (q, k, w, _), (_, _, _, fp8) = calls
    want, _ = indexer_topk(q, k, w, 8, precision="fp8")
    assert torch.equal(fp8.sort(-1).values, want.sort(-1).values)
    with pytest.raises(ValueError, match="topk must be a positive int"):
        indexer_topk(q, k, w, 0, backend="triton", precision="fp8")
    with pytest.raises(ValueError, match="precision must be 'bf16' or 'fp8'"):
        indexer_topk(q, k, w, 8, precision="fp4")


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
def test_gpu_e4m3_kernel_selects_like_the_reference():
    """The fused e4m3 score kernel (fp8 tensor-core dots) at the model's shapes selects the
    reference's e4m3 set (fp32 ties aside: all but a handful of slots)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 2048, 64, 128, device="cuda", generator=g).bfloat16()
    k = torch.randn(1, 2048, 128, device="cuda", generator=g).bfloat16()
    w = torch.randn(1, 2048, 64, device="cuda", generator=g).bfloat16()
    got, _ = indexer_topk(q, k, w, 512, backend="triton", precision="fp8")
    want, _ = indexer_topk(q, k, w, 512, backend="reference", precision="fp8")
    same = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got[0], want[0]))
    assert same >= 0.999 * got[0].ge(0).sum().item()
