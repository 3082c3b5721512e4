"""One run per checkout: the project's run lock, held by real processes."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from loraops.names import RUN_LOCK_FILE
from loraops.project.lock import HOLDER_ENV, ProjectLockedError, project_lock

# Holds the lock of PROJECT as COMMAND until the file RELEASE exists (or forever, to be killed).
HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from loraops.project.lock import project_lock

    root, command, release = sys.argv[1:4]
    with project_lock(root, command):
        while not Path(release).exists():
            time.sleep(0.05)
    """
)


def _start_holder(root: Path, command: str, release: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(root), command, str(release)])
    _wait_for_holder(root, process)
    return process


def _wait_for_holder(root: Path, process: subprocess.Popen, timeout_s: float = 120) -> dict:
    lock = root / RUN_LOCK_FILE
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the holder exited with {process.returncode}"
        text = lock.read_text() if lock.exists() else ""
        if text.strip():
            return json.loads(text)
        time.sleep(0.05)
    pytest.fail("the holder never recorded itself in the lock file")


def test_a_second_run_is_refused_naming_the_holder_and_runs_once_it_is_gone(tmp_path):
    release = tmp_path / "release"
    holder = _start_holder(tmp_path, "loraops stage train-adapter", release)
    try:
        with pytest.raises(ProjectLockedError) as refused:
            with project_lock(tmp_path, "second"):
                pytest.fail("ran while another process held the project")
        message = str(refused.value)
        assert f"'loraops stage train-adapter' (pid {holder.pid} on {socket.gethostname()}, started 20" in message
        assert "orchestration.lock_timeout_s" in message
    finally:
        release.touch()
        holder.wait(timeout=30)
    with project_lock(tmp_path, "second"):
        assert json.loads((tmp_path / RUN_LOCK_FILE).read_text())["command"] == "second"
    assert (tmp_path / RUN_LOCK_FILE).read_text() == ""  # released: no record left behind


def test_a_second_run_waits_up_to_lock_timeout_for_the_first(tmp_path):
    release = tmp_path / "release"
    holder = _start_holder(tmp_path, "first", release)
    try:
        with pytest.raises(ProjectLockedError, match="after waiting 1 s by 'first'"):
            with project_lock(tmp_path, "second", timeout_s=1):
                pass
        release.touch()  # the first run ends while the second waits
        with project_lock(tmp_path, "second", timeout_s=60):
            assert holder.poll() is not None
    finally:
        release.touch()
        holder.wait(timeout=30)


def test_the_lock_of_a_killed_run_is_taken_over_with_a_message(tmp_path, caplog):
    holder = _start_holder(tmp_path, "loraops stage train-adapter", tmp_path / "never")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with caplog.at_level(logging.WARNING, logger="loraops.project.lock"):
        with project_lock(tmp_path, "next run"):
            pass
    assert (
        f"taking over the run lock {tmp_path / RUN_LOCK_FILE} left by 'loraops stage train-adapter' (pid {holder.pid}"
        in caplog.text
    )


def test_nested_use_in_one_process_and_children_of_the_holder_run_under_the_lock(tmp_path):
    child = "from loraops.project.lock import project_lock\nwith project_lock(__import__('sys').argv[1], 'child'): print('ran')"
    with project_lock(tmp_path, "outer"):
        with project_lock(tmp_path, "inner"):  # the flow calling a stage that locks: no deadlock
            pass
        ran = subprocess.run([sys.executable, "-c", child, str(tmp_path)], capture_output=True, text=True)
        assert ran.stdout.strip() == "ran", ran.stderr  # dvc repro -> loraops stage started by the holder
        stranger_env = {k: v for k, v in os.environ.items() if k != HOLDER_ENV}
        stranger = subprocess.run(
            [sys.executable, "-c", child, str(tmp_path)], capture_output=True, text=True, env=stranger_env
        )
        assert stranger.returncode == 1 and "is in use by 'outer'" in stranger.stderr
    assert HOLDER_ENV not in os.environ
    stranger = subprocess.run([sys.executable, "-c", child, str(tmp_path)], capture_output=True, text=True)
    assert stranger.stdout.strip() == "ran", stranger.stderr  # released after the outer block only


def test_a_flow_run_records_its_id_in_the_lock(tmp_path, prefect_harness):
    from prefect import flow
    from prefect.runtime import flow_run

    @flow
    def holds_the_project(root: str) -> tuple[str, str]:
        with project_lock(root, "retrain flow"):
            return json.loads((Path(root) / RUN_LOCK_FILE).read_text())["flow_run_id"], flow_run.id

    recorded, actual = holds_the_project(str(tmp_path))
    assert recorded == actual and recorded


@pytest.fixture
def project_with_data(tiny_project) -> Path:
    """The tiny project with its base model and data contract done, ready for `loraops stage train-adapter`."""
    for stage in ("prepare-base-model", "validate-dataset"):
        subprocess.run(
            [sys.executable, "-m", "loraops", "stage", stage], cwd=tiny_project, check=True, capture_output=True
        )
    return tiny_project


@pytest.mark.slow  # two training processes on a tiny project: ~40 s on 2 busy cores
def test_two_train_adapter_stages_on_one_checkout_one_is_refused_naming_the_other(project_with_data):
    command = [sys.executable, "-m", "loraops", "stage", "train-adapter"]
    first = subprocess.Popen(command, cwd=project_with_data, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_holder(project_with_data, first)
    second = subprocess.run(command, cwd=project_with_data, capture_output=True, text=True, timeout=120)
    out, err = first.communicate(timeout=300)

    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 1
    assert f"is in use by 'loraops stage train-adapter' (pid {first.pid} on" in second.stderr
    assert "Traceback" not in second.stderr
    trained = json.loads(out)
    assert Path(trained["adapter_dir"]).is_dir() and trained["steps"] > 0


def test_a_retrain_flow_is_refused_while_another_run_holds_the_checkout(tiny_project, prefect_harness):
    from flows.retrain import retrain
    from loraops.project.params_file import load_config

    params_before = (tiny_project / "params.yaml").read_bytes()
    release = tiny_project / "release"
    holder = _start_holder(tiny_project, "loraops stage train-adapter", release)
    try:
        with pytest.raises(ProjectLockedError, match=rf"in use by 'loraops stage train-adapter' \(pid {holder.pid} on"):
            retrain(config=load_config(tiny_project / "params.yaml", {"train.seed": 2}), project_dir=str(tiny_project))
    finally:
        release.touch()
        holder.wait(timeout=30)
    assert (tiny_project / "params.yaml").read_bytes() == params_before  # its -S override was never written
    assert not (tiny_project / "mlflow" / "mlflow.db").exists()  # nothing logged or registered
    assert not (tiny_project / "adapters").exists()


def test_a_run_started_by_the_holder_runs_under_its_lock_and_anyone_else_is_refused(tmp_path):
    """The train-adapter run a retrain waits for, on a worker sharing its checkout: no deadlock with its parent."""
    release = tmp_path / "release"
    parent = _start_holder(tmp_path, "retrain flow", release)  # the retrain run holding the checkout
    try:
        recorded = json.loads((tmp_path / RUN_LOCK_FILE).read_text())
        token = recorded["token"]
        with project_lock(tmp_path, "train-adapter flow", parent_token=token):
            assert json.loads((tmp_path / RUN_LOCK_FILE).read_text()) == recorded  # still the parent's lock
        assert json.loads((tmp_path / RUN_LOCK_FILE).read_text()) == recorded  # and the parent keeps it
        for stranger in ("0" * 32, None):  # another run's token, or none
            with pytest.raises(ProjectLockedError, match=rf"in use by 'retrain flow' \(pid {parent.pid} on"):
                with project_lock(tmp_path, "train-adapter flow", parent_token=stranger):
                    pytest.fail("ran under a lock its parent does not hold")
    finally:
        release.touch()
        parent.wait(timeout=30)
    # The parent gone (or a worker with its own checkout): the run takes the lock itself.
    with project_lock(tmp_path, "train-adapter flow", parent_token=token):
        mine = json.loads((tmp_path / RUN_LOCK_FILE).read_text())
        assert mine["command"] == "train-adapter flow" and mine["token"] != token


def test_the_hand_off_carries_the_retrain_runs_lock_token(tiny_project):
    from loraops.project.lock import held_token
    from loraops.project.params_file import load_config
    from loraops.registry.handoff import handoff_parameters, prepare_handoff

    cfg = load_config(tiny_project / "params.yaml")
    assert held_token(tiny_project) is None
    with project_lock(tiny_project, "retrain flow"):
        token = json.loads((tiny_project / RUN_LOCK_FILE).read_text())["token"]
        assert held_token(tiny_project) == token
        parameters = handoff_parameters(prepare_handoff(cfg, tiny_project))
    assert parameters["parent_lock"] == token  # the train-adapter flow's parameter
    assert held_token(tiny_project) is None


def test_the_train_adapter_flow_is_refused_while_another_run_holds_its_checkout(tiny_project, prefect_harness):
    from prefect import get_client

    from flows.train import train_adapter
    from loraops.project.params_file import load_config

    token = "sk-loraopsTEST0123456789abcdefXYZ"  # a secret-looking probe prompt: not kept in the run's parameters
    cfg = load_config(tiny_project / "params.yaml", {"export.probe_prompts": [f"my key is {token}"]})
    release = tiny_project / "release"
    holder = _start_holder(tiny_project, "retrain flow", release)
    try:
        state = train_adapter(
            config=cfg,
            data_dvc=(tiny_project / "data.dvc").read_text(),
            train_key="k",
            project_dir=str(tiny_project),
            parent_lock="0" * 32,  # started by some other retrain run
            return_state=True,
        )
        with pytest.raises(ProjectLockedError, match=rf"in use by 'retrain flow' \(pid {holder.pid} on"):
            state.result()
    finally:
        release.touch()
        holder.wait(timeout=30)
    assert not (tiny_project / "models" / "base").exists() and not (tiny_project / "mlflow").exists()
    with get_client(sync_client=True) as client:
        stored = client.read_flow_run(state.state_details.flow_run_id).parameters
    assert stored["config"]["export"]["probe_prompts"] == ["my key is ***"]


@pytest.mark.slow  # a tiny training inside a flow run: ~30 s on 2 busy cores
def test_the_train_adapter_flow_trains_under_the_lock_of_the_retrain_run_that_started_it(tiny_project, prefect_harness):
    from flows.train import train_adapter
    from loraops.project.params_file import load_config

    cfg = load_config(tiny_project / "params.yaml")
    release = tiny_project / "release"
    holder = _start_holder(tiny_project, "retrain flow", release)  # the retrain run on the shared checkout
    try:
        token = json.loads((tiny_project / RUN_LOCK_FILE).read_text())["token"]
        trained = train_adapter(
            config=cfg,
            data_dvc=(tiny_project / "data.dvc").read_text(),
            train_key="k",
            project_dir=str(tiny_project),
            parent_lock=token,
        )
        assert json.loads((tiny_project / RUN_LOCK_FILE).read_text())["token"] == token  # the parent still holds it
    finally:
        release.touch()
        holder.wait(timeout=30)
    assert trained.steps > 0 and (Path(trained.adapter_dir) / "adapter_model.safetensors").is_file()


def test_a_sweep_is_refused_while_another_run_holds_the_checkout(tiny_project, prefect_harness):
    """Sweep trials train in the sweep flow's process, under the lock it takes first."""
    from flows.sweep import sweep

    params_before = (tiny_project / "params.yaml").read_bytes()
    release = tiny_project / "release"
    holder = _start_holder(tiny_project, "retrain flow", release)
    try:
        with pytest.raises(ProjectLockedError, match=rf"in use by 'retrain flow' \(pid {holder.pid} on"):
            sweep(param=["lora.r=4,8"], project_dir=str(tiny_project))
    finally:
        release.touch()
        holder.wait(timeout=30)
    assert (tiny_project / "params.yaml").read_bytes() == params_before
    assert not (tiny_project / "adapters").exists() and not (tiny_project / "mlflow").exists()
