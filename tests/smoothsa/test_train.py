"""Training and evaluation end to end on tiny synthetic data: kill and resume, DDP on gloo, bad steps, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import smoothsa
from smoothsa.checkpoint import read_checkpoint
from smoothsa.eval import evaluate_model
from smoothsa.presets import apply_overrides, get_preset
from smoothsa.tasks import ImageDiscovery
from smoothsa.dataio import default_workers
from smoothsa.train import parse_args, run_options
from smoothsa.trainer import RunOptions, train

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


def test_ddp_on_two_cpu_processes(data, tmp_path):
    args = ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517", "-m", "smoothsa.train",
            "--preset", "smoothsa_r-coco", "--data", str(data), "--out", str(tmp_path / "ddp"), "--workers", "0",
            "--amp", "none", *_overrides()]
    proc = _cli(args, tmp_path, env={"OMP_NUM_THREADS": "1"})
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output
    assert "batch 4 per process × 2 = 8 global" in output
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["step"] == 12


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
    assert proc.returncode != 0 and message in output, output


def test_eval_cli_names_keys_of_a_wrong_checkpoint(data, tmp_path):
    spot = smoothsa.build_model(apply_overrides(get_preset("spot_r-coco"), TINY).model)
    torch.save(smoothsa.official_state_dict(spot), tmp_path / "spot.pth")
    proc = _cli(["smoothsa.eval", "--preset", "smoothsa_r-coco", "--ckpt", str(tmp_path / "spot.pth"),
                 "--data", str(data), "--device", "cpu", *_overrides()], tmp_path)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "m.decode.bos" in output and "missing key" in output, output


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
    results = train(probe, data, tmp_path / "probe", OPTIONS, discovery_ckpt=tmp_path / "discovery" / "last.pth").results
    assert set(results) >= {"top1", "top3", "iou", "num", "loss_ce", "loss_l1"} and results["num"] > 0
    state = read_checkpoint(tmp_path / "probe" / "last.pth")
    before = read_checkpoint(tmp_path / "discovery" / "last.pth")
    assert torch.equal(state["m.discov.aggregat.proj_q.weight"], before["m.aggregat.proj_q.weight"])  # frozen
    assert state["m.recogn.3.weight"].shape == (4 + 4, 512)


def test_run_options_of_the_command_line(capsys):
    options = run_options(parse_args(["--compile-mode", "reduce-overhead", "--loader", "torch-gpu"]))
    assert (options.compile_mode, options.backend, options.workers) == ("reduce-overhead", "torch-gpu", default_workers())
    assert run_options(parse_args(["--workers", "3"]), workers=0).workers == 3
    assert run_options(parse_args([]), workers=0).workers == 0  # the demo's default
    assert RunOptions().workers == default_workers()
    with pytest.raises(SystemExit) as stop:
        parse_args(["--loader", "pillow"])
    assert stop.value.code == 2 and "torch-gpu" in capsys.readouterr().err
