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


# ------------------------------------------------------------------------------------------
# Megatron-Core's DSA fields: types, finiteness and ranges, each error naming field and value
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,shown", [(float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-inf")])
def test_loss_coeff_must_be_finite(value, shown):
    """A NaN coefficient used to switch the indexer loss off silently (nan > 0 is False), inf
    used to make the loss inf."""
    cfg = tiny_config()
    cfg.dsa_indexer_loss_coeff = value
    with pytest.raises(ValueError, match=f"dsa_indexer_loss_coeff must be a finite number >= 0, got {shown}"):
        validate_dsa_config(cfg)


@pytest.mark.parametrize("value", [True, "0.1"])
def test_loss_coeff_must_be_a_number(value):
    cfg = tiny_config()
    cfg.dsa_indexer_loss_coeff = value
    with pytest.raises(TypeError, match=f"dsa_indexer_loss_coeff must be a finite number >= 0, got {value!r}"):
        validate_dsa_config(cfg)


@pytest.mark.parametrize(
    "field", ["dsa_indexer_topk", "dsa_indexer_n_heads", "dsa_indexer_head_dim", "dsa_indexer_topk_freq",
              "dsa_indexer_skip_topk_offset"])
def test_int_fields_reject_bools(field):
    """A bool is an int in Python: topk=True used to pass as top-1."""
    cfg = tiny_config()
    setattr(cfg, field, True)
    with pytest.raises(TypeError, match=f"{field} must be an? .*int.*, got True"):
        validate_dsa_config(cfg)


@pytest.mark.parametrize(
    "field,value",
    [("dsa_indexer_topk", 4.0), ("dsa_indexer_n_heads", 32.0), ("dsa_indexer_head_dim", "16"),
     ("dsa_indexer_topk_freq", 2.5), ("dsa_indexer_skip_topk_offset", 1.5)])
def test_int_fields_reject_other_types(field, value):
    """topk_freq=2.5 used to pass here and crash later with "Unknown format code 'd'"."""
    cfg = tiny_config(num_layers=4)
    setattr(cfg, field, value)
    with pytest.raises(TypeError, match=f"{field} must be an? .*int.*, got {value!r}"):
        validate_dsa_config(cfg)


@pytest.mark.parametrize("field", ["dsa_indexer_topk", "dsa_indexer_n_heads", "dsa_indexer_head_dim"])
def test_int_fields_are_bounded(field):
    """topk=10**12 used to pass: ids are int32, so sizes stop at 2**31 - 1."""
    cfg = tiny_config()
    setattr(cfg, field, 10**12)
    with pytest.raises(ValueError, match=f"{field} must be a positive int <= 2147483647, got 1000000000000"):
        validate_dsa_config(cfg)


@pytest.mark.parametrize("field,value,match", [
    ("dsa_indexer_topk_freq", 0, "dsa_indexer_topk_freq must be a positive int, got 0"),
    ("dsa_indexer_skip_topk_offset", -1, "dsa_indexer_skip_topk_offset must be a non-negative int, got -1"),
])
def test_index_sharing_fields_ranges(field, value, match):
    """Megatron-Core's __post_init__ checks these, but a config mutated afterwards went through
    (the offset error then came from deep inside Megatron without the field's name)."""
    cfg = tiny_config(num_layers=4)
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=match):
        validate_dsa_config(cfg)


@pytest.mark.parametrize("field", ["dsa_indexer_use_sparse_loss", "dsa_indexer_rotate_activation",
                                   "dsa_indexer_scoring_relu", "dsa_indexer_k_norm_fp32"])
def test_bool_fields_reject_other_types(field):
    cfg = tiny_config()
    setattr(cfg, field, "no")  # truthy: would have switched the option on
    with pytest.raises(TypeError, match=f"{field} must be True or False, got 'no'"):
        validate_dsa_config(cfg)


@pytest.mark.parametrize("value", [float("nan"), 0.0, -1e-6])
def test_k_norm_epsilon_must_be_finite_and_positive(value):
    cfg = tiny_config()
    cfg.dsa_indexer_k_norm_epsilon = value
    with pytest.raises(ValueError, match="dsa_indexer_k_norm_epsilon must be None or a finite number > 0"):
        validate_dsa_config(cfg)


def test_valid_config_still_passes():
    cfg = tiny_config(num_layers=4, dsa_indexer_topk_freq=2, dsa_indexer_skip_topk_offset=1,
                      dsa_indexer_loss_coeff=0.0, dsa_indexer_k_norm_epsilon=1e-6)
    validate_dsa_config(cfg)
    cfg.dsa_indexer_loss_coeff = None  # Megatron's default: no indexer loss
    cfg.dsa_indexer_topk = 2**31 - 1
    validate_dsa_config(cfg)


# ------------------------------------------------------------------------------------------
# DSAPluginConfig: every field type-checked, errors naming DSAPluginConfig.<field>
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("indexer_backend", 1), ("attention_backend", None), ("loss_backend", ["auto"]),
    ("loss_target", None), ("loss_target", True),
    ("deterministic", "yes"), ("time_indexer", "no"), ("time_indexer", 1),
])
def test_plugin_config_wrong_types(field, value):
    with pytest.raises(TypeError, match=f"DSAPluginConfig.{field} must be"):
        DSAPluginConfig(**{field: value})


@pytest.mark.parametrize("value", [123, True, b"FS", {"F": 1}])
def test_plugin_config_index_pattern_type(value):
    with pytest.raises(TypeError, match="DSAPluginConfig.index_pattern must be a string of F/S letters or a list"):
        DSAPluginConfig(index_pattern=value)


@pytest.mark.parametrize("pattern,position,shown", [
    (["F", "X"], 2, "'X'"), (["F", "S", 0], 3, "0"), (["F", -1], 2, "-1"), (["F", True], 2, "True"),
    (["F", 1.0], 2, "1.0"), (("F", "S", "S", ["S"]), 4, r"\['S'\]"), (["F", "f"], 2, "'f'"),
])
def test_plugin_config_index_pattern_items_name_the_position(pattern, position, shown):
    """List items were only checked when a spec was built (and 1.0 / True slipped through as
    layer numbers); now the config itself names the position."""
    match = rf"DSAPluginConfig.index_pattern: layer {position} has unknown entry {shown};"
    with pytest.raises(ValueError, match=match):
        DSAPluginConfig(index_pattern=pattern)


def test_plugin_config_valid_patterns_still_pass():
    assert DSAPluginConfig(index_pattern=["F", "F", 1, 2]).index_pattern == ("F", "F", 1, 2)
    assert DSAPluginConfig(index_pattern="FSSF").index_pattern == "FSSF"


def test_context_parallel_needs_allgather_comm_type(mcore):
    """CP is supported with all-gathered keys; another comm type is refused, naming the field."""
    cfg = tiny_config()
    cfg.context_parallel_size = 2
    cfg.cp_comm_type = "p2p"
    with pytest.raises(ValueError, match="cp_comm_type must be 'allgather'"):
        validate_dsa_config(cfg)
    cfg.cp_comm_type = "allgather"
    validate_dsa_config(cfg)
