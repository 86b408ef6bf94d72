#!/bin/bash
# Plain torchrun, without Accelerate config files: loraforge's Accelerator reads torchrun's environment.
# Pick one; these are examples, not a script to run top to bottom.
exit 0

# One node, 4 GPUs, DDP (the default for LoRA/QLoRA):
torchrun --standalone --nproc_per_node 4 -m loraforge.cli train configs/demo.yaml

# One node, FSDP full shard (QLoRA of a model too large for one GPU):
torchrun --standalone --nproc_per_node 8 -m loraforge.cli train my-70b.yaml training.distributed_strategy=fsdp

# Two nodes x 8 GPUs: run on EVERY node, same command; node 0's address is the rendezvous endpoint.
torchrun --nnodes 2 --nproc_per_node 8 --rdzv_id myrun --rdzv_backend c10d --rdzv_endpoint 10.0.0.1:29500 \
    -m loraforge.cli train my.yaml

# CPU, 2 processes with gloo (what the CI test does):
torchrun --standalone --nproc_per_node 2 -m loraforge.cli train configs/demo.yaml training.max_steps=4
