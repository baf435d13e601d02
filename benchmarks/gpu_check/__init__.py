"""The GPU check (issue 31): the project's GPU path measured and checked in one short run on one
GPU, prepared so that the day a GPU machine is lent it costs one call of a few minutes.

Sections (`config.SECTIONS`), each its own process under its own timeout in `gpu_check.sh`:
- `machine`: GPU model, driver, CUDA, torch, Ray and open_clip versions;
- `losses`: every registry loss on the GPU equal to CPU fp32 (values and gradients; fp32 tight,
  autocast fp16/bf16 loose);
- `gather`: `student_trainer.distributed`'s collectives on 2 NCCL ranks equal to gloo and to the
  one-process values (skipped with fewer than 2 GPUs);
- `teacher`: the direct and the served forward at each batch size and precision, served/direct;
- `students`: one AMP student per teacher mode beside the pool on the same card.

`--dry-run` runs the same code on CPU at tiny sizes (tests/test_gpu_check.py runs it).
"""
