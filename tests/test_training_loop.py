"""Megatron's own training loop: ``megatron_dsa.enable()``, the ``--dsa-*`` plugin flags, and
``examples/pretrain_dsa.py`` (``megatron.training.pretrain`` with Megatron's mock dataset) on the
CPU with both implementations."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest

import megatron_dsa
from megatron_dsa import integration

from helpers import free_port, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "pretrain_dsa.py")

TINY = (
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 128 --num-layers 2 --hidden-size 64 "
    "--num-attention-heads 4 --ffn-hidden-size 128 --seq-length 64 --max-position-embeddings 64 "
    "--micro-batch-size 2 --global-batch-size 2 --train-iters 6 --lr 1e-3 --multi-latent-attention "
    "--q-lora-rank 32 --kv-lora-rank 32 --qk-head-dim 16 --qk-pos-emb-head-dim 8 --v-head-dim 16 "
    "--position-embedding-type rope --experimental-attention-variant dsa --dsa-indexer-n-heads 4 "
    "--dsa-indexer-head-dim 16 --dsa-indexer-topk 16 --dsa-indexer-loss-coeff 0.01 "
    "--transformer-impl local --distributed-backend gloo --use-cpu-initialization "
    "--no-gradient-accumulation-fusion --no-persist-layer-norm --no-rope-fusion --clip-grad 0 "
    "--eval-iters 0 --eval-interval 1000 --log-interval 1 --disable-bias-linear "
    "--no-dsa-indexer-rotate-activation --rerun-mode disabled --hidden-dropout 0 --attention-dropout 0"
).split()


@pytest.fixture
def enabled():
    names = megatron_dsa.enable(log=False)
    yield names
    megatron_dsa.disable()


def test_enable_redirects_megatrons_builders_and_undoes(enabled):
    from megatron.core.models.gpt import experimental_attention_variant_module_specs as specs
    from megatron.training.models import gpt as training_gpt

    name = "get_transformer_block_with_experimental_attention_variant_spec"
    assert f"{specs.__name__}:{name}" in enabled and f"{training_gpt.__name__}:{name}" in enabled
    assert "megatron.training.arguments:_add_experimental_attention_variant_args" in enabled
    wrapped = getattr(specs, name)
    assert getattr(training_gpt, name) is wrapped
    assert megatron_dsa.enable(log=False) == enabled  # idempotent
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import serialization

    assert dist_checkpointing.load is serialization.load and dist_checkpointing.load.__wrapped__ is not None
    load = dist_checkpointing.load.__wrapped__
    original = wrapped.__wrapped__
    megatron_dsa.disable()
    assert getattr(specs, name) is original and getattr(training_gpt, name) is original
    assert dist_checkpointing.load is load and serialization.load is load
    assert not integration.is_enabled()
    megatron_dsa.enable(log=False)  # for the fixture's disable()


def test_megatrons_own_builder_builds_our_layers(mcore, enabled):
    """Megatron-Core's GPT block builder for experimental_attention_variant="dsa" (the one
    ``megatron.training`` calls) now returns megatron-dsa's DSAttention / DSAIndexer on local
    modules (Megatron-Core's builder alone asserts Transformer Engine)."""
    from megatron.core.models.gpt import experimental_attention_variant_module_specs as specs

    from megatron_dsa.attention import DSAIndexer, DSAttention

    cfg = tiny_config(num_layers=2)
    block = specs.get_transformer_block_with_experimental_attention_variant_spec(config=cfg, vp_stage=None)
    core = block.layer_specs[0].submodules.self_attention.submodules.core_attention
    assert core.module is DSAttention and core.submodules.indexer.module is DSAIndexer
    mc = integration.to_megatron_core_modules(block)
    from megatron.core.transformer.experimental_attention_variant import dsa as mcore_dsa

    core = mc.layer_specs[0].submodules.self_attention.submodules.core_attention
    assert core.module is mcore_dsa.DSAttention and "reduce_rope_key_grad" not in (core.params or {})
    assert block.layer_specs[0].submodules.self_attention.submodules.core_attention.module is DSAttention


def test_enable_refuses_other_megatron_versions(monkeypatch):
    import megatron_dsa.patches as patches

    megatron_dsa.disable()
    monkeypatch.setattr(patches, "mcore_version", lambda: (0, 15, 0))
    with pytest.raises(RuntimeError, match="found 0.15.0"):
        megatron_dsa.enable(log=False)
    assert not integration.is_enabled()


def test_plugin_flags_in_megatrons_parser(enabled):
    from megatron.training.arguments import add_megatron_arguments

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    integration.add_dsa_args(parser)  # as extra_args_provider too: no clash, no duplicate
    args = parser.parse_args(["--dsa-impl", "megatron-core", "--dsa-attention-backend", "triton",
                              "--dsa-index-pattern", "F,S,1,S", "--dsa-time-indexer",
                              "--dsa-kernel-backend", "tilelang", "--dsa-attention-row-packing", "on"])
    assert args.dsa_impl == "megatron-core" and args.dsa_kernel_backend == "tilelang"  # Megatron's own flag
    settings = integration.plugin_settings_from_args(args)
    assert settings["attention_backend"] == "triton" and settings["index_pattern"] == ["F", "S", 1, "S"]
    assert settings["time_indexer"] is True and settings["attention_row_packing"] is True
    assert integration.plugin_settings_from_args(parser.parse_args([]))["attention_row_packing"] is None
    off = parser.parse_args(["--dsa-attention-row-packing", "off"])
    assert integration.plugin_settings_from_args(off)["attention_row_packing"] is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--dsa-attention-backend", "fast"])


def _pretrain(tmp_path, *extra, name="run"):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(),
               WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, EXAMPLE, *TINY, *extra], capture_output=True, text=True,
                          timeout=600, env=env, cwd=str(tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    losses = [float(x) for x in re.findall(r"lm loss: ([0-9.E+-]+)", out)]
    built = re.findall(r"DSA layers built by --dsa-impl (\S+): (\S+)", out)
    return losses, built


@pytest.mark.slow
def test_pretrain_example_both_implementations(tmp_path):
    """``megatron.training.pretrain`` with Megatron's mock dataset, 6 steps on the CPU: the loss
    falls, and Megatron-Core's own DSA (``--dsa-impl megatron-core``, its modules on the same
    local layers) gives the same losses; the run reports which implementation built the layers."""
    ours, built = _pretrain(tmp_path, name="ours")
    assert built == [("megatron-dsa", "megatron_dsa.attention.DSAttention")]
    assert len(ours) == 6 and ours[-1] < ours[0]
    theirs, built = _pretrain(tmp_path, "--dsa-impl", "megatron-core", name="mcore")
    assert built and built[0][0] == "megatron-core"
    assert theirs == pytest.approx(ours, rel=1e-4)


@pytest.mark.slow
def test_pretrain_example_with_megatrons_spec_flag(tmp_path):
    """Megatron's generic ``--spec megatron_dsa.spec get_dsa_gpt_block_spec`` selects the same
    layers (same losses as the default path), and the plugin's flags reach them: an explicit
    pattern sharing layer 1's top-k with layer 2 changes the run."""
    default, _ = _pretrain(tmp_path, name="default")
    spec, _ = _pretrain(tmp_path, "--spec", "megatron_dsa.spec", "get_dsa_gpt_block_spec", name="spec")
    assert spec == pytest.approx(default, rel=1e-6)
    shared, _ = _pretrain(tmp_path, "--spec", "megatron_dsa.spec", "get_dsa_gpt_block_spec",
                          "--dsa-index-pattern", "FS", name="shared")
    assert shared[0] != pytest.approx(default[0], rel=1e-6)


@pytest.mark.slow
def test_pretrain_example_hybrid_model(tmp_path):
    """``--hybrid-layer-pattern D-D-`` (Megatron's HybridModel through its own builder, the
    stack swapped by ``enable()``): trains, loss falling, with index sharing over the D layers
    (an explicit pattern, F then S, changes the run)."""
    losses, _ = _pretrain(tmp_path, "--hybrid-layer-pattern", "D-D-", "--num-layers", "4", name="hybrid")
    assert len(losses) == 6 and losses[-1] < losses[0]
    shared, _ = _pretrain(tmp_path, "--hybrid-layer-pattern", "D-D-", "--num-layers", "4",
                          "--dsa-index-pattern", "FS", name="hybrid_fs")
    assert shared[0] != pytest.approx(losses[0], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                                      ["--context-parallel-size", "2", "--cp-comm-type", "allgather"]])
def test_pretrain_example_two_processes_matches_one(tmp_path, parallel):
    """Megatron's loop over two gloo processes (TP 2 with sequence parallelism, or CP 2 with
    Megatron's load-balanced split) gives the one-process losses (no dropout: under sequence
    parallelism Megatron draws dropout masks from per-rank RNG states, by design)."""
    # the padded vocabulary must not change with TP (128 at TP 1 and 2)
    same_vocab = ["--make-vocab-size-divisible-by", "64"]
    one, _ = _pretrain(tmp_path, *same_vocab, name="one")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", CUDA_DEVICE_MAX_CONNECTIONS="1")  # Megatron asks for it under TP / CP
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", port,
                           EXAMPLE, *TINY, *same_vocab, *parallel], capture_output=True, text=True, timeout=900, env=env,
                          cwd=str(tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    two = [float(x) for x in re.findall(r"lm loss: ([0-9.E+-]+)", out)]
    assert two == pytest.approx(one, rel=1e-4)


@pytest.mark.slow
def test_pretrain_example_saves_and_resumes_with_index_sharing(tmp_path):
    """Megatron's own distributed checkpoint through the training loop (``--save`` / ``--load``,
    ``torch_dist``, Megatron training's metadata) with shared layers (``--dsa-indexer-topk-freq
    2``): stopping after 3 of 6 steps and resuming gives the uninterrupted run's steps 4 and 6
    exactly. (Step 5's printed loss is not compared: after a resume Megatron's log averages it
    with step 4's, measured: (4.483116 + 4.388514) / 2 = 4.435815.)"""
    ck = str(tmp_path / "ckpt")
    common = ["--train-iters", "6", "--dsa-indexer-topk-freq", "2"]
    whole, _ = _pretrain(tmp_path, *common, name="whole")
    first, _ = _pretrain(tmp_path, *common, "--exit-interval", "3", "--save", ck, "--save-interval", "3",
                         name="first")
    assert first == whole[:3]
    resumed, _ = _pretrain(tmp_path, *common, "--load", ck, name="resumed")
    assert len(resumed) == 3
    assert resumed[0] == whole[3] and resumed[2] == whole[5]
    # a model with another schedule refuses the checkpoint in Megatron's own load, naming layers
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port(),
               WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, EXAMPLE, *TINY, "--train-iters", "6", "--dsa-indexer-topk-freq", "1",
                           "--load", ck], capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert proc.returncode != 0
    assert "missing indexer tensors for layers [2] (anchors in this model, shared in the checkpoint)" in proc.stderr
