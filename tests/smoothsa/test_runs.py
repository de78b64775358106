"""The run folder: refusals that change no file, --overwrite, --resume against the saved config, finished runs,
leftover .tmp files, log.csv after a resume, time-based saves, signals, keep-last-N and atomic writes on a full
or read-only disk."""
import argparse
import csv
import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from smoothsa import cli, runs
from smoothsa.presets import apply_overrides, get_preset
from smoothsa.state import atomic_save, atomic_write_text

OPTIONS = {"amp": "none", "compile": False, "backend": "torch", "workers": 0, "log_every": 4}
TINY = ["optim.total_steps=12", "optim.batch_size=4"]


def preset(*extra):
    return apply_overrides(get_preset("demo"), TINY + list(extra))


def started_run(out, step=8, total=12, *extra):
    """A run folder as a training run leaves it when stopped after saving the state of `step`."""
    run = runs.prepare(out, preset(f"optim.total_steps={total}", *extra), OPTIONS, say=lambda _: None)
    torch.save({"step": step, "model": {"m.x": torch.arange(3.0)}}, out / "state.pt")
    torch.save({"m.x": torch.arange(3.0)}, out / "ckpt-0000006.pth")
    with open(out / "log.csv", "w", newline="") as file:  # as the training logger writes it
        csv.writer(file).writerows([["step", "split", "name", "value"]] + [[s, "train", "loss", f"{1 / s:.4f}"]
                                                                          for s in (4, 8, 12)] + [[12, "val", "ari", 0.5]])
    return run


def finish(out, step=12):
    (out / "metrics.json").write_text(json.dumps({"step": step, "val": {"ari": 0.5}}))
    torch.save({"m.x": torch.arange(3.0)}, out / "last.pth")


def test_a_new_run_writes_its_config_with_the_options(tmp_path):
    run = runs.prepare(tmp_path / "run", preset(), OPTIONS)
    assert not run.resumed and not run.finished and run.step == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["name"] == "demo" and config["optim"]["total_steps"] == 12 and config["options"] == OPTIONS


@pytest.mark.parametrize("name", ["state.pt", "last.pth", "ckpt-0001000.pth", "metrics.json", "config.json", "log.csv"])
def test_a_folder_that_holds_a_run_is_refused_without_resume_or_overwrite(hashes, tmp_path, name, capsys):
    (tmp_path / name).write_bytes(b"previous run")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.lmdb").write_bytes(b"scenes")
    before = hashes(tmp_path)

    @cli.entry_point
    def main(argv=None):
        runs.prepare(tmp_path, preset(), OPTIONS)

    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error
    assert f"{tmp_path} already holds a run ({name})" in error and "--resume" in error and "--overwrite" in error
    assert hashes(tmp_path) == before


def test_overwrite_moves_the_previous_run_aside_and_says_so(hashes, tmp_path):
    started_run(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "val.lmdb").write_bytes(b"scenes")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text("{}")
    before = hashes(tmp_path)
    notes = []
    runs.prepare(tmp_path, preset("optim.lr=1e-3"), OPTIONS, overwrite=True, say=notes.append)
    assert any("moved the previous run" in n and "previous-1" in n for n in notes), notes
    moved = {k.removeprefix("previous-1/"): v for k, v in hashes(tmp_path).items() if k.startswith("previous-1/")}
    assert moved == {k: v for k, v in before.items() if not k.startswith("data/")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "data", "previous-1"]
    assert hashes(tmp_path)["data/val.lmdb"] == before["data/val.lmdb"]
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == 1e-3
    runs.prepare(tmp_path, preset(), OPTIONS, overwrite=True, say=notes.append)
    assert (tmp_path / "previous-2" / "config.json").is_file() and (tmp_path / "previous-1" / "state.pt").is_file()


def test_resume_refuses_a_set_that_changes_the_saved_config_naming_the_fields(hashes, tmp_path):
    started_run(tmp_path)
    before = hashes(tmp_path)
    with pytest.raises(cli.UserError) as info:
        runs.prepare(tmp_path, preset(), OPTIONS | {"amp": "bf16"}, overrides=["optim.total_steps=80", "optim.lr=1e-3"],
                     resume=True)
    message = str(info.value)
    assert "optim.total_steps: saved 12, now 80" in message and "optim.lr: saved 0.002, now 0.001" in message
    assert "options.amp: saved 'none', now 'bf16'" in message and "optim.validations" in message  # what may change
    assert hashes(tmp_path) == before
    with pytest.raises(cli.UserError, match="trains preset 'demo', not 'smoothsa_r-coco'; resume it with --preset demo"):
        runs.prepare(tmp_path, get_preset("smoothsa_r-coco"), OPTIONS, resume=True)
    assert hashes(tmp_path) == before


def test_resume_uses_the_saved_config_and_accepts_the_listed_changes(tmp_path):
    started_run(tmp_path, 8, 12, "optim.lr=1e-3")
    notes = []
    # The command line's preset is the registry's (lr 2e-3): the saved lr 1e-3 is what the run continues with.
    run = runs.prepare(tmp_path, get_preset("demo"), OPTIONS | {"workers": 2}, overrides=["optim.validations=3"],
                       resume=True, say=notes.append)
    assert run.resumed and not run.finished and run.step == 8 and run.state_path == tmp_path / "state.pt"
    assert run.preset.optim.lr == 1e-3 and run.preset.optim.total_steps == 12 and run.preset.optim.validations == 3
    assert any("optim.validations 6 → 3" in n and "options.workers 0 → 2" in n for n in notes), notes
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["optim"]["validations"] == 3 and config["options"]["workers"] == 2
    assert set(runs.RESUME_CHANGEABLE) >= {"optim.validations", "options.workers", "options.log_every"}


def test_the_resumable_options_are_run_options_and_a_resume_keeps_the_record(tmp_path):
    from smoothsa.trainer import RunOptions

    fields = {f"options.{f.name}" for f in dataclasses.fields(RunOptions)}
    assert {key for key in runs.RESUME_CHANGEABLE if key.startswith("options.")} <= fields
    record = {"initial_weights": {"teacher": "spot.pth"}, "backbone_weights": "backbone weights: from the teacher"}
    runs.prepare(tmp_path, preset(), RunOptions(workers=0), record=record)
    torch.save({"step": 4}, tmp_path / "state.pt")
    runs.prepare(tmp_path, preset(), RunOptions(workers=3), resume=True, say=lambda _: None)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["options"]["workers"] == 3 and {k: config[k] for k in record} == record


def test_resuming_a_finished_run_touches_nothing(hashes, tmp_path, capsys):
    started_run(tmp_path, 12)
    finish(tmp_path)
    before = hashes(tmp_path)
    run = runs.prepare(tmp_path, preset(), OPTIONS, resume=True)
    assert run.finished and run.step == 12
    assert f"the run in {tmp_path} finished at step 12" in capsys.readouterr().out
    assert hashes(tmp_path) == before


@pytest.mark.parametrize("case", ["no config", "no state", "bad state", "both flags"])
def test_what_cannot_be_resumed_is_refused_and_left_as_it_was(hashes, tmp_path, case):
    message = {"no config": "nothing to resume", "no state": "has no state.pt", "bad state": "not a readable training state",
               "both flags": "exclude each other"}[case]
    if case != "no config":
        started_run(tmp_path)
    if case == "no state":
        (tmp_path / "state.pt").unlink()
    if case == "bad state":
        (tmp_path / "state.pt").write_bytes(b"truncated")
    before = hashes(tmp_path)
    with pytest.raises(cli.UserError, match=message):
        runs.prepare(tmp_path, preset(), OPTIONS, resume=True, overwrite=case == "both flags")
    assert hashes(tmp_path) == before


def log_rows(out) -> list[list[str]]:
    with open(out / "log.csv", newline="") as file:
        return list(csv.reader(file))


def test_resume_drops_the_log_rows_written_after_the_saved_state(hashes, tmp_path):
    started_run(tmp_path, step=8)
    notes = []
    runs.prepare(tmp_path, preset(), OPTIONS, resume=True, say=notes.append)
    assert log_rows(tmp_path) == [["step", "split", "name", "value"], ["4", "train", "loss", "0.2500"],
                                  ["8", "train", "loss", "0.1250"]]
    assert (tmp_path / "log.csv").read_bytes().endswith(b"0.1250\r\n")  # as the logger's own rows end
    assert any("dropped 2 rows" in n and "after step 8" in n for n in notes), notes
    again = hashes(tmp_path)
    runs.prepare(tmp_path, preset(), OPTIONS, resume=True, say=notes.append)  # nothing left to drop
    assert hashes(tmp_path) == again


def test_resume_drops_a_log_row_cut_short_by_a_kill(tmp_path):
    started_run(tmp_path, step=12)
    with open(tmp_path / "log.csv", "ab") as file:
        file.write(b"1")  # the first byte of a row at step 16 (or 1x): neither a whole row nor a line
    runs.prepare(tmp_path, preset(), OPTIONS, resume=True, say=lambda _: None)
    assert log_rows(tmp_path)[-1] == ["12", "val", "ari", "0.5"] and len(log_rows(tmp_path)) == 5
    assert (tmp_path / "log.csv").read_bytes().endswith(b"\r\n")


def test_leftover_tmp_files_are_removed_at_start_and_said(hashes, tmp_path):
    started_run(tmp_path)
    state = hashes(tmp_path)["state.pt"]
    (tmp_path / "state.pt.tmp").write_bytes(b"half a state")
    (tmp_path / "ckpt-0000009.pth.tmp").write_bytes(b"half a checkpoint")
    notes = []
    runs.prepare(tmp_path, preset(), OPTIONS, resume=True, say=notes.append)
    assert not list(tmp_path.glob("*.tmp")) and hashes(tmp_path)["state.pt"] == state
    assert sum("left by an interrupted write" in n for n in notes) == 2, notes


def test_an_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("notes")
    with pytest.raises(cli.UserError, match=f"--out {tmp_path / 'run'} is a file; choose a folder"):
        runs.prepare(tmp_path / "run", preset(), OPTIONS)
    assert (tmp_path / "run").read_text() == "notes"


def test_only_the_writer_changes_files(hashes, tmp_path):
    started_run(tmp_path)
    (tmp_path / "state.pt.tmp").write_bytes(b"half")
    before = hashes(tmp_path)
    run = runs.prepare(tmp_path, preset(), OPTIONS, resume=True, writer=False, say=pytest.fail)
    assert run.resumed and run.step == 8 and hashes(tmp_path) == before


def test_the_state_is_due_every_few_minutes_of_the_injected_clock():
    now = [100.0]
    timer = runs.SaveTimer(every_min=10, clock=lambda: now[0])
    now[0] += 599.0
    assert not timer.due()
    now[0] += 1.0
    assert timer.due() and timer.due()  # stays due until saved
    timer.saved()
    assert not timer.due()
    now[0] += 600.0
    assert timer.due()
    never = runs.SaveTimer(every_min=0, clock=lambda: now[0])
    now[0] += 1e9
    assert not never.due()
    with pytest.raises(cli.UserError, match="--save-every-min"):
        runs.SaveTimer(every_min=-1, clock=lambda: 0.0)


def test_keep_last_deletes_the_oldest_checkpoints_only(tmp_path):
    for step in (5000, 10000, 15000, 20000):
        torch.save({}, tmp_path / f"ckpt-{step:07d}.pth")
    (tmp_path / "last.pth").write_bytes(b"weights")
    (tmp_path / "ckpt-notes.pth").write_bytes(b"not ours")
    assert runs.CheckpointKeeper(tmp_path).prune() == []  # default: keep every one
    keeper = runs.CheckpointKeeper(tmp_path, keep_last=2)
    assert keeper.path(25000) == tmp_path / "ckpt-0025000.pth"
    assert [p.name for p in keeper.prune()] == ["ckpt-0005000.pth", "ckpt-0010000.pth"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0015000.pth", "ckpt-0020000.pth", "ckpt-notes.pth",
                                                          "last.pth"]
    with pytest.raises(cli.UserError, match="--keep-last must be at least 1"):
        runs.CheckpointKeeper(tmp_path, keep_last=0)


def test_a_signal_asks_for_a_save_then_a_non_zero_exit_that_says_how_to_continue(tmp_path, capsys):
    previous = signal.getsignal(signal.SIGTERM)
    with runs.StopSignals() as signals:
        assert not signals.requested
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (main) thread: the handler runs before the next line
        assert signals.requested
        stop = signals.stopped(40, tmp_path / "state.pt")
    assert signal.getsignal(signal.SIGTERM) is previous
    assert stop.status == 143
    assert stop.message == f"stopped by SIGTERM at step 40; the state is saved in {tmp_path / 'state.pt'}: " \
                           "run the same command with --resume to continue"

    @cli.entry_point
    def main(argv=None):
        raise stop

    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 143 and capsys.readouterr().err == stop.message + "\n"


def test_a_second_ctrl_c_stops_at_once():
    signals = runs.StopSignals()
    signals.handle(signal.SIGINT)
    assert signals.requested and signals.stopped(3, "state.pt").status == 130
    with pytest.raises(cli.Stopped) as info:
        signals.handle(signal.SIGINT)
    assert info.value.status == 130 and "second Ctrl-C" in info.value.message and "--resume" in info.value.message


def test_the_stop_request_is_reduced_over_the_process_group(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        signals = runs.StopSignals()
        assert not signals.requested_on_any_rank(torch.device("cpu"))
        signals.handle(signal.SIGINT)
        assert signals.requested_on_any_rank(torch.device("cpu")) and signals.signum == signal.SIGINT
    finally:
        torch.distributed.destroy_process_group()
    assert runs.StopSignals().requested_on_any_rank(torch.device("cpu")) is False  # no group: this process's own


def test_loader_workers_ignore_the_stop_signals():
    from smoothsa.dataio.epochs import seed_worker

    previous = {s: signal.getsignal(s) for s in runs.StopSignals.SIGNALS}
    try:
        seed_worker(0, seed=1, epoch=0)  # every loader worker's worker_init_fn
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in runs.StopSignals.SIGNALS)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _disk_that_fills(monkeypatch, room: int):
    """os.write as on a disk with `room` bytes left: short writes, then ENOSPC."""
    real = os.write
    left = [room]

    def write(fd, data):
        size = min(len(data), left[0])
        if size == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        left[0] -= size
        return real(fd, memoryview(data)[:size])

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("room", [0, 1000, 100_000])
def test_a_full_disk_keeps_the_previous_state_and_names_the_file(hashes, tmp_path, monkeypatch, room):
    path = tmp_path / "state.pt"
    atomic_save({"step": 1, "weights": torch.arange(10.0)}, path)
    before = hashes(tmp_path)
    _disk_that_fills(monkeypatch, room)
    with pytest.raises(cli.UserError) as info:
        atomic_save({"step": 2, "weights": torch.zeros(200_000)}, path)
    monkeypatch.undo()
    assert str(info.value) == (f"cannot write {path} (the previous one is kept): No space left on device; "
                               "free some space or choose another --out")
    assert hashes(tmp_path) == before
    assert torch.load(path, weights_only=True)["step"] == 1


def test_a_read_only_folder_is_a_user_error_and_keeps_the_file(tmp_path, monkeypatch, capsys):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "{}")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(args[0]))

    monkeypatch.setattr(os, "open", read_only)

    @cli.entry_point
    def main(argv=None):
        atomic_write_text(path, '{"step": 2}')

    with pytest.raises(SystemExit) as exit_:
        main([])
    monkeypatch.undo()
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (f"error: cannot write {path} (the previous one is kept): Read-only file system; "
                                       "choose a writable --out\n")
    assert path.read_text() == "{}" and not list(tmp_path.glob("*.tmp"))


def test_an_atomic_save_round_trips_large_tensors(tmp_path):
    obj = {"weights": torch.randn(300_000, dtype=torch.float64), "step": 7}
    atomic_save(obj, tmp_path / "deep" / "state.pt")
    again = torch.load(tmp_path / "deep" / "state.pt", weights_only=True)
    assert again["step"] == 7 and torch.equal(again["weights"], obj["weights"])


LOOP = '''
import argparse, csv, json, time
import torch
from smoothsa import cli, runs
from smoothsa.presets import apply_overrides, get_preset
from smoothsa.state import atomic_save, atomic_write_text


@cli.entry_point
def main(argv=None):
    """A training main reduced to the run-folder calls: the "weights" are the running sum of the step numbers."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    runs.add_arguments(parser)
    cli.add_debug_argument(parser)
    args = parser.parse_args(argv)
    preset = apply_overrides(get_preset("demo"), args.overrides)
    run = runs.prepare(args.out, preset, {"workers": 0}, overrides=args.overrides, resume=args.resume,
                       overwrite=args.overwrite)
    if run.finished:
        return
    step = total = 0
    if run.resumed:
        state = torch.load(run.state_path, weights_only=True)
        step, total = state["step"], state["total"]
    timer, keep = runs.SaveTimer(args.save_every_min), runs.CheckpointKeeper(run.out, args.keep_last)
    interval = run.preset.optim.total_steps // run.preset.optim.validations
    log = run.out / "log.csv"
    with runs.StopSignals() as signals:
        while step < run.preset.optim.total_steps:
            step += 1
            total += step
            time.sleep(0.05)
            new = not log.exists()
            with open(log, "a", newline="") as file:
                writer = csv.writer(file)
                if new:
                    writer.writerow(["step", "split", "name", "value"])
                writer.writerow([step, "train", "total", total])
            print(f"step {step}", flush=True)
            validated = step % interval == 0
            if validated:
                atomic_save({"total": total}, keep.path(step))
                keep.prune()
            if validated or timer.due() or signals.requested:
                atomic_save({"step": step, "total": total}, run.state_path)
                timer.saved()
            if signals.requested:
                raise signals.stopped(step, run.state_path)
    atomic_write_text(run.out / "metrics.json", json.dumps({"step": step, "val": {"total": total}}))


main()
'''


@pytest.mark.slow
def test_killed_stopped_and_finished_runs_follow_the_documented_sequence(hashes, tmp_path):
    """kill -9 after a validation's save, a resume stopped by SIGTERM (143), a resume to the end,
    and a resume of the finished run that changes nothing: the sum and the log are those of one uninterrupted run."""
    script, out = tmp_path / "loop.py", tmp_path / "run"
    script.write_text(LOOP)
    command = [sys.executable, str(script), "--out", str(out), "--set", "optim.total_steps=40",
               "--set", "optim.validations=4", "--keep-last", "2"]

    def start(*extra):
        return subprocess.Popen(command + list(extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def run_until(proc, step, sig):
        for line in proc.stdout:
            if line.startswith("step ") and int(line.split()[1]) >= step:
                break
        proc.send_signal(sig)
        rest, error = proc.communicate(timeout=60)
        return proc.returncode, rest, error

    status, _, _ = run_until(start(), 15, signal.SIGKILL)
    assert status == -signal.SIGKILL and not (out / "metrics.json").exists()
    status, _, error = run_until(start("--resume"), 25, signal.SIGTERM)
    assert status == 143 and "stopped by SIGTERM at step" in error and "--resume to continue" in error, error
    finished = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0, finished.stderr
    assert json.loads((out / "metrics.json").read_text()) == {"step": 40, "val": {"total": sum(range(41))}}
    with open(out / "log.csv", newline="") as file:
        rows = list(csv.reader(file))[1:]
    assert [int(r[0]) for r in rows] == list(range(1, 41))
    assert [int(r[3]) for r in rows] == [sum(range(s + 1)) for s in range(1, 41)]
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-0000030.pth", "ckpt-0000040.pth"]
    before = hashes(out)
    again = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "finished at step 40" in again.stdout and "nothing to do" in again.stdout
    assert hashes(out) == before


def test_the_run_flags_parse_and_refuse_bad_values(capsys):
    parser = argparse.ArgumentParser()
    runs.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.overwrite, args.save_every_min, args.keep_last) == (False, 10.0, None)
    args = parser.parse_args(["--overwrite", "--save-every-min", "2.5", "--keep-last", "3"])
    assert (args.overwrite, args.save_every_min, args.keep_last) == (True, 2.5, 3)
    for bad, message in [(["--keep-last", "0"], "expected an integer ≥ 1, got 0"),
                         (["--save-every-min", "-1"], "expected minutes ≥ 0, got -1"),
                         (["--save-every-min", "nan"], "expected minutes ≥ 0, got nan")]:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(bad)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


TRAIN_TINY = [
    "model.backbone=patch", "model.image_size=32", "model.grid=4", "model.feature_dim=32", "model.slot_dim=16",
    "model.decoder_layers=1", "model.num_slots=4", "data.dataset=synthetic", "optim.batch_size=4",
    "optim.val_batch_size=8", "optim.total_steps=60", "optim.validations=2",
]


def _wait_for(path, proc, polls=2400):
    """Polls (up to two minutes) until `path` exists or the process ended."""
    for _ in range(polls):
        if path.exists() or proc.poll() is not None:
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_through_the_training_cli_saves_a_state_that_resumes_to_the_same_weights(data, tmp_path):
    def command(out):
        return [sys.executable, "-m", "smoothsa.train", "--preset", "smoothsa_r-coco", "--data", str(data), "--out",
                str(out), "--workers", "0", "--amp", "none", "--device", "cpu"] + \
            [x for item in TRAIN_TINY for x in ("--set", item)]

    env = os.environ | {"SMOOTHSA_FUSED": "0"}
    whole = subprocess.run(command(tmp_path / "whole"), capture_output=True, text=True, timeout=300, env=env)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "stopped"
    proc = subprocess.Popen(command(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for(out / "log.csv", proc)  # the first logged step (20)
    proc.send_signal(signal.SIGTERM)
    _, error = proc.communicate(timeout=120)
    assert proc.returncode == 143, error
    step = torch.load(out / "state.pt", weights_only=True)["step"]
    assert 20 <= step < 60 and not (out / "last.pth").exists() and not (out / "metrics.json").exists()
    assert error.strip().splitlines()[-1] == (f"stopped by SIGTERM at step {step}; the state is saved in "
                                              f"{out / 'state.pt'}: run the same command with --resume to continue")
    assert "Traceback" not in error
    resumed = subprocess.run(command(out) + ["--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr
    expected, again = torch.load(tmp_path / "whole" / "last.pth"), torch.load(out / "last.pth")
    assert expected.keys() == again.keys() and all(torch.equal(expected[k], again[k]) for k in expected)
    with open(out / "log.csv", newline="") as file:
        rows = [tuple(row[:3]) for row in csv.reader(file)][1:]
    with open(tmp_path / "whole" / "log.csv", newline="") as file:
        assert rows == [tuple(row[:3]) for row in csv.reader(file)][1:]  # no duplicate rows, none missing
