"""Compress a trained model: project its linear layers onto a structure, then fine-tune briefly.

The workflow of ``structlin compress`` (Monarch's dense-to-sparse fine-tuning, Dao et al., ICML
2022; BLAST, Lee et al., NeurIPS 2024, which compresses Llama-7B 2x with a short retraining):

1. **Load** the dense model: a training run directory (:func:`~structlin_lab.runs.load_run`), a
   directory written by ``save_structured`` for a lab model (``lab_run.json`` beside it) or a
   Hugging Face model (``config.json``), or a dense transformers ``save_pretrained`` directory.
2. **Project**: ``structurize(model, spec, init="from_dense")`` replaces the targeted linear
   layers (``target_modules`` / ``exclude_modules``, as in ``structurize``; by default every one
   but the output head) by the structure's best fit ``W'`` of its weight ``W``; the report gives
   each layer's relative error ``||W - W'||_F / ||W||_F`` and the parameters and MACs before and
   after. With a target fraction ``f`` instead of a size, the structure's size option (``rank``
   of low-rank, TT and BTT; ``blocks`` of Monarch and block-diagonal) is the candidate whose
   report has ``params_after / params_before`` (or the MAC ratio, both over the targeted layers)
   closest to ``f``.
3. **Fine-tune** (optional) for ``steps`` AdamW steps on the model's own data: a run's training
   data, or a text file for a Hugging Face causal LM. Each structured factor gets μP's
   structure-aware learning rate relative to the model's own widths (:func:`finetune_groups`).
   The loss is the task's cross-entropy, or
   with distillation ``(1 - α) CE + α T² KL(softmax(z_dense / T) || softmax(z / T))`` against the
   dense model's logits ``z_dense`` (Hinton et al., 2015).
4. **Save** with ``structlin.save_structured``: ``structure.json``, the weights, the dense base's
   ``config.json`` (Hugging Face) or ``lab_run.json`` (lab models), and ``compress.json`` (the
   report and the losses), so ``structlin.load_structured(dense_base, out_dir)`` reloads it.

The losses reported (dense, right after projection, after fine-tuning) are means over the same
fixed batches of training data, drawn before fine-tuning starts, with the model in eval mode.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from structlin import (
    StructuredLinear,
    format_spec,
    get_structure,
    is_linear_like,
    linear_dims,
    parse_spec,
    read_structure,
    save_structured,
    structure_config,
    structurize,
)
from structlin.mup import param_groups
from structlin.options import suggest
from structlin.targets import ALL_LINEAR, Pattern, output_head, select_targets

from .runs import CHECKPOINT, LAB_RUN_NAME, load_exported, load_run, write_lab_run
from .train.build import DataShapes
from .train.config import Config

__all__ = [
    "LR_RULES",
    "SIZE_OPTIONS",
    "CompressResult",
    "Source",
    "compress",
    "densify",
    "finetune",
    "finetune_groups",
    "load_source",
    "pick_size",
    "project",
    "size_candidates",
]

#: The option that sets a structure's size, searched by :func:`pick_size`.
SIZE_OPTIONS = {
    "low_rank": "rank",
    "tt": "rank",
    "btt": "rank",
    "monarch": "blocks",
    "block_diag": "blocks",
}
PROBE_BATCHES = 4
#: Fine-tuning learning-rate rules (:class:`FinetuneOptions`).
LR_RULES = ("mup", "plain")


# ---------------------------------------------------------------------------- sources
@dataclass
class Source:
    """A model to compress (eval mode, CPU) and what it came from.

    ``kind`` is ``"run"`` (a lab model: ``config`` and ``shapes`` set) or ``"hf"`` (a
    transformers model, whose ``config`` is its own ``PretrainedConfig``).
    """

    model: nn.Module
    kind: str
    config: Any
    shapes: DataShapes | None = None


def _is_hf_dense(path: Path) -> bool:
    weights = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
    return (path / "config.json").is_file() and any((path / w).exists() for w in weights)


def _hf_class(config: Any) -> Any:
    """The transformers class of a config's first architecture (AutoModel without one)."""
    import transformers

    names = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, names[0], None) if names else None
    return cls or transformers.AutoModel


def _load_hf_dense(path: Path) -> Source:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = _hf_class(config).from_pretrained(path, local_files_only=True)
    return Source(model.float().eval(), "hf", model.config)


def _load_hf_structured(path: Path) -> Source:
    from transformers import AutoConfig

    from structlin import load_structured

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    cls = _hf_class(config)
    dense = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    return Source(load_structured(dense, path).eval(), "hf", dense.config)


def load_source(path: str | os.PathLike) -> Source:
    """The model in ``path``: a run directory, a ``save_structured`` directory (of a lab model,
    or of a Hugging Face model), or a dense transformers ``save_pretrained`` directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"compress: {path} is not a directory")
    if (path / CHECKPOINT).is_file():
        run = load_run(path)
        return Source(run.model, "run", run.config, run.shapes)
    if (path / "structure.json").is_file():
        read_structure(path)  # a clear error for a foreign or newer format
        if (path / LAB_RUN_NAME).is_file():
            run = load_exported(path)
            return Source(run.model, "run", run.config, run.shapes)
        if (path / "config.json").is_file():
            return _load_hf_structured(path)
        raise ValueError(
            f"compress: {path} was written by save_structured for a model that is neither a lab "
            f"model ({LAB_RUN_NAME}) nor a Hugging Face model (config.json); rebuild it with "
            f"structlin.load_structured and call structlin_lab.compress.project on it"
        )
    if _is_hf_dense(path):
        return _load_hf_dense(path)
    raise ValueError(
        f"compress: {path} is not a training run ({CHECKPOINT}), a save_structured directory "
        f"(structure.json) or a transformers directory (config.json and model weights)"
    )


# ---------------------------------------------------------------------------- projection
def _size_option(spec: str) -> tuple[str, dict[str, Any], str]:
    """``(structure, options, size option)`` of a spec whose size a fraction chooses."""
    name, options = _checked_spec(spec)
    if name not in SIZE_OPTIONS:
        raise ValueError(
            f"compress: a target fraction needs a structure with a size option; {name!r} has "
            f"none (valid: {', '.join(sorted(SIZE_OPTIONS))}), so give the spec alone"
        )
    option = SIZE_OPTIONS[name]
    if option in options:
        raise ValueError(
            f"compress: the spec {spec!r} already sets {option}; drop it to let the target "
            f"fraction choose it, or drop the fraction"
        )
    return name, options, option


def _checked_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``parse_spec(spec)``, with an unknown structure name a ``ValueError`` naming the valid
    ones (its options are checked by ``structurize``)."""
    name, options = parse_spec(spec)
    get_structure(name)
    return name, options


def size_candidates(model: nn.Module, names: Collection[str] | None = None) -> list[int]:
    """Sizes to try for ``rank`` / ``blocks``: every value up to 16, then steps of about 1.2x
    up to the largest width of the dense linear layers of ``model`` (those in ``names`` when
    given: a larger size could only fit layers that are not compressed)."""
    widths = [
        max(linear_dims(m))
        for n, m in model.named_modules()
        if _is_dense_linear(m) and (names is None or n in names)
    ]
    top = max(widths, default=16)
    values = set(range(1, min(top, 16) + 1))
    v = 16.0
    while v < top:
        v *= 1.2
        values.add(min(top, round(v)))
    return sorted(values)


def _is_dense_linear(module: nn.Module) -> bool:
    return is_linear_like(module) and not isinstance(module, StructuredLinear)


def _targeted(
    model: nn.Module, spec: str, target_modules: Pattern, exclude_modules: Pattern | None
) -> list[str]:
    """The linear layers ``structurize(model, spec, target_modules=..., exclude_modules=...)``
    selects (:func:`structlin.targets.select_targets`, on names alone, which also refuses a
    pattern that is not a valid regex); a ``ValueError`` naming the patterns when they select
    none."""
    names = [n for n, m in model.named_modules() if n and is_linear_like(m)]
    all_linear = isinstance(target_modules, str) and target_modules == ALL_LINEAR
    head = output_head(model, names)[0] if all_linear else None
    selected = select_targets(names, head, target_modules, exclude_modules).replaced
    if selected:
        return selected
    if all_linear and exclude_modules is None:
        why = "the model has no linear layer to compress besides its output head"
    else:  # name the patterns: usually a typo, or a regex that must match the full name
        why = (
            f"target_modules={target_modules!r} with exclude_modules={exclude_modules!r} "
            f"selects none of the linear layers {names[:20]}{' ...' if len(names) > 20 else ''}"
            f" (a regex must match the full module name; a list entry, a name or a suffix)"
        )
    raise ValueError(f"compress: {spec!r} replaced no layer: {why}")


def _listed(pattern: Pattern | None) -> str | list[str] | None:
    """``pattern`` with an iterable of names made a list: it is read more than once."""
    return pattern if pattern is None or isinstance(pattern, str) else list(pattern)


def pick_size(
    model: nn.Module,
    spec: str,
    fraction: float,
    *,
    by: str = "params",
    target_modules: Pattern = ALL_LINEAR,
    exclude_modules: Pattern | None = None,
) -> tuple[str, float]:
    """The spec, with its size option set, whose dry-run report has ``by``'s after/before ratio
    (``"params"`` or ``"macs"``) closest to ``fraction``. The ratio is
    ``sum(after) / sum(before)`` over the layers the surgery replaces: those ``target_modules``
    and ``exclude_modules`` select (as in ``structurize``), not the whole model.

    Returns the spec string and its ratio. A size that some layer refuses (e.g. more Monarch
    blocks than a layer's width) is skipped, so the ratio is always over the same layers.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"compress: the target fraction must be in (0, 1), got {fraction}")
    if by not in ("params", "macs"):
        raise ValueError(f"compress: by must be 'params' or 'macs', got {by!r}")
    structured = [e.path for e in structure_config(model).modules]
    if structured:  # surgery would leave them alone: no size could be measured
        raise ValueError(
            f"compress: pick_size measures sizes on dense layers, but {structured[:5]} are "
            f"structured; call densify(model) first"
        )
    name, options, option = _size_option(spec)
    target_modules, exclude_modules = _listed(target_modules), _listed(exclude_modules)
    targeted = _targeted(model, spec, target_modules, exclude_modules)
    best: tuple[float, str, float] | None = None
    for size in size_candidates(model, set(targeted)):
        candidate = format_spec(name, {**options, option: size})
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a refused size is skipped, not reported
                report = structurize(
                    model,
                    candidate,
                    target_modules=target_modules,
                    exclude_modules=exclude_modules,
                    dry_run=True,
                )
        except ValueError:
            continue
        totals = report.totals()
        if not totals["layers"] or report.refused:
            continue
        ratio = totals[f"{by}_after"] / totals[f"{by}_before"]
        if best is None or abs(ratio - fraction) < best[0]:
            best = (abs(ratio - fraction), candidate, ratio)
    if best is None:
        raise ValueError(f"compress: no size of {spec!r} fits the linear layers of this model")
    return best[1], best[2]


def _dense_layer(layer: StructuredLinear, base: str | None) -> nn.Module:
    """The dense layer computing what ``layer`` computes: ``W = layer.to_dense()`` in the
    module kind it replaced (``nn.Linear``, or transformers' ``Conv1D`` storing ``W^T``)."""
    w = layer.to_dense().detach()
    bias = layer.bias is not None
    if base == "Conv1D":
        from transformers.pytorch_utils import Conv1D

        dense = Conv1D(layer.out_features, layer.in_features).to(w.device, w.dtype)
        dense.weight.data.copy_(w.T)
        if not bias:
            dense.bias = None
    else:
        dense = nn.Linear(layer.in_features, layer.out_features, bias, w.device, w.dtype)
        dense.weight.data.copy_(w)
    if bias:
        dense.bias.data.copy_(layer.bias.detach())
    return dense.train(layer.training)


def densify(model: nn.Module) -> list[str]:
    """Replace every structured layer of ``model`` (in place) by the dense layer of its
    ``to_dense()`` weight, so that it can be projected onto another structure; the paths."""
    entries = structure_config(model).modules
    for entry in entries:
        parent, _, child = entry.path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, _dense_layer(model.get_submodule(entry.path), entry.base))
    return [e.path for e in entries]


def project(
    model: nn.Module,
    spec: str,
    *,
    target_modules: Pattern = ALL_LINEAR,
    exclude_modules: Pattern | None = None,
) -> Any:
    """``structurize(model, spec, init="from_dense", target_modules=..., exclude_modules=...)``
    in place; the surgery report (each layer's relative Frobenius error in ``row.error``,
    against the dense weight). Structured layers are made dense first (:func:`densify`); layers
    not targeted stay dense and untouched. Raises if no layer was replaced."""
    densify(model)
    target_modules, exclude_modules = _listed(target_modules), _listed(exclude_modules)
    _targeted(model, spec, target_modules, exclude_modules)  # the patterns, named, if no match
    report = structurize(
        model,
        spec,
        init="from_dense",
        target_modules=target_modules,
        exclude_modules=exclude_modules,
    )
    if not report.totals()["layers"]:
        raise ValueError(
            f"compress: {spec!r} replaced no layer: the model has no linear layer to compress "
            f"besides its output head\n{report}"
        )
    return report


# ---------------------------------------------------------------------------- data and losses
#: ``loss_fn(model, batch) -> (task loss, logits)``.
LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]


def _logits(output: Any) -> torch.Tensor:
    """Logits of a lab model (a tensor, or GPT-2's ``(logits, loss)``) or a transformers one."""
    if isinstance(output, tuple):
        return output[0]
    return getattr(output, "logits", output)


def _task_data(config: Config, device: torch.device) -> tuple[Iterator[Any], LossFn]:
    """A lab run's own training batches and loss (its task: :mod:`structlin_lab.train.tasks`)."""
    from .train import build_task

    task = build_task(config, device)

    def loss_fn(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        seen: list[Any] = []

        def forward(x: torch.Tensor) -> Any:
            seen.append(model(x))
            return seen[-1]

        result = task.loss_and_accuracy(forward, batch)
        return result.loss, _logits(seen[-1]).float()

    return task.train_batches(), loss_fn


@dataclass(frozen=True)
class TextOptions:
    """Fine-tuning text for a transformers causal LM: a UTF-8 file (or .gz), tokenised by
    ``tokenizer`` (``"char"`` or ``"gpt2"``, :func:`structlin_lab.data.prepare_text`), in
    ``batch_size`` random windows of ``block_size`` tokens drawn from seed ``seed``."""

    path: str
    tokenizer: str = "char"
    tokenizer_file: str | None = None
    cache_dir: str | None = None
    batch_size: int = 8
    block_size: int = 64
    seed: int = 0


def _text_data(
    text: TextOptions, vocab_size: int, device: torch.device
) -> tuple[Iterator[Any], LossFn]:
    """Windows of a text file and the next-token cross-entropy of a transformers causal LM."""
    from .data import get_batch, prepare_text

    data = prepare_text(
        text.path,
        tokenizer=text.tokenizer,
        tokenizer_file=text.tokenizer_file,
        val_fraction=0.0,
        cache_dir=text.cache_dir,
    )
    if data.vocab_size > vocab_size:
        raise ValueError(
            f"compress: the {text.tokenizer} tokenisation of {text.path} has {data.vocab_size} "
            f"tokens, more than the model's vocabulary of {vocab_size}"
        )
    generator = torch.Generator().manual_seed(text.seed)

    def batches() -> Iterator[Any]:
        while True:
            yield get_batch(data.train, text.batch_size, text.block_size, generator, device)

    def loss_fn(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = _logits(model(input_ids=x)).float()
        return F.cross_entropy(logits.flatten(0, 1), y.flatten()), logits

    return batches(), loss_fn


def _inputs(batch: Any) -> Any:
    """The model input of a batch: an image batch's ``x``, or a token batch's ``(x, y)[0]``."""
    return batch.x if hasattr(batch, "x") else batch[0]


# ---------------------------------------------------------------------------- fine-tuning
@dataclass(frozen=True)
class FinetuneOptions:
    """``steps`` AdamW steps at learning rate ``lr``; with ``distill``, the loss is
    ``(1 - alpha) * CE + alpha * T^2 * KL`` against the dense model at temperature ``T``.

    ``lr_rule`` is ``"mup"`` (factor ``t`` of a structured layer with input width ``d_in`` and
    ``n_f`` factors trains at ``lr * d_in / (n_f * fan_in_t)``, every other parameter at
    ``lr``: :func:`finetune_groups`) or ``"plain"`` (every parameter at ``lr``)."""

    steps: int = 0
    lr: float = 1e-3
    distill: bool = False
    alpha: float = 0.5
    temperature: float = 2.0
    lr_rule: str = "mup"

    def __post_init__(self) -> None:
        if self.lr_rule not in LR_RULES:
            raise ValueError(
                f"compress: lr_rule must be one of {', '.join(LR_RULES)}, got "
                f"{self.lr_rule!r}{suggest(self.lr_rule, LR_RULES)}"
            )
        if self.steps < 0:
            raise ValueError(f"compress: steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"compress: lr must be positive, got {self.lr}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"compress: alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"compress: temperature must be positive, got {self.temperature}")


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))``, the mean over predictions;
    logits ``(..., K)``. The ``T^2`` keeps its gradient on the scale of the cross-entropy's."""
    t = temperature
    s = F.log_softmax(student.flatten(0, -2) / t, dim=-1)
    p = F.log_softmax(teacher.flatten(0, -2) / t, dim=-1)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * t * t


def finetune_groups(model: nn.Module, options: FinetuneOptions) -> list[dict[str, Any]]:
    """AdamW parameter groups of ``model`` for ``options.lr_rule``.

    ``"mup"``: ``structlin.mup.param_groups(model, lr, base=model, optimizer="adamw")``, the
    structure-aware rule with the model as its own base, so ``d_in_base = d_in`` and factor
    ``t`` of a layer with ``n_f`` factors gets ``lr_t = lr * d_in / (n_f * fan_in_t)``. A dense
    layer, a vector or any other tensor keeps ``lr`` (its μP multiplier relative to its own
    width is 1); only the split of the update between a structured layer's factors changes, as
    in training (e.g. low-rank ``d -> r -> d``: ``lr / 2`` for ``A``, ``lr * d / (2 r)`` for
    ``B``). ``"plain"``: one group, every parameter at ``lr``.
    """
    if options.lr_rule == "plain":
        return [{"params": list(model.parameters()), "lr": options.lr}]
    # The model is its own base: multipliers relative to the current widths, not a base width.
    return param_groups(model, options.lr, base=model, optimizer="adamw", weight_decay=0.0)


def finetune(
    model: nn.Module,
    batches: Iterator[Any],
    loss_fn: LossFn,
    options: FinetuneOptions,
    teacher: nn.Module | None = None,
) -> list[float]:
    """Train ``model`` for ``options.steps`` steps on ``batches``; the loss of every step."""
    if options.distill and teacher is None:
        raise ValueError("finetune: distillation needs the dense teacher model")
    opt = torch.optim.AdamW(finetune_groups(model, options), lr=options.lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(options.steps):
        batch = next(batches)
        loss, logits = loss_fn(model, batch)
        if options.distill:
            with torch.no_grad():
                target = _logits(teacher(_inputs(batch))).float()
            kl = distillation_loss(logits, target, options.temperature)
            loss = (1.0 - options.alpha) * loss + options.alpha * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def mean_loss(model: nn.Module, batches: list[Any], loss_fn: LossFn) -> float:
    """The task loss of ``model`` (eval mode) averaged over ``batches``."""
    was = model.training
    model.eval()
    try:
        return sum(loss_fn(model, b)[0].item() for b in batches) / len(batches)
    finally:
        model.train(was)


# ---------------------------------------------------------------------------- the workflow
@dataclass
class CompressResult:
    """What :func:`compress` did: the compressed model (eval mode), its spec, the surgery
    report, the losses on the probe batches (``"dense"``, ``"projected"``, ``"finetuned"``,
    absent without data), each fine-tuning step's loss and where it was saved."""

    model: nn.Module
    spec: str
    report: Any
    losses: dict[str, float] = field(default_factory=dict)
    train_losses: list[float] = field(default_factory=list)
    out_dir: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "losses": self.losses,
            "train_losses": self.train_losses,
            "report": self.report.to_dict(),
        }


def _data_for(
    source: Source, text: TextOptions | None, device: torch.device
) -> tuple[Iterator[Any], LossFn]:
    if source.kind == "run":
        if text is not None:
            raise ValueError("compress: --text is for transformers models; a run uses its data")
        return _task_data(source.config, device)
    if text is None:
        raise ValueError(
            "compress: fine-tuning a transformers model needs --text FILE (the tokens to train on)"
        )
    return _text_data(text, int(source.config.vocab_size), device)


def _resolve_spec(
    model: nn.Module,
    spec: str,
    params: float | None,
    macs: float | None,
    targets: dict[str, Any],
) -> str:
    """``spec``, or with a fraction the spec :func:`pick_size` picks over ``targets``'
    layers (``{"target_modules": ..., "exclude_modules": ...}``)."""
    if params is not None and macs is not None:
        raise ValueError("compress: give a parameter fraction or a MAC fraction, not both")
    if params is None and macs is None:
        _checked_spec(spec)  # an unknown structure fails here, before any work
        _targeted(model, spec, **targets)  # and a pattern that selects nothing
        return spec
    by, fraction = ("params", params) if params is not None else ("macs", macs)
    return pick_size(model, spec, fraction, by=by, **targets)[0]


def compress(
    source: str | os.PathLike | Source,
    out_dir: str | os.PathLike | None,
    spec: str,
    *,
    params: float | None = None,
    macs: float | None = None,
    target_modules: Pattern = ALL_LINEAR,
    exclude_modules: Pattern | None = None,
    finetune_options: FinetuneOptions | None = None,
    text: TextOptions | None = None,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] | None = print,
) -> CompressResult:
    """Load, project, optionally fine-tune, save (see the module docstring).

    Args:
        source: a path :func:`load_source` reads, or a loaded :class:`Source`.
        out_dir: where ``save_structured`` writes the result (None: not saved).
        spec: the structure (``"btt:rank=4"``); with ``params``/``macs`` its size option
            must be left out: the fraction chooses it (:func:`pick_size`).
        params, macs: target fraction in (0, 1) of the replaced layers' parameters / MACs.
        target_modules, exclude_modules: which linear layers to compress, as in
            ``structurize``: ``"all-linear"`` (all but the output head), a list of
            names/suffixes, or a regex matched against full module names; the others stay
            dense and bit-identical. A selection of no layer is an error naming the patterns.
        finetune_options: fine-tuning steps, learning rate and its rule, and distillation.
        text: the text to fine-tune a transformers model on (a run uses its own data).
        device: where fine-tuning runs; the saved model is on the CPU.
        log: where the report and the losses are printed (None: silent).
    """
    say = log or (lambda _msg: None)
    ft = finetune_options or FinetuneOptions()
    src = source if isinstance(source, Source) else load_source(source)
    device = torch.device(device)
    dense = src.model.to(device).eval()
    student = copy.deepcopy(dense)
    densify(student)  # a structured source is projected from its dense weights
    targets = {
        "target_modules": _listed(target_modules),
        "exclude_modules": _listed(exclude_modules),
    }
    resolved = _resolve_spec(student, spec, params, macs, targets)
    needs_data = ft.steps > 0
    batches, loss_fn = _data_for(src, text, device) if needs_data else (None, None)
    probe = [next(batches) for _ in range(PROBE_BATCHES)] if needs_data else []
    losses = {"dense": mean_loss(dense, probe, loss_fn)} if needs_data else {}
    report = project(student, resolved, **targets)
    say(str(report))
    result = CompressResult(student, resolved, report, losses)
    if needs_data:
        losses["projected"] = mean_loss(student, probe, loss_fn)
        result.train_losses = finetune(student, batches, loss_fn, ft, dense if ft.distill else None)
        losses["finetuned"] = mean_loss(student, probe, loss_fn)
        say(_loss_line(losses))
    student.eval()
    if out_dir is not None:
        result.out_dir = _save(result, src, out_dir)
        say(f"wrote {result.out_dir}")
    return result


def _loss_line(losses: dict[str, float]) -> str:
    return "loss on training batches: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items())


def _save(result: CompressResult, src: Source, out_dir: str | os.PathLike) -> Path:
    """``save_structured`` of the CPU model, ``lab_run.json`` for a lab model, and
    ``compress.json`` (spec, losses, report)."""
    out = save_structured(result.model.cpu(), out_dir)
    if src.kind == "run":
        write_lab_run(out, src.config, src.shapes)
    (out / "compress.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return out
