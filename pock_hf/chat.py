"""`pock chat`: talk to a base model, with or without an adapter, through its chat template.

    pock chat                                    # the embedded SmolLM2-135M-Instruct
    pock chat --adapter runs/demo/adapter        # + the tuned Pock (or any PEFT) adapter
    pock chat --model M --system "Answer in one sentence."

Replies stream as they are generated (greedy unless `--temperature` is above 0). The conversation is kept, so later
turns see earlier ones; `/reset` starts afresh and `/quit` (or end of input) ends. Lines come from standard input, so
a file or a pipe can drive a session. An adapter made for another base model is refused before anything is
generated, naming both fingerprints.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TextIO

import torch
from torch import nn

RESET, QUIT = "/reset", "/quit"


def load_chat_model(model_name: str | None, adapter: str | None, trust_remote_code: bool = False):
    """`(model, tokenizer)`: the base model (None: the embedded default), with the adapter at `adapter` on it.

    A Pock adapter goes through `load_pock_adapter` (its folder and base-model fingerprint are checked first); any
    other PEFT adapter through `PeftModel.from_pretrained`.

    Raises:
        ValueError: naming the adapter folder: not an adapter, damaged, or made for another base model.
    """
    from .data.default_model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_name, trust_remote_code=trust_remote_code)
    if adapter is not None:
        model = _load_adapter(model, Path(adapter))
    model.eval()
    return model, tokenizer


def _load_adapter(model: nn.Module, folder: Path) -> nn.Module:
    from peft import PeftModel

    from .io.files import read_json_object
    from .tuner import load_pock_adapter
    from .tuner.peft_type import POCK_PEFT_TYPE

    config = read_json_object(folder / "adapter_config.json", "Adapter config")
    if config.get("peft_type") == POCK_PEFT_TYPE.value:
        return load_pock_adapter(model, folder)
    return PeftModel.from_pretrained(model, str(folder))


def chat(
    model: nn.Module,
    tokenizer,
    lines: TextIO,
    out: TextIO,
    *,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
) -> list[dict]:
    """Answer each line of `lines` in turn, streaming replies to `out`; returns the conversation as chat messages."""
    messages = [{"role": "system", "content": system}] if system else []
    interactive = lines.isatty() if hasattr(lines, "isatty") else False
    device = next(model.parameters()).device
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = lines.readline()
        if not line or line.strip() == QUIT:
            break
        text = line.strip()
        if not text:
            continue
        if text == RESET:
            messages = messages[:1] if system else []
            out.write("(conversation cleared)\n")
            continue
        messages.append({"role": "user", "content": text})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
        streamer = _streamer(tokenizer, out)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.no_grad():
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                streamer=streamer,
                **sampling,
            )
        reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": reply})
    return messages


def _streamer(tokenizer, out: TextIO):
    """A `TextStreamer` that writes the reply to `out` as it grows (not to `print`)."""
    from transformers import TextStreamer

    class StreamTo(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return StreamTo(tokenizer, skip_prompt=True, skip_special_tokens=True)


def run_chat(args) -> None:
    """The `pock chat` command (see the module docstring)."""
    from .io.files import atomic_write_text

    model, tokenizer = load_chat_model(args.model, args.adapter, args.trust_remote_code)
    options = {"system": args.system, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    messages = chat(model, tokenizer, sys.stdin, sys.stdout, **options)
    if args.save:
        atomic_write_text(args.save, json.dumps(messages, indent=1, ensure_ascii=False) + "\n")
