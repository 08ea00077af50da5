"""The instance: one worker process speaking the SageMaker hosting contract."""
