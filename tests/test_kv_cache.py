"""kpod.kv_cache: the growing key/value cache of the decoding loop."""

import torch

import kpod.kv_cache as kv_cache


class _Config:
    num_hidden_layers = 1

    def get_text_config(self, decoder: bool = True):
        return self


def _cache():
    return kv_cache.growing_cache(type("Model", (), {"config": _Config()})())


def test_growing_cache_holds_what_concatenation_holds(monkeypatch) -> None:
    """Keys and values after a prefill, many one-position steps (the buffers reallocated several
    times: one position of room) and two row selections equal those of plain concatenation, and
    the buffers grew by doubling (not one reallocation per step)."""
    monkeypatch.setattr(kv_cache, "INITIAL_ROOM", 1)
    layer = _cache().layers[0]
    torch.manual_seed(1)
    ref_k, ref_v = torch.randn(4, 2, 5, 3), torch.randn(4, 2, 5, 3)
    layer.update(ref_k.clone(), ref_v.clone())
    sizes = set()
    for step in range(9):
        k, v = torch.randn(ref_k.shape[0], 2, 1, 3), torch.randn(ref_k.shape[0], 2, 1, 3)
        keys, values = layer.update(k, v)
        ref_k, ref_v = torch.cat([ref_k, k], 2), torch.cat([ref_v, v], 2)
        assert torch.equal(keys, ref_k) and torch.equal(values, ref_v)
        sizes.add(layer.buffers[0].shape[2])
        if step in (3, 6):
            rows = torch.tensor([0, 2]) if step == 3 else torch.tensor([1])
            layer.batch_select_indices(rows)
            ref_k, ref_v = ref_k[rows], ref_v[rows]
            assert torch.equal(layer.keys, ref_k) and torch.equal(layer.values, ref_v)
            # The kept rows' filled positions and the room, not the whole (doubled) capacity.
            assert layer.buffers[0].shape[:3] == (len(rows), 2, layer.length + 1)
    # 5 + 1 of room, doubled to 12; after the first selection 9 + 1, doubled to 20; after the second
    # 12 + 1, doubled to 26 at position 14.
    assert layer.get_seq_length() == 14 and sorted(sizes) == [6, 10, 12, 13, 20, 26]


def test_join_pads_the_shorter_cache_on_the_left_with_zeros() -> None:
    """Live rows of 6 positions whose first 2 are padding in every row, joined with new rows of 5
    positions: the live rows lose 2 positions, the new ones get 1 zero position in front."""
    torch.manual_seed(2)
    live, new = _cache(), _cache()
    a_k, a_v = torch.randn(2, 1, 6, 4), torch.randn(2, 1, 6, 4)
    b_k, b_v = torch.randn(3, 1, 5, 4), torch.randn(3, 1, 5, 4)
    live.layers[0].update(a_k, a_v)
    new.layers[0].update(b_k, b_v)
    kv_cache.join(live, new, drop=2, pad_live=1, pad_new=0)
    # widths: live 6 - 2 + 1 = 5 = new 5 + 0
    layer = live.layers[0]
    assert layer.keys.shape == (5, 1, 5, 4) and layer.get_seq_length() == 5
    assert torch.equal(layer.keys[:2, :, 1:], a_k[:, :, 2:]) and torch.equal(layer.values[2:], b_v)
    assert torch.count_nonzero(layer.keys[:2, :, :1]) == 0  # padding is zeros, never garbage
    k, v = torch.randn(5, 1, 1, 4), torch.randn(5, 1, 1, 4)
    keys, _ = layer.update(k, v)  # and it goes on growing in place
    assert torch.equal(keys[:, :, -1:], k) and torch.equal(keys[2:, :, :5], b_k)


def test_auto_batch_size_counts_the_cache_of_every_layer_by_hand(tiny_causal, tiny_seq2seq) -> None:
    """The tiny Llama (2 layers, 2 key/value heads of 16 dimensions) adds 2 x 2 x 2 x 16 x 4 = 512
    bytes a position in fp32; a row of 100 positions is budgeted twice over (buffers double), so
    1 MiB holds 1,048,576 / 102,400 = 10 rows: batch 8. Half the bytes in bf16: 20 rows, batch 16."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    model = AutoModelForCausalLM.from_pretrained(tiny_causal)
    config = model.config
    assert (config.num_hidden_layers, config.num_key_value_heads) == (2, 2)
    assert config.hidden_size // config.num_attention_heads == 16
    assert kv_cache.cache_bytes_per_position(model, 4) == 512
    assert kv_cache.auto_batch_size(model, 100, 4, budget=2**20) == 8
    assert kv_cache.auto_batch_size(model, 100, 2, budget=2**20) == 16
    assert kv_cache.auto_batch_size(model, 100, 4, budget=10) == 1  # one row always
    assert kv_cache.auto_batch_size(model, 100, 2) == kv_cache.MAX_AUTO_BATCH  # 2 GiB on a CPU
    # T5: one decoder layer, 2 heads of d_kv 16, self- and cross-attention: 2 x 2 x 1 x 2 x 16 x 4.
    t5 = AutoModelForSeq2SeqLM.from_pretrained(tiny_seq2seq)
    assert kv_cache.cache_bytes_per_position(t5, 4) == 2 * 2 * 1 * 2 * 16 * 4
    # A config that does not say how large its cache is: the fixed fallback.
    unknown = type("Model", (), {"config": _Config(), "parameters": model.parameters})()
    assert kv_cache.cache_bytes_per_position(unknown, 4) is None
    assert kv_cache.auto_batch_size(unknown, 100, 4) == kv_cache.FALLBACK_BATCH
