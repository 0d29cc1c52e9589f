"""The README and docs/: within their length, every link and named file there, and the tables equal to what the
committed measurements render (so a number in them cannot drift from the code that measured it)."""
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "assets" / "measurements" / "README.md"]


def named_paths(text: str) -> list[str]:
    """Relative link targets, and backticked names that look like files of this repository (a folder and a
    file with an extension, or a top-level script): placeholders, run outputs and shell snippets left out."""
    links = [m for m in re.findall(r"\]\(([^)#\s]+)\)", text) if not re.match(r"[a-z]+://", m)]
    ticked = []
    for m in re.findall(r"`([^`\s]+)`", text):
        if (m.startswith(("out/", "../", "/", "-", "$")) or any(c in m for c in "<>*{}$=,|:") or "..." in m
                or "NNNNNN" in m or m.endswith("/")):
            continue
        if re.fullmatch(r"(assets|docs|recipes|toy|tests)/[\w./-]+\.\w+|[\w-]+\.(py|sh|md|txt)", m):
            ticked.append(m)
    return links + ticked


OUTPUTS = {"results.md", "results.json", "results.png", "verdict.md", "verdict.json", "verdict.png", "metrics.png",
           "run.json", "metrics.jsonl", "samples.jsonl", "cfg.json", "sae.safetensors", "adapter_config.json",
           "adapter_model.safetensors", "sae_curve.md", "samples_settings.json"}   # what the stages write


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_named_file_exists(page):
    text = page.read_text()
    scripts = {f.name for d in ("", "recipes", "toy", "tests") for f in (ROOT / d).glob("*.*")}
    missing = []
    for name in named_paths(text):
        here = (page.parent / name).resolve()
        bare_ok = "/" not in name and (name in scripts or name in OUTPUTS)     # a script named by its file name
        if not (here.exists() or (ROOT / name).exists() or bare_ok):
            missing.append(name)
    assert not missing, f"{page.name} names files that do not exist: {missing}"


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_named_paths_finds_what_it_should():
    text = "see [a](docs/nope.md), `recipes/x.sh`, `plot.py`, `out/run/final`, `step_NNNNNN/`, `--flag`"
    assert named_paths(text) == ["docs/nope.md", "recipes/x.sh", "plot.py"]


def test_readme_gpu_table_is_what_its_json_renders():
    import bench
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"python bench\.py --table\s+(assets/measurements/\S+\.json)", readme)
    assert m, "the README names the JSON its GPU table is rendered from"
    table = bench.headline(json.loads((ROOT / m.group(1)).read_text()))
    assert all(line in readme for line in table.splitlines() if line.strip()), "re-render: python bench.py --table"
    assert table.count("\n| ") >= 7                            # every benchmark of that run has its row


def test_headline_leaves_out_a_failed_benchmark():
    import bench
    r = json.loads((ROOT / "assets" / "measurements" / "2026-11-26-h100-round4-bench.json").read_text())
    full = bench.headline(r)
    r["sae"] = {"error": "RuntimeError: out of memory"}
    without = bench.headline(r)
    assert "SAE step" in full and "SAE step" not in without
    assert len(full.splitlines()) == len(without.splitlines()) + 1
