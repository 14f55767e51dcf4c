"""The language model of examples/language_model.py: time and memory of a step, side by side.

    python benchmarks/language_model.py [--d-model 128] [--layers 2] [--seq-len 128]
                                        [--batch 8] [--lora-rank 8] [--repeats 15]
                                        [--memory-only]

One micro-batch per step (no accumulation), the example's ``train_step``
(``nnx.jit``, model and optimizer donated) for AdamW, SAM, MSAM, LookSAM
(every 5) on the whole model, and for LoRA fine-tuning with AdamW and with
SAM on the adapters (``wrt=nnx.LoRAParam``). Time: a timed unit is 5
consecutive steps (LookSAM's period), units interleaved across the steps,
medians per step, as ratios (the absolute times are this machine's). Memory:
XLA's ``memory_analysis().temp_size_in_bytes`` of the compiled step
(deterministic for a jaxlib; nothing is run), against AdamW's, in units of
the params' bytes P, and SAM-LoRA's above LoRA's in units of the adapters'
bytes A, of P and per token. ``--memory-only`` skips the timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from pathlib import Path

import jax
import numpy as np

from _common import interleaved_medians

_PATH = Path(__file__).resolve().parent.parent / "examples" / "language_model.py"
_SPEC = importlib.util.spec_from_file_location("lm_example", _PATH)
lm = importlib.util.module_from_spec(_SPEC)
sys.modules["lm_example"] = lm
_SPEC.loader.exec_module(lm)

UNIT = 5  # steps per timed unit: LookSAM's period
STEPS = {
    "AdamW": {"method": "adamw"},
    "SAM": {"method": "sam"},
    "MSAM": {"method": "msam"},
    "LookSAM (every 5)": {"method": "looksam", "looksam_every": UNIT},
    "LoRA (AdamW)": {"method": "adamw", "lora": True},
    "SAM-LoRA": {"method": "sam", "lora": True},
}


def build_steps(config, lora_rank: int, batch):
    """Each step's model, optimizer, memory figures and a timed unit of ``UNIT`` steps."""
    pretrained = lm.Transformer(config, rngs=lm.nnx.Rngs(0))
    out = {}
    for name, spec in STEPS.items():
        run = dataclasses.replace(
            config,
            method=spec["method"],
            looksam_every=spec.get("looksam_every", config.looksam_every),
            lora_rank=lora_rank if spec.get("lora") else 0,
        )
        model, optimizer = lm.build(run, lm.copy_model(pretrained))
        memory = lm.step_memory(model, optimizer, batch)

        def unit(model=model, optimizer=optimizer):
            for _ in range(UNIT):
                loss = lm.train_step(model, optimizer, batch)
            return loss

        out[name] = (memory, unit)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--memory-only", action="store_true", help="XLA's analysis, no timing")
    args = parser.parse_args(argv)
    config = lm.Config(
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        seq_len=args.seq_len,
        micro_batch=args.batch,
        accumulate=1,
    )
    corpus = lm.load_corpus(200_000)
    batch = lm.sample_batch(corpus.train, np.random.default_rng(0), args.batch, args.seq_len)
    steps = build_steps(config, args.lora_rank, batch)
    if args.memory_only:
        times = dict.fromkeys(steps, float("nan"))
    else:
        times = interleaved_medians({n: unit for n, (_, unit) in steps.items()}, args.repeats, 1)
    memory = {n: m for n, (m, _) in steps.items()}
    base_time, base_temp = times["AdamW"], memory["AdamW"]["temp"]
    params = memory["AdamW"]["params"]
    print(
        f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; d_model {args.d_model}, "
        f"{args.layers} layers, {args.heads} heads, batch {args.batch} x {args.seq_len} bytes; "
        f"P = {params / 2**20:.2f} MiB of float32 params; "
        + ("memory only" if args.memory_only else f"{args.repeats} rounds of {UNIT} steps")
    )
    print("| step | time / AdamW | XLA temp / AdamW | XLA temp / P | trained bytes |")
    print("|---|---:|---:|---:|---:|")
    for name in steps:
        m = memory[name]
        print(
            f"| {name} | {times[name] / base_time:.2f} | {m['temp'] / base_temp:.3f} | "
            f"{m['temp'] / params:.2f} | {m['trained']:,} |"
        )
    lora, sam_lora = memory["LoRA (AdamW)"], memory["SAM-LoRA"]
    extra, adapters = sam_lora["temp"] - lora["temp"], sam_lora["trained"]
    tokens = args.batch * args.seq_len
    print(
        f"SAM-LoRA / LoRA: time {times['SAM-LoRA'] / times['LoRA (AdamW)']:.2f}; XLA temp "
        f"+{extra:,} bytes = {extra / adapters:.2f} A = {extra / sam_lora['params']:.3f} P "
        f"= {extra / tokens:.0f} bytes a token = {extra / tokens / args.d_model:.1f} bytes a "
        f"token per unit of d_model (A = {adapters:,} adapter bytes, P = {sam_lora['params']:,} "
        f"param bytes, {tokens:,} tokens)"
    )


if __name__ == "__main__":
    main()
