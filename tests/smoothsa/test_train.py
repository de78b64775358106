"""Training and evaluation end to end on tiny synthetic data: kill and resume, DDP on gloo, bad steps, bad input."""
import csv
import errno
import functools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error

import numpy as np
import pytest
import torch

import smoothsa
from smoothsa.checkpoint import read_checkpoint
from smoothsa.demo import DEMO_OPTIONS
from smoothsa.eval import evaluate_model
from smoothsa.presets import apply_overrides, get_preset
from smoothsa.tasks import ImageDiscovery
from smoothsa.dataio import default_workers
from smoothsa.pretrained import RANDOM_BANNER
from smoothsa.train import parse_args, run_options
from smoothsa.trainer import RunOptions, Trainer, train

TINY = [
    "model.backbone=patch", "model.image_size=32", "model.grid=4", "model.feature_dim=32", "model.slot_dim=16",
    "model.decoder_layers=1", "model.num_slots=4", "data.dataset=synthetic", "optim.batch_size=4",
    "optim.val_batch_size=8", "optim.total_steps=12",
]
OPTIONS = RunOptions(amp="none", compile=False, workers=0, log_every=4)


def tiny(*extra):
    return apply_overrides(get_preset("smoothsa_r-coco"), TINY + list(extra))


def _cli(args, cwd, env=None):
    environment = os.environ | {"SMOOTHSA_FUSED": "0"} | (env or {})
    return subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _overrides():
    return [x for item in TINY for x in ("--set", item)]


def log_rows(out) -> list[tuple[str, ...]]:
    """(step, split, name) of every row of a run's log.csv."""
    with open(out / "log.csv", newline="") as file:
        return [tuple(row[:3]) for row in csv.reader(file)]


def test_killed_run_resumes_to_the_same_weights(data, tmp_path):
    def args(out):
        return ["smoothsa.train", "--preset", "smoothsa_r-coco", "--data", str(data), "--out", str(out), "--workers", "0",
                "--amp", "none", *_overrides()]

    whole = _cli(args(tmp_path / "whole"), tmp_path)
    assert whole.wait(timeout=300) == 0
    run = tmp_path / "killed"
    args = args(run)
    proc = _cli(args, tmp_path)
    for _ in range(2400):  # polls for up to two minutes
        if (run / "ckpt-0000007.pth").exists() or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: only atomically written files survive
    proc.wait()
    assert not (run / "last.pth").exists(), "the run finished before it could be killed"
    resumed = _cli(args + ["--resume"], tmp_path)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert json.loads((run / "metrics.json").read_text())["step"] == 12
    assert sorted(p.name for p in run.glob("ckpt-*.pth")) == [f"ckpt-{s:07d}.pth" for s in range(6, 13)]
    assert not list(run.glob("*.tmp"))
    assert log_rows(tmp_path / "whole") == log_rows(run)  # the rows logged after the saved state were dropped
    whole, again = read_checkpoint(tmp_path / "whole" / "last.pth"), read_checkpoint(run / "last.pth")
    assert whole.keys() == again.keys()
    for key in whole:
        assert torch.equal(whole[key], again[key]), key


def test_checkpoints_are_official_layout_and_evaluate_reproducibly(data, tmp_path):
    preset = tiny()
    train(preset, data, tmp_path, OPTIONS)
    state = read_checkpoint(tmp_path / "last.pth")
    assert all(k.startswith("m.") for k in state) and "m.initializ.detach_flag" in state
    assert not bool(state["m.initializ.detach_flag"])  # the schedule turned it off after 10 % of the steps
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["optim"]["total_steps"] == 12 and config["model"]["grid"] == 4
    model = smoothsa.load_official(smoothsa.build_model(preset.model), tmp_path / "last.pth")
    first = evaluate_model(model, preset, data, tmp_path / "eval", seed=3)
    second = evaluate_model(model, preset, data, None, seed=3, batch_size=3)  # the noise is per sample
    assert first == pytest.approx(second, rel=1e-12)
    assert set(first) == {"ari", "ari_fg", "mbo", "miou"} and 0 <= first["mbo"] <= 1
    assert (tmp_path / "eval" / "slots.png").exists() and (tmp_path / "eval" / "metrics.json").exists()


def test_non_finite_losses_are_skipped_then_stop(data, tmp_path, monkeypatch):
    real = ImageDiscovery.losses
    calls = {"n": 0}

    def sometimes_nan(self, out, batch):
        terms = real(self, out, batch)
        calls["n"] += out.recon.requires_grad  # validation batches go through here too
        if out.recon.requires_grad and calls["n"] in (2, 3):
            terms["recon"] = terms["recon"] * float("nan")
        return terms

    monkeypatch.setattr(ImageDiscovery, "losses", sometimes_nan)
    train(tiny(), data, tmp_path / "skips", OPTIONS)
    summary = json.loads((tmp_path / "skips" / "metrics.json").read_text())
    assert summary["step"] == 12 and summary["skipped_steps"] == 2  # skipped steps count, as the official skip

    def always_nan(self, out, batch):
        return {k: v * float("inf") for k, v in real(self, out, batch).items()}

    monkeypatch.setattr(ImageDiscovery, "losses", always_nan)
    with pytest.raises(FloatingPointError, match="consecutive steps had a non-finite loss"):
        train(tiny(), data, tmp_path / "stops", RunOptions(amp="none", compile=False, workers=0, max_bad_steps=3))
    assert not (tmp_path / "stops" / "last.pth").exists()


def test_a_diverged_run_is_one_line_on_the_command_line(data, tmp_path, capsys, monkeypatch):
    real = ImageDiscovery.losses
    monkeypatch.setattr(ImageDiscovery, "losses",
                        lambda self, out, batch: {k: v * float("nan") for k, v in real(self, out, batch).items()})
    monkeypatch.setattr("smoothsa.train.RunOptions", functools.partial(RunOptions, max_bad_steps=3, log_every=4))
    status, _, err = run_main(tiny_args(data, tmp_path / "run"), capsys)
    last = err.strip().splitlines()[-1]  # what precedes it is the progress bar
    assert status == 2 and "Traceback" not in err, err
    assert last.startswith("error: 4 consecutive steps had a non-finite loss (by step 4); stopping.")
    assert "Lower optim.lr" in last


def test_ddp_on_two_cpu_processes(data, tmp_path):
    args = ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", "-m", "smoothsa.train",
            "--preset", "smoothsa_r-coco", "--data", str(data), "--out", str(tmp_path / "ddp"), "--workers", "0",
            "--amp", "none", *_overrides()]
    proc = _cli(args, tmp_path, env={"OMP_NUM_THREADS": "1"})
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output
    assert "batch 4 per process × 2 = 8 global" in output
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["step"] == 12


DDP_SKIPS = """
import json, sys
import torch, torch.distributed as dist
from smoothsa.evaluation import loader_for
from smoothsa.presets import apply_overrides, get_preset
from smoothsa.tasks import ImageDiscovery
from smoothsa.trainer import RunOptions, Trainer

preset = apply_overrides(get_preset("smoothsa_r-coco"), json.loads(sys.argv[2]))
trainer = Trainer(preset, RunOptions(amp="none", compile=False, workers=0), "cpu")
rank = dist.get_rank()
real = ImageDiscovery.losses
def losses(self, out, batch):  # rank 0 only: step 2's loss is not finite
    terms = real(self, out, batch)
    return {k: v * float("nan") for k, v in terms.items()} if rank == 0 and trainer.step_count == 2 else terms
ImageDiscovery.losses = losses
ImageDiscovery.valid = lambda self, out: torch.tensor(not (rank == 0 and trainer.step_count == 1))  # step 1: invalid
batch = next(iter(loader_for(preset, sys.argv[1], "train", 4, True)))
before = [p.detach().clone() for p in trainer.model.parameters()]
moved = []
for _ in range(4):
    trainer.step(batch)
    moved.append(any(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), before)))
    before = [p.detach().clone() for p in trainer.model.parameters()]
weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
replicas = [torch.empty_like(weights) for _ in range(2)]
dist.all_gather(replicas, weights)
result = {"moved": moved, "bad_steps": int(trainer.bad_steps), "equal": torch.equal(replicas[0], replicas[1])}
open(f"{sys.argv[3]}/rank{rank}.json", "w").write(json.dumps(result))
dist.destroy_process_group()
"""


def test_under_ddp_a_step_one_rank_finds_bad_is_skipped_and_counted_by_all(data, tmp_path):
    """Rank 0 alone finds step 1's batch invalid and step 2's loss not finite: every rank skips both (the
    replicas stay equal) and counts step 2 as bad (so all would stop together)."""
    script = tmp_path / "ddp_skips.py"
    script.write_text(DDP_SKIPS)
    args = ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519", str(script), str(data),
            json.dumps(TINY), str(tmp_path)]
    proc = _cli(args, tmp_path, env={"OMP_NUM_THREADS": "1"})
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {"moved": [True, False, False, True], "bad_steps": 1, "equal": True}, (rank, result)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--preset", "nope", "--data", "x"], "unknown preset 'nope'"),
        (["--preset", "smoothsa_r-coco"], "--data is required"),
        (["--preset", "smoothsa_r-coco", "--data", "/nonexistent/coco", "--set", "model.backbone=patch",
          "--set", "model.image_size=32", "--set", "model.grid=4"], "no train split at /nonexistent/coco/train.lmdb"),
        (["--preset", "smoothsa_r-coco", "--data", "x", "--set", "optim.lr=fast"], "expected float"),
    ],
)
def test_training_cli_rejects_bad_input(tmp_path, args, message):
    proc = _cli(["smoothsa.train", *args, "--out", str(tmp_path / "run")], tmp_path)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2 and message in output and "Traceback" not in output, output
    assert not (tmp_path / "run").exists()


def test_eval_cli_names_keys_of_a_wrong_checkpoint(data, tmp_path):
    spot = smoothsa.build_model(apply_overrides(get_preset("spot_r-coco"), TINY).model)
    torch.save(smoothsa.official_state_dict(spot), tmp_path / "spot.pth")
    proc = _cli(["smoothsa.eval", "--preset", "smoothsa_r-coco", "--ckpt", str(tmp_path / "spot.pth"),
                 "--data", str(data), "--device", "cpu", *_overrides()], tmp_path)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2 and "m.decode.bos" in output and "missing key" in output, output
    assert "Traceback" not in output and len(output.strip().splitlines()) == 1, output


def test_preheat_detach_keeps_the_initializer_input_detached_throughout(data, tmp_path):
    train(tiny("optim.preheat_detach=1.0"), data, tmp_path, OPTIONS)
    assert bool(read_checkpoint(tmp_path / "last.pth")["m.initializ.detach_flag"])
    with pytest.raises(ValueError, match=r"optim.preheat_detach must lie in \[0, 1\], got 2.0"):
        train(tiny("optim.preheat_detach=2"), data, tmp_path / "bad", OPTIONS)


def test_recognition_probe_trains_on_a_frozen_discovery_checkpoint(data, tmp_path):
    discovery = tiny("data.dataset=coco")  # synthetic records carry COCO's clazz / isthing fields
    train(discovery, data, tmp_path / "discovery", OPTIONS)
    probe = apply_overrides(get_preset("smoothsa_r_recogn-coco"), TINY + ["data.dataset=coco", "model.num_classes=4"])
    with pytest.raises(ValueError, match="--discovery-ckpt"):
        train(probe, data, tmp_path / "probe", OPTIONS)
    assert not (tmp_path / "probe").exists()  # refused before the folder is written
    results = train(probe, data, tmp_path / "probe", OPTIONS, discovery_ckpt=tmp_path / "discovery" / "last.pth").results
    assert set(results) >= {"top1", "top3", "iou", "num", "loss_ce", "loss_l1"} and results["num"] > 0
    state = read_checkpoint(tmp_path / "probe" / "last.pth")
    before = read_checkpoint(tmp_path / "discovery" / "last.pth")
    assert torch.equal(state["m.discov.aggregat.proj_q.weight"], before["m.aggregat.proj_q.weight"])  # frozen
    assert state["m.recogn.3.weight"].shape == (4 + 4, 512)


# -- the command line: run folders, refusals, weights, signals ------------------------------------------------------

def run_main(argv, capsys, entry=None):
    """`python -m smoothsa.train ARGV` in this process: (status, stdout, stderr)."""
    from smoothsa.train import main

    try:
        (entry or main)([str(a) for a in argv])
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def tiny_args(data, out, *extra):
    return ["--preset", "smoothsa_r-coco", "--data", data, "--out", out, "--workers", "0", "--amp", "none",
            "--device", "cpu", *_overrides(), *extra]


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A finished tiny run (12 steps) through the command line, and its config.json."""
    out = tmp_path_factory.mktemp("finished") / "run"
    from smoothsa.train import main

    main([str(a) for a in tiny_args(data, out, "--keep-last", "2")])
    return out


def test_a_run_records_its_weights_and_options_and_keeps_the_last_checkpoints(finished):
    config = json.loads((finished / "config.json").read_text())
    assert config["options"]["official_compat"] is False and config["options"]["workers"] == 0
    assert config["initial_weights"] == {} and "needs no weights" in config["backbone_weights"]
    assert sorted(p.name for p in finished.glob("ckpt-*.pth")) == ["ckpt-0000011.pth", "ckpt-0000012.pth"]
    rows = log_rows(finished)
    assert len(rows) == len(set(rows))


@pytest.mark.parametrize("extra,status,message", [
    ([], 2, "already holds a run (ckpt-0000011.pth, ckpt-0000012.pth, config.json, last.pth, …); continue it "
            "with --resume, start it again with --overwrite"),
    (["--resume", "--set", "optim.total_steps=20"], 2, "this would change it (optim.total_steps: saved 12, now 20)"),
    (["--resume", "--amp", "bf16"], 2, "options.amp: saved 'none', now 'bf16'"),
    (["--resume", "--overwrite"], 2, "--resume and --overwrite exclude each other"),
    (["--set", "optim.batch_size=-4"], 2, "optim.batch_size must be at least 1, got -4"),
    (["--set", "optim.clip_type=l3"], 2, "--set optim.clip_type=l3: expected one of"),
    (["--device", "cuda:7"], 2, "--device cuda:7"),
    (["--resume"], 0, "finished at step 12"),
])
def test_what_the_cli_refuses_or_finds_done_changes_no_file(hashes, finished, capsys, extra, status, message):
    before = hashes(finished)
    args = tiny_args(finished.parent / "missing-data", finished, *extra)  # refused before the data is read
    got, out, err = run_main(args, capsys)
    assert got == status, (out, err)
    if status:
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    else:
        assert message in out and "nothing to do" in out, out
    assert hashes(finished) == before


def test_a_missing_checkpoint_or_a_bad_one_is_one_line_before_the_folder_is_written(data, tmp_path, capsys):
    probe = ["--preset", "smoothsa_r_recogn-coco", "--data", data, "--device", "cpu", *_overrides(),
             "--set", "data.dataset=coco", "--set", "model.num_classes=4"]
    status, _, err = run_main(probe + ["--out", tmp_path / "a"], capsys)
    assert status == 2 and "starts from a trained discovery model: pass --discovery-ckpt PATH" in err, err
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    status, _, err = run_main(probe + ["--out", tmp_path / "b", "--discovery-ckpt", tmp_path / "junk.pth"], capsys)
    assert status == 2 and "junk.pth is not a readable checkpoint" in err and "Traceback" not in err, err
    status, _, err = run_main(probe + ["--out", tmp_path / "c", "--teacher-ckpt", tmp_path / "junk.pth"], capsys)
    assert status == 2 and "does not start from a teacher checkpoint: drop --teacher-ckpt" in err, err
    distill = ["--preset", "spot_r_distill-coco", "--data", data, "--device", "cpu", *_overrides(),
               "--set", "model.slot_dim=32", "--out", tmp_path / "d"]
    status, _, err = run_main(distill, capsys)
    assert status == 2 and "pass --teacher-ckpt PATH" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pth"]


def test_distillation_starts_from_the_teacher_checkpoint_and_records_it(data, tmp_path, capsys):
    spot = ["--preset", "spot_r-coco", "--data", data, "--device", "cpu", "--workers", "0", *_overrides(),
            "--set", "model.slot_dim=32", "--set", "optim.total_steps=2"]
    assert run_main(spot + ["--out", tmp_path / "spot"], capsys)[0] == 0
    teacher = tmp_path / "spot" / "last.pth"
    distill = ["--preset", "spot_r_distill-coco", "--data", data, "--device", "cpu", "--workers", "0",
               *_overrides(), "--set", "model.slot_dim=32", "--set", "optim.total_steps=2", "--out", tmp_path / "d"]
    status, out, err = run_main(distill + ["--teacher-ckpt", teacher, "--backbone-weights", "random"], capsys)
    assert status == 2 and "takes its backbone from the --teacher-ckpt checkpoint" in err, err
    status, out, err = run_main(distill + ["--teacher-ckpt", teacher], capsys)
    assert status == 0, err
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["initial_weights"] == {"teacher": str(teacher)}
    assert config["backbone_weights"] == f"backbone weights: from the teacher checkpoint {teacher}"
    trained, source = read_checkpoint(tmp_path / "d" / "last.pth"), read_checkpoint(teacher)
    assert torch.equal(trained["m.teacher.aggregat.proj_q.weight"], source["m.aggregat.proj_q.weight"])  # frozen


def test_offline_without_cached_weights_an_official_preset_stops_before_any_step(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    calls = []

    def offline(url, dst, hash_prefix=None, progress=True):
        calls.append(url)
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(Trainer, "step", lambda *_: pytest.fail("a step ran"))
    out = tmp_path / "run"
    status, _, err = run_main(["--preset", "smoothsa_r-coco", "--data", data, "--out", out, "--device", "cpu"], capsys)
    assert status == 2 and len(calls) == 1 and "Traceback" not in err, err
    assert "cannot download the DINOv2 weights" in err and "--backbone-weights" in err and str(tmp_path / "torch") in err
    assert not out.exists()


def test_a_random_backbone_is_said_loudly_and_recorded(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Trainer, "fit", lambda self, *args: None)  # the banner and the record come before
    out = tmp_path / "run"
    status, printed, err = run_main(["--preset", "smoothsa_r-coco", "--data", data, "--out", out, "--device", "cpu",
                                     "--backbone-weights", "random", "--set", "optim.total_steps=4"], capsys)
    assert status == 0, err
    assert f"*** {RANDOM_BANNER} ***" in printed
    assert json.loads((out / "config.json").read_text())["backbone_weights"] == RANDOM_BANNER


def test_the_state_is_saved_every_few_minutes_of_the_injected_clock(data, tmp_path, monkeypatch):
    """60 s a step and --save-every-min 2: a save every second step, counted from the last save of any kind."""
    now = [0.0]
    saved = []
    step, save_state = Trainer.step, Trainer.save_state

    def minute_step(self, batch):
        now[0] += 60.0
        return step(self, batch)

    def recorded(self):
        saved.append(self.step_count)
        return save_state(self)

    monkeypatch.setattr(Trainer, "step", minute_step)
    monkeypatch.setattr(Trainer, "save_state", recorded)
    train(tiny("optim.validations=4", "optim.total_steps=12"), data, tmp_path, OPTIONS, save_every_min=2,
          clock=lambda: now[0])
    assert saved == [2, 3, 5, 6, 8, 9, 11, 12]  # validations at 3, 6, 9, 12; by time 2 steps after each save


def test_folder_data_trains_and_validates_on_the_losses_only(tmp_path, capsys):
    from PIL import Image

    from smoothsa.dataio.folder import convert_folder
    from smoothsa.eval import main as eval_main

    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (24 + i, 30, 3), dtype=np.uint8)).save(tmp_path / f"photo{i}.png")
    convert_folder(tmp_path, tmp_path / "data", val_fraction=0.3)
    out = tmp_path / "run"
    args = tiny_args(tmp_path / "data", out, "--set", "data.dataset=folder", "--set", "optim.total_steps=4",
                     "--set", "optim.validations=2")
    status, printed, err = run_main(args, capsys)
    assert status == 0, err
    assert printed.count("no ground-truth segments in") == 1 and "validation reports the losses only" in printed
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["step"] == 4 and set(summary["val"]) == {"loss_recon", "loss_preheat"}
    status, printed, err = run_main(["--preset", "smoothsa_r-coco", "--ckpt", out / "last.pth", "--data",
                                     tmp_path / "data", "--device", "cpu", "--workers", "0", *_overrides(),
                                     "--set", "data.dataset=folder", "--out", tmp_path / "eval"], capsys, eval_main)
    assert status == 0, err
    assert set(json.loads((tmp_path / "eval" / "metrics.json").read_text())["val"]) == {"loss_recon", "loss_preheat"}
    assert (tmp_path / "eval" / "slots.png").stat().st_size > 0
    boxes = tiny_args(tmp_path / "data", tmp_path / "boxes", "--set", "data.dataset=folder", "--set",
                      "model.initializer=mlp_preheated", "--set", "data.with_bbox=true")
    status, _, err = run_main(boxes, capsys)  # a box-conditioned model needs boxes that folders lack
    assert status == 2 and "folder: this reader has no boxes" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "boxes").exists()


def test_eval_on_an_empty_split_or_a_missing_device_is_one_line(data, tmp_path, capsys):
    from smoothsa.dataio.records import LmdbWriter
    from smoothsa.eval import main as eval_main

    (tmp_path / "empty").mkdir()
    with LmdbWriter(tmp_path / "empty" / "val.lmdb"):
        pass
    model = smoothsa.build_model(tiny().model)
    torch.save(smoothsa.official_state_dict(model), tmp_path / "model.pth")
    common = ["--preset", "smoothsa_r-coco", "--ckpt", tmp_path / "model.pth", *_overrides(), "--workers", "0"]
    status, _, err = run_main(common + ["--data", tmp_path / "empty", "--device", "cpu"], capsys, eval_main)
    assert status == 2 and "the split holds no samples" in err and len(err.strip().splitlines()) == 1, err
    status, _, err = run_main(common + ["--data", data, "--device", "cuda:3"], capsys, eval_main)
    assert status == 2 and "--device cuda:3" in err and len(err.strip().splitlines()) == 1, err


def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_previous_state(data, tmp_path, capsys, monkeypatch):
    from smoothsa import state

    full, saves = [False], []
    write, save = state._FileSink.write, Trainer.save_state

    def write_unless_full(self, chunk):
        if full[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(self, chunk)

    def save_then_fill_the_disk(self):
        saves.append(self.step_count)
        full[0] = len(saves) > 1
        return save(self)

    monkeypatch.setattr(state._FileSink, "write", write_unless_full)
    monkeypatch.setattr(Trainer, "save_state", save_then_fill_the_disk)
    out = tmp_path / "run"
    status, _, err = run_main(tiny_args(data, out, "--set", "optim.validations=6"), capsys)
    assert status == 2 and saves == [2, 4], err
    assert err.strip().splitlines()[-1] == (f"error: cannot write {out / 'state.pt'} (the previous one is kept): "
                                            "No space left on device; free some space or choose another --out")
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 2 and not list(out.glob("*.tmp"))


def test_run_options_of_the_command_line(capsys):
    options = run_options(parse_args(["--compile-mode", "reduce-overhead", "--loader", "torch-gpu"]))
    assert (options.compile_mode, options.backend, options.workers) == ("reduce-overhead", "torch-gpu", default_workers())
    assert (options.amp, options.compile) == ("auto", None)  # decided by the device
    demo = run_options(parse_args([]), DEMO_OPTIONS)  # what `python -m smoothsa.train` runs the demo with
    assert demo == DEMO_OPTIONS and (demo.workers, demo.amp, demo.compile) == (0, "none", False)
    given = run_options(parse_args(["--workers", "3", "--amp", "bf16", "--compile"]), DEMO_OPTIONS)
    assert (given.workers, given.amp, given.compile) == (3, "bf16", True)
    assert RunOptions().workers == default_workers()
    with pytest.raises(SystemExit) as stop:
        parse_args(["--loader", "pillow"])
    assert stop.value.code == 2 and "torch-gpu" in capsys.readouterr().err
