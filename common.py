"""
common.py -- run plumbing shared by every stage: device and dtype choice, bf16 autocast, atomic file
writes, JSON reading with errors that name the file, the argparse conventions (underscores,
comma-separated lists, --model/--out_dir/--seed/--device/--dtype/--overwrite on every stage), torchrun setup, and the run record (run.json + metrics.jsonl + samples.jsonl) with its resume rules.

Nothing here knows about models, LoRA or SAEs; model.py, sampling.py, lora.py, sae.py, data.py and the
stage scripts all import it, and it imports none of them.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------------------------
# Device, dtype, files, command line


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: this machine has no CUDA device (torch {torch.__version__}); use --device "
                         "cpu, or install the CUDA build of torch")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SystemExit(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices (0..)")
    return dev


def pick_dtype(name: str = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use auto, fp32, bf16 or fp16")
    return table[name]


def autocast(device: torch.device, dtype: torch.dtype = torch.bfloat16):
    """bf16 autocast on a GPU (unless the weights are fp32 by choice); a no-op context on the CPU."""
    enabled = device.type == "cuda" and dtype != torch.float32
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def read_json(path) -> dict:
    """json.loads of a file, with an error that names the file."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


WRITTEN: set[Path] = set()      # every file this process wrote: what a run record lists as its outputs


def atomic_write(path, write: Callable[[Path], None]):
    """write(tmp) then fsync + rename over path, so a crash never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno == 28:                 # ENOSPC: the file it would replace is untouched
            raise SystemExit(f"{path}: the disk is full; free some space (the previous {path.name}, and the last "
                             "complete checkpoint, are intact: --resume continues from it)") from None
        raise
    os.replace(tmp, path)
    WRITTEN.add(path.resolve())


def add_run_args(parser, default_model: str, default_out: str):
    """The flags every stage shares."""
    g = parser.add_argument_group("model and run")
    g.add_argument("--model", default=default_model,
                   help="local Hugging Face folder, hub id, or random:<preset> (%(default)s)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or hub id when --model has none (random: models)")
    g.add_argument("--out_dir", default=default_out, help="output folder (%(default)s)")
    g.add_argument("--seed", type=int, default=42, help="random seed (%(default)s)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights dtype; auto = bf16 on GPU, fp32 on CPU")
    g.add_argument("--gpu_hour_usd", type=float, default=2.0,
                   help="price of one GPU hour, for the cost in run.json (%(default)s)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a run already in --out_dir (without it, or --resume, such a folder is refused)")
    g.add_argument("--dry_run", action="store_true",
                   help="print the effective configuration (every value after defaults, and what they imply) as "
                   "one JSON object and exit before loading a model or data")
    return g


def add_checkpointing_arg(group):
    group.add_argument("--gradient_checkpointing", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                       help="recompute each layer's activations in backward; auto (default) = on when a row can "
                            "reach 1024 tokens")


def use_checkpointing(flag: str, row_tokens: int) -> bool:
    """--gradient_checkpointing on / off / auto (on for rows of 1024 tokens or more)."""
    return row_tokens >= 1024 if flag == "auto" else flag == "on"


def print_config(config: dict) -> dict:
    """--dry_run: the effective configuration as one JSON object on stdout."""
    print(json.dumps(config, indent=1, default=str))
    return config


def check_ranges(args, positive=(), nonnegative=(), fractions=()):
    """Refuse values that would run but mean nothing, before any work: one line naming the flag.
    positive: > 0; nonnegative: >= 0; fractions: in [0, 1). Flags set to None (unset) are skipped."""
    for names, ok, rule in ((positive, lambda v: v > 0, "> 0"), (nonnegative, lambda v: v >= 0, ">= 0"),
                            (fractions, lambda v: 0 <= v < 1, "in [0, 1)")):
        for k in names:
            v = getattr(args, k, None)
            if v is not None and not ok(v):
                raise SystemExit(f"--{k} {v}: must be {rule}")


def cli(main):
    """Run a stage's main() from the command line. Bad input raises ValueError or FileNotFoundError with a
    message naming the input and what to do: print that one line, no traceback (NANOREASON_TRACEBACK=1
    shows it). Other exceptions are bugs and keep their traceback."""
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("NANOREASON_TRACEBACK"):
            raise
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit("interrupted: the training stages continue from their last checkpoint with the same command "
                         "plus --resume; evaluate.py with the same command (recorded samples are kept)") from None


def csv_list(kind=str):
    """argparse type for comma-separated lists: --rewards format,accuracy --reward_weights 1,2."""
    def parse(text: str):
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    return parse


# -----------------------------------------------------------------------------------------------
# Multi-process training (torchrun): shared by the stages


def rank() -> int:
    """This process's rank under torchrun (0 without)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Processes in this run: torchrun's WORLD_SIZE, else 1 (readable before any process group exists)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_distributed(device_arg: str):
    """torchrun sets WORLD_SIZE: one process per GPU (nccl) or per CPU worker (gloo)."""
    world = world_size()
    if world == 1:
        return 0, 1, pick_device(device_arg)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_arg)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_reduce_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    """The sum of t over all processes (t itself with one)."""
    if world > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_reduce_mean(tensors, world: int):
    if world > 1:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= world
        i = 0
        for t in tensors:
            t.copy_(flat[i:i + t.numel()].view_as(t))
            i += t.numel()


# -----------------------------------------------------------------------------------------------
# Run records: out_dir/run.json (arguments, versions, cost), metrics.jsonl (one JSON object per step),
# samples.jsonl (sampled completions). Only rank 0 writes. The resume rules live here, for every stage.

PROCESS_START = time.time()      # the cost meter counts the whole process, model loading included
# what a run record written before run.json listed its outputs may have written: exact names, and inside the
# folders only the file names our writers use (a user's step_by_step_plan.md or final/thesis.tex is not ours)
LEGACY_OUTPUTS = re.compile(r"(run\.json|metrics\.jsonl|samples\.jsonl|samples_settings\.json|results\.(json|md)|"
                            r"(resume|final|step_\d{6}|_rollout_adapter\w*|layers\.\d+)/(adapter_model\.safetensors|"
                            r"adapter_config\.json|state\.json|optim-\w+\.safetensors|cfg\.json|sae\.safetensors))")
LOCK_NAME = ".nanoreason.lock"


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def read_jsonl(path) -> list[dict]:
    """Rows of a JSONL file; an incomplete last line (a crash mid-write) is dropped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                print(f"warning: {path}: dropping an incomplete last line (a run stopped while writing it)")
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return rows


_HELD_LOCKS: dict = {}           # out_dir -> its lock file, held by this process (released when it exits)


class RunLog:
    """The run record of one stage in out_dir.

    Rank 0 holds a lock on out_dir for the whole run (a second run into it is refused, naming the holder). A
    folder whose run.json names another stage is refused whatever the flags. A fresh run refuses a folder that
    holds this stage's outputs unless overwrite; then exactly the files the old run.json lists as its outputs
    (nothing matched by a pattern) are removed, and only when the new run writes its first file (write_run),
    after every input has been checked, so a typo loses nothing. A resumed run keeps them. Nothing is written
    until the stage calls write_run, which it does after its resume state has loaded, so a failed --resume
    loses nothing. resume(step) trims metrics.jsonl and samples.jsonl to the saved step (rows logged after the
    last checkpoint would otherwise repeat) and continues the cost meter from the recorded wall seconds."""

    def __init__(self, out_dir, args: dict, stage: str, enabled: bool = True, n_gpus: int = 0,
                 gpu_hour_usd: float = 0.0, resume: bool = False, overwrite: bool = False, can_resume: bool = True):
        import transformers
        self.dir, self.enabled = Path(out_dir), enabled
        self.n_gpus, self.usd, self.wall_before = n_gpus, gpu_hour_usd, 0.0
        self.info = {"stage": stage, "args": args, "torch": torch.__version__,
                     "transformers": transformers.__version__, "git_commit": _git_commit(),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "n_gpus": n_gpus}
        if self.dir.exists() and not self.dir.is_dir():
            raise SystemExit(f"--out_dir {self.dir} is a file, not a folder: choose another --out_dir")
        if enabled:
            self._lock()
        prev = self._previous()
        if prev and prev.get("stage") != stage:
            raise SystemExit(f"--out_dir {self.dir} holds a {prev.get('stage')} run (its run.json): {stage} never writes "
                             "into another stage's folder, with or without --overwrite; choose another --out_dir")
        self.outputs = set(prev.get("outputs", [])) if prev else set()   # relative paths this run record owns
        old = self._old_outputs(prev)
        self.pending_removal: list[Path] = []
        if old and not resume:
            if not overwrite:
                raise SystemExit(f"--out_dir {self.dir} already holds a run ({', '.join(sorted(str(p.relative_to(self.dir)) for p in old)[:4])}"
                                 f"{', ...' if len(old) > 4 else ''}): "
                                 + ("pass --resume to continue it, " if can_resume else "")
                                 + "--overwrite to replace it, or choose another --out_dir")
            self.pending_removal, self.outputs = old, set()

    def _lock(self):
        """An exclusive lock on out_dir/.nanoreason.lock for this process's life (released if it dies)."""
        import fcntl
        key = self.dir.resolve()
        if key in _HELD_LOCKS:             # this process holds it already (a stage called again, as in the tests)
            return
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fh = open(self.dir / LOCK_NAME, "a+")
        except OSError as e:
            raise SystemExit(f"--out_dir {self.dir}: cannot write there ({e.strerror}); choose another --out_dir") from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise SystemExit(f"--out_dir {self.dir} is in use by {holder}: wait for it, or choose another --out_dir") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{self.info['stage']} (pid {os.getpid()} on {socket.gethostname()}, since {self.info['started']})\n")
        fh.flush()
        _HELD_LOCKS[key] = fh

    def _previous(self) -> dict:
        f = self.dir / "run.json"
        if not f.exists():
            return {}
        try:
            return read_json(f)
        except ValueError as e:
            raise SystemExit(f"--out_dir {self.dir}: {e}; move the folder aside or choose another --out_dir") from None

    def _old_outputs(self, prev: dict) -> list[Path]:
        """The files of an earlier run here: those its run.json lists, else (older records) the legacy names."""
        if not self.dir.is_dir():
            return []
        if "outputs" in prev:
            files = [self.dir / r for r in prev["outputs"]]
        else:
            files = [p for p in self.dir.rglob("*") if p.is_file()
                     and LEGACY_OUTPUTS.fullmatch(p.relative_to(self.dir).as_posix())]
        return sorted(p for p in files if p.is_file())

    def _remove_pending(self):
        """The old run's files, removed now that the new run writes (folders left empty go too)."""
        for p in self.pending_removal:
            p.unlink(missing_ok=True)
            WRITTEN.discard(p.resolve())
        for d in sorted({p.parent for p in self.pending_removal}, key=lambda d: -len(d.parts)):
            if d != self.dir and d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        self.pending_removal = []

    def resume(self, step: int):
        """Continue a run from its checkpoint at `step`: logs trimmed to it, the cost meter carried on."""
        prev = read_json(self.dir / "run.json") if (self.dir / "run.json").exists() else {}
        self.wall_before = float(prev.get("wall_seconds", 0.0))
        self.info["resumed_at_step"] = step
        if self.enabled:
            for name in ("metrics.jsonl", "samples.jsonl"):
                if (self.dir / name).exists():
                    rows = [r for r in read_jsonl(self.dir / name) if r.get("step", 0) <= step]
                    atomic_write(self.dir / name,
                                 lambda p, rows=rows: Path(p).write_text("".join(json.dumps(r) + "\n" for r in rows)))

    def write_run(self, **extra):
        if self.enabled and self.pending_removal:
            self._remove_pending()
        wall = self.wall_before + time.time() - PROCESS_START
        if torch.cuda.is_available() and torch.cuda.is_initialized():   # this process's peak, for the cost table
            extra["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        self.info.update(extra, wall_seconds=round(wall, 2), gpu_hours=round(wall * self.n_gpus / 3600, 5),
                         dollars=round(wall * self.n_gpus / 3600 * self.usd, 4))
        if self.enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            here = self.dir.resolve()
            self.outputs |= {p.relative_to(here).as_posix() for p in WRITTEN if p.is_relative_to(here) and p.exists()}
            self.outputs.add("run.json")
            self.info["outputs"] = sorted(self.outputs)                  # what --overwrite may remove, exactly
            atomic_write(self.dir / "run.json", lambda p: Path(p).write_text(json.dumps(self.info, indent=2)))
            if extra.get("finished") and self.dir.resolve() in _HELD_LOCKS:   # the run is over: the folder is free
                _HELD_LOCKS.pop(self.dir.resolve()).close()

    def _append(self, name: str, rows):
        if self.enabled:
            if self.pending_removal:
                self._remove_pending()
            self.dir.mkdir(parents=True, exist_ok=True)
            WRITTEN.add((self.dir / name).resolve())
            with open(self.dir / name, "a") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
                f.flush()
            if name not in self.outputs:          # in the run record from its first row (a crash keeps it owned)
                self.write_run()

    def metrics(self, row: dict):
        self._append("metrics.jsonl", [row])

    def samples(self, rows: list[dict]):
        self._append("samples.jsonl", rows)
