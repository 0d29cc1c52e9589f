"""bench.py --smoke runs every benchmark and its baseline on CPU in seconds (nothing here is timed)."""
import json

import bench


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    res = bench.main(["--smoke", "--out", str(out), "--repeat", "1", "--warmup", "0", "--profile"])
    saved = json.loads(out.read_text())
    assert saved["preset"] == "tiny-qwen2" and saved["copy_bandwidth_GBps"] > 0 and saved["matmul_peak_TFLOPs"] > 0
    for key in ("tokens_per_s", "hf_tokens_per_s", "vs_hf", "share_of_floor", "first_call_s", "plain_tokens_per_s"):
        assert res["decode"][key] > 0
    for key in ("seconds", "peft_seconds", "vs_peft", "mfu"):
        assert res["grpo"][key] > 0
    assert 0 < res["grpo"]["real_tokens"] < 2 * 32             # the batch has padding on both sides
    assert res["lora"]["ours_overhead"] > 0 and res["lora"]["peft_overhead"] > 0
    assert res["sae"]["vs_sparsify"] > 0 and res["sae_tune"]["tokens_per_s"] > 0
    profile = out.with_suffix(".profile.txt").read_text()
    assert all(f"== {name}" in profile for name in ("decode", "grpo", "sae", "sae_tune"))
    assert "aten::scaled_dot_product_attention" in profile or "aten::_scaled_dot_product" in profile


def test_bench_decode_autotune_smoke(tmp_path):
    # on request only (minutes of autotuning on a GPU); on CPU the plain path runs and only the plumbing is checked
    res = bench.main(["--smoke", "--only", "decode_autotune", "--out", str(tmp_path / "b.json"), "--repeat", "1"])
    row = res["decode_autotune"]
    assert set(row) >= {"default_ms_per_step", "tuned_ms_per_step", "tuned_vs_default", "tuned_long_ms_per_step"}
    assert all(v > 0 for v in row.values())
