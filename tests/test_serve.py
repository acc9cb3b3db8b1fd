"""The OpenAI-compatible server, started for real on loopback and driven with a real HTTP client."""

from __future__ import annotations

import asyncio
import copy
import json
import socket
import threading
import time

import httpx
import pytest
import torch

from conftest import randomize_adapters, submit_and_wait
from lorakit import LoraConfig, get_lora_model, load_adapter, save_adapter
from lorakit.engine import Engine, Request
from lorakit.generate import SamplingOptions, generate
from lorakit.kernels import gemm
from lorakit.models import load_model
from lorakit.pool import AdapterPool
from lorakit.serve import Server, create_app

KEY = "test-key"
ADAPTERS = {  # different ranks and target sets
    "alpha": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    "beta": LoraConfig(r=8, lora_alpha=8, target_modules="all-linear"),
    "gamma": LoraConfig(r=4, lora_alpha=16, target_modules=["o_proj", "down_proj", "up_proj"]),
}
PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "1, 2, 3,", "Hello", "JSON:",
           "Dear team,", "Q: why is the sky blue?\nA:"]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base, tok = load_model(str(tiny_model_dir), dtype=torch.float64)
    for i, (name, cfg) in enumerate(ADAPTERS.items()):
        m = get_lora_model(copy.deepcopy(base), cfg)
        randomize_adapters(m, seed=i + 1, std=0.5)
        save_adapter(m, root / name)
    # a fourth adapter on disk, loaded later through the admin route
    m = get_lora_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["k_proj"]))
    randomize_adapters(m, seed=9, std=0.5)
    save_adapter(m, root / "late")
    server = Server(copy.deepcopy(base), tok, "tiny-base", {n: str(root / n) for n in ADAPTERS}, api_key=KEY,
                    allow_adapter_updates=True, adapter_root=str(root), max_batch=64)
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    assert uv.started
    yield {"url": f"http://127.0.0.1:{port}", "server": server, "base": base, "tok": tok, "root": root}
    uv.should_exit = True
    thread.join(timeout=30)


def alone(setup, adapter: str | None, ids: list[int]) -> str:
    """The same prompt generated alone (lorakit.generate, no batching) with that adapter."""
    model = copy.deepcopy(setup["base"])
    if adapter is not None:
        load_adapter(model, setup["root"] / adapter)
    return generate(model, setup["tok"], torch.tensor([ids]), SamplingOptions(max_new_tokens=MAX_TOKENS))


HEADERS = {"Authorization": f"Bearer {KEY}"}


def test_models_and_health(setup):
    r = httpx.get(setup["url"] + "/v1/models", headers=HEADERS)
    assert r.status_code == 200
    data = {m["id"]: m for m in r.json()["data"]}
    assert set(data) == {"tiny-base", *ADAPTERS}
    assert data["tiny-base"]["parent"] is None and all(data[n]["parent"] == "tiny-base" for n in ADAPTERS)
    assert httpx.get(setup["url"] + "/health").json()["status"] == "ok"


def test_200_concurrent_requests_over_three_adapters_and_base_match_each_alone(setup):
    tok = setup["tok"]
    names = ["tiny-base", *ADAPTERS]
    # every (model, prompt, completion or chat) combination, 64 in all, over 200 requests
    jobs = [(names[i % 4], PROMPTS[(i // 4) % len(PROMPTS)], (i // 32) % 2 == 1) for i in range(200)]

    def prompt_ids(prompt, chat):
        if chat:
            return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"]
        return tok(prompt)["input_ids"]

    expected = {}
    for name, prompt, chat in set(jobs):
        expected[name, prompt, chat] = alone(setup, None if name == "tiny-base" else name, prompt_ids(prompt, chat))

    by_prompt: dict = {}
    for (name, prompt, chat), text in expected.items():
        by_prompt.setdefault((prompt, chat), {})[name] = text
    # the adapters really change the outputs: most prompts get a different completion from each model
    assert sum(len(set(t.values())) == len(t) > 1 for t in by_prompt.values()) > len(by_prompt) // 2

    async def one(client, name, prompt, chat):
        if chat:
            body = {"model": name, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
                    "temperature": 0}
            r = await client.post("/v1/chat/completions", json=body)
            return r, lambda j: j["choices"][0]["message"]["content"]
        body = {"model": name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
        r = await client.post("/v1/completions", json=body)
        return r, lambda j: j["choices"][0]["text"]

    async def main():
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with httpx.AsyncClient(base_url=setup["url"], headers=HEADERS, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, *job) for job in jobs))

    engine = setup["server"].engine
    steps_before = engine.steps
    results = asyncio.run(main())
    for (name, prompt, chat), (r, text_of) in zip(jobs, results):
        assert r.status_code == 200, r.text
        body = r.json()
        assert text_of(body) == expected[name, prompt, chat], (name, prompt, chat)
        usage = body["usage"]
        assert usage["prompt_tokens"] == len(prompt_ids(prompt, chat))
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert 1 <= usage["completion_tokens"] <= MAX_TOKENS
    assert engine.max_rows_seen > 16  # requests really shared forward passes
    assert engine.steps - steps_before < 200 * MAX_TOKENS / 8


def _sse_events(response):
    return [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def test_streaming_yields_the_same_text(setup):
    for path, body, text_of in [
        ("/v1/completions", {"prompt": PROMPTS[0]}, lambda e: e["choices"][0]["text"]),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPTS[1]}]},
         lambda e: e["choices"][0]["delta"].get("content", "")),
    ]:
        body = {**body, "model": "beta", "max_tokens": MAX_TOKENS, "temperature": 0}
        plain = httpx.post(setup["url"] + path, json=body, headers=HEADERS, timeout=60).json()
        r = httpx.post(setup["url"] + path, json={**body, "stream": True}, headers=HEADERS, timeout=60)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.text.rstrip().endswith("data: [DONE]")
        events = _sse_events(r)
        streamed = "".join(text_of(e) for e in events)
        want = plain["choices"][0]["text"] if "text" in plain["choices"][0] else \
            plain["choices"][0]["message"]["content"]
        assert streamed == want
        assert events[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
        assert events[-1]["usage"] == plain["usage"]


def test_sampling_with_a_seed_is_reproducible_and_stop_strings_cut(setup):
    body = {"model": "alpha", "prompt": PROMPTS[2], "max_tokens": MAX_TOKENS, "temperature": 1.0, "top_p": 0.9,
            "seed": 7}
    a = httpx.post(setup["url"] + "/v1/completions", json=body, headers=HEADERS, timeout=60).json()
    b = httpx.post(setup["url"] + "/v1/completions", json=body, headers=HEADERS, timeout=60).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    greedy = httpx.post(setup["url"] + "/v1/completions", json={**body, "temperature": 0}, headers=HEADERS,
                        timeout=60).json()["choices"][0]["text"]
    assert len(greedy) > 2
    stop = greedy[1:3]
    cut = httpx.post(setup["url"] + "/v1/completions", json={**body, "temperature": 0, "stop": [stop]},
                     headers=HEADERS, timeout=60).json()["choices"][0]
    assert cut["text"] == greedy[: greedy.find(stop)] and cut["finish_reason"] == "stop"


def test_errors_have_openai_shape_and_status_and_do_not_hurt_the_server(setup):
    url = setup["url"]

    def post(path, body=None, headers=HEADERS, content=None):
        return httpx.post(url + path, json=body, content=content, headers=headers, timeout=60)

    cases = [
        (post("/v1/completions", {"model": "nope", "prompt": "x"}), 404, "model_not_found"),
        (post("/v1/completions", content=b"{not json", headers={**HEADERS, "content-type": "application/json"}),
         400, None),
        (post("/v1/completions", {"model": "alpha"}), 400, None),  # no prompt
        (post("/v1/completions", {"model": "alpha", "prompt": "x", "temperature": "hot"}), 400, None),
        (post("/v1/completions", {"model": "alpha", "prompt": "word " * 600}), 400, "context_length_exceeded"),
        (post("/v1/completions", {"model": "alpha", "prompt": "x"}, headers={}), 401, "invalid_api_key"),
        (post("/v1/completions", {"model": "alpha", "prompt": "x"}, headers={"Authorization": "Bearer wrong"}), 401,
         "invalid_api_key"),
    ]
    for r, status, code in cases:
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        if code:
            assert err["code"] == code
    ok = post("/v1/completions", {"model": "gamma", "prompt": "Hello", "max_tokens": 3, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_admin_routes_load_and_unload_inside_the_root_only(setup):
    url = setup["url"]

    def post(path, body):
        return httpx.post(url + path, json=body, headers=HEADERS, timeout=60)

    assert post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "../../etc"}).status_code == 400
    assert post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "missing"}).status_code == 400
    r = post("/v1/load_lora_adapter", {"lora_name": "late", "lora_path": "late"})
    assert r.status_code == 200, r.text
    body = {"model": "late", "prompt": PROMPTS[3], "max_tokens": MAX_TOKENS, "temperature": 0}
    got = post("/v1/completions", body).json()["choices"][0]["text"]
    assert got == alone(setup, "late", setup["tok"](PROMPTS[3])["input_ids"])
    assert post("/v1/unload_lora_adapter", {"lora_name": "late"}).status_code == 200
    assert post("/v1/completions", body).status_code == 404
    assert post("/v1/unload_lora_adapter", {"lora_name": "late"}).status_code == 404


def test_admin_routes_are_off_by_default(setup):
    from fastapi.testclient import TestClient

    server = Server(copy.deepcopy(setup["base"]), setup["tok"], "tiny-base", {})
    with TestClient(create_app(server)) as client:
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "y"})
        assert r.status_code == 404 and "error" in r.json()


def test_cli_serve_starts_and_answers(setup, tiny_model_dir):
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", str(tiny_model_dir),
                             "--served-model-name", "tiny", "--adapter", f"alpha={setup['root'] / 'alpha'}",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        ids = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert ids == ["tiny", "alpha"]
        r = httpx.post(url + "/v1/completions", json={"model": "alpha", "prompt": "Hello", "max_tokens": 4,
                                                      "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "lorakit", "serve", "--model", str(tiny_model_dir), "--adapter",
                          "no-equals-sign"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "expected NAME=DIR" in bad.stderr and "Traceback" not in bad.stderr


def test_growing_cache_layer_appends_in_place_and_equals_concatenation():
    """The engine's cache layer writes each step's keys and values into spare columns: the same
    tensors as concatenating, earlier results left intact, and a new buffer only when the room runs
    out (room for half as many tokens again, at least 16)."""
    from lorakit.engine import _GrowingLayer

    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 5, 4, generator=g)
    layer = _GrowingLayer(keys.clone(), values.clone())
    seen, moves, buffer = [], 0, None
    for _ in range(30):
        k, v = torch.randn(2, 3, 1, 4, generator=g), torch.randn(2, 3, 1, 4, generator=g)
        got_k, got_v = layer.update(k, v)
        keys, values = torch.cat([keys, k], dim=2), torch.cat([values, v], dim=2)
        assert torch.equal(got_k, keys) and torch.equal(got_v, values) and layer.get_seq_length() == keys.shape[2]
        moves += layer.buffers[0] is not buffer
        buffer = layer.buffers[0]
        seen.append((got_k, keys))
    assert moves == 2  # step 1: 5 tokens + room for 16 = 21 columns; step 17: 21 + 16 = 37
    assert layer.buffers[0].shape[2] == 37
    assert all(torch.equal(a, b) for a, b in seen)  # later writes did not touch earlier views


def test_growing_cache_decodes_like_a_dynamic_cache():
    """Greedy decode of a tiny Llama over a cache of growing layers: logits equal a dynamic cache's."""
    from transformers import DynamicCache

    from conftest import tiny_llama
    from lorakit.engine import _GrowingLayer, _new_cache

    model = tiny_llama()
    ids = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        prefill = model(ids, use_cache=True).past_key_values
        growing = _new_cache()
        growing.layers = [_GrowingLayer(layer.keys.clone(), layer.values.clone()) for layer in prefill.layers]
        dynamic = DynamicCache()
        for i, layer in enumerate(prefill.layers):
            dynamic.update(layer.keys.clone(), layer.values.clone(), i)
        step = ids[:, -1:]
        for _ in range(20):
            a = model(step, past_key_values=growing, use_cache=True).logits
            b = model(step, past_key_values=dynamic, use_cache=True).logits
            assert torch.equal(a, b)
            step = a[:, -1:].argmax(-1)


@pytest.mark.skipif(gemm._linear_op() is None, reason="this torch build has no oneDNN linear")
def test_engine_on_onednn_with_bucketed_rows_gives_the_blas_tokens(tiny_model_dir, tmp_path, monkeypatch, onednn_rows):
    """An fp32 engine batching requests over two adapters and the base, rows joining and leaving:
    with its products on oneDNN (every row count padded to a ``gemm.row_bucket`` size, prefills
    included) the same greedy tokens as on the BLAS; oneDNN saw bucket sizes only, from one-row
    decode steps to prefills of over 64 rows."""
    base, tok = load_model(str(tiny_model_dir))
    base.requires_grad_(False)
    pool = AdapterPool(base, max_loaded=2)
    for i, name in enumerate(["alpha", "beta"]):
        m = get_lora_model(copy.deepcopy(base), ADAPTERS[name])
        randomize_adapters(m, seed=i + 1, std=0.5)
        save_adapter(m, tmp_path / name)
        pool.register(name, tmp_path / name)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 40, (12,), generator=g).tolist()
    work = [(torch.randint(3, 100, (n,), generator=g).tolist(), [None, "alpha", "beta"][i % 3], 3 + i % 6)
            for i, n in enumerate(lengths)]

    def run() -> list[list[int]]:
        engine = Engine(base, tok, pool, max_batch=5).start()
        engine.eos = set()  # every request makes exactly its max_new_tokens
        try:
            return submit_and_wait(engine, work)
        finally:
            engine.stop()

    monkeypatch.setattr(gemm, "CPU_GEMM", "blas")
    blas = run()
    assert onednn_rows == [] and [len(t) for t in blas] == [n for *_, n in work]
    monkeypatch.setattr(gemm, "CPU_GEMM", "onednn")
    assert run() == blas
    assert all(gemm.row_bucket(n) == n for n in onednn_rows)
    assert 1 in onednn_rows and max(onednn_rows) > 64
    assert len(set(onednn_rows)) < len({len(ids) for ids, *_ in work})  # fewer sizes than prompt lengths alone


def test_prefill_groups_bound_the_padding_and_keep_every_request():
    """Joining prompts are prefilled shortest first in groups whose left padding (every row padded to
    the group's longest) stays within 1/8 of their real tokens; each request lands in one group."""
    from lorakit.engine import prefill_groups

    g = torch.Generator().manual_seed(0)
    requests = [Request([0] * int(n), None, SamplingOptions(), lambda _: None)
                for n in torch.randint(16, 97, (32,), generator=g)]
    groups = prefill_groups(requests)
    assert sorted(map(id, (r for group in groups for r in group))) == sorted(map(id, requests))
    lengths = [[len(r.ids) for r in group] for group in groups]
    assert [n for group in lengths for n in group] == sorted(len(r.ids) for r in requests)
    assert all(len(group) * max(group) <= 9 / 8 * sum(group) for group in lengths)
    padded = sum(len(group) * max(group) for group in lengths)
    assert padded < 0.6 * len(requests) * max(map(max, lengths))  # one batch: every row padded to the longest
    assert len(groups) < len(requests) // 3  # still few forwards
    assert prefill_groups(requests, waste=float("inf")) == [sorted(requests, key=lambda r: len(r.ids))]


def test_idle_engine_gives_freed_memory_back_once_per_burst(tiny_model_dir, monkeypatch):
    """When the last running request finishes and none waits, the engine trims the heap (glibc keeps
    a burst's freed memory otherwise), once; never while rows are running."""
    import lorakit.engine as engine_module

    base, tok = load_model(str(tiny_model_dir))
    engine = Engine(base, tok, AdapterPool(base), max_batch=4)
    trims_while_running = []
    monkeypatch.setattr(engine_module, "return_freed_memory",
                        lambda: trims_while_running.append(len(engine.rows)) or True)
    engine.eos = set()
    engine.start()

    def burst(n: int) -> None:
        submit_and_wait(engine, [([5 + i, 6, 7], None, 4) for i in range(n)])

    def trims_reach(n: int) -> bool:
        deadline = time.time() + 10
        while engine.trims < n and time.time() < deadline:
            time.sleep(0.01)
        return engine.trims == n

    assert engine.trims == 0
    burst(6)
    assert trims_reach(1) and engine.steps > 0
    time.sleep(0.2)
    assert engine.trims == 1  # idle and already trimmed: not again
    burst(2)
    assert trims_reach(2)
    engine.stop()
    assert trims_while_running == [0, 0]
