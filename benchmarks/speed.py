"""Training-step speed and memory: full fine-tuning, PEFT LoRA / QLoRA, last-k freezing and Pock with each engine
mechanism added one at a time, on one machine, in one run.

    python benchmarks/speed.py                                   # SmolLM2-135M-Instruct, Alpaca, batch 8 x 256
    python benchmarks/speed.py --scheme runs/plan/scheme.json    # a planned scheme instead of the default one
    python benchmarks/speed.py --setups full,lora,pock --steps 2 # a subset
    benchmarks/gpu.sh                                            # Llama-2-7B-shaped, random bf16 weights, one GPU

Every setup runs in its own process (so peak memory is its own: RSS on CPU, `torch.cuda.max_memory_allocated` on a
GPU), takes `--warmup` steps, then times `--steps` steps (forward + backward + AdamW update) and reports the median.
Every setup trains on the same batches through the same `pock_hf.engine.training.training_step`. Writes `speed.json`,
`speed.md` and `speed.png` to `--output`. The numbers describe this machine at this time; tests never assert them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruct" / "alpaca_5000.json"
ARCHITECTURES = Path(__file__).resolve().parents[1] / "recipes" / "architectures.yaml"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROMPT_SHARE = 0.4  # random-token batches: this share of each row is prompt (no label), as in instruction data
# setup -> what it is; the Pock rows add one mechanism each to the row above
SETUPS = {
    "forward": "forward pass only (no grad), whole model",
    "full": "full fine-tuning",
    "lora": "PEFT LoRA r=8, all linears",
    "lora_gc": "PEFT LoRA + gradient checkpointing",
    "qlora": "QLoRA (LoRA r=8 on NF4 frozen weights)",
    "shira": "PEFT SHiRA (sparse high-rank, r=32 by default), all linears",
    "supertuning": "PEFT Super-Tuning (top 1% of weights), all linears",
    "last_k": "freeze all but the last k layers",
    "pock_sparse": "Pock: sparse channels + depth cut (stock loss)",
    "pock": "+ label-only chunked loss (Pock default)",
    "pock_in_backward": "+ optimizer step inside backward",
    "pock_cached": "+ frozen-prefix cache (warm)",
    "pock_compiled": "Pock default, decoder layers under torch.compile",
    "pock_nf4": "Pock default on NF4 frozen weights",
    "pock_packed": "Pock default on padding-free (packed) batches",
    "full_packed": "full fine-tuning on padding-free (packed) batches",
    "lora_packed": "PEFT LoRA on padding-free (packed) batches",
}
PACKED = "_packed"  # a setup named <base>_packed is <base> trained on `InstructionCollator(packed=True)` batches
DEFAULT_SETUPS = ",".join(SETUPS)
# setups that train the model's own weights: those stay float32, and `--dtype auto` runs them under autocast
TRAINS_OWN_WEIGHTS = ("full", "last_k")


def base_setup(setup: str) -> str:
    """The method a setup trains (`lora_packed` -> `lora`)."""
    return setup.removesuffix(PACKED)


def weights_dtype(args, device: torch.device) -> torch.dtype:
    """The dtype the model loads in. `--dtype auto` gives each method its best precision on `device`: frozen weights
    in the fastest native dtype (`pock_hf.engine.precision`; adapters and deltas stay float32), and float32 weights
    for methods that train them (`autocast_dtype` speeds those up instead, as mixed-precision training does)."""
    from pock_hf.engine.precision import fastest_precision

    if args.dtype != "auto":
        return DTYPES[args.dtype]
    return torch.float32 if base_setup(args.setup) in TRAINS_OWN_WEIGHTS else fastest_precision(device).dtype


def autocast_dtype(args, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a setup that trains its own weights under `--dtype auto` (None: no autocast)."""
    from pock_hf.engine.precision import fastest_precision

    fast = fastest_precision(device).dtype
    use = args.dtype == "auto" and base_setup(args.setup) in TRAINS_OWN_WEIGHTS and fast != torch.float32
    return fast if use else None


def capability(device: torch.device) -> str:
    """What the device computes fast, for the report: the CPU's ISA and bf16 instructions, or the CUDA capability."""
    from pock_hf.engine.precision import cpu_capability, describe_cpu

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)}, CUDA compute capability {major}.{minor}"
    return describe_cpu(cpu_capability())


def last_layers_scheme(num_layers: int, last: int, ratio: float) -> dict[str, float]:
    """Every linear module of the last `last` decoder layers at `ratio` of their output channels."""
    from pock_hf.planning.table import LLAMA_LAYER_MODULES

    return {f"model.layers.{i}.{m}": ratio for i in range(num_layers - last, num_layers) for m in LLAMA_LAYER_MODULES}


def load_scheme(args, num_layers: int) -> dict[str, float]:
    from pock_hf.tuner.config import load_scheme_file

    if args.scheme:
        return load_scheme_file(args.scheme)
    return last_layers_scheme(num_layers, args.last_k, args.ratio)


def build(setup: str, model, scheme: dict[str, float], last_k: int, shira_r: int = 32):
    """The model to train under `setup` (packing changes the batches, not the model)."""
    from peft import LoraConfig, get_peft_model

    from pock_hf import PockConfig, get_pock_model
    from pock_hf.tuner.quantize import quantize_frozen_linears

    setup = base_setup(setup)
    if setup in ("full", "forward"):
        return model
    if setup == "last_k":
        model.requires_grad_(False)
        model.model.layers[-last_k:].requires_grad_(True)
        return model
    if setup in ("shira", "supertuning"):
        from peft import ShiraConfig, SupertuningConfig

        adapter = ShiraConfig(r=shira_r, target_modules="all-linear") if setup == "shira" else SupertuningConfig()
        return get_peft_model(model, adapter)
    if setup in ("lora", "lora_gc", "qlora"):
        if setup == "qlora":
            # the same bitsandbytes NF4 quantization Pock uses, so the two quantized rows compare like with like
            quantize_frozen_linears(model.model.layers.requires_grad_(False), "nf4")
        lora = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
        )
        if setup == "lora_gc":
            lora.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return lora
    config = PockConfig(
        scheme=scheme,
        label_only_loss=setup != "pock_sparse",
        quantize_frozen="nf4" if setup == "pock_nf4" else None,
    )
    return get_pock_model(model, config)


def batches(tokenizer, data: Path, batch: int, max_length: int, count: int, packed: bool = False) -> list[dict]:
    """`count` batches of instruction rows (prompt masked), each padded to exactly `max_length` tokens, or with
    `packed` the same rows end to end without padding."""
    from pock_hf.data import InstructionCollator, load_instruction_rows, tokenize_rows

    rows = load_instruction_rows(data)[: batch * count * 4]
    examples, _ = tokenize_rows(rows, tokenizer, max_length=max_length)
    if len(examples) < batch * count:
        raise SystemExit(f"{data} gives {len(examples)} usable rows; {batch * count} are needed.")
    collate = InstructionCollator(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=max_length, packed=packed)
    return [collate(examples[i * batch : (i + 1) * batch]) for i in range(count)]


def random_model_and_batches(args, device: torch.device):
    """A model of the named architecture with random weights, built on `device` in `--dtype` (nothing downloaded),
    and batches of random tokens whose first `PROMPT_SHARE` of each row carries no label."""
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM

    architectures = yaml.safe_load(ARCHITECTURES.read_text())
    if args.architecture not in architectures:
        raise SystemExit(f"unknown --architecture {args.architecture!r}; {ARCHITECTURES} has {sorted(architectures)}")
    config = LlamaConfig(**architectures[args.architecture])
    with torch.device(device):
        model = LlamaForCausalLM(config).to(weights_dtype(args, device))
    generator = torch.Generator().manual_seed(0)
    data = []
    for _ in range(args.warmup + args.steps):
        input_ids = torch.randint(0, config.vocab_size, (args.batch, args.max_length), generator=generator)
        labels = input_ids.clone()
        labels[:, : int(PROMPT_SHARE * args.max_length)] = -100
        data.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels})
    return model, data


def model_and_batches(args, device: torch.device):
    """The model (on `device`) and the batches: random ones for `--architecture`, else a checkpoint and real data."""
    from pock_hf.data.default_model import load_model_and_tokenizer

    if args.architecture:
        model, data = random_model_and_batches(args, device)
    else:
        model, tokenizer = load_model_and_tokenizer(args.model, dtype=weights_dtype(args, device))
        steps = args.warmup + args.steps
        data = batches(tokenizer, args.data, args.batch, args.max_length, steps, packed=args.setup.endswith(PACKED))
        model = model.to(device)
    return model, [{key: value.to(device) for key, value in batch.items()} for batch in data]


def run_one(args) -> dict:
    """Time one setup in this process; returns its row."""
    from pock_hf import PrefixCache
    from pock_hf.data import model_inputs, real_token_count
    from pock_hf.engine.compile import compile_decoder_layers
    from pock_hf.engine.memory import peak_memory_mb
    from pock_hf.engine.training import make_optimizer, training_step

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, data = model_and_batches(args, device)
    scheme = load_scheme(args, model.config.num_hidden_layers)
    model = build(args.setup, model, scheme, args.last_k, args.shira_r)
    model.train()
    if args.setup == "pock_compiled":  # the warm-up steps absorb the compilation
        compile_decoder_layers(model)
    cast = autocast_dtype(args, device)

    def context() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad() if args.setup == "forward" else torch.enable_grad())
        if cast is not None:
            stack.enter_context(torch.autocast(device.type, dtype=cast))
        return stack

    if args.setup == "forward":
        step = lambda batch: model(**model_inputs(batch), use_cache=False)
    else:
        optimizer = make_optimizer(model, lr=1e-5, in_backward=args.setup == "pock_in_backward")
        step = lambda batch: training_step(model, [batch], optimizer)
    if args.setup == "pock_cached":
        cache = PrefixCache(max_mb=4096).attach(model)
        with context():
            for batch in data:  # the first epoch fills the cache; the timed steps below are a later epoch
                step(batch)
    times = []
    with context():
        for index, batch in enumerate(data):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step(batch)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if index >= args.warmup:
                times.append(time.perf_counter() - start)
    if args.profile:
        write_profile(step, data[-1], context, args.output / f"profile_{args.setup}.txt")
    if args.setup == "pock_cached":
        assert cache.stats.hit_batches >= len(data), cache.stats  # the timed steps really were served from the cache
    seconds = statistics.median(times)
    return {
        "setup": args.setup,
        "what": SETUPS[args.setup],
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "autocast": str(cast).removeprefix("torch.") if cast is not None else None,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "step_s": seconds,
        # real (non-padding) tokens: padded and packed batches of the same rows compare fairly
        "tokens_per_s": statistics.mean(real_token_count(batch) for batch in data) / seconds,
        "peak_memory_mb": peak_memory_mb(device),
        "cut_layer": getattr(model, "cut_layer", None) if args.setup.startswith("pock") else None,
    }


def write_profile(step, batch: dict, context, path: Path) -> None:
    """One more step under `torch.profiler`: the operators by total CPU time, as a text table at `path`."""
    from torch.profiler import ProfilerActivity, profile

    from pock_hf.io.files import atomic_write_text

    with context(), profile(activities=[ProfilerActivity.CPU]) as profiler:
        step(batch)
    atomic_write_text(path, profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


def ratio(value: float, reference: dict | None, key: str, inverse: bool = False) -> str:
    if reference is None:
        return "–"
    return f"{(reference[key] / value if inverse else value / reference[key]):.2f}"


def table(results: list[dict], device_capability: str = "") -> str:
    """Markdown: one row per setup, with its step time as a multiple of the forward pass (same dtype), speed-ups
    (step time) against full fine-tuning and LoRA, and memory against LoRA; headed by the device's capability."""
    by = {r["setup"]: r for r in results}
    full, lora, forward = by.get("full"), by.get("lora"), by.get("forward")
    lines = [f"Device: {device_capability}", ""] if device_capability else []
    lines += [
        (
            "| setup | dtype | trainable | step (s) | tokens/s (real) | peak memory (MB) | step / forward | "
            "speed-up vs full | vs LoRA | memory vs LoRA |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        trainable = f"{r['trainable_params'] / 1e6:.2f}M" if r["setup"] != "forward" else "–"
        dtype = r.get("dtype", "") + (f" + {r['autocast']} autocast" if r.get("autocast") else "")
        lines.append(
            f"| {r['what']} | {dtype} | {trainable} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['peak_memory_mb']:.0f} | {ratio(r['step_s'], forward, 'step_s')}x | "
            f"{ratio(r['step_s'], full, 'step_s', inverse=True)}x | {ratio(r['step_s'], lora, 'step_s', inverse=True)}x"
            f" | {ratio(r['peak_memory_mb'], lora, 'peak_memory_mb')} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path, title: str) -> None:
    """Bar chart: step time and peak memory per setup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pock_hf.io.files import save_figure

    names = [r["setup"] for r in results]
    figure, (time_axes, memory_axes) = plt.subplots(1, 2, figsize=(11, 0.45 * len(results) + 1.5), sharey=True)
    colours = ["tab:green" if n.startswith("pock") else "tab:grey" for n in names]
    time_axes.barh(names, [r["step_s"] for r in results], color=colours)
    memory_axes.barh(names, [r["peak_memory_mb"] for r in results], color=colours)
    time_axes.set(xlabel="step time (s, median)", title=title)
    memory_axes.set(xlabel="peak memory (MB)")
    time_axes.invert_yaxis()
    for axes in (time_axes, memory_axes):
        axes.grid(axis="x", alpha=0.3)
    save_figure(figure, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or local path; default: embedded SmolLM2-135M-Instruct")
    parser.add_argument("--data", type=Path, default=ALPACA, help="instruction rows (Alpaca / chat JSON or JSONL)")
    parser.add_argument("--scheme", type=Path, help="Pock scheme JSON (e.g. from `pock plan`)")
    parser.add_argument("--last-k", type=int, default=4, help="layers of the default scheme and of the last_k row")
    parser.add_argument("--ratio", type=float, default=0.25, help="channel ratio of the default scheme")
    parser.add_argument("--shira-r", type=int, default=32, help="SHiRA's rank (its trainable values: r x (in + out))")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default="auto",
        help="auto: every method at its best precision on the device (see weights_dtype)",
    )
    parser.add_argument(
        "--architecture", help=f"random weights of this architecture (a key of {ARCHITECTURES.name}) and random tokens"
    )
    parser.add_argument("--setups", default=DEFAULT_SETUPS, help=f"comma-separated, from {list(SETUPS)}")
    parser.add_argument("--output", type=Path, default=Path("runs/speed"))
    parser.add_argument("--profile", action="store_true", help="also write profile_<setup>.txt (operator times)")
    parser.add_argument("--setup", help=argparse.SUPPRESS)  # internal: run one setup in this process
    args = parser.parse_args(argv)
    unknown = [s for s in args.setups.split(",") if s not in SETUPS]
    if unknown:
        parser.error(f"unknown setup(s) {unknown}; choose from {list(SETUPS)}")
    return args


def run_setups(script: str | Path, argv: list[str], setups: list[str]) -> list[dict]:
    """Run `python script *argv --setup S` for each setup, each in its own process (so each peak memory is its own),
    and return the JSON rows they print last, in order. Raises SystemExit with the stderr tail if one fails."""
    from tqdm.auto import tqdm

    results = []
    for setup in tqdm(setups, desc="setups", unit="setup"):
        done = subprocess.run(
            [sys.executable, str(script), *argv, "--setup", setup], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise SystemExit(f"setup {setup} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        tqdm.write(f"{setup}: {results[-1]['step_s']:.2f} s/step, {results[-1]['peak_memory_mb']:.0f} MB")
    return results


def write_results(args: argparse.Namespace, stem: str, results: list[dict], markdown: str, **settings) -> None:
    """`<stem>.json` (the arguments, `settings` and the rows) and `<stem>.md` (the table) in `args.output`."""
    from pock_hf.io.files import atomic_write_text

    arguments = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    report = {"settings": {**arguments, **settings}, "results": results}
    atomic_write_text(args.output / f"{stem}.json", json.dumps(report, indent=2))
    atomic_write_text(args.output / f"{stem}.md", markdown + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.setup:
        print(json.dumps(run_one(args)))
        return []
    argv = sys.argv[1:] if argv is None else argv
    results = run_setups(__file__, argv, args.setups.split(","))
    device_capability = capability(torch.device(args.device))
    markdown = table(results, device_capability)
    write_results(args, "speed", results, markdown, device_capability=device_capability)
    plot(results, args.output / "speed.png", f"batch {args.batch} x {args.max_length}, {args.device}")
    print(markdown)
    return results


if __name__ == "__main__":
    main()
