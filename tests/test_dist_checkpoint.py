"""Distributed checkpoints (Megatron's ``dist_checkpointing``, ``torch_dist``) with index sharing.

Shared layers own no indexer; anchors' indexer tensors are stored per layer (see
``megatron_dsa.dist_checkpoint``). Save -> load gives identical parameters and loss under
Megatron's default metadata and the metadata Megatron training passes; checkpoints move both
ways between the plugin and Megatron-Core's own DSA; a schedule mismatch fails naming layers.
"""

import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import clear_indexer_tracker, free_port, tiny_config, to_mcore_spec

pytest.importorskip("psutil")  # Megatron's torch_dist file writer needs it

LAYERS = 4


def _training_metadata():
    """What megatron.training.checkpointing._build_sharded_state_dict_metadata builds (no
    distributed optimizer)."""
    from megatron.core import parallel_state

    return {"singleton_local_shards": False, "chained_optim_avoid_prefix": True,
            "dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}


METADATA = {
    "default": lambda: None,
    "training": _training_metadata,
}


def _cfg(freq=1, pattern=None, **kw):
    from megatron_dsa.config import set_plugin_config

    cfg = tiny_config(num_layers=LAYERS, dsa_indexer_topk_freq=freq, **kw)
    if pattern is not None:
        set_plugin_config(cfg, index_pattern=pattern)
    return cfg


def _gpt(cfg, mcore_impl=False, seed=0):
    from megatron.core.models.gpt import GPTModel

    from megatron_dsa.spec import get_dsa_gpt_block_spec

    torch.manual_seed(seed)
    spec = get_dsa_gpt_block_spec(cfg)
    if mcore_impl:
        spec = to_mcore_spec(spec)
    return GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=97, max_sequence_length=32,
                    position_embedding_type="none")


def _loss(model):
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 97, (2, 32), generator=g)
    labels = torch.randint(0, 97, (2, 32), generator=g)
    model.eval()
    clear_indexer_tracker()
    with torch.no_grad():
        return model(tokens, None, None, labels=labels).float().mean()


def _assert_same_params(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name, x in sa.items():
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, sb[name]), name


def _sharded(model, metadata, mcore_impl):
    from megatron_dsa.dist_checkpoint import mcore_sharded_state_dict

    return mcore_sharded_state_dict(model, metadata=metadata) if mcore_impl else model.sharded_state_dict(metadata=metadata)


def _save(model, path, metadata=None, mcore_impl=False):
    from megatron.core import dist_checkpointing

    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save(_sharded(model, metadata, mcore_impl), str(path))


def _load(model, path, metadata=None, mcore_impl=False):
    """Megatron's own load path (no plugin helper): dist_checkpointing.load + load_state_dict."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(_sharded(model, metadata, mcore_impl), str(path))
    model.load_state_dict(state, strict=True)


@pytest.mark.parametrize("meta", sorted(METADATA))
@pytest.mark.parametrize("freq,pattern,anchors", [(2, None, {1, 3}), (1, "FSSF", {1, 4})])
def test_save_load_with_sharing(mcore, tmp_path, meta, freq, pattern, anchors):
    from megatron_dsa.dist_checkpoint import checkpoint_indexer_layers, model_indexer_layers

    cfg = _cfg(freq, pattern)
    src = _gpt(cfg, seed=1)
    assert model_indexer_layers(src) == (set(range(1, LAYERS + 1)), anchors)
    _save(src, tmp_path, METADATA[meta]())
    assert checkpoint_indexer_layers(tmp_path) == anchors
    dst = _gpt(cfg, seed=2)
    assert _loss(dst) != _loss(src)
    _load(dst, tmp_path, METADATA[meta]())
    _assert_same_params(src, dst)
    torch.testing.assert_close(_loss(dst), _loss(src), rtol=0, atol=0)


def test_storage_keys(mcore):
    """Anchors' indexer tensors: one per-layer key each, no layer axis; every other parameter
    keeps Megatron's stacked key; the dict keys are the state_dict keys."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    model = _gpt(_cfg(2))
    sd = model.sharded_state_dict()
    tensors = {k: v for k, v in sd.items() if isinstance(v, ShardedTensor)}
    assert set(tensors) <= set(model.state_dict())
    idx = {k: v for k, v in tensors.items() if ".indexer." in k}
    assert {int(re.match(r"decoder\.layers\.(\d+)\.", v.key).group(1)) for v in idx.values()} == {0, 2}
    for k, v in idx.items():
        assert v.key == k and v.prepend_axis_num == 0 and v.global_shape == v.local_shape, v
    proj = tensors["decoder.layers.1.self_attention.linear_proj.weight"]
    assert proj.key == "decoder.layers.self_attention.linear_proj.weight"
    assert proj.global_shape[0] == LAYERS and proj.global_offset[0] == 1


def test_no_sharing_keeps_megatron_layout(mcore, tmp_path):
    """Without shared layers the plugin writes Megatron-Core's own (stacked) layout."""
    cfg = _cfg(1)
    ours, ref = _gpt(cfg, seed=1), _gpt(cfg, mcore_impl=True, seed=2)
    a = {k: (v.key, v.global_shape) for k, v in ours.sharded_state_dict().items() if hasattr(v, "global_shape")}
    b = {k: (v.key, v.global_shape) for k, v in ref.sharded_state_dict().items() if hasattr(v, "global_shape")}
    assert a == b


def test_mcore_default_save_fails_without_helper(mcore, tmp_path):
    """Why the per-layer layout exists: Megatron-Core's own DSA with sharing cannot save its
    default sharded state dict (stacked indexer tensors with holes)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    ref = _gpt(_cfg(2), mcore_impl=True)
    with pytest.raises(CheckpointingException, match="indexer"):
        dist_checkpointing.save(ref.sharded_state_dict(), str(tmp_path))


# (layout, metadata): "plugin" = the plugin's per-layer indexer layout under the default /
# training metadata (Megatron-Core's model through mcore_sharded_state_dict); "non_homogeneous"
# = Megatron's non-homogeneous layer format on both sides (Megatron-Core's plain
# sharded_state_dict saves with sharing only there).
LAYOUTS = {
    "plugin-default": (True, lambda: None),
    "plugin-training": (True, _training_metadata),
    "non_homogeneous": (False, lambda: dict(_training_metadata(), non_homogeneous_layers=True)),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("direction", ["ours_to_mcore", "mcore_to_ours"])
def test_moves_between_plugin_and_mcore(mcore, tmp_path, layout, direction):
    helper, meta = LAYOUTS[layout]
    cfg = _cfg(2)
    ours, ref = _gpt(cfg, seed=1), _gpt(cfg, mcore_impl=True, seed=2)
    src, dst = (ours, ref) if direction == "ours_to_mcore" else (ref, ours)
    _save(src, tmp_path, meta(), mcore_impl=helper and src is ref)
    _load(dst, tmp_path, meta(), mcore_impl=helper and dst is ref)
    _assert_same_params(src, dst)
    torch.testing.assert_close(_loss(ours), _loss(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("load_freq,load_pattern,missing,unexpected", [
    (1, None, [2, 4], []),  # every layer an anchor: layers 2 and 4 have no saved indexer
    (1, "FSSS", [], [3]),  # layer 3 shared here, an anchor in the checkpoint
    (1, "FFSS", [2], [3]),
])
def test_schedule_mismatch_names_layers(mcore, tmp_path, load_freq, load_pattern, missing, unexpected):
    from megatron_dsa import dist_checkpoint as dc

    _save(_gpt(_cfg(2), seed=1), tmp_path)
    dst = _gpt(_cfg(load_freq, load_pattern), seed=2)
    with pytest.raises(dc.IndexScheduleMismatch) as err:
        dc.load(dst, tmp_path)
    msg = str(err.value)
    if missing:
        assert f"missing indexer tensors for layers {missing}" in msg
    if unexpected:
        assert f"unexpected indexer tensors for layers {unexpected}" in msg
    assert "layers [1, 3]" in msg
    dc.load(_gpt(_cfg(2), seed=3), tmp_path)  # the matching schedule loads through the helper
    # Megatron's own load path (what megatron.training's --load calls) after megatron_dsa.enable()
    import megatron_dsa

    megatron_dsa.enable(log=False)
    try:
        with pytest.raises(dc.IndexScheduleMismatch) as err:
            _load(_gpt(_cfg(load_freq, load_pattern), seed=2), tmp_path)
        assert str(err.value) == msg
        same = _gpt(_cfg(2), seed=4)
        _load(same, tmp_path)
        _assert_same_params(same, _gpt(_cfg(2), seed=1))
    finally:
        megatron_dsa.disable()


def test_cpu_checkpoint_patch_is_undoable(mcore):
    import megatron.core.dist_checkpointing.strategies.filesystem_async as fa

    import megatron_dsa.patches as patches
    from megatron_dsa.patches.checkpoint import CHECKPOINT_MODULES

    if torch.cuda.is_available():
        pytest.skip("the patch applies only without CUDA")
    assert "cpu_checkpoint" in patches.active()
    assert fa.torch is not torch
    assert patches.apply() == patches.active()  # idempotent
    patches.undo(["cpu_checkpoint"])
    try:
        assert fa.torch is torch
        assert all(sys.modules[m].torch is torch for m in CHECKPOINT_MODULES)
    finally:
        patches.apply(["cpu_checkpoint"])
    assert fa.torch is not torch


@pytest.mark.slow
def test_pipeline_parallel_save_loads_on_one_rank(mcore, tmp_path):
    """PP=2 over gloo (torchrun): save under the training metadata, load into PP=2 (checked in
    the worker) and into this one-rank model: the same parameters."""
    port = free_port()
    here = os.path.dirname(os.path.abspath(__file__))
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    ckpt.mkdir(), out.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(here), here, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           os.path.join(here, "dist_ckpt_worker.py"), "--pp", "2", "--ckpt", str(ckpt), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = {}
    for r in range(2):
        saved.update(torch.load(out / f"rank{r}.pt"))
    model = _gpt(_cfg(2), seed=3)
    _load(model, ckpt, _training_metadata())
    state = model.state_dict()
    assert set(saved) == {k for k in state if k.startswith("decoder.layers.") and isinstance(state[k], torch.Tensor)}
    for name, x in saved.items():
        assert torch.equal(state[name], x), name
