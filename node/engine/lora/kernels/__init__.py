"""The batched multi-adapter LoRA kernels: the interface and its layouts (base.py), the torch
reference (torch_ref.py), and the Triton kernels of the CUDA path (triton.py plans and launches,
triton_jit.py holds the jit kernels). Importing this package imports no Triton."""
