"""LoRA on the shared base: which adapter sits in which device slot (manager.py), an adapter package
decoded for a slot (weights.py), the per-step token -> slot mapping (mapping.py), the wrapped base
linears (layers.py), and the batched multi-adapter kernels (kernels/). Why an adapter cannot be
served: errors.py."""
