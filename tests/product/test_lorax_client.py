"""LoRAX's REST API through the real `lorax-client` package against a live loopback server:
generate (with details and alternatives), stream, merged adapters (our exact linear mixture) and
LoRAX's structured output, each compared with the same request over /v1/completions.

lorax-client pins an old huggingface_hub, so it lives in its own venv, `.venv-lorax` (made by
scripts/setup.sh); the client runs there as a subprocess and prints its results as JSON."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.live import CLIENT_KEY as KEY

ROOT = Path(__file__).resolve().parents[2]
LORAX_PYTHON = Path(os.environ.get("SWITCHBOARD_LORAX_PYTHON", ROOT / ".venv-lorax" / "bin" / "python"))
PROMPT = "def add(a, b):"
SCHEMA = {"type": "object", "properties": {"k": {"enum": ["a", "b"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["k", "n"], "additionalProperties": False}

CLIENT_SCRIPT = r'''
import json, sys
from lorax import Client
from lorax.errors import BadRequestError, ValidationError
base, key, prompt, schema = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
c = Client(base, headers={"Authorization": f"Bearer {key}"}, timeout=120)
out = {}
r = c.generate(prompt, adapter_id="alpha", max_new_tokens=6, details=True, return_k_alternatives=2)
out["generate"] = {"text": r.generated_text, "finish": r.details.finish_reason, "n": r.details.generated_tokens,
                   "ids": [t.id for t in r.details.tokens], "alts": [len(t.alternative_tokens or []) for t in r.details.tokens]}
events = list(c.generate_stream(prompt, adapter_id="alpha", max_new_tokens=6))
out["stream"] = {"ids": [e.token.id for e in events], "last": events[-1].generated_text,
                 "finish": events[-1].details.finish_reason}
merged = {"ids": ["alpha", "beta"], "weights": [0.3, 0.7], "merge_strategy": "linear", "density": 1.0}
out["merged"] = c.generate(prompt, merged_adapters=merged, max_new_tokens=6).generated_text
fmt = {"type": "json_object", "schema": schema}
out["json"] = c.generate(prompt, adapter_id="beta", max_new_tokens=40, do_sample=True, seed=3, response_format=fmt).generated_text
out["full"] = c.generate(prompt, adapter_id="alpha", max_new_tokens=6, return_full_text=True).generated_text
try:
    c.generate(prompt, adapter_id="nope", max_new_tokens=2)
    out["missing"] = "no error"
except Exception as e:
    out["missing"] = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def server(request):
    if not LORAX_PYTHON.exists():
        pytest.skip(f"no lorax-client venv at {LORAX_PYTHON}: run scripts/setup.sh (it makes .venv-lorax with "
                    "`pip install lorax-client==0.6.3`) or set SWITCHBOARD_LORAX_PYTHON")
    return request.getfixturevalue("live_clients").base


def _completion(base: str, **body) -> str:
    r = httpx.post(f"{base}/v1/completions", json={"prompt": PROMPT, "temperature": 0.0, **body},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_lorax_client_generate_stream_merged_and_json(server):
    run = subprocess.run([str(LORAX_PYTHON), "-c", CLIENT_SCRIPT, server, KEY, PROMPT, json.dumps(SCHEMA)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    ref = _completion(server, model="alpha", max_tokens=6)
    gen = out["generate"]
    assert gen["text"] == ref and gen["n"] == 6 and gen["finish"] == "length" and gen["alts"] == [2] * 6
    assert out["stream"]["ids"] == gen["ids"] and out["stream"]["last"] == ref and out["stream"]["finish"] == "length"
    assert out["merged"] == _completion(server, model="auto", max_tokens=6,
                                        routing={"weights": {"alpha": 0.3, "beta": 0.7}})
    import jsonschema

    jsonschema.validate(json.loads(out["json"]), SCHEMA)
    assert out["full"] == PROMPT + ref
    assert "nope" in out["missing"] and "no error" not in out["missing"]


def test_lorax_routes_need_the_api_key(server):
    r = httpx.post(f"{server}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}, timeout=60)
    assert r.status_code == 401
    r = httpx.post(f"{server}/generate", json={"inputs": PROMPT, "parameters": {"merged_adapters": {
        "ids": ["alpha"], "weights": [1.0], "merge_strategy": "ties"}}}, headers={"Authorization": f"Bearer {KEY}"},
        timeout=60)
    assert r.status_code == 400 and r.json()["error_type"] == "validation" and "ties" in r.json()["error"]
