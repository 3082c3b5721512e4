"""The sweep's pure functions: --param parsing, trial order, the stop rule, the winner, table and plot."""

from __future__ import annotations

import pytest

from loraops.config import ConfigError, LoraopsConfig
from loraops.sweep.plan import (
    SweepError,
    SweptParam,
    Trial,
    TrialResult,
    config_for,
    next_wave,
    parse_param,
    parse_params,
    pick_winner,
    plot_losses,
    skip_reason,
    table_markdown,
    trial_order,
)

CFG = LoraopsConfig()


def _done(trial: Trial, loss: float) -> TrialResult:
    return TrialResult(trial=trial, status="done", val_loss=loss, trainable_params=1000, train_time_s=1.5)


def test_param_values_are_typed_by_the_config():
    assert parse_param("lora.r=4,8,16", CFG) == SweptParam(key="lora.r", values=[4, 8, 16])
    learning_rate = parse_param("train.learning_rate=2e-4, 1e-3", CFG)
    assert learning_rate.values == [0.0002, 0.001] and all(isinstance(v, float) for v in learning_rate.values)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("lora.r=4,0", "lora.r"),  # r must be > 0
        ("lora.r=4,eight", "lora.r"),
        ("lora.rank=4,8", "lora.rank"),  # unknown key
        ("lora=4", "lora"),  # a section, not a setting
        ("lora.r=4,,8", "lora.r"),
        ("lora.r=4,4", "lora.r"),
        ("lora.r", "lora.r"),
        ("=4,8", "=4,8"),
    ],
)
def test_bad_param_values_name_the_setting(text, named):
    with pytest.raises(ConfigError) as error:
        parse_param(text, CFG)
    assert named in str(error.value)


def test_params_each_once_and_at_least_one():
    with pytest.raises(ConfigError, match="at least one"):
        parse_params([], CFG)
    with pytest.raises(ConfigError, match="lora.r is given twice"):
        parse_params(["lora.r=4", "lora.r=8"], CFG)


def test_trials_in_the_given_order_first_param_slowest():
    params = parse_params(["lora.r=16,4", "train.learning_rate=2e-4,1e-3"], CFG)
    trials = trial_order(params)
    assert [(t.values["lora.r"], t.values["train.learning_rate"]) for t in trials] == [
        (16, 0.0002),
        (16, 0.001),
        (4, 0.0002),
        (4, 0.001),
    ]
    assert [t.name for t in trials][:2] == ["01-r16-learning_rate0.0002", "02-r16-learning_rate0.001"]
    assert config_for(CFG, trials[1]).lora.r == 16 and config_for(CFG, trials[1]).train.learning_rate == 0.001


def test_stop_rule_stops_raising_once_the_gain_is_small():
    params = parse_params(["lora.r=4,8,16,32"], CFG)
    r4, r8, r16, r32 = trial_order(params)
    done = [_done(r4, 2.0), _done(r8, 1.5)]
    assert skip_reason(r16, params, done, min_gain=0.1) is None  # 4 -> 8 gained 0.5
    done.append(_done(r16, 1.45))
    reason = skip_reason(r32, params, done, min_gain=0.1)  # 8 -> 16 gained 0.05
    assert reason and "lora.r not raised past 16" in reason and "0.0500" in reason
    assert skip_reason(r32, params, done, min_gain=None) is None  # no rule: every trial runs
    assert skip_reason(r8, params, done[:1], min_gain=0.1) is None  # two values always run


def test_stop_rule_holds_per_combination_and_carries_on_after_a_skip():
    params = parse_params(["train.learning_rate=1e-3,2e-4", "lora.r=4,8,16,32"], CFG)
    trials = trial_order(params)
    fast = trials[:4]
    done = [_done(fast[0], 2.0), _done(fast[1], 1.99)]
    reason = skip_reason(fast[2], params, done, min_gain=0.1)
    assert reason
    done.append(TrialResult(trial=fast[2], status="skipped", note=reason))
    assert skip_reason(fast[3], params, done, min_gain=0.1) == reason  # nor r=32 after the skipped r=16
    assert skip_reason(trials[6], params, done, min_gain=0.1) is None  # the other learning rate: its own line


def test_waves_on_a_deployment_wait_only_for_what_the_stop_rule_reads():
    params = parse_params(["lora.r=4,8,16,32"], CFG)
    r4, r8, r16, r32 = trials = trial_order(params)
    assert next_wave(trials, params, [], min_gain=None) == trials  # no stop rule: every trial at once
    assert next_wave(trials, params, [], min_gain=0.1) == [r4, r8]  # the first two values always run
    done = [_done(r4, 2.0), TrialResult(trial=r8, status="failed", note="RuntimeError: boom")]
    assert next_wave(trials, params, done, min_gain=0.1) == [r16]  # a failed trial is a result too
    done.append(TrialResult(trial=r16, status="skipped", note="stop rule"))
    assert next_wave(trials, params, done, min_gain=0.1) == [r32]
    assert next_wave(trials, params, [*done, _done(r32, 1.0)], min_gain=0.1) == []

    grid = parse_params(["train.learning_rate=1e-3,2e-4", "lora.r=4,8,16"], CFG)
    cells = trial_order(grid)  # (1e-3: r4, r8, r16), (2e-4: r4, r8, r16)
    assert next_wave(cells, grid, [], min_gain=0.1) == [cells[0], cells[1], cells[3], cells[4]]
    assert next_wave(cells, grid, [_done(cells[0], 2.0), _done(cells[1], 1.0)], 0.1) == [cells[2], cells[3], cells[4]]


def test_winner_is_the_lowest_loss_and_ties_go_to_the_smaller_rank():
    r4, r8, r16 = trial_order(parse_params(["lora.r=4,8,16"], CFG))
    results = [_done(r4, 1.52), _done(r8, 1.50), _done(r16, 1.40)]
    assert pick_winner(results).trial == r16
    assert pick_winner(results, margin=0.2).trial == r4  # all three within 0.2 of 1.40
    assert pick_winner(results, margin=0.11).trial == r8  # r4 is 0.12 worse
    failed = TrialResult(trial=r8, status="failed", note="TrainingDivergedError: loss became nan\nat step 2")
    assert pick_winner([*results[:1], failed]).trial == r4  # among the trials that finished
    with pytest.raises(SweepError) as error:
        pick_winner([TrialResult(trial=r4, status="skipped", note="stop rule"), failed])
    assert "01-r4 skipped: stop rule; 02-r8 failed: TrainingDivergedError: loss became nan" in str(error.value)


def test_table_and_plot(tmp_path):
    params = parse_params(["lora.r=4,8,16", "train.learning_rate=2e-4,1e-3"], CFG)
    trials = trial_order(params)
    results = [_done(trial, 2.0 - 0.1 * trial.index) for trial in trials[:-1]]
    results.append(TrialResult(trial=trials[-1], status="skipped", note="lora.r not raised past 8"))
    results[2] = TrialResult(trial=trials[2], status="failed", note="ValueError: a | b\ndetails")
    results[0] = results[0].model_copy(update={"peak_memory_bytes": 3 * 2**20})
    table = table_markdown(params, results, winner=results[1])
    rows = table.splitlines()
    assert rows[0] == (
        "| trial | lora.r | train.learning_rate | trainable params | val loss | train time (s) | peak memory (MiB) | note |"
    )
    assert len(rows) == 2 + len(trials)
    assert rows[2] == "| 01-r4-learning_rate0.0002 | 4 | 0.0002 | 1,000 | 1.9000 | 1.5 | 3 | done |"
    assert "(winner)" in rows[3] and "lora.r not raised past 8" in rows[-1]
    assert rows[4].endswith("| - | - | - | - | failed: ValueError: a \\| b |")  # one line, the pipe escaped
    png = plot_losses(params, results, tmp_path / "plot" / "val_loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_command_refuses_a_bad_param_before_starting_anything(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from loraops.cli.app import app

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(CFG.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["sweep", "--param", "lora.r=4,-8", "--params", str(params)])
    assert result.exit_code == 1
    assert "lora.r" in result.output and "greater than 0" in result.output
    assert not (tmp_path / ".loraops").exists() and not (tmp_path / "mlflow").exists()  # no lock, no store


def test_each_trial_on_a_train_deployment_has_its_own_settings_folders_key_and_parent_run():
    from loraops.registry.handoff import TrainingHandoff, handoff_parameters
    from loraops.sweep.remote import trial_handoff

    outgoing = TrainingHandoff(config=CFG, data_dvc="outs: []\n", train_key="sweep")
    assert "run_tags" not in handoff_parameters(outgoing)  # retrain's runs: parameters as before
    params = parse_params(["lora.r=4,8"], CFG)
    sent = [trial_handoff(outgoing, trial, "parent-run") for trial in trial_order(params)]
    assert [one.config.lora.r for one in sent] == [4, 8]
    assert len({one.train_key for one in sent}) == 2 and "sweep" not in {one.train_key for one in sent}
    first = sent[0]
    assert first.data_dvc == outgoing.data_dvc and first.config.train.learning_rate == CFG.train.learning_rate
    assert first.config.train.output_dir == f"{CFG.train.output_dir}/sweep/01-r4"
    assert first.config.paths.adapter_dir == "adapters/sweep/01-r4"
    assert first.config.paths.metrics_dir == f"{CFG.paths.metrics_dir}/sweep/01-r4"
    assert first.run_tags == {"mlflow.parentRunId": "parent-run", "loraops.sweep": "01-r4", "mlflow.runName": "01-r4"}
    assert handoff_parameters(first)["run_tags"] == first.run_tags
    assert outgoing.config == CFG  # the sweep's own settings are untouched
