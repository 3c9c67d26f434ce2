"""caldpo.plot (reward dynamics figure) and the calibration metrics it reads (caldpo.train.losses)."""
from __future__ import annotations

import json

import pytest
import torch

from caldpo.plot import main as plot_main, read_run
from caldpo.train.config import load_config
from caldpo.train.losses import batch_loss


@pytest.mark.parametrize("overrides,targets", [
    (["loss=caldpo", "loss.beta=0.1"], (5.0, -5.0)),
    (["loss=cal_dpo", "loss.beta=0.25", "loss.shift=0.2"], (0.8 / 0.25, -0.2 / 0.25)),
    (["loss=cal_dpo", "loss.beta=0.1", "loss.shift=0"], None),
    (["loss=dpo", "loss.beta=0.1"], None),
])
def test_calibration_metrics_against_float64(overrides, targets):
    cfg = load_config(["model=tiny", *overrides])
    beta = float(cfg.loss.beta)
    g = torch.Generator().manual_seed(0)
    n, T = 6, 5
    pc, pr, rc, rr = (torch.randn(n, generator=g, dtype=torch.float64) * 3 - 20 for _ in range(4))
    ids = torch.ones(n, T, dtype=torch.long)
    batch = {f"{s}_{k}": ids.clone() for s in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "labels")}
    _, m = batch_loss(cfg, lambda **inputs: torch.cat([pc, pr]).float(), lambda b, i: (rc.float(), rr.float()),
                      batch, torch.device("cpu"))
    h_w, h_l = (pc.float() - rc.float()).double(), (pr.float() - rr.float()).double()
    torch.testing.assert_close(m["calibration/h_chosen"].double(), h_w, rtol=0, atol=1e-5)
    torch.testing.assert_close(m["calibration/h_rejected"].double(), h_l, rtol=0, atol=1e-5)
    assert m["rewards/chosen_positive"].tolist() == (beta * h_w > 0).double().tolist()
    assert 0 < m["rewards/chosen_positive"].sum() < n  # the draw has both signs: the metric is not constant
    if targets is None:
        assert "calibration/target_chosen" not in m
    else:
        assert m["calibration/target_chosen"].tolist() == pytest.approx([targets[0]] * n)
        assert m["calibration/target_rejected"].tolist() == pytest.approx([targets[1]] * n)


def _fake_run(path, loss: str, beta: float, slope: float):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"loss:\n  name: {loss}\n  beta: {beta}\n")
    lines = []
    for step in range(0, 41):
        ex = 8 * step
        rec = {"split": "train", "step": step, "examples": ex, "loss": 0.7 - 0.01 * step,
               "rewards/chosen": slope * step / 40, "rewards/rejected": -0.5 * step / 40,
               "rewards/margins": (slope + 0.5) * step / 40, "rewards/accuracies": min(1, 0.5 + step / 80),
               "logps/chosen": -40 + slope * step, "logps/rejected": -40 - step}
        lines.append(json.dumps(rec))
        if step % 10 == 0:
            lines.append(json.dumps({**rec, "split": "eval"}))
    lines.append(json.dumps({**rec, "rewards/chosen": 99.0}))  # a resumed run rewrites its last step
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_plot_writes_a_png_with_every_run(tmp_path, capsys):
    import matplotlib.image

    _fake_run(tmp_path / "dpo", "dpo", 0.1, -0.6)
    _fake_run(tmp_path / "cal", "caldpo", 0.1, 0.3)
    run = read_run(tmp_path / "cal")
    assert run["targets"] == pytest.approx((5.0, -5.0)) and read_run(tmp_path / "dpo")["targets"] is None
    assert len(run["train"]) == 41 and run["train"][-1]["rewards/chosen"] == 99.0  # the rewrite wins
    assert run["eval"][-1]["h/chosen"] == pytest.approx(0.3 / 0.1)
    out = tmp_path / "fig" / "dyn.png"
    assert plot_main([str(tmp_path / "dpo"), str(tmp_path / "cal"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    img = matplotlib.image.imread(out)
    assert img.shape[0] > 400 and img.shape[1] > 1000
    rgb = img[..., :3].reshape(-1, 3)
    assert rgb.std() > 0.05  # not blank
    # both runs' default colours (C0 blue, C1 orange) are drawn
    for colour in ((0x1f, 0x77, 0xb4), (0xff, 0x7f, 0x0e)):
        c = torch.tensor(colour, dtype=torch.float32) / 255
        assert (torch.from_numpy(rgb.copy()) - c).abs().max(1).values.lt(0.02).sum() > 200


def test_plot_refuses_a_folder_without_metrics(tmp_path, capsys):
    assert plot_main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.startswith("caldpo: ") and not (tmp_path / "x.png").exists()


def test_plot_names_a_config_yaml_that_is_not_yaml(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"split": "train", "step": 1, "examples": 8, "loss": 1.0}\n')
    (tmp_path / "config.yaml").write_text("loss: [unclosed\n  : :\n")
    assert plot_main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"caldpo: {tmp_path / 'config.yaml'}: not YAML") and err.count("\n") == 1
