"""Continuous-batching LLM engine over llama.cpp's C API."""

from .engine import Engine, EngineConfig, Generation
from .errors import ContextOverflow, EngineError, EngineStopped, InvalidConfig, InvalidRequest, Overloaded
from .params import GenerationParams
from .sequence import Finished, FinishReason, GenerationStats, Token

__all__ = [
    "ContextOverflow",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineStopped",
    "Finished",
    "FinishReason",
    "Generation",
    "GenerationParams",
    "GenerationStats",
    "InvalidConfig",
    "InvalidRequest",
    "Overloaded",
    "Token",
]
