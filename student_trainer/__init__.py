"""student_trainer: students trained with Ray Train (DDP) against a teacher source.

`config` (TrainConfig), `data` (batches per rank, shard writing), `teacher` (teacher sources),
`losses`, `train` (the Ray Train loop, `run_training`), `evaluate` (zero-shot and retrieval).
"""
