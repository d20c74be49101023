"""Train a tiny GPT whose attention layers are megatron-dsa DSA layers.

Built from Megatron-Core's own pieces: ``GPTModel``, its distributed-data-parallel wrapper, its
forward-backward schedule (1F1B / interleaved when pipelined) and its optimizer. Data: the
Python standard library's own source files as byte-level tokens (nothing to download).

    python examples/train_tiny_gpt.py                       # CPU (gloo, one process)
    python examples/train_tiny_gpt.py --device cuda         # GPU
    torchrun --nproc_per_node=2 examples/train_tiny_gpt.py --pp 2 --num-microbatches 4
    torchrun --nproc_per_node=2 examples/train_tiny_gpt.py --cp 2
    torchrun --nproc_per_node=2 examples/train_tiny_gpt.py --tp 2 --sequence-parallel

One line per step: LM loss, indexer KL loss, tokens/s, peak memory; a summary at the end.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import resource
import sys
import sysconfig
import time
from functools import partial

import torch

from megatron_dsa.config import INT32_MAX, DSAPluginConfig, base_pattern


# ----------------------------------------------------------------------------- arguments
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--num-microbatches", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--topk", type=int, default=32, help="dsa_indexer_topk")
    p.add_argument("--indexer-heads", type=int, default=16)
    p.add_argument("--indexer-dim", type=int, default=32)
    p.add_argument("--indexer-loss-coeff", type=float, default=0.01)
    p.add_argument("--dense-warmup-steps", type=int, default=None,
                   help="steps with the dense indexer loss before switching to the sparse one "
                        "(default 10; 0 with --cuda-graphs)")
    p.add_argument("--index-freq", type=int, default=None,
                   help="dsa_indexer_topk_freq: one anchor every N DSA layers (default 1 = no sharing)")
    p.add_argument("--index-pattern", default=None,
                   help='explicit anchor/shared pattern, e.g. "FSSS" (instead of --index-freq)')
    p.add_argument("--time-indexer", action="store_true",
                   help="measure the indexer's share of attention time (synchronises the device)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--cp", type=int, default=1,
                   help="context-parallel size (Megatron's load-balanced split)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (world size = tp * cp * pp)")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="sequence parallelism (required with --tp > 1: Megatron's absorbed MLA needs it)")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline chunks per stage")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--recompute", choices=["none", "full"], default="none")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="Megatron-Core per-layer CUDA graphs (cuda_graph_impl='local'); GPU only")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (atomics-free sparse-attention backward, "
                        "torch.use_deterministic_algorithms): bit-reproducible runs")
    p.add_argument("--indexer-precision", choices=["bf16", "fp8"], default="bf16",
                   help="numerics of the top-k selection (DSAPluginConfig.indexer_precision; fp8: e4m3 "
                        "queries and keys with per-token scales, as DeepSeek-V3.2 selects at inference)")
    p.add_argument("--json-out", default=None, help="write the per-step log as JSON here")
    p.add_argument("--graph-shape-classes", default=None, metavar="N,N,...",
                   help="packed variable-length batches: each micro-batch is one packed (THD) row of "
                        "random-length documents (up to --micro-batch * --seq-len tokens) and the DSA "
                        "layers replay the CUDA graphs of the row's token-count class "
                        "(DSAPluginConfig.graph_shape_classes; larger rows run eagerly, counted)")
    args = p.parse_args(argv)

    def need(cond, msg):
        if not cond:
            p.error(msg)

    for name in ("steps", "seq_len", "micro_batch", "num_microbatches", "layers", "hidden",
                 "heads", "topk", "indexer_heads", "indexer_dim", "pp", "cp", "tp"):
        need(getattr(args, name) > 0, f"--{name.replace('_', '-')} must be positive")
    # sizes that end up as int32 ids / Megatron-Core's DSA fields (validate_dsa_config's bound)
    for name in ("topk", "indexer_heads", "indexer_dim"):
        need(getattr(args, name) <= INT32_MAX, f"--{name.replace('_', '-')} must be <= {INT32_MAX}, "
                                               f"got {getattr(args, name)}")
    # NaN fails every comparison and inf trains to NaN: finite first, then the range
    need(math.isfinite(args.lr) and args.lr > 0, f"--lr must be a finite number > 0, got {args.lr}")
    need(math.isfinite(args.indexer_loss_coeff) and args.indexer_loss_coeff >= 0,
         f"--indexer-loss-coeff must be a finite number >= 0, got {args.indexer_loss_coeff}")
    need(0 <= args.seed <= 2**32 - 1, f"--seed must be in [0, {2**32 - 1}], got {args.seed}")
    need(args.index_pattern is None or args.index_freq is None,
         "--index-pattern and --index-freq conflict: the pattern sets every layer's role; give one of them")
    if args.index_freq is None:
        args.index_freq = 1
    need(args.index_freq > 0, "--index-freq must be positive")
    if args.index_pattern is not None:
        # the plugin's own validation (letters, then the pattern against the model's layers)
        try:
            plugin = DSAPluginConfig(index_pattern=args.index_pattern)
        except (TypeError, ValueError) as e:
            p.error(f"--index-pattern {args.index_pattern!r}: {e}")
        need(len(args.index_pattern) == args.layers,
             f"--index-pattern must have one letter per layer: {len(args.index_pattern)} letters, "
             f"--layers {args.layers}")
        try:
            base_pattern(argparse.Namespace(num_layers=args.layers, megatron_dsa=plugin))
        except ValueError as e:
            p.error(f"--index-pattern {args.index_pattern!r}: {e}")
    if args.dense_warmup_steps is None:
        args.dense_warmup_steps = 0 if args.cuda_graphs else 10
    need(args.dense_warmup_steps >= 0, "--dense-warmup-steps must be >= 0")
    # Megatron-Core captures the per-layer graphs after the first step, and a captured graph
    # keeps the indexer-loss variant it was captured with: a later dense->sparse switch would be
    # silently ignored (measured: the indexer weights then diverge from eager at the switch).
    need(not (args.cuda_graphs and args.dense_warmup_steps > 0),
         "--cuda-graphs needs --dense-warmup-steps 0: a captured graph keeps its indexer-loss variant")
    need(args.hidden % args.heads == 0, "--hidden must be divisible by --heads")
    need(args.indexer_dim & (args.indexer_dim - 1) == 0 and args.indexer_dim >= 16,
         "--indexer-dim must be a power of two >= 16 (Hadamard rotation)")
    need(args.seq_len <= 4096, "--seq-len must be <= 4096 for this example")
    need(args.tp == 1 or args.sequence_parallel, "--tp > 1 needs --sequence-parallel")
    need(not args.sequence_parallel or args.tp > 1, "--sequence-parallel needs --tp > 1")
    need(args.heads % args.tp == 0, f"--heads ({args.heads}) must be divisible by --tp ({args.tp})")
    need(args.seq_len % args.tp == 0, f"--seq-len must be divisible by --tp ({args.tp}) for sequence parallelism")
    need(args.seq_len % (2 * args.cp) == 0,
         f"--seq-len must be divisible by 2 * --cp = {2 * args.cp} (the load-balanced causal CP split)")
    chunks = args.pp * (args.vpp or 1)
    need(args.layers % chunks == 0, f"--layers ({args.layers}) must be divisible by pp*vpp ({chunks})")
    need(args.vpp is None or args.vpp > 1, "--vpp must be > 1 when given")
    need(args.vpp is None or args.pp > 1, "--vpp needs --pp > 1")
    if args.pp > 1:
        need(args.num_microbatches % args.pp == 0 or args.vpp is None,
             "--num-microbatches must be a multiple of --pp with --vpp")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    need(args.device == "cpu" or torch.cuda.is_available(), "--device cuda but no CUDA device")
    need(not args.cuda_graphs or args.device == "cuda", "--cuda-graphs needs --device cuda")
    if args.graph_shape_classes is not None:
        try:
            args.graph_shape_classes = DSAPluginConfig(graph_shape_classes=[
                int(n) for n in args.graph_shape_classes.split(",")]).graph_shape_classes
        except (TypeError, ValueError) as e:
            p.error(f"--graph-shape-classes {args.graph_shape_classes!r}: {e}")
        need(args.pp == args.cp == args.tp == 1 and not args.cuda_graphs,
             "--graph-shape-classes (packed rows of varying length) runs with --pp 1 --cp 1 --tp 1 and "
             "without --cuda-graphs")
    if args.json_out is not None:  # fail now, not after training
        folder = os.path.dirname(os.path.abspath(args.json_out))
        need(os.path.isdir(folder), f"--json-out {args.json_out}: folder {folder} does not exist")
        need(not os.path.isdir(args.json_out), f"--json-out {args.json_out} is a folder; give a file name")
        target = args.json_out if os.path.exists(args.json_out) else folder
        need(os.access(target, os.W_OK), f"--json-out {args.json_out}: {target} is not writable")
    return args


# ----------------------------------------------------------------------------- data
def stdlib_bytes(limit: int = 4 << 20) -> torch.Tensor:
    """Byte tokens of the standard library's .py files (sorted, so every machine agrees)."""
    root = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for path in sorted(glob.glob(os.path.join(root, "*.py"))):
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    if total < 65536:
        raise RuntimeError(f"found only {total} bytes of Python source under {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


class Batches:
    """Random windows (seeded); every pipeline rank draws the same ones."""

    def __init__(self, tokens, seq_len, micro_batch, seed, device):
        self.tokens, self.seq_len, self.mb, self.device = tokens, seq_len, micro_batch, device
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self):
        starts = torch.randint(0, self.tokens.numel() - self.seq_len - 1, (self.mb,), generator=self.gen)
        win = torch.stack([self.tokens[s : s + self.seq_len + 1] for s in starts.tolist()])
        return {"tokens": win[:, :-1].to(self.device), "labels": win[:, 1:].to(self.device)}


class PackedBatches(Batches):
    """One packed (THD) row per micro-batch: documents of random length (at most --seq-len) with
    a random total of at most micro_batch * seq_len tokens, and their ``cu_seqlens``."""

    def __next__(self):
        total = int(torch.randint(self.seq_len, self.mb * self.seq_len + 1, (1,), generator=self.gen))
        lens = []
        while sum(lens) < total:
            lens.append(min(int(torch.randint(8, self.seq_len + 1, (1,), generator=self.gen)), total - sum(lens)))
        starts = torch.randint(0, self.tokens.numel() - self.seq_len - 1, (len(lens),), generator=self.gen)
        win = torch.cat([self.tokens[s : s + n + 1][:-1] for s, n in zip(starts.tolist(), lens)])
        lab = torch.cat([self.tokens[s + 1 : s + n + 1] for s, n in zip(starts.tolist(), lens)])
        cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)
        return {"tokens": win[None].to(self.device), "labels": lab[None].to(self.device),
                "cu_seqlens": cu.to(self.device), "max_seqlen": max(lens)}


# ----------------------------------------------------------------------------- model
def build(args):
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from megatron_dsa.config import set_plugin_config
    from megatron_dsa.spec import get_dsa_gpt_block_spec

    cpu = args.device == "cpu"
    cfg = MLATransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        ffn_hidden_size=4 * args.hidden, q_lora_rank=args.hidden // 2, kv_lora_rank=args.hidden // 2,
        qk_head_dim=args.hidden // args.heads, qk_pos_emb_head_dim=16, v_head_dim=args.hidden // args.heads,
        rope_type="rope", experimental_attention_variant="dsa",
        dsa_indexer_n_heads=args.indexer_heads, dsa_indexer_head_dim=args.indexer_dim,
        dsa_indexer_topk=args.topk, dsa_indexer_loss_coeff=args.indexer_loss_coeff,
        dsa_indexer_use_sparse_loss=args.dense_warmup_steps == 0,
        dsa_indexer_topk_freq=args.index_freq,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        transformer_impl="local", use_cpu_initialization=cpu, params_dtype=torch.float32,
        pipeline_model_parallel_size=args.pp, virtual_pipeline_model_parallel_size=args.vpp,
        pipeline_dtype=torch.float32,
        context_parallel_size=args.cp, cp_comm_type="allgather" if args.cp > 1 else None,
        tensor_model_parallel_size=args.tp, sequence_parallel=args.sequence_parallel,
        # Over gloo, batched p2p ops can be matched out of order under the interleaved schedule
        # (measured: wrong activations from the third microbatch on); unbatched ops are exact.
        batch_p2p_comm=not cpu,
        recompute_granularity="full" if args.recompute == "full" else None,
        recompute_method="uniform" if args.recompute == "full" else None,
        recompute_num_layers=1 if args.recompute == "full" else None,
        cuda_graph_impl="local" if args.cuda_graphs else "none",
    )
    set_plugin_config(cfg, index_pattern=args.index_pattern, time_indexer=args.time_indexer,
                      deterministic=True if args.deterministic else None,
                      graph_shape_classes=args.graph_shape_classes,
                      indexer_precision=args.indexer_precision)
    chunks = []
    for vp in range(args.vpp or 1):
        vp_stage = vp if args.vpp else None
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        model = GPTModel(
            config=cfg, transformer_layer_spec=get_dsa_gpt_block_spec(cfg, vp_stage=vp_stage),
            vocab_size=256, max_sequence_length=args.seq_len, pre_process=pre, post_process=post,
            position_embedding_type="none", vp_stage=vp_stage,
        )
        if not cpu:
            model = model.cuda()
        ddp = DistributedDataParallel(
            config=cfg, ddp_config=DistributedDataParallelConfig(), module=model,
        )
        chunks.append(ddp)
    opt = get_megatron_optimizer(
        # Megatron-Core's grad clipping asserts CUDA tensors, so the CPU run trains unclipped.
        OptimizerConfig(optimizer="adam", lr=args.lr, weight_decay=0.01, clip_grad=0.0 if cpu else 1.0,
                        adam_beta2=0.95, params_dtype=torch.float32),
        chunks,
    )
    return cfg, chunks, opt


def fmt_indexer_loss(value, coeff):
    """The indexer loss for the log lines: ``off`` when it is not trained (coefficient 0), ``-``
    when no value was tracked."""
    if coeff == 0:
        return "off"
    return "-" if value is None else f"{value:.3e}"


def forward_step(data_iterator, model):
    from megatron.core import parallel_state

    batch = next(data_iterator)
    cp = parallel_state.get_context_parallel_world_size()
    if cp > 1:  # this rank's rows of every sequence: Megatron's load-balanced split
        from megatron.core.utils import get_batch_on_this_cp_rank

        batch = get_batch_on_this_cp_rank(dict(batch, cu_seqlens=None), is_hybrid_cp=False,
                                          cp_group=parallel_state.get_context_parallel_group())
    if batch.get("cu_seqlens") is not None:  # --graph-shape-classes: one packed row of documents
        from megatron.core.packed_seq_params import PackedSeqParams

        cu, n = batch["cu_seqlens"], batch["max_seqlen"]
        psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=n, max_seqlen_kv=n)
        output = model(batch["tokens"], None, None, labels=batch["labels"], packed_seq_params=psp)
    else:
        output = model(batch["tokens"], None, None, labels=batch["labels"])

    def loss_func(output_tensor):
        # this rank's share of the mean over the whole sequence (the schedule multiplies by the
        # CP size and DDP averages the gradients over CP: the mean's gradient)
        loss = output_tensor.float().mean() / cp
        reported = loss.detach().clone()  # clone: the schedule divides the loss in place
        if cp > 1:
            torch.distributed.all_reduce(reported, group=parallel_state.get_context_parallel_group())
        return loss, {"lm loss": reported}

    return output, loss_func


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.experimental_attention_variant.dsa import (
        DSAIndexerLossLoggingHelper,
    )

    import megatron_dsa.patches as patches
    from megatron_dsa import index_cache

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world != args.pp * args.cp * args.tp:
        raise SystemExit(f"error: --pp {args.pp} --cp {args.cp} --tp {args.tp} need exactly "
                         f"{args.pp * args.cp * args.tp} processes (got WORLD_SIZE={world})")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    parallel_state.initialize_model_parallel(
        pipeline_model_parallel_size=args.pp, virtual_pipeline_model_parallel_size=args.vpp,
        context_parallel_size=args.cp, tensor_model_parallel_size=args.tp,
    )
    active = patches.apply()
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(args.seed)
    if args.device == "cuda" or args.tp > 1:  # the model-parallel RNG states (SP forks them)
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(args.seed, use_cudagraphable_rng=args.cuda_graphs)

    cfg, chunks, opt = build(args)
    n_params = sum(p.numel() for c in chunks for p in c.parameters())
    data = (PackedBatches if args.graph_shape_classes else Batches)(
        stdlib_bytes(), args.seq_len, args.micro_batch, args.seed, args.device)
    iters = [data] * len(chunks) if len(chunks) > 1 else data
    fwd_bwd = get_forward_backward_func()
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    log = rank == world - 1
    if log:
        print(f"megatron-dsa tiny GPT: {args.layers} DSA layers, {n_params/1e6:.2f}M params/rank, "
              f"device={args.device}, pp={args.pp}, vpp={args.vpp}, cp={args.cp}, tp={args.tp}, topk={args.topk}, "
              f"patches={active}", flush=True)
        print(index_cache.format_schedule(index_cache.resolve_schedule(cfg)), flush=True)

    history, t_start = [], time.time()
    tokens_per_step = args.seq_len * args.micro_batch * args.num_microbatches
    for step in range(1, args.steps + 1):
        if step == args.dense_warmup_steps + 1 and not cfg.dsa_indexer_use_sparse_loss:
            cfg.dsa_indexer_use_sparse_loss = True  # dense warm-up over: sparse indexer loss
        t0 = time.time()
        for c in chunks:
            c.zero_grad_buffer()
        opt.zero_grad()
        losses = fwd_bwd(
            forward_step_func=forward_step, data_iterator=iters, model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=args.num_microbatches, seq_length=args.seq_len,
            micro_batch_size=args.micro_batch, forward_only=False,
        )
        if args.cp > 1 or args.tp > 1:
            # Megatron's gradient finalisation: average over the CP ranks (each saw its rows
            # only), sum the sequence-parallel norms' and average the replicated indexers' over TP
            from megatron.core.distributed import finalize_model_grads

            finalize_model_grads(chunks)
        ok, grad_norm, _ = opt.step()
        totals = {}
        DSAIndexerLossLoggingHelper.track_indexer_metrics(
            loss_scale=1.0 / args.num_microbatches, iteration=step, writer=None, total_loss_dict=totals
        )
        dt = time.time() - t0
        cache = index_cache.STATS.snapshot()  # this rank's layers

        lm = float("nan")
        if last and losses:
            lm = float(torch.stack([x["lm loss"] for x in losses]).mean())
        # None: no indexer loss this step (--indexer-loss-coeff 0, or not tracked on this rank)
        idx_loss = float(totals["indexer loss"]) if "indexer loss" in totals else None
        if args.device == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with torch.no_grad():  # how far the indexers have moved (their only training signal is their loss)
            idx_norm = float(sum(p.float().square().sum() for c in chunks for n, p in c.named_parameters()
                                 if ".indexer." in n) ** 0.5) if any(".indexer." in n for c in chunks for n, _ in c.named_parameters()) else None
        row = {"step": step, "lm_loss": lm, "indexer_loss": idx_loss, "indexer_weight_norm": idx_norm,
               "tokens_per_s": tokens_per_step / dt,
               "peak_mib": peak, "grad_norm": float(grad_norm) if grad_norm is not None else None,
               "index_cache": cache}
        history.append(row)
        if log:
            share = cache["indexer_share"]
            promos = ",".join(f"{k}:{v}" for k, v in cache["promotions"].items()) or "0"
            idx_text = fmt_indexer_loss(idx_loss, args.indexer_loss_coeff)
            print(f"step {step:4d} | lm loss {lm:.4f} | indexer loss {idx_text} | "
                  f"{row['tokens_per_s']:8.0f} tok/s | peak {peak:7.1f} MiB | cache hits "
                  f"{cache['cache_hits']} promotions {promos}"
                  + (f" | indexer {100 * share:.0f}% of attn" if share is not None else ""), flush=True)
        # a diverged run stops here (the values above are already on the host: no extra sync)
        bad = [(what, v) for what, v in (("lm loss", lm if last else None), ("indexer loss", idx_loss))
               if v is not None and not math.isfinite(v)]
        if world > 1:  # every pipeline rank stops together (the lm loss lives on the last stage)
            flag = torch.tensor([float(bool(bad))], device=args.device)
            dist.all_reduce(flag)
            if flag.item() > 0 and not bad:
                bad = [("the loss on another pipeline rank", float("nan"))]
        if bad:
            error = (f"step {step}: " + ", ".join(f"{what} is {v}" for what, v in bad)
                     + f" (non-finite); stopping (try a smaller --lr than {args.lr:g})")
            print(f"error: {error}", file=sys.stderr, flush=True)
            if log and args.json_out:
                with open(args.json_out, "w") as f:
                    json.dump({"args": vars(args), "history": history, "error": error}, f, indent=1)
            # (the process group's threads must be shut down before exit: left running, gloo's
            # destructor can abort the process, exit code -6 instead of 1)
            dist.destroy_process_group()
            raise SystemExit(1)

    if log:
        k = max(1, min(5, args.steps // 4))
        first = sum(r["lm_loss"] for r in history[:k]) / k
        final = sum(r["lm_loss"] for r in history[-k:]) / k
        idx_text = fmt_indexer_loss(history[-1]["indexer_loss"], args.indexer_loss_coeff)
        print(f"summary: {args.steps} steps in {time.time() - t_start:.1f} s | lm loss {first:.4f} -> "
              f"{final:.4f} (mean of first/last {k}) | indexer loss {idx_text} | "
              f"mean {sum(r['tokens_per_s'] for r in history) / len(history):.0f} tok/s", flush=True)
        if args.graph_shape_classes:
            from megatron_dsa.graph import STATS

            print(f"graph shape classes {args.graph_shape_classes}: {STATS.as_dict()}", flush=True)
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump({"args": vars(args), "history": history}, f, indent=1)
    dist.destroy_process_group()
    return history


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
