"""Student data: per-rank training and evaluation batches (`batches`) and writing shards (`write_shards`;
IDX files through it in `idx`; zero-shot templates in `templates`).

Reading a shard's samples is the one shard reader's job (`teacher_service.shards`).
"""
from student_trainer.data.batches import Batch, eval_set, steps_per_epoch, train_batches

__all__ = ["Batch", "eval_set", "steps_per_epoch", "train_batches"]
