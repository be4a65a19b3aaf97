"""The decoder-layer ↔ MoE-ordinal mapping (reference_impl.layers)."""

import pytest

from reference_impl.errors import ConfigError
from reference_impl.layers import LayerMap, moe_layer_pattern


def test_all_moe_is_the_identity():
    m = LayerMap.from_config(4)
    assert m.moe_layers == (0, 1, 2, 3)
    assert [m.ordinal(i) for i in range(4)] == [0, 1, 2, 3]


def test_first_k_dense_shifts_the_ordinals():
    m = LayerMap.from_config(5, first_k_dense=2)
    assert m.pattern == (False, False, True, True, True)
    assert m.moe_layers == (2, 3, 4) and m.num_moe_layers == 3
    assert m.ordinal(3) == 1 and m.decoder_layer(1) == 3
    with pytest.raises(ConfigError, match="decoder layer 1 is dense"):
        m.ordinal(1)


def test_frequency_and_explicit_list_agree_with_the_hf_rule():
    assert moe_layer_pattern(6, first_k_dense=1, moe_layer_freq=2) == (False, False, True, False, True, False)
    assert moe_layer_pattern(4, moe_layer_freq=[1, 0, 1, 1]) == (True, False, True, True)
    with pytest.raises(ConfigError, match="one 0/1 per decoder layer"):
        moe_layer_pattern(4, moe_layer_freq=[1, 0])


def test_pipeline_stages_hold_their_own_ordinals():
    m = LayerMap.from_config(4, first_k_dense=1)
    assert m.stage(0, 2) == (0,) and m.stage(1, 2) == (1, 2)
    with pytest.raises(ConfigError, match="equal stages"):
        m.stage(0, 3)
