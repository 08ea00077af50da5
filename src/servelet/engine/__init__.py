"""Continuous-batching LLM engine over llama.cpp's C API.

Names are imported on first use, so that `servelet.engine.params` (the request parameters the gateway
validates too) can be imported without loading llama.cpp into a process that never runs a model.
"""

from importlib import import_module

_WHERE = {
    "Engine": "engine",
    "EngineConfig": "engine",
    "Generation": "generation",
    "ContextOverflow": "errors",
    "EngineError": "errors",
    "EngineStopped": "errors",
    "InvalidConfig": "errors",
    "InvalidRequest": "errors",
    "Overloaded": "errors",
    "GenerationParams": "params",
    "Finished": "sequence",
    "FinishReason": "sequence",
    "GenerationStats": "sequence",
    "Token": "sequence",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
