"""The adapter on the real embedded default model (SmolLM2-135M-Instruct): train, cut, save, load."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from pock_hf import PockConfig, get_pock_model
from pock_hf.data import InstructionCollator, tokenize_rows
from pock_hf.data.personal import make_personal_dataset

pytestmark = pytest.mark.slow

LAST_LAYERS_SCHEME = {
    f"model.layers.{i}.{module}": ratio
    for i in (28, 29)
    for module, ratio in [
        ("self_attn.q_proj", 0.5),
        ("self_attn.v_proj", 0.5),
        ("mlp.up_proj", 0.25),
        ("mlp.down_proj", 0.25),
    ]
}


def test_sparse_fine_tune_of_smollm2_learns_and_round_trips(smollm2, tmp_path):
    base, tokenizer = smollm2
    rows = make_personal_dataset().train[:8]
    examples, report = tokenize_rows(rows, tokenizer, max_length=128)
    assert report.kept == 8
    batch = InstructionCollator(pad_token_id=tokenizer.pad_token_id)(examples)

    model = get_pock_model(copy.deepcopy(base), PockConfig(scheme=LAST_LAYERS_SCHEME))
    assert model.cut_layer == 28
    backward_calls = {i: 0 for i in (0, 27, 28)}
    for i in backward_calls:
        model.get_base_model().model.layers[i].register_full_backward_hook(
            lambda m, gi, go, i=i: backward_calls.__setitem__(i, backward_calls[i] + 1)
        )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert backward_calls == {0: 0, 27: 0, 28: 6}

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=batch["input_ids"]).logits, logits, rtol=0, atol=0)
