"""The Ray Train loop: an open_clip student, DDP, AdamW + warmup/cosine, teacher outputs from a source.

Student and loss heads live in one `DistillModule` so DDP synchronises the projection heads with
the student. Checkpoints go through `ray.train.report`; rerunning the same run name resumes.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from teacher_service.preprocess import PreprocessSpec, preprocess_spec, to_model_input

from .checkpoint import MODEL_FILE, save_student
from .config import TrainConfig
from .data import Batch, resolve_shards, steps_per_epoch, train_batches
from .factory import create_student, create_tokenizer, embed_dim
from .losses import LossSet, build_losses
from .masking import encode_image_masked
from .scheduler import set_lr, warmup_cosine
from .teacher_client import make_teacher_source

TRAIN_STATE_FILE = "train_state.pt"
_MAX_LOGIT_SCALE = math.log(100.0)


class DistillModule(torch.nn.Module):
    """Student + loss heads: forward(batch tensors, teacher outputs) -> {"<name>_loss": tensor}."""

    def __init__(self, student: torch.nn.Module, losses: LossSet, spec: PreprocessSpec) -> None:
        super().__init__()
        self.student = student
        self.losses = losses
        self.spec = spec

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor,
                teacher: Optional[dict]) -> dict:
        pixels = to_model_input(images, self.spec, device=images.device)
        student = {
            "image_features": self.student.encode_image(pixels, normalize=True),
            "text_features": self.student.encode_text(tokens, normalize=True),
            "logit_scale": self.student.logit_scale.exp(),
            "labels": labels,
        }
        if getattr(self.student, "logit_bias", None) is not None:
            student["logit_bias"] = self.student.logit_bias
        if self.losses.mask_ratio:
            student["masked_image_features"] = encode_image_masked(
                self.student, pixels, self.losses.mask_ratio)
        return self.losses(student, teacher or {})


def teacher_tensors(outputs: Optional[dict], device: torch.device) -> Optional[dict]:
    """fp16 numpy teacher outputs → float32 tensors (copied: Ray results are read-only)."""
    if outputs is None:
        return None
    result = {}
    for key in ("image_features", "text_features"):
        if outputs.get(key) is not None:
            result[key] = torch.tensor(outputs[key], dtype=torch.float32, device=device)
    result["logit_scale"] = torch.tensor(float(outputs["logit_scale"]), device=device)
    if outputs.get("logit_bias") is not None:
        result["logit_bias"] = torch.tensor(float(outputs["logit_bias"]), device=device)
    return result


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's rule: no weight decay on gains, biases, embeddings and the logit scale."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name \
            or "embedding" in name or "token" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _restore(module: DistillModule, optimizer: torch.optim.Optimizer,
             fingerprint: str) -> tuple[int, int]:
    """Load the latest Ray Train checkpoint, if any: (next epoch, global step).

    A run resumed against another teacher would silently mix two teachers' targets: refused.
    """
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, 0
    with checkpoint.as_directory() as d:
        module.student.load_state_dict(torch.load(Path(d) / MODEL_FILE, map_location="cpu",
                                                  weights_only=True))
        state = torch.load(Path(d) / TRAIN_STATE_FILE, map_location="cpu", weights_only=False)
    saved = state.get("teacher_fingerprint", "")
    if saved != fingerprint:
        raise ValueError(
            f"cannot resume: the checkpoint was trained with teacher fingerprint {saved or 'none'!r}, "
            f"the current teacher is {fingerprint or 'none'!r}. Use a new run name or the same teacher.")
    module.losses.load_state_dict(state["losses"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]) + 1, int(state["step"])


def _report(metrics: dict, module: DistillModule, optimizer, cfg: TrainConfig, epoch: int,
            step: int) -> None:
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        save_student(module.student, cfg.model, d)
        torch.save({"losses": module.losses.state_dict(), "optimizer": optimizer.state_dict(),
                    "epoch": epoch, "step": step,
                    "teacher_fingerprint": metrics["teacher_fingerprint"]}, Path(d) / TRAIN_STATE_FILE)
        (Path(d) / "metrics.json").write_text(json.dumps(metrics, indent=2))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _as_tensors(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(batch.images).to(device),
            torch.from_numpy(batch.tokens).to(device),
            torch.from_numpy(batch.labels).to(device))


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()

    student = create_student(cfg.model, device)
    tokenizer = create_tokenizer(student, cfg.model)
    source = make_teacher_source(cfg.teacher, run=cfg.run_name, device=str(device))
    losses = build_losses(cfg.losses, student_dim=embed_dim(student),
                          teacher_dim=source.embed_dim or embed_dim(student), options=cfg.loss_options)
    if losses.needs_teacher and cfg.teacher.mode == "none":
        raise ValueError(f"losses {sorted(cfg.losses)} need a teacher but teacher.mode is 'none'")
    module = DistillModule(student, losses, preprocess_spec(student)).to(device)
    optimizer = torch.optim.AdamW(param_groups(module, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    start_epoch, step = _restore(module, optimizer, source.info.get("fingerprint", ""))
    ddp = ray.train.torch.prepare_model(module)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    shards = resolve_shards(cfg.data.train_shards)
    steps = steps_per_epoch(shards, world_size=world, batch_size=cfg.data.batch_size)
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    total_steps = steps * cfg.epochs
    run_start = time.perf_counter()
    samples_done = 0

    for epoch in range(start_epoch, cfg.epochs):
        batches = train_batches(shards, rank=rank, world_size=world, batch_size=cfg.data.batch_size,
                                image_size=cfg.data.image_size, epoch=epoch, seed=cfg.seed,
                                tokenizer=tokenizer, shuffle_buffer=cfg.data.shuffle_buffer)
        batches = (b for i, b in zip(range(steps), batches))
        sums: dict[str, float] = {}
        epoch_start = time.perf_counter()
        ddp.train()
        for i, (batch, teacher_out) in enumerate(source.stream(batches)):
            set_lr(optimizer, warmup_cosine(step, base_lr=cfg.optim.lr,
                                            warmup_steps=cfg.optim.warmup_steps, total_steps=total_steps))
            images, tokens, labels = _as_tensors(batch, device)
            with torch.autocast(device.type, enabled=use_amp):
                parts = ddp(images, tokens, labels, teacher_tensors(teacher_out, device))
                loss = sum(v for k, v in parts.items() if k.endswith("_loss"))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {epoch} step {i}: "
                                         f"{ {k: float(v) for k, v in parts.items()} }")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.optim.grad_clip_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(ddp.parameters(), cfg.optim.grad_clip_norm)
            scaler.step(optimizer)
            scaler.update()
            with torch.no_grad():
                module.student.logit_scale.clamp_(0, _MAX_LOGIT_SCALE)
            step += 1
            samples_done += len(batch.keys) * world
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            if rank == 0 and cfg.log_every_steps and step % cfg.log_every_steps == 0:
                print(f"[{cfg.run_name}] epoch {epoch + 1}/{cfg.epochs} step {i + 1}/{steps} "
                      f"loss {float(loss):.4f}", flush=True)
        epoch_time = time.perf_counter() - epoch_start
        metrics = {k: v / max(1, steps) for k, v in sums.items()}
        metrics.update(source.stats.as_metrics())
        metrics.update({
            "epoch": epoch + 1, "step": step, "epoch_time_s": round(epoch_time, 3),
            "train_samples_per_s": round(steps * cfg.data.batch_size * world / max(epoch_time, 1e-9), 3),
            "run_samples_per_s": round(samples_done / max(time.perf_counter() - run_start, 1e-9), 3),
            "world_size": world, "teacher_mode": cfg.teacher.mode,
            "teacher_fingerprint": source.info.get("fingerprint", ""),
            "peak_rss_mb": round(_peak_rss_mb(), 1),
        })
        if device.type == "cuda":
            metrics["peak_gpu_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        _report(metrics, module, optimizer, cfg, epoch, step)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build_trainer(cfg: TrainConfig):
    """A TorchTrainer for `cfg`; the same run name + storage path resumes (Train V2 semantics)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg.validate()
    storage = os.path.abspath(cfg.storage_path)
    Path(storage).mkdir(parents=True, exist_ok=True)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=cfg.run_name, storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=0)),
    )


def run_training(cfg: TrainConfig):
    """Train (or resume) and return the Ray Train `Result` (metrics from the last epoch)."""
    result = build_trainer(cfg).fit()
    if result.error:
        raise result.error
    return result
