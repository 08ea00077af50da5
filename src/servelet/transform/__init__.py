"""SageMaker batch transform's record layer: which objects a job reads (`inputs`), the records and request bodies in
each (`records`), where and how the answers are written (`outputs`), and the checks on the job's settings
(`choices`). Pure and streaming, so the job runner only moves bytes between them and the model."""
