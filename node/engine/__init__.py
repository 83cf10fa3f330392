"""The shared-base multi-LoRA engine. A request's path through it, file by file:

async_engine.py   AsyncEngine: the asyncio front; runs the core on its own thread
llm_engine.py     LLMEngine: the synchronous core, one scheduled step at a time
scheduler.py      which sequences run next (continuous batching, round-robin over adapters)
block_manager.py  the paged KV cache's blocks
lora/manager.py   adapter residency: device slots <- host cache <- store <- peers
model_runner.py   a batch -> input tensors -> one forward pass; owns the KV cache and slot buffer
model.py          the Llama-family decoder; layers/ (attention, fused ops, sampler) and lora/
                  (LoRA layers, mapping, weights, kernels) hold its parts
grammar.py        guided decoding: JSON grammars compiled per schema, token masks per row
"""

from node.engine.async_engine import AsyncEngine, RequestStream
from node.engine.config import EngineConfig, ModelConfig, ModelConfigError
from node.engine.llm_engine import LLMEngine
from node.engine.lora.errors import (
    AdapterBaseMismatchError,
    AdapterError,
    AdapterIncompatibleError,
    AdapterNotFoundError,
    AdapterSlotsBusyError,
    AdapterStoreFullError,
)
from node.engine.lora.kernels.base import LoRAKernel
from node.engine.lora.kernels.torch_ref import TorchLoRAKernel
from node.engine.lora.manager import AdapterManager
from node.engine.lora.mapping import LoRAMapping
from node.engine.request import (
    Choice,
    DuplicateRequestError,
    EngineBusyError,
    FinishEvent,
    GenerationRequest,
    PromptLogprobsEvent,
    PromptTooLongError,
    RequestError,
    SamplingParams,
    SequenceFinishEvent,
    TokenEvent,
    TokenLogprob,
)

__all__ = [
    "AdapterBaseMismatchError",
    "AdapterError",
    "AdapterIncompatibleError",
    "AdapterManager",
    "AdapterNotFoundError",
    "AdapterSlotsBusyError",
    "AdapterStoreFullError",
    "DuplicateRequestError",
    "EngineBusyError",
    "AsyncEngine",
    "Choice",
    "EngineConfig",
    "FinishEvent",
    "GenerationRequest",
    "LLMEngine",
    "LoRAKernel",
    "LoRAMapping",
    "ModelConfig",
    "ModelConfigError",
    "PromptLogprobsEvent",
    "PromptTooLongError",
    "RequestError",
    "RequestStream",
    "SamplingParams",
    "SequenceFinishEvent",
    "TokenEvent",
    "TokenLogprob",
    "TorchLoRAKernel",
]
