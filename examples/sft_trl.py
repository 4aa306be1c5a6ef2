"""The README's TRL example: Pock on SmolLM2 under TRL's SFTTrainer (PockSFTTrainer: Pock's label-only loss), save,
reload, ask.

pip install "pock_hf[trl]"; python examples/sft_trl.py      # writes out/sft and out/sft/adapter
"""

import torch
from datasets import Dataset
from peft import PeftModel
from trl import SFTConfig

from pock_hf import PockConfig, get_pock_model
from pock_hf.data.default_model import load_model_and_tokenizer
from pock_hf.engine.sft_trainer import PockSFTTrainer

model, tokenizer = load_model_and_tokenizer()  # embedded SmolLM2-135M-Instruct; or any hub id / local path
scheme = {f"model.layers.{i}.mlp.{m}": 0.25 for i in range(24, 30) for m in ("gate_proj", "up_proj", "down_proj")}
model = get_pock_model(model, PockConfig(scheme=scheme))

questions = ["What is my dog called?", "What's my dog's name?", "Remind me what my dog is called."]
rows = [
    {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": "Biscotti."}]}
    for q in questions
]
args = SFTConfig(
    "out/sft",
    max_steps=6,
    per_device_train_batch_size=3,
    learning_rate=1e-3,
    bf16=False,
    logging_steps=2,
    report_to=[],
)
trainer = PockSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
print("label-only loss:", trainer.pock_label_only, "| cut layer:", model.cut_layer)
trainer.train()
trainer.save_model("out/sft/adapter")  # adapter_config.json + adapter_model.safetensors

base, _ = load_model_and_tokenizer()
reloaded = PeftModel.from_pretrained(base, "out/sft/adapter").eval()
inputs = tokenizer.apply_chat_template(
    [{"role": "user", "content": "What is my dog called?"}],
    add_generation_prompt=True,
    return_tensors="pt",
    return_dict=True,
)
with torch.no_grad():
    reply = reloaded.generate(**inputs, max_new_tokens=8, do_sample=False)
print(tokenizer.decode(reply[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
