"""Dense batch-1 decode tokens/s of the ways one could run a decode step, in one run.

Why kernel mode has its own decoder: this compares the model's own forward (eager, dynamic KV
cache), the same forward with a static KV cache under ``torch.compile`` (transformers' recipe
for fast decoding), and the lean decoder of :mod:`moyu_exp.kernels` with stock PyTorch ops and
with the native kernels. Timed as ``generate``/``step`` over ``--steps`` tokens after a prompt
and burn-in; medians over ``--repeats``.

    python benchmarks/decode_paths.py                 # SmolLM2, fp32
    python benchmarks/decode_paths.py --skip-compile  # without the (minutes long) compilation
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from decode_speed import config


def generate_rate(model, prompt, steps: int, repeats: int, **kwargs) -> float:
    """Decode tokens/s of ``generate``: (time for 1 + steps tokens - time for 1) / steps."""

    def timed(new_tokens: int) -> float:
        start = time.perf_counter()
        model.generate(
            prompt,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            **kwargs,
        )
        return time.perf_counter() - start

    timed(1 + steps)  # burn-in (and, under torch.compile, compilation)
    one = statistics.median(timed(1) for _ in range(repeats))
    full = statistics.median(timed(1 + steps) for _ in range(repeats))
    return steps / (full - one)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from moyu_exp import bench, models
    from moyu_exp.decode import steps, timed_steps
    from moyu_exp.kernels.decoder import LeanDecoder

    loaded = models.load(config(args.model, args.dtype, None, "dense", 0.0).model)
    model = loaded.model
    prompt = bench.prompt_ids(loaded.tokenizer, args.prompt_tokens)
    pad = loaded.tokenizer.eos_token_id
    print(
        f"model {args.model} ({args.dtype}), {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    results = {}
    with torch.inference_mode():
        name = "HF forward, eager, dynamic cache"
        results[name] = generate_rate(model, prompt, args.steps, args.repeats, pad_token_id=pad)
        print(f"{name:<44}{results[name]:>8.1f} tok/s", flush=True)
    for name, backend in (
        ("lean decoder, stock PyTorch ops", "torch"),
        ("lean decoder, native kernels", "native"),
    ):
        os.environ["MOYU_KERNELS"] = backend
        decoder = LeanDecoder(model, None, args.prompt_tokens + 2 * args.steps + 8)
        first = int(decoder.prefill(prompt).argmax())
        steps(decoder, first, 8)  # burn-in

        rates = []
        for _ in range(args.repeats):
            decoder.rewind(args.prompt_tokens)
            rates.append(args.steps / timed_steps(decoder, first, args.steps, loaded.device))
        results[name] = statistics.median(rates)
        print(f"{name:<44}{results[name]:>8.1f} tok/s ({decoder.backend})", flush=True)
    if not args.skip_compile:
        model.forward = torch.compile(model.forward, fullgraph=False, dynamic=False)
        start = time.perf_counter()
        with torch.inference_mode():
            name = "HF forward, static cache, torch.compile"
            results[name] = generate_rate(
                model,
                prompt,
                args.steps,
                args.repeats,
                pad_token_id=pad,
                cache_implementation="static",
            )
        print(
            f"{name:<44}{results[name]:>8.1f} tok/s "
            f"(compile and timing took {time.perf_counter() - start:.0f} s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
