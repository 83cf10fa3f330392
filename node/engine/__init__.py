"""The shared-base multi-LoRA engine."""

from node.engine.adapter_manager import AdapterManager, AdapterSlotsBusyError
from node.engine.config import EngineConfig, ModelConfig, ModelConfigError
from node.engine.async_engine import AsyncEngine, RequestStream
from node.engine.llm_engine import LLMEngine
from node.engine.lora import LoRAMapping
from node.engine.lora_kernels import LoRAKernel, TorchLoRAKernel
from node.engine.lora_weights import (
    AdapterBaseMismatchError,
    AdapterError,
    AdapterIncompatibleError,
    AdapterNotFoundError,
)
from node.engine.request import (
    DuplicateRequestError,
    FinishEvent,
    GenerationRequest,
    PromptTooLongError,
    RequestError,
    SamplingParams,
    TokenEvent,
)

__all__ = [
    "AdapterBaseMismatchError",
    "AdapterError",
    "AdapterIncompatibleError",
    "AdapterManager",
    "AdapterNotFoundError",
    "AdapterSlotsBusyError",
    "DuplicateRequestError",
    "AsyncEngine",
    "EngineConfig",
    "FinishEvent",
    "GenerationRequest",
    "LLMEngine",
    "LoRAKernel",
    "LoRAMapping",
    "ModelConfig",
    "ModelConfigError",
    "PromptTooLongError",
    "RequestError",
    "RequestStream",
    "SamplingParams",
    "TokenEvent",
    "TorchLoRAKernel",
]
