"""servelet: model serving on one machine, SageMaker-compatible, continuous batching on llama.cpp."""

__version__ = "0.1.0"
