"""The training loop: μP optimizer, per-step schedule, evaluation, JSONL metrics, exact resume.

What depends on the data (batches, loss, accuracy, evaluation, the data position) belongs to the
config's task (:mod:`.tasks`: image classification or language modelling); the loop is the same
for every task.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one JSON object
per evaluation) and ``checkpoints/last.pt``; with ``train.tensorboard: true`` also ``tensorboard/``,
where every metrics row's numeric values are written as TensorBoard scalars (needs
``pip install 'structlin[tensorboard]'``). Checkpoints carry the model, optimizer, scheduler,
global RNG states, the task's data position and the running training statistics, so that
``resume=True`` continues the same trajectory: on CPU in float32 an interrupted and resumed run
ends with the same metrics as an uninterrupted one.

Distributed data parallel: launch the same command under ``torchrun --nproc-per-node N``. For
image classification each process trains on its shard of every global batch (``data.batch_size``
is the global batch and must divide by N); for language modelling each process draws its own
``data.batch_size`` windows. Gradients are averaged by DDP, and only rank 0 logs, writes metrics
and checkpoints (the checkpoint carries every rank's data position). With
``train.distributed: fsdp`` the model is sharded with FSDP2 instead of replicated, and model and
optimizer are checkpointed through ``torch.distributed.checkpoint`` (:mod:`.distributed`).

Compute is reported as training MACs so far: ``3 x forward MACs per example x examples seen``
(forward plus the two backward products; MACs counted by ``FlopCounterMode`` on one example,
the same convention as ``StructuredLinear.macs``).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from structlin import clear_aux, collect_aux
from structlin.io import atomic_write_text

from .build import build_model, build_optimizer, forward_macs, seed_everything
from .checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from .config import Config, check_compile_mode, config_hash
from .distributed import gathered, load_sharded, save_sharded, shard_model, wrap_ddp
from .monitor import factor_rms_stats
from .schedule import lr_factor
from .tasks import BatchResult, build_task

__all__ = ["CheckpointError", "Trainer", "TrainingDiverged"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class CheckpointError(RuntimeError):
    """A checkpoint to resume from is unreadable (empty, truncated or not a checkpoint)."""


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(
            f"train.device={name!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"train.device={name} but CUDA is not available here (torch {torch.__version__}, "
            f"built {'with' if torch.backends.cuda.is_built() else 'without'} CUDA); use "
            f"train.device=cpu, or auto to pick CUDA when there is one"
        )
    if name == "cuda" and local_rank >= 0:
        return torch.device("cuda", local_rank)
    return device


def _init_distributed() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment; (0, 1, -1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, -1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


class Trainer:
    """Train one :class:`Config` into ``out_dir``.

    Args:
        config: the experiment.
        out_dir: run directory. It must not exist (or be empty) unless ``resume`` or
            ``overwrite`` is set.
        resume: continue from ``out_dir/checkpoints/last.pt``; the config must match the one
            the run was started with (apart from evaluation and logging settings).
        overwrite: start afresh in an existing directory (its metrics are replaced).
        log: where progress lines go (``print`` by default; ``None`` silences them).
    """

    def __init__(
        self,
        config: Config,
        out_dir: str | Path,
        *,
        resume: bool = False,
        overwrite: bool = False,
        log: Callable[[str], None] | None = print,
    ) -> None:
        self.cfg = config
        self.out = Path(out_dir)
        self.ckpt_path = self.out / "checkpoints" / "last.pt"
        self.rank, self.world_size, local_rank = _init_distributed()
        self.is_main = self.rank == 0
        self.log = (log or (lambda _msg: None)) if self.is_main else (lambda _msg: None)
        self.resume = resume
        self._check_run_dir(overwrite)
        # Checked on every rank, so that a missing package fails all processes alike.
        self._summary_writer_cls = _summary_writer_class() if config.train.tensorboard else None
        self._tb = None
        self.device = _resolve_device(config.train.device, local_rank)
        seed_everything(config.train.seed)
        self.task = build_task(config, self.device, self.rank, self.world_size)
        self.model, self.base = build_model(config, self.task.shapes, self.device)
        self.sharded = self.world_size > 1 and config.train.distributed == "fsdp"
        if self.sharded:  # before the optimizer, which must hold the sharded parameters
            shard_model(self.model)
        self.optimizer = build_optimizer(config, self.model, self.base)
        self.total_steps = self._total_steps()
        o = config.optim
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(o.schedule, self.total_steps, o.warmup_steps, o.min_lr_ratio)
        )
        self.forward = self.model
        if self.world_size > 1 and not self.sharded:
            self.forward = wrap_ddp(self.model, self.device)
        if config.train.compile:
            check_compile_mode(config.train, str(self.device))
            self.forward = torch.compile(self.forward, mode=config.train.compile_mode)
        self.macs_per_example = forward_macs(self.model, self.task.example_input())
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.step = 0
        self.samples = 0
        self.wall_time = 0.0  # seconds in the training loop, summed over resumes
        self._running = {"loss": 0.0, "acc": 0.0, "n": 0}
        self._stop_signal: int | None = None
        self._last_aux = None  # the aux losses and stats of the latest step, logged at eval

    # ------------------------------------------------------------------ set-up
    def _check_run_dir(self, overwrite: bool) -> None:
        exists = self.out.exists() and any(self.out.iterdir())
        if self.resume:
            if not self.ckpt_path.is_file():
                raise FileNotFoundError(f"cannot resume: no checkpoint at {self.ckpt_path}")
            saved = self.out / "config.yaml"
            if saved.is_file():
                import yaml

                if not self._same_config(yaml.safe_load(saved.read_text()), str(saved)):
                    raise ValueError(
                        f"cannot resume {self.out}: it was started with a different config "
                        f"(compare {saved}); start a new run directory or pass the same config"
                    )
            return
        if exists and not overwrite:
            raise FileExistsError(
                f"run directory {self.out} already exists and is not empty; pass --resume to "
                f"continue it or --overwrite to start again"
            )
        if exists and overwrite:
            for name in ("metrics.jsonl",):
                (self.out / name).unlink(missing_ok=True)
            self.ckpt_path.unlink(missing_ok=True)
            if self.is_main:
                shutil.rmtree(self.out / "tensorboard", ignore_errors=True)

    def _total_steps(self) -> int:
        t = self.cfg.train
        if t.steps is not None:
            return int(t.steps)
        return max(1, math.ceil(float(t.epochs) * self.task.steps_per_epoch))

    def _autocast(self):
        mode = self.cfg.train.autocast
        if mode == "off" or (mode == "auto" and self.device.type != "cuda"):
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _predict(self, x: torch.Tensor):
        """The model's output for ``x``, under autocast (the tasks' ``forward``)."""
        with self._autocast():
            return self.forward(x)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The task's evaluation on its held-out split, as ``{"test_loss", "test_acc"}`` (the
        metric names the results tables and fits read; the split is the validation split)."""
        self.model.eval()
        try:
            loss, acc = self.task.evaluate(self._predict)
        finally:
            clear_aux(self.model)  # evaluation forwards record aux losses no step will use
            self.model.train()
        return {"test_loss": loss, "test_acc": acc}

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "samples": self.samples,
            "wall_time": self.wall_time,
            "running": dict(self._running),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng(),
            "config": self.cfg.to_dict(),
            "config_hash": config_hash(self.cfg),
        }
        state["data"] = self._gather(self.task.state_dict())  # one entry per rank
        if not self.sharded:  # sharded runs save these with save_sharded (every rank)
            state["model"] = self.model.state_dict()
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def _gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def _all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        if self.world_size == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.tolist()

    def save(self) -> Path:
        """Write the checkpoint (collective under DDP: every rank must call it)."""
        if self.sharded:
            save_sharded(self.ckpt_path.parent / "dcp", self.model, self.optimizer)
        state = self._state()
        if self.is_main:
            save_checkpoint(self.ckpt_path, state)
        return self.ckpt_path

    def _same_config(self, saved: Any, source: str) -> bool:
        """Whether a stored config (a dict) is this run's config. It is read with today's fields
        and defaults, so a config written before a field was added still matches; one with a
        field this version no longer has gets a clear error."""
        try:
            return config_hash(Config.from_dict(saved)) == config_hash(self.cfg)
        except ValueError as e:
            raise ValueError(
                f"cannot resume {self.out}: the config in {source} does not read in this "
                f"version of structlin ({e}); start a new run directory"
            ) from e

    def _check_checkpoint_config(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint of another config; only a checkpoint without a stored config
        falls back to the hash it stored."""
        saved = state.get("config")
        same = (
            self._same_config(saved, str(self.ckpt_path))
            if isinstance(saved, dict)
            else state.get("config_hash") == config_hash(self.cfg)
        )
        if not same:
            raise ValueError(
                f"cannot resume {self.out}: the checkpoint was written with a different config"
            )

    def _load(self) -> None:
        # Load on CPU: RNG states must stay CPU ByteTensors, and load_state_dict moves the
        # model's and optimizer's tensors to their parameters' device anyway.
        try:
            state = load_checkpoint(self.ckpt_path, map_location="cpu")
        except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError) as e:
            raise CheckpointError(
                f"cannot resume {self.out}: checkpoint {self.ckpt_path} is unreadable "
                f"({' '.join(str(e).split()) or type(e).__name__}; empty, truncated or not "
                f"written by structlin); restore it from a copy, or pass --overwrite to start again"
            ) from e
        if not isinstance(state, dict) or "step" not in state:
            raise CheckpointError(
                f"cannot resume {self.out}: {self.ckpt_path} is not a structlin training "
                f"checkpoint; pass --overwrite to start again"
            )
        self._check_checkpoint_config(state)
        if self.sharded:
            load_sharded(self.ckpt_path.parent / "dcp", self.model, self.optimizer)
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"])
        if len(state["data"]) != self.world_size:
            raise ValueError(
                f"cannot resume {self.out}: it was written by {len(state['data'])} process(es), "
                f"this run has {self.world_size}"
            )
        self.task.load_state_dict(state["data"][self.rank])
        self.step = state["step"]
        self.samples = state["samples"]
        self.wall_time = float(state.get("wall_time", 0.0))
        self._running = dict(state["running"])

    # ------------------------------------------------------------------ loop
    def _write_metrics(self, row: dict[str, Any]) -> None:
        if not self.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
        if self._tb is not None:
            for key, value in row.items():
                # the step is the x axis; strings (status) and booleans are not scalars
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, global_step=row["step"])
            self._tb.flush()

    def _on_signal(self, signum, _frame) -> None:
        self._stop_signal = signum

    def fit(self) -> dict[str, Any]:
        """Train to ``total_steps``; returns the last metrics row (with ``status``)."""
        created = self._new_paths()
        try:
            return self._fit()
        except BaseException:
            if self.step == 0 and self.is_main:
                _remove(created)
            raise

    def _new_paths(self) -> list[Path]:
        """What :meth:`fit` may create that does not exist yet: removed again if the run fails
        before its first step, so that a rerun does not find a half-made run directory."""
        if self.resume:
            return []
        if not self.out.exists():
            return [self.out]
        names = ("config.yaml", "metrics.jsonl", "tensorboard", "checkpoints")
        return [self.out / n for n in names if not (self.out / n).exists()]

    def _fit(self) -> dict[str, Any]:
        import yaml

        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        if self.resume:
            self._load()
            self.log(f"resumed {self.out} at step {self.step}/{self.total_steps}")
        elif self.is_main:
            text = yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
            atomic_write_text(self.out / "config.yaml", text)
        if self._summary_writer_cls is not None and self.is_main:
            self._tb = self._summary_writer_cls(log_dir=str(self.out / "tensorboard"))
        handlers = {}
        if _main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            return self._loop()
        finally:
            for sig, old in handlers.items():
                signal.signal(sig, old)
            if self._tb is not None:
                self._tb.close()
                self._tb = None

    def _loop(self) -> dict[str, Any]:
        t = self.cfg.train
        batches = self.task.train_batches()
        bar = _progress(self.total_steps, self.step, enabled=t.progress and self.is_main)
        last: dict[str, Any] = {"status": "finished", "step": self.step}
        t_start, samples_start = time.perf_counter(), self.samples
        wall_start = self.wall_time
        keep = t.ckpt_every > 0  # 0: no checkpoints (sweeps that never resume)
        self.model.train()
        while self.step < self.total_steps:
            result = self._train_step(next(batches))
            self.wall_time = wall_start + time.perf_counter() - t_start
            self._tally(result)
            if bar is not None:
                bar.update(1)
            done = self.step == self.total_steps
            if self.step % t.eval_every == 0 or done:
                elapsed = time.perf_counter() - t_start
                last = self._eval_row((self.samples - samples_start) / max(elapsed, 1e-9))
                self._report(last, bar)
            if keep and (self.step % t.ckpt_every == 0 or done):
                self.save()
            if self._stop_signal is not None:
                last = self._interrupted(last, keep)
                break
        if bar is not None:
            bar.close()
        return last

    def _train_step(self, batch: Any) -> BatchResult:
        """Forward, backward and one optimizer and scheduler step on ``batch``."""
        result = self.task.loss_and_accuracy(self._predict, batch)
        # Auxiliary losses any module recorded in this forward (e.g. a mixture's load balancing).
        aux = collect_aux(self.model)
        loss = result.loss if aux.loss is None else result.loss + aux.loss
        self._check_finite(loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.clip)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self._last_aux = aux
        return result

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Raise :class:`TrainingDiverged` on a NaN or infinite loss. Under DDP the ranks
        decide together (and share a stop signal), or a lone rank would hang the others."""
        finite = bool(torch.isfinite(loss))
        if self.world_size > 1:
            flags = [float(not finite), float(self._stop_signal is not None)]
            bad, stop = self._all_reduce(flags, "max")
            finite = bad == 0.0
            if stop and self._stop_signal is None:
                self._stop_signal = signal.SIGTERM
        if not finite:
            raise TrainingDiverged(
                f"loss became {loss.item()} at step {self.step + 1}; stopping. The last "
                f"good checkpoint (if any) is {self.ckpt_path}. Lower optim.lr, enable "
                f"optim.clip, or try norm='rms_clamp' for structured layers."
            )

    def _tally(self, result: BatchResult) -> None:
        """Add a batch to the examples seen and to the running training loss and accuracy."""
        n = result.examples
        self.samples += n * self.world_size
        self._running["loss"] += result.loss.item() * n
        self._running["acc"] += result.accuracy * n
        self._running["n"] += n

    def _report(self, row: dict[str, Any], bar) -> None:
        self._write_metrics(row)
        if bar is not None:
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", test=f"{row['test_acc']:.3f}")
        else:
            self.log(_fmt(row))

    def _interrupted(self, last: dict[str, Any], keep: bool) -> dict[str, Any]:
        """Save (if checkpoints are on) after a SIGINT/SIGTERM; the row to return."""
        if keep:
            self.save()
            saved = f"saved {self.ckpt_path}"
        else:
            saved = "no checkpoint (train.ckpt_every=0)"
        self.log(f"signal {self._stop_signal}: {saved} at step {self.step}")
        return {**last, "status": "interrupted", "step": self.step}

    def _eval_row(self, samples_per_s: float) -> dict[str, Any]:
        loss_sum, acc_sum, count = self._all_reduce(
            [self._running["loss"], self._running["acc"], float(self._running["n"])]
        )
        r = {"loss": loss_sum, "acc": acc_sum, "n": count}
        with gathered(self.model) if self.sharded else nullcontext():  # factors are sharded
            rms = factor_rms_stats(self.model)
        row = {
            "step": self.step,
            "epoch": self.step / max(1, self.task.steps_per_epoch),
            "lr": self.cfg.optim.lr * self.scheduler.lr_lambdas[0](self.step - 1),
            "train_loss": r["loss"] / max(1, r["n"]),
            "train_acc": r["acc"] / max(1, r["n"]),
            **self.evaluate(),
            "samples_per_s": samples_per_s,
            "samples": self.samples,
            "wall_time_s": self.wall_time,
            "forward_macs_per_example": self.macs_per_example,
            "params": self.num_params,
            "train_macs": 3 * self.macs_per_example * self.samples,
            **rms,
            **(self._last_aux.metrics() if self._last_aux is not None else {}),
            "status": "running" if self.step < self.total_steps else "finished",
        }
        self._running = {"loss": 0.0, "acc": 0.0, "n": 0}
        return row


def _remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, imported only when TensorBoard logging is on."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(
            "train.tensorboard=true needs the tensorboard package, which is not installed: "
            "pip install 'structlin[tensorboard]' (or set train.tensorboard=false)"
        ) from e
    return SummaryWriter


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _progress(total: int, start: int, enabled: bool):
    if not enabled:
        return None
    import sys

    if not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


def _fmt(row: dict[str, Any]) -> str:
    return (
        f"step {row['step']:>6}  epoch {row['epoch']:.2f}  lr {row['lr']:.2e}  "
        f"train {row['train_loss']:.4f}/{row['train_acc']:.3f}  "
        f"test {row['test_loss']:.4f}/{row['test_acc']:.3f}  {row['samples_per_s']:.0f}/s"
    )
