"""Tiny configs of every attention variant, shared by the attention tests."""

import dataclasses

from efficientjax.model import MLAConfig, ModelConfig, NSAConfig

BASE = ModelConfig(vocab_size=61, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=4,
                   head_dim=8, mlp_dim=48, rope_theta=100.0)

TINY = {
    'mha': BASE,
    'gqa': dataclasses.replace(BASE, attention='gqa', num_kv_heads=2),
    'mqa': dataclasses.replace(BASE, attention='mqa', num_kv_heads=1),
    'mla': dataclasses.replace(BASE, attention='mla', mla=MLAConfig(
        q_lora_rank=12, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)),
    # Blocks small enough that a 24-token sequence has several of each kind; of the 4 selected
    # blocks 3 are forced (the first, the current, the previous), so one is a top-k choice.
    'nsa': dataclasses.replace(BASE, attention='nsa', num_kv_heads=2, nsa=NSAConfig(
        block_len=4, stride=2, select_block_len=4, num_selected=4, window=6)),
}
