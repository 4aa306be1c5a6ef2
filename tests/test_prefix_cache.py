"""The frozen-prefix cache: same losses as the uncached run, the prefix really skipped, invalidated when it must be."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from pock_hf import PockConfig, get_pock_model
from pock_hf.data import InstructionCollator
from pock_hf.engine.prefix_cache import META_FILE, PrefixCache
from pock_hf.engine.training import make_optimizer, training_step

from .tiny import tiny_llama

SCHEME = {"model.layers.2.mlp.up_proj": 0.5, "model.layers.3.self_attn.o_proj": 0.25}  # cut at layer 2


def examples(count: int = 6, seed: int = 0) -> list[dict]:
    """Instruction-like examples of different lengths: prompt unlabelled, answer labelled."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        length = 6 + (i * 5) % 11
        ids = torch.randint(3, 96, (length,), generator=generator).tolist()
        rows.append(
            {"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * (length // 2) + ids[length // 2 :]}
        )
    return rows


PADDED, PACKED = InstructionCollator(pad_token_id=0), InstructionCollator(pad_token_id=0, packed=True)


def epochs(
    model, batches_per_epoch: list[list[list[dict]]], cache: PrefixCache | None = None, collates=None
) -> list[float]:
    """Train over the given epochs of batches (each a list of example lists, batched by that epoch's collator in
    `collates`, default padded); returns every step's loss."""
    collates = collates or [PADDED] * len(batches_per_epoch)
    if cache is not None:
        cache.attach(model)
    optimizer = make_optimizer(model, lr=1e-2)
    return [
        training_step(model, [collate(batch)], optimizer).loss
        for epoch, collate in zip(batches_per_epoch, collates, strict=True)
        for batch in epoch
    ]


def pock_model():
    model = get_pock_model(tiny_llama(), PockConfig(scheme=SCHEME))
    model.train()
    return model


def two_epochs(rows):
    first = [rows[0:3], rows[3:6]]
    second = [[rows[4], rows[1], rows[5]], [rows[2], rows[0], rows[3]]]  # reshuffled: other batches, other padding
    return [first, second]


def count_calls(module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_cached_training_equals_uncached_and_skips_the_prefix():
    rows = examples()
    expected = epochs(pock_model(), two_epochs(rows))

    model, cache = pock_model(), PrefixCache()
    layer_calls = count_calls(model.base_model.model.model.layers[0].mlp)
    cut_layer_calls = count_calls(model.base_model.model.model.layers[2].mlp)
    got = epochs(model, two_epochs(rows), cache)

    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert cache.stats.miss_batches == 2 and cache.stats.hit_batches == 2 and len(cache) == len(rows)
    # layer 0 ran only in the first epoch; the cut layer ran in both
    assert layer_calls[0] == 2 and cut_layer_calls[0] == 4
    assert expected[2] != expected[0], "training did not change the model"


@pytest.mark.parametrize("collates", [(PACKED, PACKED), (PADDED, PACKED)], ids=["packed", "padded then packed"])
def test_packed_rows_are_served_per_example_sharing_entries_with_padded_rows(collates):
    rows = examples()
    expected = epochs(pock_model(), two_epochs(rows))  # padded and uncached: packing changes no loss

    model, cache = pock_model(), PrefixCache()
    layer_calls = count_calls(model.base_model.model.model.layers[0].mlp)
    got = epochs(model, two_epochs(rows), cache, collates)

    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert cache.stats.miss_batches == 2 and cache.stats.hit_batches == 2 and len(cache) == len(rows)
    assert layer_calls[0] == 2  # the second epoch's packed rows skipped the prefix


def test_cut_change_invalidates():
    rows = examples()
    model, cache = pock_model(), PrefixCache()
    epochs(model, [[rows[:3]]], cache)
    assert len(cache) == 3
    # something below the old cut starts training: the cut moves to layer 1 and the stored states are stale
    model.base_model.model.model.layers[1].post_attention_layernorm.weight.requires_grad_(True)
    reference = pock_model()
    reference.base_model.model.model.layers[1].post_attention_layernorm.weight.requires_grad_(True)
    reference.load_state_dict(model.state_dict())
    collate = InstructionCollator(pad_token_id=0)
    with torch.no_grad():
        got, expected = model(**collate(rows[:3])).loss, reference(**collate(rows[:3])).loss
    assert model.cut_layer == 1 and cache.stats.invalidations == 1 and cache.stats.hit_batches == 0
    torch.testing.assert_close(got, expected)


def test_prefix_weight_change_invalidates():
    rows = examples()
    model, cache = pock_model(), PrefixCache()
    collate = InstructionCollator(pad_token_id=0)
    cache.attach(model)
    with torch.no_grad():
        model(**collate(rows[:3]))
        model.base_model.model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
        got = model(**collate(rows[:3])).loss
    cache.detach()
    with torch.no_grad():
        expected = model(**collate(rows[:3])).loss
    assert cache.stats.invalidations == 1 and cache.stats.hit_batches == 0
    torch.testing.assert_close(got, expected)


def test_size_limit_is_respected_and_results_stay_exact():
    rows = examples()
    expected = epochs(pock_model(), two_epochs(rows))
    row_mb = 16 * 32 * 4 / 2**20  # at most 16 tokens x hidden 32 x fp32
    cache = PrefixCache(max_mb=2.5 * row_mb)
    got = epochs(pock_model(), two_epochs(rows), cache)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert cache.size_mb <= 2.5 * row_mb and cache.stats.rows_over_limit > 0 and cache.stats.hit_batches == 0


def test_disk_cache_is_safetensors_reused_across_runs_and_never_unpickles(tmp_path):
    rows = examples()
    first = PrefixCache(directory=tmp_path)
    epochs(pock_model(), [[rows[:3]]], first)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) == 3 and json.loads((tmp_path / META_FILE).read_text())["validity"]["cut"] == 2

    # a pickle planted under an entry's name: loading it must fail safely (a miss), never run it
    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    files[0].write_bytes(pickle.dumps(Exploit()))
    second = PrefixCache(directory=tmp_path)
    expected = epochs(pock_model(), [[rows[:3]]])
    got = epochs(pock_model(), [[rows[:3]]], second)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert not marker.exists()

    third = PrefixCache(directory=tmp_path)  # the damaged entry was rewritten by the second run
    epochs(pock_model(), [[rows[:3]]], third)
    assert third.stats.hit_batches == 1


def test_newer_format_and_bad_arguments_are_refused(tmp_path):
    (tmp_path / META_FILE).write_text(json.dumps({"format_version": 99, "validity": {}}))
    with pytest.raises(ValueError, match="newer pock_hf"):
        PrefixCache(directory=tmp_path)
    with pytest.raises(ValueError, match="max_mb"):
        PrefixCache(max_mb=0)
    with pytest.raises(TypeError, match="get_pock_model"):
        PrefixCache().attach(tiny_llama())


def test_generation_and_hidden_state_outputs_bypass_the_cache():
    model, cache = pock_model(), PrefixCache()
    model.eval()
    prompt = torch.tensor([examples(1)[0]["input_ids"]])
    plain = model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
    hidden = model(input_ids=prompt, output_hidden_states=True).hidden_states
    cache.attach(model)
    model(input_ids=prompt)  # fills the cache for this prompt
    assert torch.equal(model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False), plain)
    for got, expected in zip(model(input_ids=prompt, output_hidden_states=True).hidden_states, hidden):
        torch.testing.assert_close(got, expected)


def test_a_weight_edit_through_data_invalidates():
    """`.data` writes move no version counter; the sampled values catch them (the embedding here, below the cut)."""
    rows = examples()
    model, cache = pock_model(), PrefixCache()
    collate = InstructionCollator(pad_token_id=0)
    cache.attach(model)
    embeddings = model.base_model.model.model.embed_tokens.weight
    with torch.no_grad():
        model(**collate(rows[:3]))
        embeddings.data[:] = torch.randn_like(embeddings)
        got = model(**collate(rows[:3])).loss
    cache.detach()
    with torch.no_grad():
        expected = model(**collate(rows[:3])).loss
    assert cache.stats.invalidations == 1 and cache.stats.hit_batches == 0
    torch.testing.assert_close(got, expected)
