"""Pretrain a DSA model with Megatron's own training loop (``megatron.training.pretrain``).

The shape of Megatron-LM's ``pretrain_gpt.py`` for Megatron-Core 0.19, plus one call,
``megatron_dsa.enable()``: Megatron's own argument parser, model builders (GPT, or hybrid with
``--hybrid-layer-pattern``), dataset providers and loop; ``--experimental-attention-variant dsa``
and Megatron's ``--dsa-*`` flags describe the model, ``--dsa-impl`` picks the implementation
(``megatron-dsa``, the default, or ``megatron-core``), and the plugin's own flags
(``--dsa-attention-backend``, ``--dsa-index-pattern``, ...) its settings.

Tiny model on the CPU (a few seconds per step; the CPU shims of
``megatron_dsa.patches.training`` are applied only when CUDA is absent)::

    python examples/pretrain_dsa.py --mock-data --tokenizer-type NullTokenizer --vocab-size 128 \\
        --num-layers 2 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 128 \\
        --seq-length 64 --max-position-embeddings 64 --micro-batch-size 2 --global-batch-size 2 \\
        --train-iters 10 --lr 1e-3 --multi-latent-attention --q-lora-rank 32 --kv-lora-rank 32 \\
        --qk-head-dim 16 --qk-pos-emb-head-dim 8 --v-head-dim 16 --position-embedding-type rope \\
        --experimental-attention-variant dsa --dsa-indexer-n-heads 4 --dsa-indexer-head-dim 16 \\
        --dsa-indexer-topk 16 --dsa-indexer-loss-coeff 0.01 --transformer-impl local \\
        --distributed-backend gloo --use-cpu-initialization --no-gradient-accumulation-fusion \\
        --no-persist-layer-norm --no-rope-fusion --clip-grad 0 --eval-iters 0 --log-interval 1

(`README.md` has the full command, also for the GPU.) Every rank builds the mock dataset and
reads the same samples, so tensor-parallel ranks need no broadcast; context-parallel ranks take
Megatron's load-balanced share of every sequence (``get_batch_on_this_cp_rank``).
"""

from __future__ import annotations

import os
import sys
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import megatron_dsa  # noqa: E402


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def get_batch(data_iterator, vp_stage=None):
    """This rank's microbatch: every tensor of the mock sample, moved to the device, and under
    context parallelism Megatron's two mirrored chunks of every sequence."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank
    from megatron.training.utils import is_first_or_last_pipeline_stage

    if not is_first_or_last_pipeline_stage(vp_stage):
        return None, None, None, None, None
    sample = next(data_iterator)
    dev = _device()
    batch = {k: sample.get(k) for k in ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")}
    batch = {k: (v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    if parallel_state.get_context_parallel_world_size() > 1:
        batch = get_batch_on_this_cp_rank(dict(batch, cu_seqlens=None), is_hybrid_cp=False,
                                          cp_group=parallel_state.get_context_parallel_group())
    return batch["tokens"], batch["labels"], batch["loss_mask"], batch["attention_mask"], batch["position_ids"]


def loss_func(loss_mask, output_tensor):
    """Sum of the token losses, their count, and Megatron's ``lm loss`` report."""
    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    tokens = mask.sum().detach().to(torch.int)
    return loss, tokens, {"lm loss": torch.cat([loss.detach().view(1), tokens.view(1).to(loss.dtype)])}


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    from megatron.core.utils import get_attr_wrapped_model

    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator, vp_stage)
    output = model(tokens, position_ids, attention_mask, labels=labels, loss_mask=loss_mask)
    return output, partial(loss_func, loss_mask)


def datasets_provider(train_val_test_num_samples, vp_stage=None):
    """Megatron's mock GPT dataset (or its GPT dataset with ``--data-path``), built on every
    first/last pipeline stage rank."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.training import get_args, get_tokenizer
    from megatron.training.utils import get_blend_and_blend_per_split, is_first_or_last_pipeline_stage

    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, blend_per_split=blend_per_split,
        split=args.split, path_to_cache=args.data_cache_path, tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss, create_attention_mask=args.create_attention_mask_in_dataloader,
        mmap_bin_files=args.mmap_bin_files,
    )
    kind = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(
        kind, train_val_test_num_samples, lambda: is_first_or_last_pipeline_stage(vp_stage), config
    ).build()


class SyntheticTokens(torch.utils.data.Dataset):
    """Random tokens, deterministic per sample index (``--synthetic-data``): no index files to
    build, whatever the sequence length."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int):
        self.n, self.s, self.v, self.seed = num_samples, seq_length, vocab_size, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1000003 + int(i))
        text = torch.randint(0, self.v, (self.s + 1,), generator=g)
        return {"tokens": text[:-1], "labels": text[1:], "loss_mask": torch.ones(self.s),
                "position_ids": torch.arange(self.s)}


def synthetic_datasets_provider(train_val_test_num_samples, vp_stage=None):
    from megatron.training import get_args

    args = get_args()
    train = SyntheticTokens(train_val_test_num_samples[0], args.seq_length, args.padded_vocab_size, args.seed)
    return train, None, None


def add_example_args(parser):
    from megatron_dsa.integration import add_dsa_args

    group = parser.add_argument_group(title="pretrain_dsa example")
    group.add_argument("--synthetic-data", action="store_true",
                       help="random tokens instead of Megatron's datasets (no index to build: long sequences)")
    return add_dsa_args(parser)


def main():
    megatron_dsa.enable()
    import megatron_dsa.patches as patches
    from megatron_dsa.patches import training as training_patches

    if torch.cuda.is_available():
        patches.apply()  # only what this machine needs (e.g. a missing Hadamard package)
        training_patches.apply_dataset_helpers()
    else:
        training_patches.apply()  # the CPU shims of Megatron's loop (core patches included)
    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import (
        gpt_config_from_args, hybrid_config_from_args, pretrain_cfg_container_from_args,
    )
    from megatron.training.arguments import parse_and_validate_args

    from megatron_dsa.config import set_plugin_config
    from megatron_dsa.integration import plugin_settings_from_args

    args = parse_and_validate_args(extra_args_provider=add_example_args,
                                   args_defaults={"tokenizer_type": "NullTokenizer"})
    if getattr(args, "hybrid_layer_pattern", None):
        model_cfg = hybrid_config_from_args(args)
        if args.dsa_impl == "megatron-core" and args.spec is None:
            from megatron_dsa.integration import original_hybrid_stack_spec

            model_cfg.hybrid_stack_spec = original_hybrid_stack_spec()
    else:
        model_cfg = gpt_config_from_args(args)
    # the plugin's flags, on the model config whichever path builds the layers (--spec included)
    set_plugin_config(model_cfg.transformer, **plugin_settings_from_args(args))
    cfg = pretrain_cfg_container_from_args(args, model_cfg)
    provider = synthetic_datasets_provider if args.synthetic_data else datasets_provider
    provider.is_distributed = True
    pretrain(cfg, provider, ModelType.encoder_or_decoder, forward_step)
    if torch.cuda.is_available() and torch.distributed.get_rank() == 0:
        print(f"[megatron-dsa] peak GPU memory allocated: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB",
              flush=True)


if __name__ == "__main__":
    main()
