"""save_structured / load_structured and the structure config: round trips in a fresh process,
every mismatch a clear error that leaves the model untouched, atomic writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from persist_cases import net
from structlin import make_linear, parse_spec
from structlin.persist import (
    MANIFEST_NAME,
    WEIGHTS_NAME,
    StructureMismatchError,
    load_structured,
    read_structure,
    save_structured,
)
from structlin.structure_config import CONFIG_VERSION, StructureConfig, structure_config
from structlin.surgery import structurize

pytest.importorskip("safetensors", reason="save_structured needs safetensors")
TESTS = Path(__file__).parent


def structured_net(seed: int = 0) -> nn.Module:
    """Two surgeries: mixed overrides and norm=rms_clamp, then from_dense on the stem."""
    model = net(seed)
    structurize(
        model,
        "btt:rank=2",
        exclude_modules=["stem"],
        norm="rms_clamp",
        overrides={"blocks.0.fc2": "tt:rank=3", r"blocks\.1\.fc1": {"learn_gamma": False}},
    )
    structurize(model, "kron", target_modules=["stem"], init="from_dense")
    with torch.no_grad():  # as after training: every parameter away from its init
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def test_config_lists_both_surgeries_and_round_trips_through_json():
    model = structured_net()
    config = structure_config(model)
    assert config.version == CONFIG_VERSION
    assert config.paths == ["stem", "blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"]
    by_path = {e.path: e for e in config.modules}
    assert by_path["stem"].init == "from_dense" and by_path["blocks.0.fc1"].init == "mup"
    assert by_path["stem"].bias is False and by_path["stem"].in_features == 97
    assert by_path["blocks.1.fc1"].spec.endswith("norm=rms_clamp,learn_gamma=False")
    assert all(e.base == "Linear" and e.dtype == "float32" for e in config.modules)
    assert StructureConfig.from_json(config.to_json()) == config
    for entry in config.modules:
        layer = model.get_submodule(entry.path)
        name, opts = parse_spec(entry.spec)
        assert (name, opts) == (layer.structure, layer.options())
        rebuilt = make_linear(entry.spec, entry.in_features, entry.out_features, bias=entry.bias)
        assert rebuilt.spec == entry.spec
        assert rebuilt.state_dict().keys() == layer.state_dict().keys()
    with pytest.raises(ValueError, match="version 99"):
        StructureConfig.from_dict({**config.to_dict(), "version": 99})


def test_report_carries_config_and_to_dict():
    model = net()
    report = structurize(model, "low_rank:rank=4", init="from_dense")
    assert report.config == structure_config(model)
    data = json.loads(json.dumps(report.to_dict()))
    assert [r["name"] for r in data["rows"]][:2] == ["stem", "blocks.0.fc1"]
    assert data["totals"] == report.totals()
    assert StructureConfig.from_dict(data["config"]) == report.config
    dry = structurize(net(), "low_rank:rank=4", dry_run=True)
    assert [(e.path, e.spec) for e in dry.config.modules] == [
        (e.path, e.spec) for e in report.config.modules
    ]
    assert all(e.init == "mup" for e in dry.config.modules)


RELOAD = """
import sys, torch
from persist_cases import net
from structlin.persist import load_structured
from structlin.structure_config import structure_config, StructureConfig
d = sys.argv[1]
model = load_structured(net(seed=123), d).eval()
ref = torch.load(d + "/../ref.pt", weights_only=True)
print("equal", torch.equal(model(ref["x"]), ref["y"]))
print("config", structure_config(model) == StructureConfig.from_json(ref["config"]))
"""


def test_round_trip_in_a_fresh_process(tmp_path):
    model = structured_net()
    x = torch.randn(5, 97)
    with torch.no_grad():
        y = model(x)
    save_structured(model, tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved").iterdir()} == {MANIFEST_NAME, WEIGHTS_NAME}
    config = structure_config(model).to_json()
    torch.save({"x": x, "y": y, "config": config}, tmp_path / "ref.pt")
    # a fresh process with a differently seeded dense base: nothing but the files carries over
    out = subprocess.run(
        [sys.executable, "-c", RELOAD, str(tmp_path / "saved")],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1", "PATH": ""},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["equal True", "config True"], out.stdout


def test_load_in_process_equals_and_saving_again_overwrites(tmp_path):
    model = structured_net()
    save_structured(model, tmp_path / "d")
    save_structured(model, tmp_path / "d")  # a directory written by save_structured is replaced
    loaded = load_structured(net(seed=5), tmp_path / "d").eval()
    x = torch.randn(3, 97)
    assert torch.equal(loaded(x), model(x))
    assert read_structure(tmp_path / "d") == structure_config(model)
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary folders left


def _snapshot(model: nn.Module) -> tuple[list[tuple[str, type]], dict[str, torch.Tensor]]:
    modules = [(n, type(m)) for n, m in model.named_modules()]
    return modules, {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: tuple, b: tuple) -> bool:
    (mods_a, state_a), (mods_b, state_b) = a, b
    return (
        mods_a == mods_b
        and state_a.keys() == state_b.keys()
        and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    )


def _edit_manifest(directory: Path, edit) -> None:
    path = directory / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("case", "build", "edit", "match"),
    [
        ("wrong widths", lambda: net(width=32), None, r"'stem' is Linear\(97, 32"),
        ("missing module", lambda: nn.Sequential(nn.Linear(97, 24)), None, "'stem'.*not in"),
        (
            "not linear",
            lambda: _with(net(), "blocks.0.fc1", nn.Identity()),
            None,
            "'blocks.0.fc1' is a Identity",
        ),
        ("wrong bias", lambda: _with(net(), "stem", nn.Linear(97, 24)), None, "'stem'.*bias"),
        (
            "extra structured",
            lambda: _with(net(), "head", make_linear("low_rank:rank=2", 24, 10)),
            None,
            r"\['head'\].*structured",
        ),
        (
            "changed option",
            net,
            lambda m: m["structure"]["modules"][1].update(spec="btt:rank=3,norm=rms_clamp"),
            r"'blocks.0.fc1'",
        ),
        (
            "unknown option",
            net,
            lambda m: m["structure"]["modules"][1].update(spec="btt:rnk=2"),
            r"'blocks.0.fc1'.*does not build",
        ),
        ("wrong dtype", lambda: net().double(), None, r"float32.*float64"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_mismatch_is_an_error_naming_the_module_and_changes_nothing(
    tmp_path, case, build, edit, match
):
    save_structured(structured_net(), tmp_path / "d")
    if edit is not None:
        _edit_manifest(tmp_path / "d", edit)
    model = build()
    before = _snapshot(model)
    with pytest.raises(StructureMismatchError, match=match):
        load_structured(model, tmp_path / "d")
    assert _same(_snapshot(model), before), case


def _with(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
    return model


def test_conv1d_base_is_checked(tmp_path):
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    model = nn.Sequential(conv1d(16, 12), nn.ReLU(), nn.Linear(16, 4))  # Conv1D(nf=out, nx=in)
    structurize(model, "low_rank:rank=2", init="from_dense")
    assert structure_config(model).modules[0].base == "Conv1D"
    save_structured(model, tmp_path / "d")
    with pytest.raises(StructureMismatchError, match=r"'0' is Linear\(12, 16.*Conv1D\(12, 16"):
        load_structured(
            nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4)), tmp_path / "d"
        )
    fresh = nn.Sequential(conv1d(16, 12), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(2, 12)
    assert torch.equal(load_structured(fresh, tmp_path / "d")(x), model(x))


def test_tied_weights_are_written_once_and_restored(tmp_path):
    def tied():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 8), nn.Linear(8, 11, bias=False))
        model[2].weight = model[0].weight
        return model

    model = tied()
    structurize(model, "low_rank:rank=2", target_modules=["1"])
    save_structured(model, tmp_path / "d")
    manifest = json.loads((tmp_path / "d" / MANIFEST_NAME).read_text())
    assert manifest["tied"] == {"2.weight": "0.weight"}
    loaded = load_structured(tied(), tmp_path / "d")
    assert loaded[2].weight is loaded[0].weight
    ids = torch.tensor([[1, 4, 7]])
    assert torch.equal(loaded(ids), model(ids))


def test_save_is_atomic_and_refuses_foreign_directories(tmp_path):
    class BadConfig:
        def save_pretrained(self, directory):
            raise RuntimeError("disk full")

    model = structured_net()
    model.config = BadConfig()
    with pytest.raises(RuntimeError, match="disk full"):
        save_structured(model, tmp_path / "d")
    assert list(tmp_path.iterdir()) == []  # no half-written directory, no temporary one
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not written by save_structured"):
        save_structured(structured_net(), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_not_a_saved_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=MANIFEST_NAME):
        load_structured(net(), tmp_path)


def test_missing_safetensors_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        save_structured(structured_net(), tmp_path / "d")
