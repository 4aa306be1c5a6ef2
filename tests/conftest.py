"""Shared fixtures: the embedded SmolLM2 model and its chat tokenizer, and a tiny hub-free tokenizer."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pock_hf.data.default_model import DEFAULT_MODEL, GGUF_FILE, cache_root, gguf_folder, load_model_and_tokenizer

# A Llama-3-style template: BOS in the text, no default system prompt, content trimmed, nothing after <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A 260-token byte-level tokenizer (one token per byte, no merges) with the Llama-3-style chat template.

    Decoding is exact, it has character offsets like any fast tokenizer, and it has an eos but no pad token.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(
        models.BPE(vocab={token: i for i, token in enumerate(LLAMA3_SPECIALS + tuple(alphabet))}, merges=[])
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(LLAMA3_SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=LLAMA3_SPECIALS[0], eos_token="<|eot_id|>", chat_template=LLAMA3_TEMPLATE
    )


@pytest.fixture(scope="session")
def smollm2():
    """`(model, tokenizer)` of the embedded default via the public loader. The first run on a machine materialises the
    checkpoint into the real cache (~25 s, 517 MB); later loads take under a second. For slow tests only."""
    return load_model_and_tokenizer()


@pytest.fixture(scope="session")
def chat_tokenizer():
    """The real SmolLM2 tokenizer (ChatML template with a default system prompt, pad = <|im_end|>).

    Read from the materialised checkpoint when there is one (~0.2 s), else straight from the GGUF file (~8 s): the
    same tokenizer either way, and fast tests need not materialise the model.
    """
    cached = cache_root() / DEFAULT_MODEL
    if cached.is_dir():
        return AutoTokenizer.from_pretrained(cached)
    return AutoTokenizer.from_pretrained(gguf_folder(), gguf_file=GGUF_FILE)
