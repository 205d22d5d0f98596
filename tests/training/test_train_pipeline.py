"""`switchboard-train` end to end on a tiny GPT-2: adapters on CodeAlpaca and Gutenberg slices,
centroids, the MLP router (router-only and the three complexity-aware MoLoRA phases), and the eval report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.paths import DATA
from training.cli import main

CODE = "codealpaca/code_alpaca_2k.json"
LIT = "gutenberg"
TRAIN = ["--rank", "8", "--alpha", "16", "--lr", "3e-3", "--batch-size", "8", "--max-length", "96", "-q"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir: Path, sample_data: Path) -> Path:
    """A store with `code` (trained with the Unified LoRA controller), `lit`, and an MLP router `mlp`."""
    torch.set_num_threads(1)
    store = tmp_path_factory.mktemp("store")
    base = ["--base-model", str(tiny_model_dir), "--adapter-dir", str(store)]
    code = [
        "--data",
        str(sample_data / CODE),
        "--name",
        "code",
        "--limit",
        "80",
        "--max-steps",
        "40",
        "--controller",
    ]
    assert main(["adapter", *base, *code, *TRAIN]) == 0
    lit = ["--data", str(sample_data / LIT), "--name", "lit", "--limit", "64", "--max-steps", "40"]
    assert main(["adapter", *base, *lit, *TRAIN]) == 0
    router = ["--adapters", "code,lit", "--name", "mlp", "--max-steps", "60", "-q"]
    assert main(["router", *base, *router]) == 0
    return store


def meta(store: Path, name: str) -> dict:
    return json.loads((store / name / "switchboard.json").read_text())


def test_adapters_beat_base_on_their_own_domain(trained: Path) -> None:
    for name in ("code", "lit"):
        ev = meta(trained, name)["eval"]
        assert ev["val_loss_adapter"] < ev["val_loss_base"] - 0.02, (name, ev)
        assert ev["val_ppl_adapter"] < ev["val_ppl_base"]


def test_adapter_folder_is_plain_peft_with_safetensors_only(trained: Path, tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from router_core.artifacts import load_centroids
    from router_core.store_rules import base_fingerprint

    folder = trained / "code"
    files = {p.name for p in folder.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "switchboard.json",
        "centroid.safetensors",
    } <= files
    assert {"examples.jsonl", "controller.jsonl"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["fan_in_fan_out"] is True
    assert set(cfg["target_modules"]) == {"c_attn", "c_proj"}

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    x = torch.randint(0, 300, (1, 10))
    base_logits = base(x).logits
    fp = base_fingerprint(base)
    peft = PeftModel.from_pretrained(base, str(folder)).eval()
    assert (peft(x).logits - base_logits).abs().max() > 1e-4

    m = meta(trained, "code")
    for key in ("name", "version", "description", "domain", "base_model", "base_fingerprint", "created"):
        assert m[key], key
    assert m["base_fingerprint"] == fp and m["version"] == 1
    tr = m["training"]
    assert tr["template"]["name"] == "alpaca" and len(tr["data_hash"]) == 64 and tr["steps"] == 40
    assert {"r", "alpha", "target_modules"} <= set(tr["lora"]) and tr["train_loss"] > 0
    assert tr["controller"]["steps_by_mode"] and sum(tr["controller"]["steps_by_mode"].values()) == 40
    assert meta(trained, "lit")["training"]["template"]["name"] == "plain"
    centroids, emb_id = load_centroids(folder / "centroid.safetensors")
    lines = (folder / "examples.jsonl").read_text().splitlines()
    # default k 64: every training prompt is a centroid row up to 64, k-means beyond
    assert emb_id == "base" and centroids.shape == (min(len(lines), 64), 64)
    assert 0 < len(lines) <= 256 and "query" in json.loads(lines[0])


def test_server_store_reader_accepts_the_adapters(trained: Path, tiny_model_dir: Path) -> None:
    """Contract with the server: its own validator reads what training wrote (fingerprint included)."""
    from transformers import AutoModelForCausalLM

    from router_core.store_rules import base_fingerprint
    from server.engine.adapter_weights import BaseSpec
    from server.engine.base_model import targetable_modules
    from server.store.folder import read_adapter

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    spec = BaseSpec(module_shapes=targetable_modules(base), fingerprint=base_fingerprint(base), max_rank=64)
    for name in ("code", "lit"):
        weights = read_adapter(name, trained / name, spec)
        assert (
            weights.rank == 8 and weights.centroid_embedder == "base" and weights.centroids.shape[1] == 64
        )
        assert weights.meta["base_fingerprint"] == spec.fingerprint


def test_centroids_refit_with_k(trained: Path, tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    from router_core.artifacts import load_centroids

    store = tmp_path / "store"
    shutil.copytree(trained, store)
    rc = main(["centroids", "--base-model", str(tiny_model_dir), "--adapter-dir", str(store), "--k", "3"])
    assert rc == 0 and "3 centroid(s)" in capsys.readouterr().out
    for name in ("code", "lit"):
        c, emb_id = load_centroids(store / name / "centroid.safetensors")
        assert c.shape == (3, 64) and emb_id == "base"
        assert torch.allclose(c.norm(dim=1), torch.ones(3), atol=1e-5)
        assert meta(store, name)["centroids"]["k"] == 3


@pytest.mark.slow
def test_centroids_with_the_real_minilm_encoder(trained: Path, tmp_path: Path) -> None:
    from router_core.artifacts import load_centroids
    from tests.conftest import require_minilm

    require_minilm()
    store = tmp_path / "store"
    shutil.copytree(trained, store)
    assert (
        main(["centroids", "--adapter-dir", str(store), "--adapters", "code,lit", "--embedder", "minilm", "--k", "1"])
        == 0
    )
    code, emb_id = load_centroids(store / "code" / "centroid.safetensors")
    lit, _ = load_centroids(store / "lit" / "centroid.safetensors")
    assert emb_id.startswith("minilm:") and code.shape == (1, 384)
    assert float(code @ lit.T) < 0.6  # code prompts and novel passages are far apart for MiniLM


def test_router_is_loadable_and_routes(trained: Path) -> None:
    from router_core.artifacts import load_router

    router = load_router(trained / "_routers" / "mlp", available_adapters=["code", "lit"])
    assert router.adapter_names == ("code", "lit") and router.embedder_id == "base"
    cfg = json.loads((trained / "_routers" / "mlp" / "router.json").read_text())
    assert cfg["extra"]["phases"] == ["router"] and cfg["extra"]["train_accuracy"] >= 0.75
    assert cfg["hidden"] == 256 and cfg["complexity_dim"] == 6
    w = router.route(torch.nn.functional.normalize(torch.randn(3, 64), dim=-1), torch.rand(3, 6))
    assert w.shape == (3, 2) and torch.allclose(w.sum(-1), torch.ones(3))


def test_router_three_phases_update_experts(trained: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    store = tmp_path / "store"
    shutil.copytree(trained, store)
    before = load_file(store / "code" / "adapter_model.safetensors")
    args = [
        "router",
        "--base-model",
        str(tiny_model_dir),
        "--adapter-dir",
        str(store),
        "--adapters",
        "code,lit",
    ]
    args += ["--name", "joint", "--phases", "router,expert,joint", "--max-steps", "12", "--batch-size", "8"]
    args += ["--max-length", "48", "--expert-lr", "1e-3", "-q"]
    assert main(args) == 0
    extra = json.loads((store / "_routers" / "joint" / "router.json").read_text())["extra"]
    assert [p for _, p in extra["phase_history"]] == ["router", "expert", "joint"]
    assert extra["experts_updated"] == {"code": 2, "lit": 2}
    m = meta(store, "code")
    assert m["version"] == 2 and m["training"]["router_phases"]["router"] == "joint"
    after = load_file(store / "code" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (store / "code" / "examples.jsonl").is_file() and (
        store / "code" / "centroid.safetensors"
    ).is_file()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(store / "code"))


def test_eval_writes_report_with_plots(
    trained: Path, tiny_model_dir: Path, sample_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    args = ["eval", "--base-model", str(tiny_model_dir), "--adapter-dir", str(trained), "--router", "mlp"]
    args += ["--data", f"code={sample_data / CODE}", f"lit={sample_data / LIT}", "--limit", "6"]
    args += ["--max-length", "64", "--reroute-every", "4", "--out", str(out), "-q"]
    routing_data = DATA / "routing"
    args += ["--held-out", f"code={routing_data / 'heldout_code.jsonl'}", f"lit={routing_data / 'heldout_literature.jsonl'}"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    # the centroid router with its fitted temperature, and at T = 1 for comparison
    # ... and Arrow, per token from the adapters' weights (no embedding, no examples)
    # (and without its confidence map, when one was fitted: voting over enough example rows)
    routers = {"centroid", "centroid@T=1", "mlp/mlp", "arrow"}
    assert set(report["routing"]) - {"centroid@no-map"} == routers
    routers = set(report["routing"])
    assert 0 < report["routing"]["centroid"]["temperature"] < 1 == report["routing"]["centroid@T=1"]["temperature"]
    for r in report["routing"].values():
        assert 0.0 <= r["accuracy"] <= 1.0 and sum(map(sum, r["confusion"])) == 12
        assert r["held_out"]["n"] == {"code": 194, "lit": 191} and 0.0 <= r["held_out"]["accuracy"] <= 1.0
        assert 0.0 <= r["held_out"]["ece"] <= 1.0 and sum(b["count"] for b in r["held_out"]["reliability"]) == 385
        per_source = r["held_out"]["per_source"]  # each record's `source` up to its first "/"
        assert {"cpython-stdlib", "cpython-include", "tinyshakespeare"} <= set(per_source)
        assert sum(v["n"] for v in per_source.values()) == 385
    assert "complexity_mse" in report["routing"]["mlp/mlp"]
    for d in ("code", "lit"):
        ppl = report["perplexity"][d]
        assert set(ppl["adapters"]) == {"code", "lit"} and set(ppl["routed"]) == routers
        assert ppl["adapters"][d] < ppl["base"]  # held-out own-domain perplexity below the base
    for png in ("confusion_centroid.png", "confusion_mlp_mlp.png", "confusion_arrow.png", "perplexity.png",
                "phi_code.png", "reliability.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    md = (out / "report.md").read_text()
    assert "Routing accuracy" in md and "![perplexity.png](perplexity.png)" in md and "φ" in md
    assert "in-distribution vs held-out sources" in md and "best single" in md and "held-out ECE" in md


def test_resume_from_checkpoint(tiny_model_dir: Path, sample_data: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    args = ["adapter", "--base-model", str(tiny_model_dir), "--adapter-dir", str(store), "--name", "gsm"]
    args += ["--data", str(sample_data / "gsm8k" / "test.jsonl"), "--limit", "24", "--rank", "4"]
    args += ["--max-length", "48", "--save-steps", "2", "--batch-size", "4", "-q"]
    assert main([*args, "--max-steps", "4"]) == 0
    assert (store / ".work" / "gsm" / "checkpoints" / "checkpoint-4").is_dir()
    assert main([*args, "--max-steps", "6", "--resume"]) == 0
    tr = meta(store, "gsm")["training"]
    assert tr["resumed"] is True and tr["steps"] == 6 and meta(store, "gsm")["version"] == 2


def test_user_errors_are_one_line(tiny_model_dir: Path, sample_data: Path, tmp_path: Path, capsys) -> None:
    data = ["--data", str(sample_data / "gsm8k" / "test.jsonl"), "--limit", "8", "--max-steps", "1", "-q"]
    rc = main(
        [
            "adapter",
            "--base-model",
            str(tmp_path / "nope"),
            "--adapter-dir",
            str(tmp_path),
            "--name",
            "x",
            *data,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "local folder" in err and "hub id" in err and "Traceback" not in err
    ok_base = ["--base-model", str(tiny_model_dir), "--adapter-dir", str(tmp_path)]
    assert main(["adapter", *ok_base, "--name", "x", "--target-modules", "nonexistent", *data]) == 2
    assert main(["adapter", *ok_base, "--name", "bad:name", *data]) == 2
    assert main(["centroids", *ok_base, "--adapters", "missing"]) == 2


def test_running_server_picks_up_trained_outputs_on_reload(trained: Path, tiny_model_dir: Path) -> None:
    """Training → store → live server: a server started before anything was registered serves the
    trained adapters and router after `POST /admin/reload`, without a restart."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from tests.conftest import ADMIN
    from tests.tiny import app_settings

    settings = app_settings(tiny_model_dir, trained, store={"scan_on_start": False})
    with TestClient(create_app(settings)) as client:
        before = {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert not {"code", "lit"} & before
        report = client.post("/admin/reload", headers=ADMIN).json()
        assert {"code", "lit"} <= set(report["loaded"]) and not report["failed"]
        assert "mlp" in report["routers"] and not report["failed_routers"]
        for body in ({"model": "code"}, {"model": "auto", "routing": {"router": "mlp"}}, {"model": "auto"}):
            r = client.post("/v1/completions", json={**body, "prompt": "Write a Python function", "max_tokens": 4})
            assert r.status_code == 200, r.text
            weights = r.json()["choices"][0]["routing"][0]["weights"]
            assert set(weights) <= {"code", "lit"} and weights
