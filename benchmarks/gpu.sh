#!/usr/bin/env bash
# GPU benchmark: full fine-tuning, PEFT LoRA (+ gradient checkpointing), QLoRA and Pock on a Llama-2-7B-shaped model
# with random bf16 weights (nothing downloaded), sequence length 512, on one CUDA GPU. Each setup runs in its own
# process; tokens/s and torch.cuda.max_memory_allocated go to runs/gpu/speed.{md,json,png}.
#
#   benchmarks/gpu.sh                 # Llama-2-7B shape, batch 8: ~140 GB-class GPU (H100/H200), a few minutes
#   benchmarks/gpu.sh --small         # Llama-3.2-1B shape, batch 4: a 16-24 GB GPU or a Jetson AGX Orin
#   benchmarks/gpu.sh --small --batch 1 --setups lora,pock,pock_nf4     # Jetson Orin Nano 8 GB
#
# Extra arguments go to benchmarks/speed.py (later ones win). On a Jetson, run it inside NVIDIA's L4T PyTorch
# container (JetPack 6) with this repository mounted and `pip install -e .` done; full fine-tuning of the 7B shape
# does not fit a 32/64 GB Orin at batch 8, so pass --small or drop `full` from --setups there.
set -euo pipefail
cd "$(dirname "$0")/.."
architecture="meta-llama/Llama-2-7b-hf"
batch=8
if [[ "${1:-}" == "--small" ]]; then
  architecture="meta-llama/Llama-3.2-1B"
  batch=4
  shift
fi
exec python benchmarks/speed.py --device cuda --dtype bfloat16 --architecture "$architecture" \
  --max-length 512 --batch "$batch" --warmup 2 --steps 5 \
  --setups forward,full,lora,lora_gc,qlora,pock,pock_in_backward,pock_cached,pock_nf4 \
  --output runs/gpu "$@"
