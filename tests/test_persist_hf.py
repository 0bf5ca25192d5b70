"""Hugging Face round trips: GPT-2 (Conv1D, tied head), Llama, BERT and ViT from tiny local
configs, saved structured and reloaded in a fresh process with the one documented call."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import structlin as sl
from structlin.persist import WEIGHTS_NAME, save_structured

pytest.importorskip("transformers", reason="the Hugging Face round trips need transformers")
pytest.importorskip("safetensors", reason="save_structured needs safetensors")

TESTS = Path(__file__).parent
SURGERY = {  # a mix of structures, inits and options per family
    "gpt2": ("btt:rank=2", {"init": "from_dense", "overrides": {"c_proj": "tt:rank=2"}}),
    "llama": (
        "monarch:blocks=4",
        {"norm": "rms_clamp", "overrides": {"down_proj": "low_rank:rank=8"}},
    ),
    "bert": ("low_rank:rank=4", {"init": "from_dense"}),
    "vit": ("kron", {"overrides": {"attention.q_proj": {"structure": "btt", "rank": 2}}}),
}
AUTO = {
    "gpt2": "AutoModelForCausalLM",
    "llama": "AutoModelForCausalLM",
    "bert": "AutoModel",
    "vit": "AutoModelForImageClassification",
}

# Runs in a fresh process: builds each dense base from the saved config.json and reloads it with
# load_structured; never repeats the surgery by hand.
RELOAD = """
import json, sys, torch, transformers as tf
from structlin.persist import load_structured
from structlin.structure_config import structure_config
import persist_cases as pc
root, auto = sys.argv[1], json.loads(sys.argv[2])
ref = torch.load(f"{root}/ref.pt", weights_only=True)
for name, cls_name in auto.items():
    d = f"{root}/{name}"
    cls = getattr(tf, cls_name)
    try:
        cls.from_pretrained(d)
        print(name, "from_pretrained-loaded")
    except OSError as err:
        print(name, "from_pretrained-refused", "model.safetensors" in str(err))
    model = load_structured(cls.from_config(tf.AutoConfig.from_pretrained(d)), d).eval()
    print(name, "equal", torch.equal(pc.hf_output(model, name), ref[name]))
    print(name, "config", structure_config(model).to_dict() == json.loads(
        open(f"{d}/structure.json").read())["structure"])
    if name + ".gen" in ref:
        ids = pc.hf_inputs(name)["input_ids"]
        mask = torch.ones_like(ids)
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
        )
        print(name, "generate", torch.equal(out, ref[name + ".gen"]))
"""


def test_hf_structured_models_reload_in_a_fresh_process(tmp_path):
    import persist_cases as pc

    ref = {}
    for name, model in pc.tiny_hf_models().items():
        spec, kwargs = SURGERY[name]
        report = sl.structurize(model, spec, **kwargs)
        assert report.replaced and report.config.paths == report.replaced
        model.eval()
        ref[name] = pc.hf_output(model, name)
        if name in ("gpt2", "llama"):
            ids = pc.hf_inputs(name)["input_ids"]
            ref[name + ".gen"] = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=0,
            )
        save_structured(model, tmp_path / name)
        files = {p.name for p in (tmp_path / name).iterdir()}
        assert {"config.json", "structure.json", WEIGHTS_NAME} <= files
        assert "model.safetensors" not in files and "pytorch_model.bin" not in files
    manifest = json.loads((tmp_path / "gpt2" / "structure.json").read_text())
    assert manifest["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    torch.save(ref, tmp_path / "ref.pt")
    out = subprocess.run(
        [sys.executable, "-c", RELOAD, str(tmp_path), json.dumps(AUTO)],
        capture_output=True,
        text=True,
        cwd=TESTS,
        env={**_env(), "PYTHONPATH": str(TESTS)},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = set(out.stdout.split("\n"))
    for name in AUTO:
        assert f"{name} from_pretrained-refused True" in lines, out.stdout
        assert f"{name} equal True" in lines, out.stdout
        assert f"{name} config True" in lines, out.stdout
    assert {"gpt2 generate True", "llama generate True"} <= lines, out.stdout


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["HF_HUB_OFFLINE"] = "1"
    return env
