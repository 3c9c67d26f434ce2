"""Reward dynamics of training runs: ``python -m caldpo.plot RUN_DIR [RUN_DIR ...] --out FILE.png``.

Reads each run's ``metrics.jsonl`` (train and eval records) and ``config.yaml`` (loss.name,
loss.beta, loss.shift) and draws, against examples seen, one line per run: chosen and
rejected rewards (``beta * h``), margins, reward accuracy, chosen and rejected log-probs,
and ``h = log pi - log pi_ref`` of chosen and rejected. Train records are thin lines,
evaluations thick lines with markers. Where the loss has calibration targets (Cal-DPO:
``h_w -> (1-s)/beta``, ``h_l -> -s/beta``; ``loss=caldpo`` is s = 1/2, i.e. +-1/(2 beta)),
they are drawn dashed in the run's colour, on the h panels and, times beta, on the reward
panels. Headless (matplotlib's Agg backend); a resumed run's rewritten steps count once.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

PANELS = [  # (metric key, title); "h/..." are derived from rewards / beta
    ("rewards/chosen", "chosen reward (beta*h_w)"),
    ("rewards/rejected", "rejected reward (beta*h_l)"),
    ("rewards/margins", "reward margin"),
    ("rewards/accuracies", "reward accuracy"),
    ("logps/chosen", "log pi(y_w|x)"),
    ("logps/rejected", "log pi(y_l|x)"),
    ("h/chosen", "h_w = log pi/pi_ref (chosen)"),
    ("h/rejected", "h_l = log pi/pi_ref (rejected)"),
]


class PlotError(ValueError):
    """A run folder that cannot be plotted (missing or unreadable metrics/config)."""


def calibration_targets(loss: dict) -> tuple[float, float] | None:
    """Cal-DPO's targets (t_w, t_l) for h of chosen and rejected of a run's loss config, or None."""
    from caldpo.kernels.losses import calibration_targets as targets
    from caldpo.train.losses import calibration_shift

    s = calibration_shift(loss)
    return None if s is None or loss.get("beta") is None else targets(float(loss["beta"]), s)


def read_run(run_dir) -> dict:
    """{"label", "loss", "beta", "targets", "train": [records], "eval": [records]} of one run folder."""
    run = Path(run_dir)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise PlotError(f"{run}: no metrics.jsonl (is it a caldpo run folder?)")
    loss: dict = {}
    cfg_file = run / "config.yaml"
    if cfg_file.is_file():
        from omegaconf import DictConfig, OmegaConf
        try:
            cfg = OmegaConf.load(cfg_file)
        except Exception as e:  # noqa: BLE001 - yaml's and OmegaConf's errors alike: the file cannot be read
            raise PlotError(f"{cfg_file}: not YAML ({' '.join(str(e).split())[:200]}); restore it from a copy, or "
                            "delete it (the plot then has no loss, beta or calibration targets)") from None
        loss = dict(OmegaConf.to_container(cfg, resolve=False).get("loss") or {}) if isinstance(cfg, DictConfig) else {}
    splits: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
    for n, line in enumerate(metrics.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise PlotError(f"{metrics}:{n}: not JSON ({e.msg})") from None
        split = rec.get("split")
        if split in splits and "examples" in rec and "loss" in rec:
            splits[split][int(rec["examples"])] = rec
    beta = float(loss["beta"]) if loss.get("beta") is not None else None
    out = {"label": run.name, "loss": loss.get("name"), "beta": beta, "targets": calibration_targets(loss)}
    for split, recs in splits.items():
        rows = [recs[k] for k in sorted(recs)]
        if beta:
            for r in rows:
                for side in ("chosen", "rejected"):
                    if f"rewards/{side}" in r:
                        r[f"h/{side}"] = r[f"rewards/{side}"] / beta
        out[split] = rows
    return out


def plot_runs(run_dirs, out, labels: list[str] | None = None, title: str | None = None) -> Path:
    """Draw the reward-dynamics figure of ``run_dirs`` into the PNG ``out``; returns its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_run(d) for d in run_dirs]
    if labels:
        for r, lab in zip(runs, labels):
            r["label"] = lab
    fig, axes = plt.subplots(2, 4, figsize=(18, 8), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        name = f"{run['label']} ({run['loss']}" + (f", beta={run['beta']:g})" if run["beta"] else ")")
        handles.append(matplotlib.lines.Line2D([], [], color=color, lw=2, marker="o", ms=3, label=name))
        for ax, (key, title_) in zip(axes.flat, PANELS):
            ax.set_title(title_, fontsize=10)
            for split, style in (("train", dict(lw=0.8, alpha=0.45)), ("eval", dict(lw=2.0, marker="o", ms=3))):
                pts = [(r["examples"], r[key]) for r in run[split] if key in r]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, color=color, **style)
            if run["targets"] and key.split("/")[0] in ("h", "rewards") and key.split("/")[1] in ("chosen", "rejected"):
                t = run["targets"][0 if key.endswith("chosen") else 1]
                ax.axhline(t * (run["beta"] if key.startswith("rewards") else 1.0), color=color, ls="--", lw=1)
    for ax, (key, _) in zip(axes.flat, PANELS):
        if not key.startswith("logps/"):
            ax.axhline(0.0, color="0.6", lw=0.6, zorder=0)
        ax.set_xlabel("examples seen", fontsize=9)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(handles=handles, fontsize=8)
    axes.flat[1].legend(fontsize=8, handles=[
        matplotlib.lines.Line2D([], [], color="k", lw=0.8, alpha=0.45, label="train (per step)"),
        matplotlib.lines.Line2D([], [], color="k", lw=2, marker="o", ms=3, label="eval"),
        matplotlib.lines.Line2D([], [], color="k", lw=1, ls="--", label="Cal-DPO target")])
    fig.suptitle(title or "reward dynamics: " + ", ".join(r["label"] for r in runs), fontsize=12)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m caldpo.plot", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (each with metrics.jsonl, config.yaml)")
    p.add_argument("--out", required=True, metavar="FILE.png", help="where to write the figure")
    p.add_argument("--labels", nargs="+", default=None, help="one legend label per run (default: folder names)")
    p.add_argument("--title", default=None)
    a = p.parse_args(argv)
    from caldpo.cli import run

    def work() -> None:
        if a.labels and len(a.labels) != len(a.runs):
            raise PlotError(f"--labels: {len(a.labels)} labels for {len(a.runs)} runs; give one per run")
        print(plot_runs(a.runs, a.out, a.labels, a.title))

    return run(work, errors=(PlotError,))


if __name__ == "__main__":
    from caldpo.cli import main as _main

    _main(main)
