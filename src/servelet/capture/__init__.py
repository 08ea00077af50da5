"""Data capture: SageMaker Model Monitor's record of what an endpoint was asked and answered (DataCaptureConfig).

`records` writes one invocation as SageMaker's JSON line, `writer` buffers lines within a bound and writes them to
the object store in the background, `data_capture` decides which invocations are captured.
"""
