"""Errors the engine raises before or while serving a request; each maps to one HTTP status."""

# What to run when the llama.cpp build does not fit this CPU (it crashes, or cannot decode): the Makefile's switch.
REBUILD_WITHOUT_AMX = "SERVELET_LLAMA_CPP_AMX=off make install"


class EngineError(Exception):
    """Base class: the message is written for the user who sent the request."""

    status_code = 500


class InvalidRequest(EngineError):
    """The request cannot be served as asked (empty prompt, bad parameter)."""

    status_code = 422


class ContextOverflow(InvalidRequest):
    """Prompt tokens plus max_new_tokens do not fit in the context length."""


class Overloaded(EngineError):
    """The bounded waiting queue is full: the client should retry later."""

    status_code = 429


class EngineStopped(EngineError):
    """The engine is shutting down or its decode loop failed."""

    status_code = 503


class InvalidConfig(EngineError):
    """The engine's settings do not fit the model (refused at start)."""
