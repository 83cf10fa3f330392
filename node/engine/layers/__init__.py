"""The model's building blocks other than LoRA: paged attention (attention.py: the KV cache, fp8 or not, and
the torch path; triton_attention.py, the decode kernel of the CUDA path), the fused Triton norm / rotary / SiLU
ops of the CUDA path (fused.py), the sampler (sampler.py), and what the Triton modules share
(triton_util.py). Importing this package imports no Triton."""
