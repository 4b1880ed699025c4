"""The checks to run on a machine with an NVIDIA GPU, which no CPU test reaches (after `make demo`):

    OUT=gpu_out llama_caption/tools/gpu/check.sh          # decoders, training, captions, 7B benches
    CKPT=demo_runs/full/runs/001/scst llama_caption/tools/gpu/serve_check.sh   # caption server

`decoders` (fixed-shape decoders against generate on CUDA), `graph7b` (the CUDA-graph decoder at
LLaMA-7B's shape) and `compare` (captions of several results files) are the pieces they run.
Figures from an H200 are in docs/performance.md.
"""
