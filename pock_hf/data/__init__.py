"""Data: instruction rows and their tokenization, the generated personal-assistant profile, and the embedded default
model. The bottom of the package: it imports nothing from pock_hf."""

from .default_model import DEFAULT_MODEL, ensure_pad_token, load_model_and_tokenizer
from .instructions import (
    IGNORE_INDEX,
    DataFormatError,
    InstructionCollator,
    TokenizeReport,
    assistant_spans,
    check_row,
    load_instruction_rows,
    model_inputs,
    pack_examples,
    real_token_count,
    to_messages,
    tokenize_example,
    tokenize_rows,
)
from .personal import PersonalDataset, fact_recall, make_personal_dataset, replay_rows, write_personal_dataset

__all__ = [
    "DEFAULT_MODEL",
    "IGNORE_INDEX",
    "DataFormatError",
    "InstructionCollator",
    "PersonalDataset",
    "TokenizeReport",
    "assistant_spans",
    "check_row",
    "ensure_pad_token",
    "fact_recall",
    "load_instruction_rows",
    "load_model_and_tokenizer",
    "make_personal_dataset",
    "model_inputs",
    "pack_examples",
    "real_token_count",
    "replay_rows",
    "to_messages",
    "tokenize_example",
    "tokenize_rows",
    "write_personal_dataset",
]
