"""Bad inputs to every ``structlin`` command: one ``structlin: error:`` line, the right exit code.

Each row of ``CASES`` is a command line, its exit code (2: usage error, 1: failed run) and
substrings the error line must contain: the bad value and what to do about it. A new command
gets rows here. The rows run in-process through ``structlin_lab.cli.main``; only the SIGKILL
test needs a real process.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from structlin_lab.cli import main
from structlin_lab.scaling.sweep import load_sweep, run_sweep
from structlin_lab.train.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / "configs" / "sweeps" / "cifar10_mlp_scaling-cpu.yaml"


@dataclass(frozen=True)
class Case:
    """One bad command line: ``argv`` (``{name}`` fields are paths of the ``world`` fixture),
    the expected exit code and substrings of the error line."""

    id: str
    argv: tuple[str, ...]
    code: int
    expect: tuple[str, ...]


def _case(id_: str, argv: str, code: int, *expect: str) -> Case:
    return Case(id_, tuple(argv.split()), code, expect)


CASES = [
    # --- no command / unknown command
    _case("no-command", "", 2, "required", "command"),
    _case("unknown-command", "trian", 2, "invalid choice", "'trian'", "train"),
    # --- train
    _case("train-key-typo", "train --set optim.lrr=1 train.steps=1", 2, "optim.lrr", "'lr'"),
    _case("train-set-no-value", "train {lm} --set optim.lr", 2, "'optim.lr'", "key=value"),
    _case("train-unknown-section", "train {lm} --set nokey=1", 2, "'nokey'", "valid keys"),
    _case("train-steps-not-int", "train {lm} --set train.steps=abc", 2, "'abc'", "integer"),
    _case("train-steps-zero", "train {lm} --out {fresh} --set train.steps=0", 2, "0"),
    _case("train-missing-config", "train {tmp}/nope.yaml", 2, "nope.yaml", "does not exist"),
    _case("train-yaml-syntax", "train {bad_yaml}", 2, "bad.yaml", "not valid YAML", "line 2"),
    _case("train-not-a-mapping", "train {list_yaml}", 2, "list.yaml", "mapping"),
    _case(
        "train-cuda-on-cpu",
        "train {lm} --out {fresh} --set train.device=cuda",
        2,
        "train.device=cuda",
        "CUDA is not available",
        "train.device=cpu",
    ),
    _case(
        "train-bad-device", "train {lm} --out {fresh} --set train.device=nope", 2, "'nope'", "cpu"
    ),
    _case(
        "train-unknown-model",
        "train {lm} --out {fresh} --set model.name=nope",
        2,
        "'nope'",
        "gpt2, mlp, vit",
    ),
    _case(
        "train-unknown-structure",
        "train {lm} --out {fresh} --set structure.spec=nope",
        2,
        "'nope'",
        "btt",
    ),
    _case(
        "train-structure-option",
        "train {lm} --out {fresh} --set structure.spec=btt:rank=0",
        2,
        "rank",
        "got 0",
    ),
    _case("train-negative-lr", "train {lm} --out {fresh} --set optim.lr=-1", 2, "lr=-1", "1e-3"),
    _case(
        "train-batch-zero",
        "train {lm} --out {fresh} --set data.batch_size=0",
        2,
        "data.batch_size",
        "0",
    ),
    _case("train-bad-task", "train {lm} --out {fresh} --set task=foo", 2, "'foo'", "'lm'"),
    _case(
        "train-bad-optimizer",
        "train {lm} --out {fresh} --set optim.name=lion",
        2,
        "'lion'",
        "adamw",
    ),
    _case(
        "train-missing-text",
        "train {lm} --out {fresh} --set data.source={tmp}/no.txt",
        2,
        "no.txt",
        "does not exist",
    ),
    _case(
        "train-block-too-long",
        "train {lm} --out {fresh} --set data.source={short} data.block_size=64",
        2,
        "block_size + 1 = 65",
        "smaller block_size",
    ),
    _case(
        "train-dir-exists", "train {lm} --out {run}", 2, "already exists", "--resume", "--overwrite"
    ),
    _case("train-resume-nothing", "train {lm} --out {fresh} --resume", 2, "no checkpoint"),
    _case(
        "train-resume-and-overwrite",
        "train {lm} --out {run} --resume --overwrite",
        2,
        "--overwrite",
        "not allowed with",
        "--resume",
    ),
    _case(
        "train-resume-other-config",
        "train {lm} --out {run} --resume --set optim.lr=1e-2",
        2,
        "different config",
    ),
    _case(
        "train-resume-garbage",
        "train {lm} --out {garbage_run} --resume",
        1,
        "last.pt",
        "unreadable",
        "--overwrite",
    ),
    _case(
        "train-resume-empty",
        "train {lm} --out {empty_run} --resume",
        1,
        "last.pt",
        "unreadable",
        "--overwrite",
    ),
    _case(
        "train-resume-truncated",
        "train {lm} --out {truncated_run} --resume",
        1,
        "last.pt",
        "unreadable",
        "--overwrite",
    ),
    _case(
        "train-diverges",
        "train {lm} --out {fresh} --set optim.lr=1e30",
        1,
        "loss became nan",
        "optim.lr",
        "optim.clip",
    ),
    # --- sweep
    _case("sweep-yaml-syntax", "sweep {bad_yaml} --dry-run", 2, "bad.yaml", "not valid YAML"),
    _case("sweep-missing-spec", "sweep {tmp}/nope.yaml", 2, "nope.yaml", "does not exist"),
    _case("sweep-key-typo", "sweep {typo_sweep} --dry-run", 2, "'gird'", "grid"),
    _case("sweep-jobs-zero", f"sweep {SWEEP} --jobs 0", 2, "--jobs", "at least 1, got 0"),
    _case("sweep-jobs-not-int", f"sweep {SWEEP} --jobs many", 2, "--jobs", "'many'"),
    _case("sweep-threads-zero", f"sweep {SWEEP} --threads 0", 2, "--threads", "got 0"),
    _case("sweep-timeout-negative", f"sweep {SWEEP} --timeout-min -5", 2, "--timeout-min"),
    _case(
        "sweep-only-matches-none", f"sweep {SWEEP} --dry-run --only nothing_*", 2, "matches none"
    ),
    _case(
        "sweep-slurm-without-submitit",
        f"sweep {SWEEP} --slurm",
        1,
        "--slurm",
        "pip install submitit",
        "--jobs",
    ),
    # --- results, fit, plot
    _case("results-no-dir", "results {tmp}/nothing", 2, "nothing"),
    _case("fit-no-dir", "fit {tmp}/nothing", 2, "nothing"),
    _case(
        "fit-bad-reference",
        "fit {fit_runs} --reference nope --n-boot 5",
        2,
        "--reference 'nope'",
        "valid: btt, dense",
    ),
    _case("fit-no-fittable-runs", "fit {run}", 2, "3 or more"),
    _case("fit-n-boot-zero", "fit {fit_runs} --n-boot 0", 2, "--n-boot", "got 0"),
    _case("fit-bad-by", "fit {fit_runs} --by width", 2, "--by", "'width'", "structure"),
    _case("plot-kind-lr-with-by", "plot {fit_runs} --kind lr --by group", 2, "--kind scaling only"),
    _case("plot-bad-kind", "plot {fit_runs} --kind pie", 2, "--kind", "'pie'"),
    # --- info
    _case("info-layer-not-int", "info --layer btt 64 abc", 2, "D_OUT", "'abc'", "768 3072"),
    _case("info-layer-negative", "info --layer btt -3 64", 2, "D_IN", "'-3'"),
    _case("info-layer-two-args", "info --layer btt 64", 2, "--layer", "3 arguments"),
    _case("info-layer-unknown", "info --layer nope 64 64", 2, "'nope'", "btt"),
    _case("info-layer-option-typo", "info --layer btt:rnk=2 64 64", 2, "'rnk'", "'rank'"),
    _case("info-config-missing", "info --config {tmp}/nope.yaml", 2, "nope.yaml"),
    _case("info-config-yaml-syntax", "info --config {bad_yaml}", 2, "not valid YAML"),
    _case(
        "info-char-vocab-unknown",
        "info --config {lm} --set data.source=null",
        2,
        "character-level",
        "--vocab N",
        "data.source",
    ),
    _case("info-vocab-zero", "info --vocab 0", 2, "--vocab", "got 0"),
    # --- data
    _case("data-no-subcommand", "data", 2, "data"),
    _case("data-unknown-set", "data fetch mnist", 2, "'mnist'", "fashion_mnist"),
    _case("data-text-no-source", "data fetch text", 2, "--source PATH"),
    _case(
        "data-text-missing",
        "data fetch text --source {tmp}/no.txt --root {tmp}/c",
        2,
        "no.txt",
        "does not exist",
    ),
    # --- demo, bench
    _case("demo-bad-data", "demo --data mnist", 2, "--data", "'mnist'"),
    _case("bench-unknown-flag", "bench --structurez btt", 2, "--structurez"),
    # --- coord-check
    _case(
        "coord-no-data",
        "coord-check --cache {tmp}/empty",
        2,
        "--data PATH",
        "--download",
        "--text FILE",
    ),
    _case(
        "coord-missing-data",
        "coord-check --data {tmp}/no.tar.gz --cache {tmp}/empty",
        2,
        "no.tar.gz",
        "--data",
        "--download",
    ),
    _case("coord-text-alone", "coord-check --text {text}", 2, "--hf-config"),
    _case("coord-hf-alone", "coord-check --hf-config gpt2", 2, "--text"),
    # --- export, compress
    _case("export-no-run", "export {tmp}/nothing {tmp}/out", 2, "nothing", "does not exist"),
    _case(
        "compress-no-source",
        "compress {tmp}/nothing {tmp}/out --structure btt",
        2,
        "nothing",
        "not a directory",
    ),
    _case("compress-no-structure", "compress {run} {tmp}/out", 2, "--structure"),
    _case(
        "compress-target-matches-nothing",
        "compress {run} {tmp}/out --structure btt --target nosuch",
        2,
        "replaced no layer",
        "target_modules='nosuch'",
        "blocks.0.mlp.c_fc",
    ),
    _case(
        "compress-exclude-everything",
        "compress {run} {tmp}/out --structure btt --params 0.5 --exclude .*",
        2,
        "replaced no layer",
        "exclude_modules='.*'",
    ),
    _case(
        "compress-target-bad-regex",
        "compress {run} {tmp}/out --structure btt --target mlp.(",
        2,
        "'mlp.('",
        "not a valid regular expression",
    ),
    _case(
        "compress-bad-lr-rule",
        "compress {run} {tmp}/out --structure btt --lr-rule mpu",
        2,
        "invalid choice",
        "'mpu'",
        "mup",
    ),
]


def _write_text(path: Path) -> Path:
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat"]
    path.write_text(" ".join(rng.choice(words) for _ in range(3000)))
    return path


def _write_short(path: Path) -> Path:
    path.write_text("a short text, shorter than a block of 64 characters")
    return path


def _lm_config(tmp: Path, text: Path) -> Path:
    cfg = {
        "name": "tiny",
        "task": "lm",
        "model": {
            "name": "gpt2",
            "width": 16,
            "base_width": 16,
            "depth": 1,
            "kwargs": {"d_head": 8},
        },
        "data": {
            "tokenizer": "char",
            "block_size": 8,
            "batch_size": 2,
            "eval_batches": 1,
            "source": str(text),
            "root": str(tmp / "cache"),
        },
        "train": {"steps": 4, "eval_every": 1, "ckpt_every": 1, "progress": False},
    }
    cfg["model"]["kwargs"] = {"d_head": 8}
    path = tmp / "lm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fake_fit_runs(root: Path) -> None:
    """Finished runs of two structures at four widths, error ``2 C^-b`` (enough to fit)."""
    for structure, b in (("dense", 0.10), ("btt", 0.12)):
        for width, macs in ((64, 1e5), (128, 1e6), (256, 1e7), (512, 1e8)):
            run = root / f"{structure}_w{width}"
            run.mkdir(parents=True)
            cfg = {
                "name": run.name,
                "model": {"name": "mlp", "width": width, "depth": 3},
                "structure": {"spec": structure},
                "train": {"seed": 0},
            }
            (run / "config.yaml").write_text(yaml.safe_dump(cfg))
            err = 2.0 * (300 * macs) ** -b
            row = {
                "step": 10,
                "train_acc": 1 - err,
                "test_acc": 1 - err,
                "test_loss": 1.0,
                "forward_macs_per_example": macs,
                "train_macs": 300 * macs,
                "status": "finished",
            }
            (run / "metrics.jsonl").write_text(json.dumps(row) + "\n")


def _broken_copy(run: Path, dst: Path, content: bytes | None) -> str:
    """A copy of ``run`` whose checkpoint is ``content`` (None: the first half of the original)."""
    shutil.copytree(run, dst)
    ckpt = dst / "checkpoints" / "last.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2] if content is None else content)
    return str(dst)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    """Paths the rows refer to: configs, a finished tiny run and broken copies of it."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    text = _write_text(tmp / "text.txt")
    lm = _lm_config(tmp, text)
    (tmp / "bad.yaml").write_text("model: [1,\n b")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    typo = yaml.safe_load(SWEEP.read_text())
    typo["gird"] = typo.pop("grid")
    typo["base"] = str((SWEEP.parent / typo["base"]).resolve())
    (tmp / "typo_sweep.yaml").write_text(yaml.safe_dump(typo))
    run = tmp / "run"
    assert main(["train", str(lm), "--out", str(run), "--no-tune-malloc"]) == 0
    _fake_fit_runs(tmp / "fit_runs")
    return {
        "tmp": str(tmp),
        "text": str(text),
        "short": str(_write_short(tmp / "short.txt")),
        "lm": str(lm),
        "bad_yaml": str(tmp / "bad.yaml"),
        "list_yaml": str(tmp / "list.yaml"),
        "typo_sweep": str(tmp / "typo_sweep.yaml"),
        "run": str(run),
        "garbage_run": _broken_copy(run, tmp / "garbage", b"not a checkpoint"),
        "empty_run": _broken_copy(run, tmp / "empty", b""),
        "truncated_run": _broken_copy(run, tmp / "truncated", None),
        "fit_runs": str(tmp / "fit_runs"),
    }


@pytest.fixture
def no_cuda_no_submitit(monkeypatch):
    """Every row behaves as on a CPU-only machine without submitit, and without debug output."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "submitit", None)  # find_spec("submitit") is then None
    monkeypatch.delenv("STRUCTLIN_DEBUG", raising=False)


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("structlin: error:")]


def test_there_are_rows_for_every_command():
    from structlin_lab.cli import build_parser

    commands = {c.argv[0] for c in CASES if c.argv}
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) <= commands
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_gives_one_error_line(case, world, tmp_path, capsys, no_cuda_no_submitit):
    paths = {**world, "fresh": str(tmp_path / "fresh")}
    argv = [a.format(**paths) for a in case.argv]
    if argv and argv[0] in ("train", "sweep"):
        argv.append("--no-tune-malloc")
    code = main(argv)
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert (code, len(lines)) == (case.code, 1), err
    assert "Traceback" not in err
    for text in case.expect:
        assert text in lines[0], lines[0]


def test_a_run_that_fails_before_its_first_step_leaves_nothing(world, tmp_path, capsys):
    out = tmp_path / "run"
    short = [f"data.source={world['short']}", "data.block_size=64"]
    argv = ["train", world["lm"], "--out", str(out), "--set", *short]
    for _ in range(2):  # the rerun fails for the same reason, not with "already exists"
        assert main([*argv, "--no-tune-malloc"]) == 2
        assert "block_size" in capsys.readouterr().err
        assert not out.exists()
    out.mkdir()  # an existing empty directory is kept, and stays empty
    assert main([*argv, "--no-tune-malloc"]) == 2
    assert out.is_dir() and not any(out.iterdir())


def test_a_run_that_diverges_after_a_step_keeps_its_directory(world, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", world["lm"], "--out", str(out), "--set", "optim.lr=1e30", "--no-tune-malloc"]
    assert main(argv) == 1
    assert "loss became nan" in capsys.readouterr().err
    assert (out / "metrics.jsonl").is_file() and (out / "checkpoints" / "last.pt").is_file()


@pytest.mark.parametrize("how", ["flag", "flag-after-command", "env"])
def test_debug_prints_the_traceback(how, capsys, monkeypatch):
    argv = ["info", "--layer", "btt", "64", "abc"]
    if how == "env":
        monkeypatch.setenv("STRUCTLIN_DEBUG", "1")
    else:
        argv = ["--debug", *argv] if how == "flag" else [*argv, "--debug"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "UsageError" in err
    assert len(_error_lines(err)) == 1


def test_info_config_reports_the_character_vocabulary_of_the_text(world, capsys):
    from structlin_lab.data import prepare_text

    cfg = yaml.safe_load(Path(world["lm"]).read_text())
    vocab = prepare_text(world["text"], tokenizer="char", cache_dir=cfg["data"]["root"]).vocab_size
    assert vocab < 20  # six words and spaces, not the GPT-2 BPE's 50,257
    assert main(["info", "--config", world["lm"]]) == 0
    out = capsys.readouterr().out
    assert f"vocabulary {vocab}" in out
    assert f"Linear(16, {vocab})" in out and "50257" not in out
    assert main(["info", "--config", world["lm"], "--vocab", "100"]) == 0
    assert "Linear(16, 100)" in capsys.readouterr().out


def test_fit_reference_defaults_to_dense_only_when_dense_was_fitted(world, tmp_path, capsys):
    assert main(["fit", world["fit_runs"], "--n-boot", "5"]) == 0
    assert "compute multiplier of btt vs dense" in capsys.readouterr().out
    assert main(["fit", world["fit_runs"], "--n-boot", "5", "--reference", "btt"]) == 0
    assert "compute multiplier of dense vs btt" in capsys.readouterr().out
    only_btt = tmp_path / "btt_only"
    only_btt.mkdir()
    for run in Path(world["fit_runs"]).glob("btt_*"):
        shutil.copytree(run, only_btt / run.name)
    assert main(["fit", str(only_btt), "--n-boot", "5"]) == 0
    assert "compute multiplier" not in capsys.readouterr().out


def test_run_sweep_refuses_zero_jobs():
    with pytest.raises(ValueError, match="jobs >= 1"):
        run_sweep(load_sweep(SWEEP), jobs=0)


_SLOW_SAVE = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from structlin_lab.cli import main

    save, calls = torch.save, []

    def slow_save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: half-write it, then hang until killed
            f.write(b"PK\\x03\\x04 a partial checkpoint")
            f.flush()
            Path(sys.argv[1]).write_text("saving")
            time.sleep(600)
        return save(obj, f, *args, **kwargs)

    torch.save = slow_save
    sys.exit(main(sys.argv[2:]))
    """
)


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_previous_one(world, tmp_path, capsys):
    """SIGKILL the trainer while it writes its step-2 checkpoint: ``last.pt`` is still the
    step-1 one, and ``--resume`` from it ends where an uninterrupted run ends."""
    run, marker = tmp_path / "killed", tmp_path / "saving"
    argv = ["train", world["lm"], "--out", str(run), "--no-tune-malloc"]
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_SAVE, str(marker), *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.stderr.read().decode() if proc.poll() is not None else ""
        assert list((run / "checkpoints").glob(".last.pt.tmp-*")), "no temp file mid-write"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 1
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"resumed {run} at step 1/4" in out
    resumed = json.loads(out.strip().splitlines()[-1])
    assert main(["train", world["lm"], "--out", str(tmp_path / "whole"), "--no-tune-malloc"]) == 0
    whole = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["step"] == whole["step"] == 4
    assert resumed["test_loss"] == pytest.approx(whole["test_loss"], rel=1e-6)
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-6)


def test_a_closed_pipe_is_not_an_error():
    """`structlin info | head -1`: the reader closes the pipe early; no error line, exit 0."""
    import subprocess
    import sys

    cmd = f"{sys.executable} -m structlin_lab info | head -1"
    out = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd}"], capture_output=True, text=True)
    assert out.stdout.startswith("structlin ") and out.stderr == ""
    assert out.returncode == 0
