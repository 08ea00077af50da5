"""What a gateway tells an instance beyond the SageMaker hosting contract's headers."""

# On an async job's invocation (its InferenceId): the body may be as large as the instance's async limit
# (SERVELET_MAX_ASYNC_PAYLOAD_BYTES) rather than a real-time call's (SERVELET_MAX_PAYLOAD_BYTES).
ASYNC_INVOCATION_HEADER = "X-Servelet-Async-Invocation"
