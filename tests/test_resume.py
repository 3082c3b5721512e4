"""Resuming an interrupted training run: a SIGKILLed process continues from its last checkpoint.

The training process is a real subprocess that kills itself with SIGKILL between two checkpoints;
the rerun must continue from the last complete checkpoint (optimizer, scheduler and RNG state
restored) and end with the adapter an uninterrupted run produces.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_training_params
from safetensors.torch import load_file

from loraops.config import ConfigError, config_from_dict
from loraops.results import BaseModelRef, TrainResult
from loraops.train import trainer as training
from loraops.train.builders import build_sft_config
from loraops.train.checkpoints import last_complete_checkpoint, prepare_checkpoint_dir, run_fingerprint

DATA = Path(__file__).parent / "fixtures" / "data"
KILL_AT_STEP = 5  # after checkpoint-4 is written, before checkpoint-6

# Runs one training in a fresh interpreter; with a kill step it SIGKILLs itself mid-run.
TRAIN_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path
    from transformers import AutoTokenizer, TrainerCallback
    from loraops.train import trainer as training
    from loraops.config import config_from_dict
    from loraops.results import BaseModelRef
    from loraops.data.tokenization import build_dataset

    model_dir, data_dir, workdir, config_json, kill_at = sys.argv[1:6]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = lambda split: [json.loads(line) for line in Path(data_dir, split + ".jsonl").read_text().splitlines()]
    splits = [build_dataset(tokenizer, rows(split), max_length=64) for split in ("train", "validation")]

    class KillMidRun(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)

    class CountSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            with open(Path(workdir) / "steps-run.log", "a") as log:
                log.write(f"{state.global_step}\\n")

    callbacks = (CountSteps(), KillMidRun()) if int(kill_at) else (CountSteps(),)
    cfg = config_from_dict(json.loads(config_json))
    ref = BaseModelRef(source=model_dir, path=model_dir)
    result = training.train_adapter(cfg, ref, *splits, Path(workdir) / "adapter", extra_callbacks=callbacks)
    result.write_json(Path(workdir) / "result.json")
    """
)


def _raw_config(base: Path, workdir: Path, **train) -> dict:
    train = {"max_steps": 8, "eval_steps": 2, "early_stopping_patience": 0, "save_total_limit": 2, **train}
    return tiny_training_params(base, workdir, train=train)


def _train_in_subprocess(model_dir: Path, workdir: Path, kill_at: int = 0) -> subprocess.CompletedProcess:
    config = json.dumps(_raw_config(model_dir, workdir))
    return subprocess.run(
        [sys.executable, "-c", TRAIN_SCRIPT, str(model_dir), str(DATA), str(workdir), config, str(kill_at)],
        capture_output=True,
        text=True,
        timeout=600,
    )


def _adapter(workdir: Path) -> dict[str, torch.Tensor]:
    return load_file(workdir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir) -> Path:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    done = _train_in_subprocess(tiny_model_dir, workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def test_a_sigkilled_run_resumes_to_the_uninterrupted_adapter(tmp_path, tiny_model_dir, uninterrupted):
    killed = _train_in_subprocess(tiny_model_dir, tmp_path, kill_at=KILL_AT_STEP)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "adapter").exists()  # nothing half-done where the stage's output goes
    assert last_complete_checkpoint(tmp_path / "checkpoints").name == "checkpoint-4"

    (tmp_path / "steps-run.log").unlink()
    rerun = _train_in_subprocess(tiny_model_dir, tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (tmp_path / "steps-run.log").read_text().split() == ["5", "6", "7", "8"]  # only the lost steps rerun
    result = TrainResult.read_json(tmp_path / "result.json")
    assert result.resumed_from_step == 4 and result.steps == 8
    assert TrainResult.read_json(uninterrupted / "result.json").resumed_from_step is None

    resumed, reference = _adapter(tmp_path), _adapter(uninterrupted)
    assert resumed.keys() == reference.keys() and len(resumed) > 0
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=0, atol=1e-6, msg=name)

    # The history is whole: steps 1..8 once each, the resumed half continuing the interrupted one.
    history = json.loads((tmp_path / "metrics" / "train_history.json").read_text())
    assert [row["step"] for row in history if "loss" in row] == list(range(1, 9))
    expected = json.loads((uninterrupted / "metrics" / "train_history.json").read_text())
    assert [row["loss"] for row in history if "loss" in row] == pytest.approx(
        [row["loss"] for row in expected if "loss" in row], abs=1e-6
    )
    assert not list((tmp_path / "checkpoints").glob("checkpoint-*"))  # cleared once the adapter is saved


# ------------------------------------------------------------------ which checkpoint is resumed


def _checkpoint(output_dir: Path, step: int, complete: bool = True) -> Path:
    path = output_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (path / name).write_bytes(b"x")
    (path / "trainer_state.json").write_text(f'{{"global_step": {step}}}' if complete else '{"global_st')
    return path


def test_the_newest_complete_checkpoint_of_the_same_run_is_resumed(tmp_path):
    assert prepare_checkpoint_dir(tmp_path, "run-a", resume=True) is None
    _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path, 10)
    _checkpoint(tmp_path, 12, complete=False)  # killed while writing its state
    assert prepare_checkpoint_dir(tmp_path, "run-a", resume=True) == tmp_path / "checkpoint-10"


def test_checkpoints_of_another_run_are_cleared_not_resumed(tmp_path):
    prepare_checkpoint_dir(tmp_path, "run-a", resume=True)
    _checkpoint(tmp_path, 4)
    (tmp_path / "keep-me.txt").write_text("a user's file")
    assert prepare_checkpoint_dir(tmp_path, "run-b", resume=True) is None
    assert not list(tmp_path.glob("checkpoint-*")) and (tmp_path / "keep-me.txt").exists()


def test_resume_false_starts_afresh(tmp_path):
    prepare_checkpoint_dir(tmp_path, "run-a", resume=True)
    _checkpoint(tmp_path, 4)
    assert prepare_checkpoint_dir(tmp_path, "run-a", resume=False) is None
    assert not list(tmp_path.glob("checkpoint-*"))


def test_a_checkpoint_missing_its_optimizer_state_is_not_resumed(tmp_path):
    prepare_checkpoint_dir(tmp_path, "run-a", resume=True)
    (_checkpoint(tmp_path, 6) / "optimizer.pt").unlink()
    assert prepare_checkpoint_dir(tmp_path, "run-a", resume=True) is None


def test_fingerprint_follows_settings_and_tokens_but_not_checkpoint_placement(tmp_path, tiny_tokenizer):
    from loraops.data.tokenization import build_dataset

    rows = [json.loads(line) for line in (DATA / "train.jsonl").read_text().splitlines()]
    train, validation = build_dataset(tiny_tokenizer, rows[:8], 64), build_dataset(tiny_tokenizer, rows[8:12], 64)
    ref = BaseModelRef(source="tiny", path=str(tmp_path))

    def fingerprint(train_dataset=train, **overrides):
        cfg = config_from_dict(_raw_config(Path("tiny"), tmp_path, **overrides))
        return run_fingerprint(cfg, ref, train_dataset, validation, "cpu")

    reference = fingerprint()
    assert fingerprint(save_total_limit=5, save_steps=4, output_dir="/elsewhere") == reference
    assert fingerprint(learning_rate=2e-2) != reference
    assert fingerprint(train_dataset=build_dataset(tiny_tokenizer, rows[1:9], 64)) != reference


def test_save_steps_must_be_a_multiple_of_eval_steps(tmp_path):
    with pytest.raises(ConfigError, match=r"train.save_steps \(3\) is not a multiple of train.eval_steps \(2\)"):
        config_from_dict(_raw_config(Path("tiny"), tmp_path, save_steps=3))
    args = build_sft_config(config_from_dict(_raw_config(Path("t"), tmp_path, save_steps=4)), tmp_path, "cpu")
    assert args.save_steps == 4 and args.eval_steps == 2 and not args.save_only_model


def test_liger_kernels_on_cpu_are_refused_with_the_setting_named(tmp_path, tiny_model_dir):
    cfg = config_from_dict(_raw_config(tiny_model_dir, tmp_path, use_liger_kernel=True))
    with pytest.raises(ConfigError, match="train.use_liger_kernel=true needs a CUDA device"):
        training.train_adapter(cfg, BaseModelRef(source="t", path=str(tiny_model_dir)), [], [], tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


# ------------------------------------------- a crashed stage process, rerun the way users rerun it


def test_rerunning_a_killed_train_stage_resumes_from_its_checkpoint(tmp_path, tiny_model_dir):
    """`python -m loraops stage train-adapter` (what dvc.yaml and a worker run) killed mid-run, then rerun."""
    import os
    import time

    from conftest import make_project

    project = make_project(
        tmp_path / "project", tiny_model_dir, train={"max_steps": 120, "eval_steps": 10, "save_total_limit": 1}
    )
    stage = lambda name: [sys.executable, "-m", "loraops", "stage", name]  # noqa: E731
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(stage("prepare-base-model"), cwd=project, check=True, capture_output=True, env=env)
    checkpoints = project / "checkpoints"
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen(stage("train-adapter"), cwd=project, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and first.poll() is None:
        if last_complete_checkpoint(checkpoints) is not None:
            break
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=30) == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    survivor = last_complete_checkpoint(checkpoints)
    assert survivor is not None, "the first run was killed before any checkpoint was complete"
    saved_at = int(survivor.name.split("-")[1])
    assert saved_at < 120

    rerun = subprocess.run(stage("train-adapter"), cwd=project, capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    from loraops.project.params_file import load_config
    from loraops.stages import read_training

    result = read_training(load_config(project / "params.yaml"), project)
    assert result.resumed_from_step is not None and result.resumed_from_step >= saved_at
    assert result.steps == 120 and Path(result.adapter_dir).name == "candidate"
    history = json.loads((project / "metrics" / "train_history.json").read_text())
    assert [row["step"] for row in history if "loss" in row] == list(range(1, 121))

    # MLflow: the killed attempt's run (left RUNNING by SIGKILL) is marked FAILED; the rerun's run is FINISHED.
    from loraops.project.params_file import load_config
    from loraops.registry.store import client_for

    cfg = load_config(project / "params.yaml")
    client = client_for(cfg.registry, project)
    runs = client.search_runs([client.get_experiment_by_name(cfg.registry.experiment).experiment_id])
    assert sorted(run.info.status for run in runs) == ["FAILED", "FINISHED"]
    finished = next(run for run in runs if run.info.status == "FINISHED")  # train.json holds numbers only, no run id
    from loraops.registry.adapter_hash import adapter_key

    assert finished.data.tags["loraops.adapter_key"] == adapter_key(Path(result.adapter_dir))
    assert [p.step for p in client.get_metric_history(finished.info.run_id, "loss")][-1] == 120
