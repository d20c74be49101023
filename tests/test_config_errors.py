"""Bad configuration gets a clear error naming the field."""

import pytest
import torch

from helpers import tiny_config
from megatron_dsa.config import DSAPluginConfig, get_plugin_config, set_plugin_config, validate_dsa_config


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("dsa_indexer_topk", None, "dsa_indexer_topk must be set"),
        ("dsa_indexer_topk", 0, "dsa_indexer_topk must be a positive int"),
        ("dsa_indexer_topk", -4, "dsa_indexer_topk must be a positive int"),
        ("dsa_indexer_n_heads", None, "dsa_indexer_n_heads must be set"),
        ("dsa_indexer_head_dim", None, "dsa_indexer_head_dim must be set"),
        ("dsa_indexer_head_dim", 4, "dsa_indexer_head_dim"),  # smaller than the rope dim
        ("dsa_indexer_loss_coeff", -1.0, "dsa_indexer_loss_coeff"),
    ],
)
def test_bad_dsa_fields(field, value, match):
    cfg = tiny_config()
    object.__setattr__(cfg, field, value)
    with pytest.raises(ValueError, match=match):
        validate_dsa_config(cfg)


def test_rotation_needs_power_of_two_indexer_dim():
    cfg = tiny_config(dsa_indexer_head_dim=24, dsa_indexer_rotate_activation=True)
    with pytest.raises(ValueError, match="power of two"):
        validate_dsa_config(cfg)


def test_non_mla_config_is_rejected():
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                            use_cpu_initialization=True, add_bias_linear=False)
    object.__setattr__(cfg, "experimental_attention_variant", "dsa")
    with pytest.raises(ValueError, match="multi-latent attention"):
        validate_dsa_config(cfg)


def test_wrong_variant_is_rejected():
    cfg = tiny_config()
    object.__setattr__(cfg, "experimental_attention_variant", None)
    with pytest.raises(ValueError, match="experimental_attention_variant"):
        validate_dsa_config(cfg)


def test_spec_validates(mcore):
    from megatron_dsa.spec import get_dsa_gpt_block_spec

    cfg = tiny_config()
    object.__setattr__(cfg, "dsa_indexer_topk", 0)
    with pytest.raises(ValueError, match="dsa_indexer_topk"):
        get_dsa_gpt_block_spec(cfg)


def test_plugin_config():
    cfg = tiny_config()
    assert get_plugin_config(cfg) == DSAPluginConfig()
    set_plugin_config(cfg, attention_backend="reference")
    assert get_plugin_config(cfg).attention_backend == "reference"
    with pytest.raises(ValueError, match="indexer_backend"):
        DSAPluginConfig(indexer_backend="fast")
    with pytest.raises(ValueError, match="unknown letters"):
        DSAPluginConfig(index_pattern="FSX")
    with pytest.raises(ValueError, match="loss_target"):
        DSAPluginConfig(loss_target="free")
    object.__setattr__(cfg, "megatron_dsa", {"attention_backend": "reference"})
    with pytest.raises(TypeError, match="DSAPluginConfig"):
        get_plugin_config(cfg)


def test_layer_rejects_bad_tensors(mcore):
    from megatron.core.transformer.spec_utils import build_module

    from megatron_dsa.spec import get_dsa_attention_spec

    cfg = tiny_config()
    attn = build_module(get_dsa_attention_spec(cfg), config=cfg, layer_number=1)
    core = attn.core_attention
    d = cfg.kv_lora_rank + cfg.qk_pos_emb_head_dim
    q, k = torch.randn(8, 1, 4, d), torch.randn(8, 1, 1, d)
    x, qr, up = torch.randn(8, 1, 64), torch.randn(8, 1, 32), torch.randn(4, 16, 32)
    with pytest.raises(ValueError, match="value must be None"):
        core(q, k, torch.randn(8, 1, 4, 16), None, x, qr, up_v_weight=up)
    with pytest.raises(ValueError, match="last dim"):
        core(q[..., :-1], k[..., :-1], None, None, x, qr, up_v_weight=up)
    with pytest.raises(ValueError, match="up_v_weight"):
        core(q, k, None, None, x, qr)


def test_loss_target_attention_needs_the_fused_attention(mcore):
    """loss_target='attention' on the reference attention: a clear error naming why."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_dsa.spec import get_dsa_attention_spec

    cfg = tiny_config(dsa_indexer_use_sparse_loss=True)
    set_plugin_config(cfg, attention_backend="reference", loss_target="attention")
    m = build_module(get_dsa_attention_spec(cfg), config=cfg, layer_number=1).train()
    with pytest.raises(ValueError, match="loss_target='attention' cannot run: the sparse attention"):
        m(torch.randn(16, 1, cfg.hidden_size), None)
