"""The Megatron-Core patches: needed only where they are, idempotent, undoable, version-guarded."""

import pytest
import torch

import megatron_dsa.patches as patches


def test_version_guard():
    patches._check_version()  # the installed megatron-core is supported
    patches._check_version((0, 19, 2))
    with pytest.raises(RuntimeError, match="megatron-core"):
        patches._check_version((0, 16, 0))
    with pytest.raises(RuntimeError, match="megatron-core"):
        patches._check_version((0, 20, 0))


def test_apply_is_idempotent_and_undo_restores(mcore):
    from megatron.core.models.common.embeddings import rotary_pos_embedding as rope
    from megatron.core.transformer.experimental_attention_variant import dsa

    patches.undo()
    orig_torch, orig_rot = rope.torch, dsa.rotate_activation
    assert orig_torch is torch
    try:
        first = patches.apply()
        assert set(first) == set(patches.needed())
        patched_torch, patched_rot = rope.torch, dsa.rotate_activation
        assert patches.apply() == first  # idempotent: nothing re-wrapped
        assert rope.torch is patched_torch and dsa.rotate_activation is patched_rot
        if "cpu_device" in first:
            assert rope.torch is not torch
        patches.undo()
        assert rope.torch is orig_torch and dsa.rotate_activation is orig_rot
        assert patches.active() == []
    finally:
        patches.apply()


def test_unknown_patch_name():
    with pytest.raises(ValueError, match="unknown patch"):
        patches.apply(["nope"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only patch")
def test_cpu_patch_lets_megatron_rope_and_rotation_run(mcore):
    """Without the patch Megatron's RoPE asks for a CUDA device; with it, it runs on the CPU."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.experimental_attention_variant import dsa

    patches.undo()
    try:
        with pytest.raises((RuntimeError, AssertionError)):
            RotaryEmbedding(16, rotary_percent=1.0)
        with pytest.raises(AssertionError):
            dsa.rotate_activation(torch.randn(2, 16))  # Megatron's needs bf16 + the CUDA package
    finally:
        patches.apply()
    emb = RotaryEmbedding(16, rotary_percent=1.0)(12)
    assert emb.device.type == "cpu" and emb.shape[0] == 12
    x = torch.randn(3, 16, dtype=torch.float64)
    from megatron_dsa.kernels.hadamard import hadamard_reference

    torch.testing.assert_close(dsa.rotate_activation(x), hadamard_reference(x, 16**-0.5))
