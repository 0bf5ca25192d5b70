"""The ``structlin`` command line (also ``python -m structlin_lab``).

Every failure ends in one ``structlin: error: ...`` line on stderr: exit code 2 for a usage
error (a bad argument, config key or value, a missing or malformed input file), 1 for a run
that failed (divergence, an unreadable checkpoint, a missing optional package). The traceback
is printed too with ``--debug`` or ``STRUCTLIN_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

from structlin import __version__, get_structure, list_structures, make_linear, structure_options

__all__ = ["UsageError", "main"]


class UsageError(ValueError):
    """A bad command line or input file: the CLI exits with code 2."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors read ``structlin: error: <command>: ...``, like
    the errors the commands raise."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        command = self.prog.removeprefix("structlin").strip()
        self.exit(2, f"structlin: error: {command + ': ' if command else ''}{message}\n")


def _positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1 (``--jobs 0`` is an error, not one job)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


@contextlib.contextmanager
def _yaml_file(path: str | None, what: str) -> Iterator[None]:
    """Turn a YAML syntax error in ``path`` into a :class:`UsageError` naming file and line."""
    import yaml

    try:
        yield
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UsageError(
            f"{what} {path} is not valid YAML: {problem}{where}; fix its syntax"
        ) from err


def _cmd_info(args: argparse.Namespace) -> int:
    from .models import list_models

    layer = _layer_args(args.layer) if args.layer else None
    print(f"structlin {__version__}")
    print("structures:")
    for name in list_structures():
        opts = ", ".join(structure_options(get_structure(name))) or "-"
        print(f"  {name:<11} options: {opts}")
    _print_theta_presets()
    print(f"models: {', '.join(list_models())}")
    if layer is not None:
        print(make_linear(*layer))
    if args.config:
        _print_structure_report(args)
    return 0


def _layer_args(layer: list[str]) -> tuple[str, int, int]:
    """``info --layer SPEC D_IN D_OUT``, with the widths checked to be positive integers."""
    spec, *dims = layer
    widths = []
    for name, text in zip(("D_IN", "D_OUT"), dims, strict=True):
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise UsageError(
                f"info --layer: {name} must be a positive integer, got {text!r}; "
                f"e.g. --layer {spec} 768 3072"
            )
        widths.append(value)
    return spec, widths[0], widths[1]


def _print_theta_presets() -> None:
    from structlin import THETA_PRESETS

    print("einsum presets (theta = alpha/beta/gamma/delta/epsilon/phi/rho, then its taxonomy):")
    for name, theta in THETA_PRESETS.items():
        print(f"  {name:<11} theta={theta}  {theta.taxonomy()}")


def _print_structure_report(args: argparse.Namespace) -> None:
    """The dry-run ``structurize`` report of ``--config``'s model, built on ``meta``."""
    import torch

    from structlin import structurize

    from .train.build import model_at_width, shapes_only

    cfg = _info_config(args)
    vocab = _info_vocab(cfg, args.vocab) if cfg.task == "lm" else None
    shapes = shapes_only(cfg, vocab=vocab)
    with torch.device("meta"):
        model = model_at_width(cfg, cfg.model.width, shapes)
    s = cfg.structure
    report = structurize(
        model,
        s.spec,
        target_modules=s.target_modules,
        exclude_modules=s.exclude_modules,
        overrides=s.overrides,
        dry_run=True,
    )
    print(
        f"model {cfg.model.name} width {cfg.model.width} depth {cfg.model.depth}, "
        f"structure {s.spec} (dry run):"
    )
    print(report)


def _info_vocab(cfg, vocab: int | None) -> int | None:
    """The vocabulary ``info --config`` builds an LM with: ``--vocab``, else the GPT-2 BPE's
    (``shapes_only``), else a character vocabulary read from ``data.source``."""
    if vocab is not None or cfg.data.tokenizer != "char":
        return vocab
    source = cfg.data.source
    if not source or not Path(source).is_file():
        raise UsageError(
            f"info --config: a character-level model's vocabulary depends on its text, and "
            f"data.source={source!r} is not a file; pass --vocab N or "
            f"--set data.source=PATH_TO_TEXT"
        )
    from .data import prepare_text

    data = prepare_text(
        source, tokenizer="char", tokenizer_file=cfg.data.tokenizer_file, cache_dir=cfg.data.root
    )
    print(f"vocabulary {data.vocab_size} (the distinct characters of {source})")
    return data.vocab_size


def _info_config(args: argparse.Namespace):
    from .train import load_config

    sets = list(args.set or [])
    with _yaml_file(args.config, "config"):
        if not any(x.startswith(("train.steps=", "train.epochs=")) for x in sets):
            import yaml

            if not Path(args.config).is_file():
                raise FileNotFoundError(f"config file {args.config} does not exist")
            raw = yaml.safe_load(Path(args.config).read_text()) or {}
            train = (raw.get("train", {}) if isinstance(raw, dict) else {}) or {}
            if train.get("steps") is None and train.get("epochs") is None:
                sets.append("train.steps=1")
        return load_config(args.config, sets)


def _cmd_data_fetch(args: argparse.Namespace) -> int:
    name = args.name
    if name in ("cifar10", "cifar100"):
        from .data import load_cifar

        arrays = load_cifar(name, args.root, source=args.source, download=True)
        print(f"{name}: {len(arrays.train_x)} train / {len(arrays.test_x)} test images cached")
    elif name == "fashion_mnist":
        from .data import load_fashion_mnist

        arrays = load_fashion_mnist(args.root, source=args.source, download=True)
        print(f"{name}: {len(arrays.train_x)} train / {len(arrays.test_x)} test images cached")
    elif name == "text":
        from .data import prepare_text

        if not args.source:
            raise UsageError("data fetch text needs --source PATH to a UTF-8 text file or .gz")
        data = prepare_text(
            args.source,
            tokenizer=args.tokenizer,
            tokenizer_file=args.tokenizer_file,
            cache_dir=args.root,
        )
        print(
            f"text: {len(data.train)} train / {len(data.val)} val tokens, "
            f"vocabulary {data.vocab_size}"
        )
    else:
        raise ValueError(
            f"unknown data set {name!r}; valid: cifar10, cifar100, fashion_mnist, text"
        )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .experiments.demo import run_demo

    run_demo(
        data=args.data,
        source=args.source,
        root=args.root,
        dense_width=args.width,
        structure=args.structure,
        epochs=args.epochs,
        out_dir=args.out,
    )
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_from_args

    run_from_args(args)
    return 0


def _cmd_coord_check(args: argparse.Namespace) -> int:
    structures = [x.strip() for item in args.structures or () for x in item.split(";")]
    structures = [x for x in structures if x]
    if args.text or args.hf_config:
        return _coord_check_text(args, structures)
    from .data import load_cifar
    from .experiments.coord_mlp import DEFAULT_STRUCTURES, run_coord_check_mlp

    try:
        data = load_cifar("cifar10", args.cache, source=args.data, download=args.download)
    except FileNotFoundError as err:
        raise UsageError(_no_cifar_message(args, err)) from err
    run_coord_check_mlp(
        data.train_x,
        data.train_y,
        data.test_x[: args.eval_size],
        structures=structures or DEFAULT_STRUCTURES,
        widths=args.widths or [64, 128, 256, 512, 1024],
        steps=args.steps or 40,
        batch_size=args.batch_size or 512,
        lr=args.lr,
        base_width=args.base_width,
        depth=args.depth,
        seed=args.seed,
        out_dir=args.out,
    )
    print(f"wrote {args.out}/records.csv, fits.json and coord_check.png/pdf")
    return 0


def _no_cifar_message(args: argparse.Namespace, err: FileNotFoundError) -> str:
    """The data loader's message in the CLI's words: its flags, not its Python arguments."""
    if args.data is None:
        return (
            f"coord-check: no CIFAR-10 data cached in {args.cache or 'the default cache'}; pass "
            f"--data PATH (cifar-10-python.tar.gz, its extracted folder, or an image-folder "
            f"archive laid out as {{train,test}}/<class>/*.png) or --download, or check a "
            f"language model instead with --text FILE --hf-config gpt2"
        )
    text = str(err).replace("pass source=", "pass --data").replace("download=True", "--download")
    return f"coord-check --data {args.data}: {text}"


def _coord_check_text(args: argparse.Namespace, structures: list[str]) -> int:
    """``coord-check --text FILE --hf-config TYPE``: a tiny Hugging Face causal LM."""
    if not (args.text and args.hf_config):
        given, missing = ("--text", "--hf-config") if args.text else ("--hf-config", "--text")
        raise UsageError(
            f"coord-check: {given} needs {missing} too, e.g. --text FILE --hf-config gpt2"
        )
    from .data import prepare_text
    from .experiments.coord_text import (
        DEFAULT_TEXT_STRUCTURES,
        DEFAULT_TEXT_WIDTHS,
        run_coord_check_text,
    )

    data = prepare_text(args.text, tokenizer="char", val_fraction=0.0, cache_dir=args.cache)
    run_coord_check_text(
        data.train,
        data.vocab_size,
        model_type=args.hf_config,
        structures=structures or DEFAULT_TEXT_STRUCTURES,
        widths=args.widths or list(DEFAULT_TEXT_WIDTHS),
        steps=args.steps or 10,
        batch_size=args.batch_size or 8,
        block_size=args.block_size,
        lr=args.lr,
        n_layer=args.depth,
        d_head=args.d_head,
        seed=args.seed,
        out_dir=args.out,
    )
    print(f"wrote {args.out}/records.csv, fits.json and coord_check.png/pdf")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import Trainer, load_config

    with _yaml_file(args.config, "config"):
        config = load_config(args.config, args.set)
    if not args.no_tune_malloc:
        from .malloc import tune_malloc

        tune_malloc()
    out = args.out or f"runs/{config.name}"
    trainer = Trainer(config, out, resume=args.resume, overwrite=args.overwrite)
    result = trainer.fit()
    print(json.dumps(result))
    return 0 if result.get("status") in ("finished", "interrupted") else 1


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .scaling.sweep import dry_run, load_sweep, run_sweep, select, submit_slurm

    with _yaml_file(args.spec, "sweep spec"):
        sweep = load_sweep(args.spec, extra_set=args.set)
    if args.only:
        sweep = select(sweep, args.only)
    if args.slurm and not args.dry_run:
        import importlib.util

        if importlib.util.find_spec("submitit") is None:
            raise RuntimeError(
                "sweep --slurm needs the submitit package, which is not installed: "
                "pip install submitit (or run the sweep on this machine with --jobs N)"
            )
    print(dry_run(sweep))
    if args.dry_run:
        return 0
    if args.slurm:
        jobs = submit_slurm(sweep, partition=args.partition, timeout_min=args.timeout_min)
        print(f"submitted {len(jobs)} job(s) to SLURM")
        return 0
    results = run_sweep(
        sweep, jobs=args.jobs, threads_per_job=args.threads, tune_malloc=not args.no_tune_malloc
    )
    return 1 if any(r["status"] == "failed" for r in results) else 0


def _cmd_results(args: argparse.Namespace) -> int:
    from .scaling.results import collect_runs, format_table, write_table

    rows = collect_runs(args.dirs)
    print(format_table(rows))
    if args.csv or args.json:
        write_table(rows, args.csv, args.json)
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    from .scaling.fit import compute_multipliers, fit_by_structure
    from .scaling.results import collect_runs

    rows = collect_runs(args.dirs)
    fits = fit_by_structure(rows, x=args.x, y=args.y, irreducible=args.irreducible, by=args.by)
    if not fits:
        raise ValueError("no structure has 3 or more finished widths to fit")
    print(f"{'structure':<20}{'exponent b':>12}{'± se':>8}{'a':>12}{'e0':>8}{'R^2':>7}{'n':>4}")
    for name, f in fits.items():
        print(
            f"{name:<20}{f.b:>12.4f}{f.b_stderr:>8.4f}{f.a:>12.4g}{f.e0:>8.4f}{f.r2:>7.3f}{f.n:>4}"
        )
    reference = _fit_reference(args.reference, fits)
    if reference is not None:
        at, mults = compute_multipliers(
            rows,
            reference,
            x=args.x,
            y=args.y,
            by=args.by,
            at_error=args.at_error,
            irreducible=args.irreducible,
            n_boot=args.n_boot,
        )
        for name, (est, lo, hi) in mults.items():
            print(
                f"compute multiplier of {name} vs {reference} at error {at:.4f}: "
                f"{est:.2f}x (95% bootstrap {lo:.2f}-{hi:.2f})"
            )
    return 0


def _fit_reference(reference: str | None, fits: dict) -> str | None:
    """The structure compute multipliers are measured against: ``--reference`` (which must be
    among the fitted curves), else ``dense`` when it was fitted, else none."""
    if reference is None:
        return "dense" if "dense" in fits else None
    if reference not in fits:
        raise UsageError(
            f"fit --reference {reference!r} is not among the fitted curves; valid: "
            f"{', '.join(sorted(fits))}"
        )
    return reference


def _cmd_plot(args: argparse.Namespace) -> int:
    from .scaling.plots import plot_from_dirs

    kwargs: dict = {}
    if args.y is not None:
        kwargs["y"] = args.y
    if args.kind == "scaling":
        kwargs.update(x=args.x, by=args.by)
    elif args.by != "structure" or args.x != "train_macs":
        raise UsageError("--x and --by apply to --kind scaling only")
    for path in plot_from_dirs(args.dirs, args.out, kind=args.kind, **kwargs):
        print(f"wrote {path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .runs import export_run

    out = export_run(args.run_dir, args.out_dir)
    print(f"wrote {out} (reload: structlin_lab.load_exported or structlin.load_structured)")
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from .compress import FinetuneOptions, TextOptions, compress

    text = None
    if args.text:
        text = TextOptions(
            args.text,
            tokenizer=args.tokenizer,
            tokenizer_file=args.tokenizer_file,
            cache_dir=args.cache,
            batch_size=args.batch_size,
            block_size=args.block_size,
            seed=args.seed,
        )
    ft = FinetuneOptions(
        steps=args.steps,
        lr=args.lr,
        distill=args.distill,
        alpha=args.alpha,
        temperature=args.temperature,
        lr_rule=args.lr_rule,
    )
    compress(
        args.source,
        args.out_dir,
        args.structure,
        params=args.params,
        macs=args.macs,
        target_modules=args.target,
        exclude_modules=args.exclude,
        finetune_options=ft,
        text=text,
        device=args.device,
    )
    return 0


def _add_tune_malloc_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-tune-malloc",
        action="store_true",
        help="keep glibc's default allocator, which unmaps and re-faults large activations "
        "every step (by default the CLI keeps freed memory for reuse: structlin_lab.malloc)",
    )


def _add_set_flag(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help=help_text)


def _add_train(sub) -> None:
    train = sub.add_parser("train", help="train a model from a YAML config")
    train.add_argument("config", nargs="?", help="YAML config (see configs/); defaults if omitted")
    _add_set_flag(train, "override config keys, e.g. --set optim.lr=1e-3 model.width=256")
    train.add_argument("--out", help="run directory (default runs/<config name>)")
    again = train.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    again.add_argument("--overwrite", action="store_true", help="restart in an existing directory")
    _add_tune_malloc_flag(train)
    train.set_defaults(func=_cmd_train)


def _add_sweep(sub) -> None:
    sw = sub.add_parser("sweep", help="run (or submit) a grid of training runs from a spec")
    sw.add_argument("spec", help="sweep YAML, e.g. configs/sweeps/cifar10_mlp_scaling-cpu.yaml")
    sw.add_argument("--dry-run", action="store_true", help="list runs with params/MACs only")
    _add_set_flag(sw, "overrides added to every run, e.g. data.source=/data/cifar-10-python.tar.gz")
    sw.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="PATTERN",
        help="run only the runs whose names match a shell-style pattern, e.g. '*_lr3e-02_s0'",
    )
    sw.add_argument(
        "--jobs", type=_positive_int, default=1, help="runs in parallel on this machine"
    )
    sw.add_argument("--threads", type=_positive_int, default=None, help="torch threads per run")
    sw.add_argument("--slurm", action="store_true", help="submit a SLURM job array (submitit)")
    sw.add_argument("--partition", default=None)
    sw.add_argument("--timeout-min", type=_positive_int, default=1440)
    _add_tune_malloc_flag(sw)
    sw.set_defaults(func=_cmd_sweep)


def _add_results(sub) -> None:
    res = sub.add_parser("results", help="collect training runs into one table")
    res.add_argument("dirs", nargs="+")
    res.add_argument("--csv", help="write the table as CSV")
    res.add_argument("--json", help="write the table as JSON")
    res.set_defaults(func=_cmd_results)


def _add_fit(sub) -> None:
    fit = sub.add_parser("fit", help="power-law fits of error vs compute per structure")
    fit.add_argument("dirs", nargs="+")
    fit.add_argument("--x", default="train_macs", help="compute column (default train_macs)")
    fit.add_argument("--y", default="final_test_error", help="error column")
    fit.add_argument("--irreducible", action="store_true", help="fit e0 + a*C^-b")
    fit.add_argument(
        "--reference",
        default=None,
        help="curve the compute multipliers are measured against (default: dense, if fitted)",
    )
    fit.add_argument(
        "--at-error",
        type=float,
        default=None,
        help="error level for the multiplier (default: the reference fit at its largest compute)",
    )
    fit.add_argument("--n-boot", type=_positive_int, default=1000)
    fit.add_argument(
        "--by",
        default="structure",
        choices=["structure", "group"],
        help="what a curve is: the structure spec, or the sweep entry (run-name prefix)",
    )
    fit.set_defaults(func=_cmd_fit)


def _add_plot(sub) -> None:
    plot = sub.add_parser("plot", help="paper-style figures (PNG and PDF) from training runs")
    plot.add_argument("dirs", nargs="+")
    plot.add_argument(
        "--kind",
        default="scaling",
        choices=["scaling", "lr"],
        help="error vs compute with fits, or error vs LR per width",
    )
    plot.add_argument("--out", default="figures")
    plot.add_argument("--x", default="train_macs", help="compute column (scaling plots)")
    plot.add_argument(
        "--y",
        default=None,
        help="error/loss column (default: final_test_error for scaling, final_train_error for lr)",
    )
    plot.add_argument(
        "--by",
        default="structure",
        choices=["structure", "group"],
        help="one curve per structure spec, or per sweep entry (scaling plots)",
    )
    plot.set_defaults(func=_cmd_plot)


def _add_info(sub) -> None:
    info = sub.add_parser("info", help="list structures and their options")
    info.add_argument(
        "--layer",
        nargs=3,
        metavar=("SPEC", "D_IN", "D_OUT"),
        help="also build one layer and print it, e.g. --layer btt:rank=2 768 3072",
    )
    info.add_argument("--config", help="also print the structurize report of a training config")
    _add_set_flag(info, "config overrides for --config")
    info.add_argument(
        "--vocab",
        type=_positive_int,
        default=None,
        help="vocabulary size for lm configs (default: GPT-2 BPE's, or the characters of "
        "data.source for a character-level model)",
    )
    info.set_defaults(func=_cmd_info)


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="download / cache data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    fetch = data_sub.add_parser("fetch", help="fetch and cache a data set")
    fetch.add_argument("name", help="cifar10, cifar100, fashion_mnist or text")
    fetch.add_argument("--source", help="local copy (archive, folder or text file)")
    fetch.add_argument(
        "--root", help="cache directory (default $STRUCTLIN_DATA or ~/.cache/structlin)"
    )
    fetch.add_argument("--tokenizer", default="gpt2", choices=["gpt2", "char"])
    fetch.add_argument("--tokenizer-file", help="local gpt2.tiktoken ranks file")
    fetch.set_defaults(func=_cmd_data_fetch)


def _add_demo(sub) -> None:
    demo = sub.add_parser(
        "demo", help="train the paper's MLP dense vs BTT at matched compute (a few CPU minutes)"
    )
    demo.add_argument(
        "--data", default="fashion_mnist", choices=["fashion_mnist", "cifar10", "cifar100"]
    )
    demo.add_argument("--source", help="local copy of the data set (else download/cache)")
    demo.add_argument("--root", help="cache directory")
    demo.add_argument("--width", type=int, default=256, help="dense width (BTT width is matched)")
    demo.add_argument("--structure", default="btt")
    demo.add_argument("--epochs", type=float, default=2.0)
    demo.add_argument("--out", default="demo_out")
    demo.set_defaults(func=_cmd_demo)


def _add_bench(sub) -> None:
    from .bench import build_parser as bench_parser

    bench = sub.add_parser("bench", help="forward+backward time of each structure vs nn.Linear")
    bench_parser(bench)
    bench.set_defaults(func=_cmd_bench)


def _add_coord_check(sub) -> None:
    from .experiments.coord_mlp import DEFAULT_STRUCTURES

    cc = sub.add_parser(
        "coord-check",
        help="Δh vs width, structure-aware vs naive LR: the CIFAR-10 MLP (paper Fig. 2a), or a "
        "Hugging Face causal LM on a text file (--text FILE --hf-config gpt2)",
    )
    cc.add_argument("--data", help="CIFAR-10 source: official archive/folder or image-folder tar")
    cc.add_argument("--download", action="store_true", help="download CIFAR-10 if not cached")
    cc.add_argument(
        "--cache", help="cache directory (default $STRUCTLIN_DATA or ~/.cache/structlin)"
    )
    cc.add_argument("--text", help="a UTF-8 text file, tokenised by character (with --hf-config)")
    cc.add_argument(
        "--hf-config",
        help="a transformers model type (gpt2, llama, ...): a tiny causal LM built from a local "
        "config, with heads of --d-head, --depth blocks and an untied head; nothing is downloaded",
    )
    cc.add_argument(
        "--structures",
        nargs="+",
        help=f"structure specs, space- or ';'-separated (default: {';'.join(DEFAULT_STRUCTURES)}; "
        "with --text: dense btt)",
    )
    cc.add_argument(
        "--widths", type=int, nargs="+", help="default 64..1024 (--text: 64 144 256 400)"
    )
    cc.add_argument("--steps", type=int, help="default 40 (--text: 10)")
    cc.add_argument("--batch-size", type=int, help="default 512 (--text: 8 windows)")
    cc.add_argument("--lr", type=float, default=3e-3)
    cc.add_argument("--base-width", type=int, default=64, help="CIFAR-10 only (--text: min width)")
    cc.add_argument("--depth", type=int, default=2, help="MLP depth, or transformer blocks")
    cc.add_argument("--eval-size", type=int, default=512)
    cc.add_argument("--block-size", type=int, default=64, help="--text: context length")
    cc.add_argument("--d-head", type=int, default=16, help="--text: attention head size")
    cc.add_argument("--seed", type=int, default=0)
    cc.add_argument("--out", default="coord_check")
    cc.set_defaults(func=_cmd_coord_check)


def _add_export(sub) -> None:
    ex = sub.add_parser("export", help="write a training run's model in save_structured's format")
    ex.add_argument("run_dir", help="a run directory (config.yaml, checkpoints/last.pt)")
    ex.add_argument("out_dir", help="new directory: structure.json, safetensors, lab_run.json")
    ex.set_defaults(func=_cmd_export)


def _add_compress(sub) -> None:
    cp = sub.add_parser(
        "compress",
        help="project a trained model's linear layers onto a structure (from_dense), print the "
        "per-layer error and savings, optionally fine-tune, save a load_structured directory",
    )
    cp.add_argument(
        "source",
        help="a run directory, a save_structured directory, or a dense transformers directory",
    )
    cp.add_argument("out_dir", help="new directory written by save_structured")
    cp.add_argument("--structure", required=True, help="spec, e.g. btt:rank=4 or low_rank")
    size = cp.add_mutually_exclusive_group()
    size.add_argument(
        "--params",
        type=float,
        help="target fraction in (0, 1) of the linear layers' params: picks the structure's "
        "rank (low_rank, tt, btt) or blocks (monarch, block_diag)",
    )
    size.add_argument("--macs", type=float, help="the same, as a fraction of their MACs")
    cp.add_argument(
        "--target",
        default="all-linear",
        metavar="REGEX",
        help="structurize's target_modules: the linear layers to compress, a regex matched "
        "against full module names (e.g. '.*mlp.*'); default all-linear (all but the output "
        "head). The others stay dense; --params/--macs are fractions of the targeted layers",
    )
    cp.add_argument(
        "--exclude",
        metavar="REGEX",
        help="structurize's exclude_modules: a regex of full module names to keep dense",
    )
    cp.add_argument("--steps", type=int, default=0, help="fine-tuning steps (default 0: none)")
    cp.add_argument("--lr", type=float, default=1e-3, help="fine-tuning AdamW learning rate")
    cp.add_argument(
        "--lr-rule",
        default="mup",
        choices=["mup", "plain"],
        help="mup (default): each structured layer's factors get μP's structure-aware learning "
        "rates, lr * d_in / (n_factors * fan_in); plain: every parameter at --lr",
    )
    cp.add_argument(
        "--distill", action="store_true", help="distil from the dense model's logits (KL)"
    )
    cp.add_argument("--alpha", type=float, default=0.5, help="weight of the KL term")
    cp.add_argument("--temperature", type=float, default=2.0, help="distillation temperature")
    cp.add_argument("--text", help="transformers models: UTF-8 text (or .gz) to fine-tune on")
    cp.add_argument("--tokenizer", default="char", choices=["char", "gpt2"])
    cp.add_argument("--tokenizer-file", help="local gpt2.tiktoken ranks file")
    cp.add_argument("--cache", help="token cache directory (default $STRUCTLIN_DATA)")
    cp.add_argument("--batch-size", type=int, default=8, help="--text: windows per step")
    cp.add_argument("--block-size", type=int, default=64, help="--text: tokens per window")
    cp.add_argument("--seed", type=int, default=0, help="--text: seed of the windows")
    cp.add_argument("--device", default="cpu", help="where fine-tuning runs")
    cp.set_defaults(func=_cmd_compress)


#: One function per command, each adding its sub-parser; in the order ``--help`` lists them.
_COMMANDS = (
    _add_train,
    _add_sweep,
    _add_results,
    _add_fit,
    _add_plot,
    _add_info,
    _add_data,
    _add_demo,
    _add_bench,
    _add_coord_check,
    _add_export,
    _add_compress,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``structlin`` parser: one sub-command per entry of ``_COMMANDS``."""
    parser = _Parser(prog="structlin", description=__doc__)
    parser.add_argument("--version", action="version", version=f"structlin {__version__}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for add_command in _COMMANDS:
        add_command(sub)
    return parser


_DEBUG_HELP = "on an error, print the traceback too (or set STRUCTLIN_DEBUG=1)"


#: Errors in what the user gave (arguments, configs, input files): exit code 2. Anything else
#: raised by a command is a failed run: exit code 1.
_USAGE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    KeyError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
)


def _debug_env() -> bool:
    return os.environ.get("STRUCTLIN_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _error_line(err: BaseException) -> str:
    """``err``'s message on one line (a ``KeyError``'s unquoted), else its type's name."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else err
    return " ".join(str(text).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the ``structlin`` command ``argv`` (default ``sys.argv[1:]``); the exit code.

    0 on success, 2 for a usage error, 1 for a failed run (see the module docstring); ``--help``
    and ``--version`` return 0. Errors print one ``structlin: error: ...`` line on stderr.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere on the line, not only before the sub-command
    debug = "--debug" in argv or _debug_env()
    argv = [a for a in argv if a != "--debug"]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse's own usage errors, --help and --version
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("structlin: error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`structlin info | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit either
        return 0
    except Exception as err:
        if debug:
            traceback.print_exc()
        print(f"structlin: error: {_error_line(err)}", file=sys.stderr)
        return 2 if isinstance(err, _USAGE_ERRORS) else 1


if __name__ == "__main__":
    sys.exit(main())
