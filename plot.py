"""
plot.py -- pictures of runs: any stage's metrics.jsonl, several runs overlaid, and evaluation results.

    python plot.py out/tina_open_rs2                    # -> out/tina_open_rs2/metrics.png
    python plot.py out/toy/sae_tuned_s0 out/toy/control  # runs of one stage overlaid -> the first run's metrics_overlay.png
    python plot.py out/eval                             # an evaluate.py folder: pass@k curves and pass@1 bars

One panel per group of metrics, chosen by the stage named in run.json (a stage it does not know: one panel per
metric): GRPO (grpo_lora.py) reward and each reward function, completion length, truncation and zero-spread
groups, KL to the reference, clipped share, learning rate; SAE training (train_sae.py) FVU, dead fraction, L0,
AuxK, learning rate; SAE-Tuning (sae_tune.py) the loss (KL or CE), the SAE's MSE, gradient norm, learning rate.
Each series is drawn raw (faint) and as a running mean over --smooth steps. evaluate.py and
recipes/resa_controls.py draw their figures with eval_figure below. Needs matplotlib (pip install matplotlib);
CPU or GPU makes no difference, it reads files only.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

GROUPS = {   # stage: [(panel title, y axis, metric keys; a key ending in "/" takes every metric under it)]
    "grpo_lora": [("reward (training batch)", "mean reward", ["reward", "reward/"]),
                  ("completion length", "tokens", ["completion_len_mean", "completion_len_max"]),
                  ("truncated completions and zero-spread groups", "share", ["truncated", "zero_spread_groups"]),
                  ("KL to the reference", "nats per token", ["kl"]),
                  ("clipped share (low / high / region)", "share of tokens", ["clip_ratio/"]),
                  ("learning rate", "lr", ["lr"])],
    "train_sae": [("FVU (training batch)", "fraction of variance unexplained", ["fvu/"]),
                  ("dead latents", "share of latents", ["dead_fraction/"]),
                  ("L0", "active latents per token", ["l0/"]),
                  ("AuxK loss", "loss", ["auxk/"]),
                  ("learning rate", "lr", ["lr"])],
    "sae_tune": [("loss", "KL or CE (nats, summed over a chunk for KL)", ["kl", "ce"]),
                 ("the SAE's reconstruction error", "MSE", ["sae_mse"]),
                 ("gradient norm", "norm before clipping", ["grad_norm"]),
                 ("learning rate", "lr", ["lr"])],
}
NOT_PLOTTED = {"step", "epoch", "tokens_per_s"}


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def read_run(run_dir: Path) -> tuple[str | None, list[dict]]:
    """-> (the stage named in run.json or None, the rows of metrics.jsonl); a clear error where there are none."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{run_dir}: no metrics.jsonl (a run folder of grpo_lora.py, train_sae.py or sae_tune.py, "
                         "or an evaluate.py folder with results.json)")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:     # a run killed mid-write leaves a partial last line
            continue
    if not rows:
        raise SystemExit(f"{path}: no complete rows yet")
    stage = None
    if (run_dir / "run.json").is_file():
        stage = json.loads((run_dir / "run.json").read_text()).get("stage")
    return stage, rows


def panels_for(stage: str | None, rows: list[dict]) -> list[tuple[str, str, list[str]]]:
    """The stage's panels with the keys its rows hold (empty panels dropped); an unknown stage: one per metric."""
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items()
                              if k not in NOT_PLOTTED and isinstance(v, (int, float))))
    if stage not in GROUPS:
        return [(k, k, [k]) for k in keys]
    out = []
    for title, ylabel, want in GROUPS[stage]:
        got = [k for k in keys if any(k == w or (w.endswith("/") and k.startswith(w)) for w in want)]
        if got:
            out.append((title, ylabel, got))
    return out


def running_mean(ys: list[float], w: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= w:
            acc -= ys[i - w]
        out.append(acc / min(i + 1, w))
    return out


def plot_metrics(run_dirs: list[Path], out: Path, smooth: int = 0) -> list[str]:
    """One figure of every panel of the runs' stage, every run overlaid (the runs must be of one stage), written
    to out. -> the panels' titles."""
    runs = [(d, *read_run(d)) for d in run_dirs]
    stages = {s for _, s, _ in runs}
    if len(stages) > 1:
        raise SystemExit("runs of different stages cannot share panels: " +
                         ", ".join(f"{d} ({s or 'unknown'})" for d, s, _ in runs))
    stage = stages.pop()
    panels = panels_for(stage, [r for _, _, rows in runs for r in rows])
    plt = _plt()
    if plt is None:
        raise SystemExit("plot.py needs matplotlib: pip install matplotlib")
    cols = min(3, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows), squeeze=False)
    for ax, (title, ylabel, keys) in zip([a for row in axes for a in row], panels):
        for i, (d, _, rows) in enumerate(runs):
            for j, k in enumerate(keys):
                pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and "step" in r]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                w = smooth or max(1, len(ys) // 50)
                label = (f"{d.name}: " if len(runs) > 1 else "") + k
                # one colour per run (per metric when there is one run), one line style per metric of a panel
                color = f"C{(i if len(runs) > 1 else j) % 10}"
                style = ("-", "--", ":", "-.")[j % 4] if len(runs) > 1 else "-"
                if w > 1:
                    ax.plot(xs, ys, color=color, alpha=0.25, lw=0.8, ls=style)
                ax.plot(xs, running_mean(list(ys), w), color=color, lw=1.6, label=label, ls=style)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.legend(fontsize=7)
    for ax in [a for row in axes for a in row][len(panels):]:
        ax.axis("off")
    names = ", ".join(d.name for d, _, _ in runs)
    fig.suptitle(f"{stage or 'run'}: {names}" + (f" (running mean over {smooth} steps)" if smooth else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return [title for title, _, _ in panels]


def eval_figure(rows: list[dict], path: Path, title: str = "") -> Path | None:
    """Per benchmark (one column each): every row's pass@k curve over k (top), and below it either each row's paired
    difference to the base with its 95% interval (where the rows have vs_base) or each row's pass@1 with its
    interval. rows: {"arm", "benchmark", "n", "problems", "pass@1", "interval95", "pass_at_k"[, "vs_base",
    "vs_base_interval95"]}. -> the path, or None without matplotlib (a note is printed)."""
    plt = _plt()
    if plt is None:
        print(f"matplotlib is not installed: skipping {path.name} (pip install matplotlib)")
        return None
    benches = list(dict.fromkeys(r["benchmark"] for r in rows))
    fig, axes = plt.subplots(2, len(benches), figsize=(5.5 * len(benches), 8), squeeze=False)
    for j, bench in enumerate(benches):
        mine = [r for r in rows if r["benchmark"] == bench]
        top, bottom = axes[0][j], axes[1][j]
        for i, r in enumerate(mine):
            ks = list(range(1, len(r["pass_at_k"]) + 1))
            top.plot(ks, [100 * v for v in r["pass_at_k"]], "o-" if len(ks) < 20 else "-", ms=3, label=r["arm"],
                     color=f"C{i % 10}", lw=2 if r["arm"] == "base" else 1.2)
        n_max = max(len(r["pass_at_k"]) for r in mine)
        if n_max > 1:
            top.set_xscale("log", base=2)
            ticks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= n_max]
            top.set_xticks(ticks, [str(k) for k in ticks])
        top.set_xlabel("k (samples per problem)")
        top.set_ylabel("pass@k (%)")
        top.set_title(f"{bench}: pass@k (n = {mine[0]['n']}, {mine[0]['problems']} problems)", fontsize=10)
        diff = [r for r in mine if "vs_base" in r]
        shown = diff or mine
        y = list(range(len(shown)))[::-1]
        if diff:
            mid = [100 * r["vs_base"] for r in shown]
            lo = [100 * (r["vs_base"] - r["vs_base_interval95"][0]) for r in shown]
            hi = [100 * (r["vs_base_interval95"][1] - r["vs_base"]) for r in shown]
            bottom.axvline(0, color="#888", lw=1)
            bottom.set_xlabel("pass@1 minus the base (points), paired 95% interval")
        else:
            mid = [100 * r["pass@1"] for r in shown]
            lo = [100 * (r["pass@1"] - r["interval95"][0]) for r in shown]
            hi = [100 * (r["interval95"][1] - r["pass@1"]) for r in shown]
            bottom.set_xlabel("pass@1 (%), 95% interval over problems")
        bottom.errorbar(mid, y, xerr=[lo, hi], fmt="o", capsize=3)
        bottom.set_yticks(y, [r["arm"] for r in shown], fontsize=8)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def short_name(adapter: str) -> str:
    """An adapter path as a figure label: its last two folders ('base' stays)."""
    return adapter if adapter == "base" else "/".join(Path(adapter).parts[-2:])


def eval_rows(results: dict, samples) -> list[dict]:
    """eval_figure's rows from evaluate.py's results ({adapter: {benchmark: summary}}) and its sample records."""
    import evaluate as E
    by: dict[tuple, list] = {}
    for s in samples:                                          # grouped once: (adapter, benchmark) -> samples
        by.setdefault((s["adapter"], s["benchmark"]), []).append(s)
    return [{"arm": short_name(adapter), "benchmark": bench, "n": r["n"], "problems": r["problems"],
             "pass@1": r["pass@1"], "interval95": r["interval95"],
             "pass_at_k": E.pass_at_k_curve(by.get((adapter, bench), []), r["n"])}
            for adapter, per in results.items() for bench, r in per.items()]


def main(argv=None):
    p = argparse.ArgumentParser(usage='python plot.py RUN_DIR [RUN_DIR ...] [--out FILE] [--smooth N]', description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (with metrics.jsonl) of one stage, or evaluate.py folders")
    p.add_argument("--out", default=None, help="the PNG (default: beside the first run: metrics.png, "
                   "metrics_overlay.png for several runs, results.png for an evaluation)")
    p.add_argument("--smooth", type=int, default=0, help="running mean over this many steps (default: a 50th of the run)")
    args = p.parse_args(argv)
    dirs = [Path(d) for d in args.runs]
    for d in dirs:
        if not d.is_dir():
            raise SystemExit(f"{d}: no such folder")
    if all((d / "results.json").is_file() and (d / "samples.jsonl").is_file() for d in dirs):
        out = []
        for d in dirs:
            path = Path(args.out) if args.out and len(dirs) == 1 else d / "results.png"
            rows = eval_rows(json.loads((d / "results.json").read_text())["results"],
                             map(json.loads, open(d / "samples.jsonl")))
            out.append(eval_figure(rows, path, f"evaluation: {d}"))
        if None in out:
            raise SystemExit("plot.py needs matplotlib: pip install matplotlib")
        print("\n".join(map(str, out)))
        return out
    if args.smooth < 0:
        raise SystemExit(f"--smooth {args.smooth}: must be >= 0 (0: a 50th of the run)")
    out = Path(args.out) if args.out else dirs[0] / ("metrics.png" if len(dirs) == 1 else "metrics_overlay.png")
    plot_metrics(dirs, out, args.smooth)
    print(out)
    return out


if __name__ == "__main__":
    main()
