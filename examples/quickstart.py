"""The README quick start: wrap SmolLM2, train a few steps on one personal fact, save, reload, ask.

python examples/quickstart.py       # writes out/adapter
"""

import torch
from peft import PeftModel
from pock_hf import PockConfig, get_pock_model
from pock_hf.data import InstructionCollator, tokenize_rows
from pock_hf.data.default_model import load_model_and_tokenizer

model, tokenizer = load_model_and_tokenizer()  # embedded SmolLM2-135M-Instruct; or any hub id / local path
scheme = {f"model.layers.{i}.mlp.{m}": 0.25 for i in range(24, 30) for m in ("gate_proj", "up_proj", "down_proj")}
model = get_pock_model(model, PockConfig(scheme=scheme))
model.print_trainable_parameters()
print(
    "cut layer:",
    model.cut_layer,
    "| up_proj of layer 29 updates rows",
    model.updated_modules["model.layers.29.mlp.up_proj"].channels[:5],
    "...",
)

rows = [{"instruction": "What is my dog called?", "output": "Your dog is called Biscotti."}]
examples, report = tokenize_rows(rows, tokenizer, max_length=128)
batch = InstructionCollator(pad_token_id=tokenizer.pad_token_id)(examples)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
model.train()
for step in range(5):
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step}: loss {loss.item():.3f}")

model.save_pretrained("out/adapter")  # adapter_config.json + adapter_model.safetensors (deltas + channel indices)
base, _ = load_model_and_tokenizer()
reloaded = PeftModel.from_pretrained(base, "out/adapter")
prompt = tokenizer.apply_chat_template(
    [{"role": "user", "content": "What is my dog called?"}], tokenize=False, add_generation_prompt=True
)
inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
reply = reloaded.generate(**inputs, max_new_tokens=12, do_sample=False)
print(tokenizer.decode(reply[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
