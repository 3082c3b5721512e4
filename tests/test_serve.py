"""``loraops serve`` on loopback, driven by the official ``openai`` client, over a real SQLite MLflow store.

The server runs in-process (uvicorn in a thread) on the tiny Llama; three tiny adapters are registered
the way the pipeline registers them (MLflow Models with content hashes), plus one under another
registered model whose versions say they were trained on another base. ``serve.alias_ttl_s`` is 1 s
and ``serve.max_adapters`` 1, so alias moves and adapter eviction happen within a test.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlparse

import httpx
import pytest
from conftest import background_process, free_port, wait_until_healthy
from registry_helpers import PROMPT, make_adapter, register, registry_config

from loraops.config import ModelConfig, QuantConfig
from loraops.registry.mlflow_model import adapter_folder
from loraops.registry.store import make_client
from loraops.registry.versions import promote_version
from loraops.results import BaseModelRef
from loraops.serve.server import build_engine, server_config
from loraops.train.adapters import AdapterSource, load_adapter
from loraops.train.generate import generate_text

openai = pytest.importorskip("openai")

API_KEY = "test-key-not-a-secret"
OTHER_BASE = "org/another-base"
TOKENS = 12


@pytest.fixture(scope="module")
def served(tiny_model_dir, store_uri, tmp_path_factory):
    """A running server: (openai client, base URL, registered model name, other model name, engine, adapters)."""
    root = tmp_path_factory.mktemp("serve-project")
    folder = tmp_path_factory.mktemp("serve-adapters")
    adapters = {n: make_adapter(tiny_model_dir, folder / f"a{n}", seed=10 + n) for n in (1, 2, 3)}
    serve = {"alias_ttl_s": 1, "max_adapters": 1, "max_tokens": 32}
    cfg = registry_config(store_uri, root, model={"base": str(tiny_model_dir)}, serve=serve, train={"device": "cpu"})
    other = registry_config(store_uri, root)
    client = make_client(store_uri)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)  # anything MLflow would write into the working directory lands in tmp
        for n in (1, 2, 3):  # versions 1..3
            register(cfg, root, adapters[n], str(tiny_model_dir), client=client)
        register(other, root, adapters[1], OTHER_BASE, client=client)
    name = cfg.registry.model_name
    promote_version(client, name, "1")  # champion -> 1

    engine = build_engine(cfg, root)
    port = free_port()
    server = _start(server_config(engine, cfg, "127.0.0.1", port, API_KEY))
    url = f"http://127.0.0.1:{port}"
    api = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    try:
        yield {
            "api": api,
            "url": url,
            "name": name,
            "other": other.registry.model_name,
            "engine": engine,
            "adapters": adapters,
            "client": client,
            "base": str(tiny_model_dir),
            "cfg": cfg,
        }
    finally:
        server.should_exit = True
        server.thread.join(timeout=30)


def _start(config):
    import uvicorn

    server = uvicorn.Server(config)
    server.thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    server.thread.start()
    _until(lambda: server.started or not server.thread.is_alive(), "the server to start")
    assert server.started, "uvicorn exited during start-up"
    return server


def _until(check, what: str, bound_s: float = 60.0):
    """Poll ``check`` until it returns something truthy; fail (not a speed assert: a hang guard) after ``bound_s``."""
    deadline = time.monotonic() + bound_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.1)


def chat(api, model: str, content: str = PROMPT, **options):
    options.setdefault("max_tokens", TOKENS)
    return api.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], temperature=0, **options
    )


def streamed(api, model: str, content: str = PROMPT, **options):
    """(text, finish_reason, usage, chunk count) of a streamed answer."""
    options.setdefault("max_tokens", TOKENS)
    stream = api.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        **options,
    )
    parts, finish, usage, count = [], None, None, 0
    for chunk in stream:
        count += 1
        assert chunk.object == "chat.completion.chunk"
        usage = chunk.usage or usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(parts), finish, usage, count


def error_of(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value.status_code, caught.value.response.json()["error"]


def local_answer(adapter: Path | None, base: str) -> str:
    ref = BaseModelRef(source=base, path=base)
    if adapter is None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True).eval()
        return generate_text(model, AutoTokenizer.from_pretrained(base), PROMPT, TOKENS)
    model, tokenizer = load_adapter(AdapterSource("local", adapter, ref, QuantConfig()), ModelConfig(), "cpu")
    return generate_text(model, tokenizer, PROMPT, TOKENS)


def stored_weights(client, name: str, version: str) -> Path:
    """The version's adapter weights as the artifact store holds them on disk."""
    source = client.get_model_version(name, version).source
    location = client.get_logged_model(source.removeprefix("models:/")).artifact_location
    return adapter_folder(Path(unquote(urlparse(location).path))) / "adapter_model.safetensors"


# --- tests --------------------------------------------------------------------------------------


def test_models_lists_the_base_and_every_alias_and_version(served):
    name, other = served["name"], served["other"]
    ids = [model.id for model in served["api"].models.list()]

    assert ids[0] == served["base"]
    assert {f"{name}@champion", f"{name}@challenger", *(f"{name}/{n}" for n in (1, 2, 3))} <= set(ids)
    assert {f"{other}/1", f"{other}@challenger"} <= set(ids)
    assert served["api"].models.retrieve(f"{name}/2").id == f"{name}/2"
    health = httpx.get(f"{served['url']}/health")  # open without a key: for liveness probes
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_an_alias_answers_like_loraops_generate_and_names_its_exact_version(served):
    api, name = served["api"], served["name"]
    expected = local_answer(served["adapters"][1], served["base"])

    answer = chat(api, f"{name}@champion")
    by_number = chat(api, f"{name}/1")
    base = chat(api, served["base"])

    assert answer.choices[0].message.content == expected == by_number.choices[0].message.content
    assert answer.model == f"{name}/1" and answer.system_fingerprint.startswith("lora-")
    assert base.model == served["base"]
    assert base.choices[0].message.content == local_answer(None, served["base"]) != expected
    usage = answer.usage
    assert usage.completion_tokens <= TOKENS and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_streamed_text_equals_the_whole_answer_also_with_a_stop_sequence(served):
    api, name = served["api"], served["name"]
    for model in (served["base"], f"{name}/2"):  # the tiny base answers only special tokens: empty text
        whole = chat(api, model)
        text, finish, usage, chunks = streamed(api, model)
        assert text == whole.choices[0].message.content and finish == whole.choices[0].finish_reason
        assert usage.completion_tokens == whole.usage.completion_tokens
    assert chunks > 4, "the adapter's answer arrives in pieces (role, several deltas, finish, usage)"

    full = chat(api, f"{name}/2", max_tokens=24).choices[0].message.content
    cut = next(i for i in range(3, len(full) - 2) if full[i : i + 2].strip() == full[i : i + 2])
    stop = full[cut : cut + 2]
    stopped = chat(api, f"{name}/2", max_tokens=24, stop=[stop])
    assert stopped.choices[0].message.content == full[: full.index(stop)].strip()
    assert stopped.choices[0].finish_reason == "stop"
    assert streamed(api, f"{name}/2", max_tokens=24, stop=[stop])[:2] == (stopped.choices[0].message.content, "stop")

    raw = httpx.post(
        f"{served['url']}/v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": f"{name}/2", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4, "stream": True},
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.startswith("data: {") and raw.text.endswith("data: [DONE]\n\n")


def test_a_new_a_moved_and_a_deleted_alias_are_followed_without_restart(served):
    api, name, client = served["api"], served["name"], served["client"]
    model_of = lambda alias: chat(api, f"{name}@{alias}", max_tokens=2).model  # noqa: E731

    status, error = error_of(lambda: chat(api, f"{name}@staging"))
    assert status == 404 and error["code"] == "model_not_found"

    promote_version(client, name, "2", "staging")  # a new alias
    _until(lambda: _served_or_none(lambda: model_of("staging")) == f"{name}/2", "@staging to serve version 2")
    assert f"{name}@staging" in [model.id for model in api.models.list()]

    promote_version(client, name, "1", "staging")  # moved, as a promotion moves @champion
    _until(lambda: _served_or_none(lambda: model_of("staging")) == f"{name}/1", "@staging to move to version 1")

    client.delete_registered_model_alias(name, "staging")
    _until(lambda: _served_or_none(lambda: model_of("staging")) == 404, "@staging to be refused once deleted")
    assert model_of("champion") == f"{name}/1"


def _served_or_none(call):
    try:
        return call()
    except openai.NotFoundError:
        return 404


def test_concurrent_requests_for_different_adapters_never_mix(served):
    api, name, engine = served["api"], served["name"], served["engine"]
    models = [served["base"], f"{name}/1", f"{name}/2"] * 3
    one_by_one = [chat(api, model).choices[0].message.content for model in models]

    with ThreadPoolExecutor(max_workers=len(models)) as pool:
        together = list(pool.map(lambda model: chat(api, model).choices[0].message.content, models))

    assert together == one_by_one
    assert len(set(one_by_one[:3])) == 3, "the base and the two adapters answer differently"
    assert len(engine.pool.loaded()) == 1, "serve.max_adapters=1: each switch dropped the other adapter"


def test_bad_requests_get_openai_errors(served):
    api, name, url = served["api"], served["name"], served["url"]
    for model in (f"{name}@no-such-alias", f"{name}/99", "no-such-model/1", "/etc/passwd", "../models/base", "m-1"):
        status, error = error_of(lambda model=model: chat(api, model))
        assert (status, error["code"], error["param"]) == (404, "model_not_found", "model"), model
        assert set(error) == {"message", "type", "param", "code"}

    status, error = error_of(lambda: api.chat.completions.create(model=f"{name}/1", messages=[]))
    assert status == 400 and "messages is empty" in error["message"]
    status, error = error_of(lambda: chat(api, f"{name}/1", max_tokens=33))
    assert status == 400 and error["param"] == "max_tokens" and "serve.max_tokens" in error["message"]
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    malformed = httpx.post(f"{url}/v1/chat/completions", headers=headers, content=b"{not json")
    assert malformed.status_code == 400 and malformed.json()["error"]["type"] == "invalid_request_error"
    no_model = httpx.post(f"{url}/v1/chat/completions", headers=headers, json={"messages": []})
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"

    keyless = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    status, error = error_of(lambda: chat(keyless, f"{name}/1"))
    assert (status, error["code"]) == (401, "invalid_api_key") and API_KEY not in error["message"]
    assert httpx.get(f"{url}/v1/models").status_code == 401


def test_an_adapter_trained_on_another_base_is_refused_naming_both(served):
    status, error = error_of(lambda: chat(served["api"], f"{served['other']}/1"))

    assert status == 400 and error["code"] == "model_not_servable"
    assert OTHER_BASE in error["message"] and served["base"] in error["message"]


def test_a_tampered_adapter_is_refused_naming_model_version_and_file(served):
    name, client = served["name"], served["client"]
    shutil.copyfile(stored_weights(client, name, "2"), stored_weights(client, name, "3"))  # never served before

    status, error = error_of(lambda: chat(served["api"], f"{name}/3"))

    assert status == 500 and error["code"] == "adapter_refused"
    assert f"{name} version 3" in error["message"] and "adapter_model.safetensors differs" in error["message"]
    assert f"{name}/3" not in served["engine"].pool.loaded()


def test_the_pool_keeps_the_most_recently_used_adapters(served):
    from transformers import AutoModelForCausalLM

    from loraops.serve.engine import AdapterPool
    from loraops.serve.generation import Sampling, generate_answer

    base = AutoModelForCausalLM.from_pretrained(served["base"], use_safetensors=True).eval()
    pool = AdapterPool(base, max_adapters=2)

    def answer(model_id: str) -> str:
        parts: list[str] = []
        with pool.active(model_id) as model:
            messages = [{"role": "user", "content": PROMPT}]
            generate_answer(model, served["engine"].tokenizer, messages, Sampling(TOKENS), parts.append)
        return "".join(parts)

    for n in (1, 2):
        pool.add(f"a/{n}", served["adapters"][n])
    first = answer("a/1")  # a/1 is now the most recently used
    pool.add("a/3", served["adapters"][3])

    assert pool.loaded() == ["a/1", "a/3"], "a/2 was the least recently used"
    assert answer("a/1") == first == local_answer(served["adapters"][1], served["base"])
    assert answer("a/3") == local_answer(served["adapters"][3], served["base"]) != first


@pytest.mark.integration
def test_the_cli_serves_the_project_with_the_key_from_the_environment(served, tmp_path):
    name, params, port = served["name"], tmp_path / "params.yaml", free_port()
    params.write_text(json.dumps(served["cfg"].model_dump(mode="json")))  # JSON is YAML
    command = [sys.executable, "-m", "loraops", "serve", "-p", str(params), "--port", str(port)]
    env, log = {**os.environ, "LORAOPS_API_KEY": "cli-key"}, tmp_path / "serve.log"
    with background_process(command, env, log, cwd=tmp_path) as process:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy("loraops serve", f"{url}/health", process, log, time.monotonic() + 180)
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="cli-key", max_retries=0, timeout=120)

        assert f"{name}@champion" in [model.id for model in api.models.list()]
        assert chat(api, f"{name}@champion").choices[0].message.content == local_answer(
            served["adapters"][1], served["base"]
        )
        assert httpx.get(f"{url}/v1/models").status_code == 401
    assert f"{name}@champion -> version 1" in log.read_text() and "cli-key" not in log.read_text()


class _PieceTokenizer:
    """Token id i decodes to PIECES[i]: enough of a tokenizer for the text assembler."""

    PIECES = ["Hello", " wor", "ld", "!", " bye", "\ufffd"]

    def decode(self, ids, **_options) -> str:
        return "".join(self.PIECES[i] for i in ids)


def test_streamed_pieces_never_include_a_stop_string_or_text_that_may_still_change():
    from loraops.serve.generation import TextAssembler

    def pieces(ids: list[int], stop: list[str]) -> list[str]:
        assembler = TextAssembler(_PieceTokenizer(), stop)
        sent = [assembler.push([i]) for i in ids]
        return [piece for piece in [*sent, assembler.finish()] if piece]

    assert pieces([0, 1, 2, 3], ["world"]) == ["Hello"], "' wor' was held back: it may start the stop string"
    assert pieces([0, 1, 2, 3], ["xyz"]) == ["Hello", " wor", "ld", "!"]
    assert pieces([0, 1, 5, 2], []) == ["Hello", " wor", "\ufffdld"], "an incomplete character waits for the next token"
    assert pieces([0, 4], [" b"]) == ["Hello"]


def test_serve_settings_are_checked_and_leave_the_params_hash_alone():
    from loraops.config import ConfigError, LoraopsConfig, config_from_dict

    changed = config_from_dict({"serve": {"port": 9000, "max_adapters": 8, "alias_ttl_s": 0}})
    assert changed.params_hash() == LoraopsConfig().params_hash(), "serving settings do not make a retrain 'changed'"
    with pytest.raises(ConfigError, match=r"serve\.max_adapters"):
        config_from_dict({"serve": {"max_adapters": 0}})
