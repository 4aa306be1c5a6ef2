"""`pock chat`: streamed replies through the chat template, kept history, /reset, stdin-driven sessions, and a clear
refusal of an adapter made for another base model."""

from __future__ import annotations

import io
import json
import subprocess
import sys

from pock_hf import PockConfig, get_pock_model
from pock_hf.chat import chat, load_chat_model

from .tiny import save_tiny_checkpoint


def test_replies_stream_history_is_kept_and_reset_clears_it(tmp_path):
    model, tokenizer = load_chat_model(str(save_tiny_checkpoint(tmp_path / "tiny")), None)
    out = io.StringIO()
    lines = io.StringIO("hello\n/reset\n\nhi there\nand again\n/quit\nnever read\n")
    messages = chat(model, tokenizer, lines, out, system="Be brief.", max_new_tokens=4)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["hi there", "and again"]  # hello was reset
    text = out.getvalue()
    assert "(conversation cleared)" in text
    for reply in (m["content"] for m in messages if m["role"] == "assistant"):
        assert reply in text  # streamed to the output as generated


def test_the_command_is_driven_through_stdin(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "tiny")
    saved = tmp_path / "conversation.json"
    command = [sys.executable, "-m", "pock_hf.cli", "chat", "--model", str(folder), "--max-new-tokens", "3"]
    done = subprocess.run(
        [*command, "--save", str(saved)], input="hello\nwhat now\n", capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    messages = json.loads(saved.read_text())
    assert [m["content"] for m in messages if m["role"] == "user"] == ["hello", "what now"]
    assert len(messages) == 4


def test_an_adapter_for_another_base_is_refused_naming_both(tmp_path):
    tuned = save_tiny_checkpoint(tmp_path / "tiny")
    other = save_tiny_checkpoint(tmp_path / "other", intermediate_size=40)
    model, _ = load_chat_model(str(tuned), None)
    get_pock_model(model, PockConfig(scheme={"model.layers.3.mlp.up_proj": 0.5})).save_pretrained(tmp_path / "adapter")
    command = [
        sys.executable,
        "-m",
        "pock_hf.cli",
        "chat",
        "--model",
        str(other),
        "--adapter",
        str(tmp_path / "adapter"),
    ]
    done = subprocess.run(command, input="hello\n", capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "adapter" in done.stderr and "Traceback" not in done.stderr
    assert str(tmp_path / "adapter") in done.stderr
