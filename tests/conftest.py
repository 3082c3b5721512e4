"""Shared fixtures: a tiny random Llama with a real (tiny) BPE tokenizer and ChatML template.

The tiny model trains a step in well under a second, so behaviour tests stay fast. The real
SmolLM2 path is covered by tests marked ``slow``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

# dvc.yaml stage commands call `python -m loraops`: that must be this interpreter, as under `make test`.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

FIXTURES = Path(__file__).parent / "fixtures"
TINY_DATA = FIXTURES / "data"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer():
    """A byte-level BPE trained on the tiny fixture data, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [line for path in sorted(TINY_DATA.glob("*.jsonl")) for line in path.read_text().splitlines()]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def save_tiny_model(directory: Path) -> Path:
    """Save a 2-layer random Llama (safetensors) plus tokenizer: a local base model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(autouse=True)
def single_threaded_torch(request):
    """Tiny models gain nothing from threads, and on a shared 2-core machine threads spin: ~3x slower.

    Tests marked slow (real SmolLM2) keep torch's default threads.
    """
    if request.node.get_closest_marker("slow"):
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Path of a saved tiny Llama; treat it as read-only (copy it before changing anything)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def tiny_data_dir(tmp_path) -> Path:
    """A writable copy of the committed tiny chat dataset (train.jsonl, validation.jsonl)."""
    import shutil

    target = tmp_path / "data"
    shutil.copytree(TINY_DATA, target)
    return target


REPO_ROOT = Path(__file__).resolve().parent.parent
GIT = ["git", "-c", "user.name=loraops-tests", "-c", "user.email=tests@loraops.invalid"]


def tiny_params(base_model: Path, **sections) -> dict:
    """params.yaml contents for a tiny-model project; ``sections`` update whole sections."""
    import yaml

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["model"]["base"] = str(base_model)
    params["data"]["max_length"] = 64
    params["train"].update(learning_rate=0.01, max_steps=8, batch_size=8, eval_steps=4, early_stopping_patience=0)
    params["eval"].update(batch_size=8, general_examples=8, generation_samples=4, max_new_tokens=8)
    params["registry"]["model_name"] = "tiny-adapter"
    for section, values in sections.items():
        params[section].update(values)
    return params


def tiny_training_params(base_model: Path | str, workdir: Path, **sections) -> dict:
    """A raw config training the tiny model on CPU, outputs under ``workdir``; ``sections`` update keys of sections."""
    raw = {
        "model": {"base": str(base_model)},
        "data": {"max_length": 64},
        "lora": {"r": 8, "alpha": 16},
        "train": {"device": "cpu", "learning_rate": 1e-2, "batch_size": 4, "output_dir": str(workdir / "checkpoints")},
        "eval": {"batch_size": 12},
        "paths": {"metrics_dir": str(workdir / "metrics")},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


def dvc_changes(status: dict) -> dict:
    """``dvc status`` without the standing "always changed" of resolve_init_adapter (dvc.yaml: it asks the registry
    on every ``dvc repro``); keys may be ``stage`` or ``path/dvc.yaml:stage``."""
    return {stage: changes for stage, changes in status.items() if changes != ["always changed"]}


def make_project(directory: Path, base_model: Path, **sections) -> Path:
    """A real loraops project: git repo, DVC repo with a local remote, tiny data under data.dvc."""
    import shutil
    import subprocess

    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO_ROOT / "loraops", directory / "loraops", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "dvc.yaml", directory / "dvc.yaml")
    shutil.copytree(REPO_ROOT / "gx", directory / "gx", ignore=shutil.ignore_patterns("uncommitted"))
    shutil.copy(REPO_ROOT / ".gitignore", directory / ".gitignore")
    shutil.copytree(TINY_DATA, directory / "data")
    (directory / "params.yaml").write_text(yaml.safe_dump(tiny_params(base_model, **sections), sort_keys=False))
    dvc = str(Path(sys.executable).parent / "dvc")
    run = lambda *args: subprocess.run(args, cwd=directory, check=True, capture_output=True, text=True)  # noqa: E731
    run("git", "init", "-q", "-b", "main")
    run(dvc, "init", "-q")
    run(dvc, "remote", "add", "-d", "local", str(directory.parent / f"{directory.name}-remote"))
    run(dvc, "add", "-q", "data")
    run("git", "add", "-A")
    run(*GIT, "commit", "-q", "-m", "tiny project")
    return directory


@pytest.fixture
def tiny_project(tmp_path, tiny_model_dir, monkeypatch) -> Path:
    """A fresh tiny project whose MLflow store lives inside it (sqlite under mlflow/)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return make_project(tmp_path / "project", tiny_model_dir)


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server per session (starts in ~10 s on 2 cores)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def store_uri(tmp_path_factory) -> str:
    """The session's SQLite MLflow store for registry tests; each test registers under its own names."""
    from registry_helpers import shared_store_uri

    return shared_store_uri(tmp_path_factory)


@pytest.fixture
def away_from_the_checkout(tmp_path, monkeypatch):
    """Anything MLflow would put in the working directory (mlruns/, mlflow.db) lands in tmp."""
    monkeypatch.chdir(tmp_path)


def free_port() -> int:
    """A free TCP port on loopback, for servers a test starts itself."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(name: str, url: str, process, log: Path, deadline: float) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log if it exits or the deadline passes."""
    import time
    import urllib.request

    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{name} server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{name} server not healthy at {url} by its deadline:\n{log.read_text()[-3000:]}")


MLFLOW = str(Path(sys.executable).parent / "mlflow")
HEALTH_TIMEOUT_S = 60


@contextlib.contextmanager
def background_process(command: list[str], env: dict, log: Path, cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """A server in its own process group, its output in ``log``; stopped with its workers (SIGTERM, then SIGKILL)."""
    with log.open("w") as output:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # the server's own group: e.g. uvicorn and its worker
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


def mlflow_server_command(port: int, store: Path, artifacts: Path) -> list[str]:
    """`mlflow server` on loopback with one worker, a SQLite store and a local artifact root."""
    return [
        MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{store}",
        "--artifacts-destination", str(artifacts),
    ]  # fmt: skip


@contextlib.contextmanager
def mlflow_server(
    root: Path, health_timeout_s: float = HEALTH_TIMEOUT_S
) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """A real, healthy `mlflow server` on a free loopback port, its files under ``root``: (url, process, store)."""
    port, store = free_port(), root / "server.db"
    log = root / "mlflow-server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with background_process(mlflow_server_command(port, store, root / "server-artifacts"), env, log) as process:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy("mlflow", f"{url}/health", process, log, time.monotonic() + health_timeout_s)
        yield url, process, store


@pytest.fixture
def tracking_server(tmp_path) -> Iterator[str]:
    """A real `mlflow server` on a free loopback port (SQLite store, local artifact root); its URL."""
    with mlflow_server(tmp_path) as (url, _, _):
        yield url
