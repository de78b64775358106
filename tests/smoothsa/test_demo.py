"""The embedded demo: its trivial baselines and one tiny end-to-end run (train, evaluate, compare, write)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from smoothsa.demo import baseline_segments, baselines, run_demo
from smoothsa.metrics import ari
from smoothsa.presets import apply_overrides, get_preset

SMALL = ["model.image_size=32", "model.grid=4", "model.feature_dim=16", "model.slot_dim=16", "optim.batch_size=4",
         "optim.val_batch_size=8", "optim.total_steps=6", "optim.validations=2"]


def test_grid_baseline_is_nine_equal_blocks_in_raster_order():
    grid = baseline_segments("grid_3x3", 2, 6, 9)  # (B, H·W, 9)
    assert grid.shape == (2, 54, 9) and bool((grid.sum(-1) == 1).all())
    index = grid[0].int().argmax(-1).reshape(6, 9)
    expected = (torch.arange(6)[:, None] // 2) * 3 + torch.arange(9)[None, :] // 3
    assert torch.equal(index, expected)
    one = baseline_segments("one_slot", 3, 4, 4)
    assert one.shape == (3, 16, 1) and bool(one.all())


def test_grid_baseline_scores_a_scene_split_along_its_blocks_perfectly():
    grid = baseline_segments("grid_3x3", 1, 6, 6)
    true = torch.zeros(1, 36, 3, dtype=torch.bool)
    true[0, :, 0] = True  # background everywhere, then two objects that each fill one block
    for channel, block in ((1, 0), (2, 4)):
        inside = grid[0, :, block]
        true[0, inside, 0] = False
        true[0, inside, channel] = True
    assert ari(grid, true, fg=True).item() == pytest.approx(1.0)
    assert ari(baseline_segments("one_slot", 1, 6, 6), true, fg=True).item() == pytest.approx(0.0)


def test_baselines_score_the_validation_split(data):
    preset = apply_overrides(get_preset("demo"), SMALL)
    scores = baselines(preset, data)
    assert set(scores) == {"one_slot", "grid_3x3"}
    assert scores["one_slot"]["ari"] == pytest.approx(0.0) and scores["one_slot"]["ari_fg"] == pytest.approx(0.0)
    assert 0.0 < scores["grid_3x3"]["ari_fg"] < 1.0


def test_demo_trains_evaluates_and_writes_metrics_and_pictures(data, tmp_path, capsys):
    summary = run_demo(out=tmp_path / "demo", data=data, overrides=SMALL, device="cpu")
    written = json.loads((tmp_path / "demo" / "eval" / "metrics.json").read_text())
    assert written == json.loads(json.dumps(summary))
    logged = json.loads((tmp_path / "demo" / "metrics.json").read_text())["val"]  # training's last validation
    assert {k: logged[k] for k in written["val"]} == written["val"]  # the printed number is the logged one
    assert set(written["val"]) == {"ari", "ari_fg", "mbo", "miou"}
    assert set(written["baselines"]) == {"one_slot", "grid_3x3"} and written["train_seconds"] > 0
    assert (tmp_path / "demo" / "eval" / "slots.png").stat().st_size > 0
    assert (tmp_path / "demo" / "last.pth").exists()
    printed = capsys.readouterr().out
    assert "grid_3x3" in printed and f"{written['val']['ari_fg']:6.3f}" in printed


@pytest.mark.slow
def test_ctrl_c_stops_the_demo_resumably_and_a_finished_demo_says_it_is_done(hashes, data, tmp_path, capsys):
    out = tmp_path / "demo"
    overrides = [x for item in SMALL + ["optim.total_steps=60"] for x in ("--set", item)]
    command = [sys.executable, "-m", "smoothsa.train", "--out", str(out), "--data", str(data), "--workers", "1",
               *overrides]
    # Its own process group, as a terminal's: Ctrl-C reaches the loader worker too, which must ignore it.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=os.environ | {"SMOOTHSA_FUSED": "0"})
    for _ in range(2400):
        if (out / "log.csv").exists() or proc.poll() is not None:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, error = proc.communicate(timeout=120)
    assert proc.returncode == 130, error
    assert "run the same command with --resume to continue" in error.strip().splitlines()[-1]
    assert "Traceback" not in error and "FileNotFoundError" not in error
    assert not (out / "last.pth").exists() and not (out / "eval").exists()

    from smoothsa.train import main

    again = ["--out", str(out), "--data", str(data), *overrides]
    with pytest.raises(SystemExit) as refused:  # neither resumed nor overwritten: refused
        main(again)
    assert refused.value.code == 2 and "already holds a run" in capsys.readouterr().err
    main(again + ["--resume", "--backbone-weights", str(tmp_path / "absent.pth")])  # a resume loads no weights
    summary = json.loads((out / "eval" / "metrics.json").read_text())
    assert json.loads((out / "metrics.json").read_text())["step"] == 60 and "train_seconds" in summary
    capsys.readouterr()
    before = hashes(out)
    main(again)  # the finished demo, run again as it was
    printed = capsys.readouterr().out
    assert f"the demo in {out} is done: metrics {out / 'eval' / 'metrics.json'}" in printed and "--overwrite" in printed
    assert hashes(out) == before
    main(again + ["--overwrite"])
    assert "moved the previous run" in capsys.readouterr().out
    assert (out / "previous-1" / "eval" / "metrics.json").exists() and (out / "eval" / "metrics.json").exists()
