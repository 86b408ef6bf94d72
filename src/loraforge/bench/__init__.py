"""Benchmarks: the stock QLoRA stack (transformers + peft + bitsandbytes) against loraforge, on one GPU.

- `speed`: tokens/s, peak memory and one step's grads of both stacks, per case (`loraforge bench`);
- `max_context`: the longest batch-1 sequence each stack trains, found by search in worker processes
  (`context_worker`), and the memory model's prediction (`loraforge bench --max-context`).

loraforge's side is built as `loraforge train` builds its model (`models.build_loraforge`). This package
sits on top: it may import train/, model/ and kernels/; only cli.py imports it.
"""
