"""The continuous engine's parts: the KV cache cut and joined row by row (kvcache), decode
attention without copying the cache (attention), token choice (decoding) against
transformers' own `generate()`, beams included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.inference import kvcache
from pipeline.inference.attention import NAME, packed_decode_attention, use_packed_decode_attention
from pipeline.inference.decoding import Decoding, Request, Selection
from pipeline.inference.generation import AnswerRepetitionPenalty


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread) -> None:
    """Tiny models on shared cores: one torch thread is much faster than two (conftest)."""


def _cache(rows: int, length: int, seed: int, layers: int = 2) -> torch.Tensor:
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    g = torch.Generator().manual_seed(seed)
    for i in range(layers):
        cache.update(torch.randn(rows, 2, length, 4, generator=g), torch.randn(rows, 2, length, 4, generator=g), i)
    return cache


# ---- kvcache ------------------------------------------------------------------------------------


def test_rows_are_cut_joined_and_trimmed_column_for_column() -> None:
    a, b = _cache(2, 5, seed=1), _cache(1, 3, seed=2)
    keys_a, keys_b = a.layers[1].keys.clone(), b.layers[1].keys.clone()
    joined = kvcache.concat([kvcache.copy_of(a), kvcache.copy_of(b)])
    assert kvcache.length(joined) == 5 and joined.get_seq_length() == 5
    k = joined.layers[1].keys
    assert torch.equal(k[:2], keys_a) and torch.equal(k[2, :, 2:], keys_b[0]) and not k[2, :, :2].any()
    kvcache.select(joined, torch.tensor([2, 0]))  # a row may leave, the others reorder
    kvcache.trim_left(joined, 2)  # the columns only the shorter row's padding was in
    assert torch.equal(joined.layers[1].keys[0], keys_b[0]) and torch.equal(joined.layers[1].keys[1], keys_a[0, :, 2:])
    # the originals are untouched: a prefix cache stays valid for its later rows
    assert torch.equal(a.layers[1].keys, keys_a) and torch.equal(b.layers[1].keys, keys_b)


def test_a_growing_layer_writes_in_place_and_grows_when_full() -> None:
    layer = kvcache.GrowingLayer(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), room=2)
    buffer = layer._k
    for step in range(4):
        keys, _ = layer.update(torch.full((1, 2, 1, 4), step + 1.0), torch.full((1, 2, 1, 4), -1.0))
        assert layer.get_seq_length() == 4 + step and keys.shape[2] == 4 + step
    assert layer._k is not buffer  # grew once full (room 2), by copying
    assert keys[0, 0, 3:, 0].tolist() == [1.0, 2.0, 3.0, 4.0] and not keys[0, :, :3].any()


def test_beams_take_only_the_generated_columns_of_the_beam_they_continue() -> None:
    cache = _cache(3, 6, seed=5)
    kvcache.growing(cache)
    before = cache.layers[0].keys.clone()
    before[:, :, :4] = before[0, :, :4]  # a request's beams share their prompt columns
    cache.layers[0]._k[:, :, :6] = before
    kvcache.copy_rows(cache, torch.tensor([0, 2]), torch.tensor([2, 1]), columns=2)  # beam 0 <- 2, beam 2 <- 1
    after = cache.layers[0].keys
    assert torch.equal(after[0], before[2]) and torch.equal(after[2], before[1]) and torch.equal(after[1], before[1])


def test_a_prefix_expanded_into_rows_stays_unwritten() -> None:
    prefix = _cache(1, 4, seed=3)
    before = prefix.layers[0].keys.clone()
    rows = kvcache.expand(prefix, 3)
    kvcache.growing(rows)
    rows.update(torch.ones(3, 2, 2, 4), torch.ones(3, 2, 2, 4), 0)
    assert rows.layers[0].keys.shape == (3, 2, 6, 4) and torch.equal(prefix.layers[0].keys, before)
    assert prefix.get_seq_length() == 4


def test_linear_attention_states_follow_their_rows() -> None:
    from pipeline.inference.families.minimax_vl_01.modeling import MiniMaxVL01Cache

    cache = MiniMaxVL01Cache(full_layer=1)
    cache.set_linear_cache(0, torch.arange(2.0).view(2, 1, 1, 1).expand(2, 1, 2, 2).clone())
    cache.update(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4), 1)
    other = kvcache.copy_of(cache)
    kvcache.select(other, torch.tensor([1]))
    other = kvcache.expand(other, 2)
    joined = kvcache.concat([cache, other])
    assert joined.get_linear_cache(0)[:, 0, 0, 0].tolist() == [0.0, 1.0, 1.0, 1.0]
    assert joined.get_seq_length() == 3 and joined.layers[1].keys.shape[0] == 4


def test_layers_the_engine_cannot_cut_are_refused() -> None:
    from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

    cache = DynamicCache()
    cache.layers = [DynamicSlidingWindowLayer(sliding_window=4)]
    cache.update(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), 0)
    with pytest.raises(kvcache.UnsupportedCacheError, match="DynamicSlidingWindowLayer"):
        kvcache.check(cache)


# ---- attention ----------------------------------------------------------------------------------


class _Attention(torch.nn.Module):
    num_key_value_groups = 4
    is_causal = True


def test_packed_decode_attention_equals_repeated_heads_with_padding() -> None:
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 8, 1, 16, generator=g), torch.randn(3, 2, 20, 16, generator=g), torch.randn(3, 2, 20, 16, generator=g)
    mask = torch.ones(3, 1, 1, 20, dtype=torch.bool)
    mask[1, ..., :7] = False  # a left-padded row
    out, _ = packed_decode_attention(_Attention(), q, k, v, mask, scaling=0.25)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, repeat_kv(k, 4), repeat_kv(v, 4), attn_mask=mask, scale=0.25).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    # a prefill (several query tokens) is transformers' own path, unchanged
    q5 = torch.randn(3, 8, 5, 16, generator=g)
    mask5 = torch.ones(3, 1, 5, 20, dtype=torch.bool)
    ours, _ = packed_decode_attention(_Attention(), q5, k, v, mask5, scaling=0.25)
    theirs, _ = sdpa_attention_forward(_Attention(), q5, k, v, mask5, scaling=0.25)
    assert torch.equal(ours, theirs)


def test_only_grouped_query_attention_is_switched(tmp_path: Path) -> None:
    from pipeline.config import RunConfig
    from pipeline.inference.loading import load_model
    from pipeline.testing import make_tiny_model

    folder = make_tiny_model("idefics3", tmp_path / "idefics3")
    model = load_model(RunConfig(source="u", output="u", model=str(folder), device="cpu")).model
    text, vision = model.config.text_config, model.config.vision_config
    assert text.num_attention_heads > text.num_key_value_heads  # grouped-query attention
    assert use_packed_decode_attention(model) == 1
    assert text._attn_implementation == NAME and vision._attn_implementation == "sdpa"


# ---- token choice ----------------------------------------------------------------------------------


def test_the_penalty_and_min_new_tokens_match_transformers_processors() -> None:
    from transformers import MinNewTokensLengthLogitsProcessor

    g = torch.Generator().manual_seed(1)
    scores = torch.randn(2, 30, generator=g)
    generated = torch.tensor([[5, 7, 5, 0], [3, 9, 0, 0]])  # 3 and 2 tokens so far (the rest unused)
    decoding = Decoding(num_beams=1, repetition_penalty=1.3, eos_ids=(2, 4), start_ids=(1,))
    selection = Selection(decoding, [Request(slot=0, tag=None, limit=8, min_new=3)] * 2, "cpu")
    ours = selection._process(scores.clone(), generated, torch.tensor([3, 2]), torch.tensor([3, 3]), [None, None])
    for row, count in ((0, 3), (1, 2)):
        ids = torch.cat((torch.tensor([[0] * 6]), generated[row : row + 1, :count]), dim=1)  # a 6-token prompt
        theirs = MinNewTokensLengthLogitsProcessor(6, 3, [2, 4])(ids, scores[row : row + 1].clone())
        theirs = AnswerRepetitionPenalty(1.3, 6, (1,))(ids, theirs)
        assert torch.equal(ours[row], theirs[0]), row
    assert ours[1, 2] == float("-inf") and ours[0, 2] != float("-inf")  # the second row is still short


@pytest.mark.parametrize("family", ["mono_internvl", "minimax_vl_01"])
def test_beams_equal_transformers_beam_search(family: str, tmp_path: Path) -> None:
    """Beam search, batched rows of different lengths, against transformers' `_beam_search` on the
    same rows one at a time. The features go in with a batch dimension, so that transformers'
    expansion for beams copies them row by row (the flat (tokens, hidden) tensor the static
    batches passed was repeated token by token, which scrambled every row's image with beams).
    MiniMax-VL-01's cache reorders its lightning states with the beams (the native one did not)."""
    from transformers import GenerationConfig

    from pipeline.config import RunConfig
    from pipeline.inference import load_engine
    from pipeline.inference.adapters import CHART, DESCRIPTION, OCR
    from pipeline.testing import make_tiny_model, sample_image_page

    folder = make_tiny_model(family, tmp_path / family)
    engine = load_engine(RunConfig(source="u", output="u", model=str(folder), device="cpu", num_beams=3,
                                   repetition_penalty=1.2, max_new_tokens=7))
    model, builder = engine.model, engine.builder
    page = builder.build(sample_image_page(140, 100, seed=4), builder.plan(140, 100))
    keys = (DESCRIPTION, OCR, CHART)
    with torch.inference_mode():
        features = builder.encode_page(model, page)
        ours = engine.generate([page.prompts[k] for k in keys], [features] * 3, limit=7)
        for key, gen in zip(keys, ours, strict=True):
            ids = torch.from_numpy(page.prompts[key])[None]
            config = GenerationConfig(max_new_tokens=7, num_beams=3, do_sample=False,
                                      eos_token_id=sorted(engine.eos_token_ids), pad_token_id=builder.pad_token_id)
            processors = engine.generation.logits_processors(ids.shape[1], builder.penalty_start_ids())
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                 image_features=features.features[None], logits_processor=processors)
            theirs = out[0, ids.shape[1]:].tolist()
            stop = next((i for i, t in enumerate(theirs) if t in engine.eos_token_ids), len(theirs))
            assert gen.tokens == theirs[:stop], key
    assert len({t for g in ours for t in g.tokens}) > 3  # varied outputs, so the comparison means something
