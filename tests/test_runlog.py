"""common.RunLog, the run record every stage keeps in its --out_dir: one run at a time (a lock), no stage writing
into another's folder, --overwrite removing exactly the old run's own files and only once the new run writes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import common as C

ROOT = Path(__file__).resolve().parents[1]


def finished_run(d: Path, stage: str = "grpo_lora"):
    """A run of `stage` in d, as a stage leaves it: an adapter, metrics, run.json listing its outputs."""
    log = C.RunLog(d, {}, stage)
    log.write_run()
    (d / "final").mkdir()
    C.atomic_write(d / "final" / "adapter_config.json", lambda p: p.write_text("{}"))
    log.metrics({"step": 1})
    log.write_run(finished=True)
    return json.loads((d / "run.json").read_text())


def test_a_second_process_is_refused_while_a_run_holds_the_folder(tmp_path):
    d = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); "
                               f"import common as C; C.RunLog({str(d)!r}, {{}}, 'train_sae'); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit, match=r"in use by train_sae \(pid \d+"):
            C.RunLog(d, {}, "train_sae", resume=True)
    finally:
        holder.kill()
        holder.wait()
    C.RunLog(d, {}, "train_sae", resume=True)                # the holder died: its lock went with it


def test_a_stage_never_writes_into_another_stages_folder(tmp_path):
    finished_run(tmp_path / "g", "grpo_lora")
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(SystemExit, match="holds a grpo_lora run"):
            C.RunLog(tmp_path / "g", {}, "evaluate", **flags)
    assert (tmp_path / "g" / "final" / "adapter_config.json").exists() and (tmp_path / "g" / "metrics.jsonl").exists()


def test_overwrite_removes_exactly_the_recorded_files_and_only_when_the_new_run_writes(tmp_path):
    d = tmp_path / "r"
    rec = finished_run(d)
    assert rec["outputs"] == ["final/adapter_config.json", "metrics.jsonl", "run.json"]
    user = [d / "step_by_step_plan.md", d / "layers.txt", d / "final" / "thesis.tex"]      # look like outputs
    for f in user:
        f.write_text("mine")
    with pytest.raises(SystemExit, match="already holds a run"):
        C.RunLog(d, {}, "grpo_lora")
    log = C.RunLog(d, {}, "grpo_lora", overwrite=True)
    assert (d / "metrics.jsonl").exists()                    # nothing removed until the new run writes
    log.write_run()
    assert not (d / "metrics.jsonl").exists() and not (d / "final" / "adapter_config.json").exists()
    assert all(f.read_text() == "mine" for f in user)
    assert json.loads((d / "run.json").read_text())["outputs"] == ["run.json"]


def test_overwrite_of_a_record_without_an_outputs_list_removes_only_our_file_names(tmp_path):
    d = tmp_path / "old"
    (d / "step_000010").mkdir(parents=True)
    (d / "step_000010" / "adapter_model.safetensors").write_text("x")
    (d / "step_000010" / "notes.txt").write_text("mine")
    (d / "layers.3").mkdir()
    (d / "layers.3" / "sae.safetensors").write_text("x")
    (d / "run.json").write_text(json.dumps({"stage": "grpo_lora"}))        # an older record: no "outputs"
    (d / "step_by_step_plan.md").write_text("mine")
    C.RunLog(d, {}, "grpo_lora", overwrite=True).write_run()
    assert not (d / "step_000010" / "adapter_model.safetensors").exists() and not (d / "layers.3").exists()
    assert (d / "step_000010" / "notes.txt").read_text() == "mine" and (d / "step_by_step_plan.md").exists()


def test_overwrite_with_a_bad_input_loses_nothing(char_model_dir, arith_file, tmp_path, monkeypatch):
    import grpo_lora as G
    monkeypatch.setitem(G.REWARDS, "not_newline", lambda cs, gold: [float(c[:1] not in ("\n", "")) for c in cs])
    out = tmp_path / "g"
    base = ["--model", str(char_model_dir), "--out_dir", str(out), "--rewards", "not_newline", "--reward_weights", "1",
            "--num_generations", "2", "--prompts_per_step", "2", "--grad_accum", "2", "--max_completion_len", "4",
            "--max_prompt_len", "64",
            "--max_steps", "1", "--stop_step", "1", "--system_prompt", "none", "--device", "cpu"]
    G.main(base + ["--dataset", str(arith_file)])
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    with pytest.raises(ValueError, match="unknown dataset"):
        G.main(base + ["--dataset", "no_such_set", "--overwrite"])                # a typo
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == before
    assert "final/adapter_model.safetensors" in before


def test_out_dir_that_is_a_file_or_not_writable(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(SystemExit, match="is a file"):
        C.RunLog(f, {}, "evaluate")
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):                           # root writes anywhere: nothing to show
            pytest.skip("running as a user who can write a read-only folder")
        with pytest.raises(SystemExit, match="cannot write there"):
            C.RunLog(ro / "sub", {}, "evaluate")
    finally:
        os.chmod(ro, 0o700)


def test_full_disk_ctrl_c_and_a_damaged_resume_state_are_named(tmp_path):
    import errno
    target = tmp_path / "x.json"
    target.write_text("old")

    def full(p):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(SystemExit, match="the disk is full.*intact"):
        C.atomic_write(target, full)
    assert target.read_text() == "old" and not list(tmp_path.glob(".x.json.tmp*"))

    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit, match="--resume"):
        C.cli(interrupted)
    import lora as L
    (tmp_path / "run" / "resume").mkdir(parents=True)
    (tmp_path / "run" / "resume" / "state.json").write_text(json.dumps({"step": 3}))
    with pytest.raises(SystemExit, match="lacks adapter, optim"):
        L.load_training_state(tmp_path / "run", None, None, None)


def test_train_sae_offers_no_resume_it_does_not_have(tmp_path):
    d = tmp_path / "s"
    log = C.RunLog(d, {}, "train_sae", can_resume=False)
    log.write_run(finished=True)
    with pytest.raises(SystemExit) as e:
        C.RunLog(d, {}, "train_sae", can_resume=False)
    assert "--overwrite" in str(e.value) and "--resume" not in str(e.value)
