"""
lora.py -- hand-written LoRA that reads and writes PEFT's adapter files.

    y = W x + b + (alpha / r) * B(A(dropout(x)))        A: [r, in] kaiming-uniform(a=sqrt(5)), B: [out, r] zeros

`LoRALinear` *is* an nn.Linear (same `weight` / `bias` parameters, frozen) with two extra submodules
`lora_A` and `lora_B`, so module names stay transformers' names and the adapter keys are PEFT's:
    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight   [out, r]

Without dropout (and with enough rows) the forward is one matmul on W + scale * B @ A, built per call,
and backward forms no full weight gradient (MergedLoRA); with dropout it is the base matmul plus
two small ones, the second adding into the output in place. LoRA weights are kept in float32 even when
the base is bf16 (lr 1e-6 updates would vanish in bf16). Disabling is a flag
(GRPO's reference policy is the same model with LoRA off). merge() adds scale * B @ A into W for fast
generation and export; by default it keeps a copy of W so that unmerge() restores it bit-exactly (a
bf16 subtract would drift a little at every merge / unmerge cycle).

Simplifications versus PEFT: Linear layers only (no embeddings, no DoRA, no bias training, no
rank_pattern / alpha_pattern); one adapter at a time.
"""
from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from common import atomic_write, csv_list, read_json

ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFIX = "base_model.model."   # PEFT's key prefix for a causal LM


class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 dtype: torch.dtype = torch.float32):
        nn.Module.__init__(self)  # skip nn.Linear.__init__: the base parameters are reused, not re-made
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev = base.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=dev, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=dev, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))   # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)                             # -> a fresh adapter changes nothing
        self.disabled = False
        self.merged = False
        self._backup: torch.Tensor | None = None

    def forward(self, x):                                   # x [..., in] -> [..., out]
        if self.merged and self.disabled:
            raise RuntimeError("LoRA is merged into the weights; unmerge before disabling it")
        if self.merged or self.disabled:
            return F.linear(x, self.weight, self.bias)
        dropout = self.training and isinstance(self.lora_dropout, nn.Dropout)
        rows, i, o = x.numel() // self.in_features, self.in_features, self.out_features
        if not dropout and rows * (2 * o + i) > 3 * o * i:  # merging moves ~3 x W; the sum ~2 x y + 1 x x
            return MergedLoRA.apply(x, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight,
                                    self.scaling)
        y = F.linear(x, self.weight, self.bias)
        if not torch.is_autocast_enabled(x.device.type):   # under autocast the matmuls pick their dtype
            x = x.to(self.lora_A.weight.dtype)               # (no extra copy of x in float32)
        a = self.lora_A(self.lora_dropout(x))                # [..., r]
        # y += scale * a @ B^T in place: one matmul whose epilogue adds into y (y is not needed by the
        # base matmul's backward)
        dt = y.dtype
        y.view(-1, self.out_features).addmm_(a.reshape(-1, self.r).to(dt), self.lora_B.weight.to(dt).t(),
                                             alpha=self.scaling)
        return y

    def delta(self) -> torch.Tensor:
        """scale * B @ A in float32, [out, in]."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def effective_weight(self) -> torch.Tensor:
        """The [out, in] weight this layer applies right now: W, or W + scale B A while enabled and unmerged
        (the static decoder folds it into its stacked weights)."""
        if self.merged or self.disabled:
            return self.weight
        return (self.weight.float() + self.delta()).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self, keep_backup: bool = True):
        if self.merged:
            return
        self._backup = self.weight.data.clone() if keep_backup else None
        self.weight.data.copy_((self.weight.data.float() + self.delta()).to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            return
        if self._backup is not None:
            self.weight.data.copy_(self._backup)
        else:
            self.weight.data.copy_((self.weight.data.float() - self.delta()).to(self.weight.dtype))
        self._backup = None
        self.merged = False

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, r={self.r}, alpha={self.alpha}"


# -----------------------------------------------------------------------------------------------
# Attaching, switching, merging


def _matches(name: str, targets) -> bool:
    """PEFT's rule: a string is a regex over the full module name; a list matches the name's suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_module(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def attach_lora(model: nn.Module, r: int = 32, alpha: float = 128, dropout: float = 0.05,
                targets=ALL_LINEARS, use_rslora: bool = False, names: list[str] | None = None) -> list[str]:
    """Wrap the target Linear layers in LoRALinear; freeze everything but the LoRA weights.

    targets: module-name suffixes (list) or a regex over full names (str), as PEFT's target_modules.
    names: exact module names instead of targets. Returns the wrapped module names.
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA layers; detach them first (unload_lora)")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = list(names) if names is not None else [n for n in linears if _matches(n, targets)]
    bad = [n for n in chosen if n not in linears]
    if bad or not chosen:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in linears})
        what = f"modules {bad[:3]} are not Linear layers of this model" if bad else f"no Linear layer matches {targets!r}"
        raise ValueError(f"LoRA targets do not fit the model: {what}; its Linear layers are named "
                         f"{', '.join(suffixes)} (e.g. {linears[0]})")
    for p in model.parameters():
        p.requires_grad_(False)
    for n in chosen:
        layer = LoRALinear(model.get_submodule(n), r, alpha, dropout, use_rslora)
        _set_module(model, n, layer.train(model.training))  # new modules default to train mode: follow the model
    return chosen


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_layers(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


def set_lora_enabled(model: nn.Module, enabled: bool):
    for m in lora_layers(model).values():
        m.disabled = not enabled


@contextmanager
def lora_disabled(model: nn.Module):
    """The base model, for free: `with lora_disabled(model): ref = model(...)`."""
    set_lora_enabled(model, False)
    try:
        yield model
    finally:
        set_lora_enabled(model, True)


def merge_lora(model: nn.Module, keep_backup: bool = True):
    for m in lora_layers(model).values():
        m.merge(keep_backup)


def unmerge_lora(model: nn.Module):
    for m in lora_layers(model).values():
        m.unmerge()


@contextmanager
def lora_merged(model: nn.Module):
    """Weights with LoRA merged in (fast generation), restored exactly afterwards."""
    merge_lora(model, keep_backup=True)
    try:
        yield model
    finally:
        unmerge_lora(model)


def unload_lora(model: nn.Module, merge: bool = False) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear (merging the adapter into W first if merge)."""
    for n, m in lora_layers(model).items():
        if merge:
            m.merge(keep_backup=False)
        elif m.merged:
            m.unmerge()
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight, lin.bias = m.weight, m.bias
        _set_module(model, n, lin)
    return model


# -----------------------------------------------------------------------------------------------
# PEFT-format files


def adapter_config(model: nn.Module, base_model: str = "", **extra) -> dict:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
    m0 = next(iter(layers.values()))
    dropout = m0.lora_dropout.p if isinstance(m0.lora_dropout, nn.Dropout) else 0.0
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": m0.r, "lora_alpha": m0.alpha, "lora_dropout": dropout, "use_rslora": m0.use_rslora,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in layers}), "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "use_dora": False, "revision": None, **extra,
    }


def save_adapter(model: nn.Module, out_dir, base_model: str = "", **extra_config):
    """Write adapter_model.safetensors + adapter_config.json exactly as PEFT does."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = adapter_config(model, base_model, **extra_config)
    sd = {}
    for n, m in lora_layers(model).items():
        sd[f"{PREFIX}{n}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
        sd[f"{PREFIX}{n}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()
    atomic_write(out / "adapter_model.safetensors", lambda p: save_file(sd, str(p), metadata={"format": "pt"}))
    atomic_write(out / "adapter_config.json", lambda p: Path(p).write_text(json.dumps(cfg, indent=2)))


def read_adapter(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config dict, {module name: {"A": [r, in], "B": [out, r]}}), validated."""
    path = Path(path)
    cfg_file, w_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.exists() or not w_file.exists():
        raise FileNotFoundError(f"{path} is not a PEFT adapter folder: it needs adapter_config.json and "
                                "adapter_model.safetensors")
    cfg = read_json(cfg_file)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r}; only LORA adapters are supported")
    for key, ok in (("use_dora", False), ("bias", "none"), ("fan_in_fan_out", False)):
        if cfg.get(key, ok) != ok:
            raise ValueError(f"{path}: {key}={cfg[key]!r} is not supported (expected {ok!r})")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save"):
        if cfg.get(key):
            raise ValueError(f"{path}: {key} is set ({cfg[key]!r}); per-module ranks and saved modules "
                             "are not supported")
    weights: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(w_file), framework="pt", device="cpu") as f:
            for key in f.keys():
                m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.lora_([AB])(?:\.default)?\.weight", key)
                if m is None:
                    raise ValueError(f"{w_file}: unexpected tensor {key!r} (only lora_A / lora_B weights of "
                                     "Linear layers are supported)")
                weights.setdefault(m.group(1), {})[m.group(2)] = f.get_tensor(key)
    except (OSError, RuntimeError, SafetensorError) as e:   # a truncated or corrupt file
        raise ValueError(f"{w_file} is not a readable safetensors file: {e}") from None
    targets = cfg.get("target_modules")
    if targets and targets != "all-linear":    # as peft: only the modules target_modules names get their tensors
        def targeted(name):
            if isinstance(targets, str):
                return re.fullmatch(targets, name) is not None
            return any(name == t or name.endswith("." + t) for t in targets)
        dropped = sorted(n for n in weights if not targeted(n))
        if dropped:
            print(f"warning: {w_file} holds tensors for {len(dropped)} modules its target_modules {targets!r} does not "
                  f"name (e.g. {dropped[0]}): left out, as peft does")
            weights = {n: ab for n, ab in weights.items() if targeted(n)}
    for name, ab in weights.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{w_file}: {name} has lora_{''.join(ab)} but not both lora_A and lora_B")
        if not all(torch.isfinite(t).all() for t in ab.values()):
            raise ValueError(f"{w_file}: {name} holds NaN or inf values: the adapter is corrupt")
        if ab["A"].shape[0] != cfg["r"] or ab["B"].shape[1] != cfg["r"]:
            raise ValueError(f"{w_file}: {name} has rank {ab['A'].shape[0]}, config says r={cfg['r']}")
    if not weights:
        raise ValueError(f"{w_file} holds no LoRA weights")
    return cfg, weights


def load_adapter(model: nn.Module, path, trainable: bool = False) -> dict:
    """Attach the adapter at `path` (PEFT format: ours, PEFT's, the published Tina ones) to model.

    Checks that every module the adapter targets exists in the model with matching shapes, before
    changing anything. Returns the adapter config.
    """
    cfg, weights = read_adapter(path)
    base, ours = cfg.get("base_model_name_or_path") or "", getattr(model, "name_or_path", "") or ""
    if base and ours and Path(base).name != Path(ours).name:
        print(f"warning: adapter {path} was trained on {base}; loading it into {ours} (fine if they are the "
              "same weights, or on purpose, as in Resa's modularity check)")
    modules = dict(model.named_modules())
    absent = [n for n in sorted(weights) if not isinstance(modules.get(n), nn.Linear)]
    if absent:
        n_layers = sum(1 for n in modules if re.fullmatch(r"model\.layers\.\d+", n))
        raise ValueError(f"adapter {path} targets {absent[0]} (and {len(absent) - 1} more), which is not a "
                         f"Linear layer of this model ({n_layers} layers); was it trained for another "
                         "architecture?")
    for name, ab in weights.items():
        mod = modules[name]
        want_a, want_b = (cfg["r"], mod.in_features), (mod.out_features, cfg["r"])
        if tuple(ab["A"].shape) != want_a or tuple(ab["B"].shape) != want_b:
            raise ValueError(f"adapter {path}: {name} has lora_A {tuple(ab['A'].shape)} / lora_B "
                             f"{tuple(ab['B'].shape)}, the model needs {want_a} / {want_b}; was it trained "
                             "for another model size?")
    attach_lora(model, cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0), use_rslora=cfg.get("use_rslora", False),
                names=sorted(weights))
    with torch.no_grad():
        for name, m in lora_layers(model).items():
            m.lora_A.weight.copy_(weights[name]["A"])
            m.lora_B.weight.copy_(weights[name]["B"])
            m.lora_A.weight.requires_grad_(trainable)
            m.lora_B.weight.requires_grad_(trainable)
    return cfg


def add_lora_args(parser, r: int = 32, alpha: float = 128, dropout: float = 0.05):
    """--lora_r / --lora_alpha / --lora_dropout / --lora_targets (Tina and Resa: 32 / 128 / 0.05 / all seven)."""
    g = parser.add_argument_group("LoRA")
    g.add_argument("--lora_r", type=int, default=r, help="rank (%(default)s)")
    g.add_argument("--lora_alpha", type=float, default=alpha, help="alpha; scale = alpha / r (%(default)s)")
    g.add_argument("--lora_dropout", type=float, default=dropout, help="dropout on the LoRA input (%(default)s)")
    g.add_argument("--lora_targets", type=csv_list(), default=list(ALL_LINEARS),
                   help="comma-separated module names (default: %(default)s)")
    return g


# -----------------------------------------------------------------------------------------------
# Training state for --resume: adapter + AdamW moments + RNG in safetensors, the rest in JSON; never pickle.
# Every file is written atomically and the previous state is deleted only after state.json points at the new one.


def rng_tensors(generator: torch.Generator, world: int = 1) -> dict[str, torch.Tensor]:
    """This process's RNG states (torch's CPU and CUDA generators, the sampler's) as uint8 tensors; with several
    processes every rank's, gathered (collective: every rank calls it), under rng/<name>/rank<r> beside rank 0's
    plain names, so each rank resumes from its own stream."""
    mine = {"rng/torch_cpu": torch.get_rng_state(), "rng/sampler": generator.get_state().cpu()}
    if torch.cuda.is_available():
        mine["rng/torch_cuda"] = torch.cuda.get_rng_state()
    if world == 1:
        return mine
    import torch.distributed as dist
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    out = {}
    for k, v in mine.items():
        parts = [torch.empty_like(v, device=dev) for _ in range(world)]
        dist.all_gather(parts, v.to(dev))
        out.update({f"{k}/rank{r}": p.cpu() for r, p in enumerate(parts)})
    return {**out, **mine}


def save_training_state(out_dir: Path, net, opt, step: int, data_state: dict, generator: torch.Generator,
                        rng: dict | None = None):
    d = out_dir / "resume"
    d.mkdir(parents=True, exist_ok=True)
    names = {id(p): n for n, p in net.named_parameters()}
    tensors = {}
    for p in lora_parameters(net):
        st = opt.state.get(p, {})
        if st:
            tensors[f"exp_avg/{names[id(p)]}"] = st["exp_avg"].detach().cpu()
            tensors[f"exp_avg_sq/{names[id(p)]}"] = st["exp_avg_sq"].detach().cpu()
            tensors[f"step/{names[id(p)]}"] = torch.as_tensor(st["step"], dtype=torch.float64).reshape(1).cpu()
    tensors.update(rng if rng is not None else rng_tensors(generator))
    tag = f"{step:06d}"
    save_adapter(net, d / f"adapter-{tag}")
    atomic_write(d / f"optim-{tag}.safetensors", lambda p: save_file(tensors, str(p)))
    state = {"step": step, "adapter": f"adapter-{tag}", "optim": f"optim-{tag}.safetensors", **data_state}
    atomic_write(d / "state.json", lambda p: Path(p).write_text(json.dumps(state, indent=2)))
    for old in d.iterdir():   # only now drop the previous state: a kill above leaves it intact
        if tag not in old.name and old.name != "state.json":
            if old.is_dir():
                for f in old.iterdir():
                    f.unlink()
                old.rmdir()
            else:
                old.unlink()


def load_training_state(out_dir: Path, net, opt, generator: torch.Generator, run_args: dict | None = None,
                        may_change=(), rank: int = 0) -> dict:
    """Restore LoRA weights, optimizer moments and RNG states from out_dir/resume. With run_args, the saved
    run's arguments must equal these except the keys in may_change (a changed lr, dataset or schedule would
    silently make another run). Every problem names its file."""
    d = out_dir / "resume"
    if not (d / "state.json").exists():
        raise SystemExit(f"--resume: no resume state in {d} (nothing saved yet?)")
    try:
        state = read_json(d / "state.json")
    except ValueError as e:
        raise SystemExit(f"--resume: {e}") from None
    lacking = [k for k in ("step", "adapter", "optim") if k not in state]
    if lacking:
        raise SystemExit(f"--resume: {d / 'state.json'} lacks {', '.join(lacking)}: the resume state is damaged; "
                         "restore it, or start a new run")
    may_change = (*may_change, "out_dir", "resume", "overwrite")      # a moved folder is the same run
    if run_args is not None and "args" in state:
        changed = [k for k, v in state["args"].items() if k not in may_change and k in run_args and run_args[k] != v]
        if changed:
            raise SystemExit("--resume: " + "; ".join(
                "the training data changed since the run started (its checksum differs)" if k == "data_checksum"
                else f"--{k} was {state['args'][k]!r}, now {run_args[k]!r}" for k in changed)
                             + ". Resume with the saved values (only " + ", ".join(
                                 f"--{k}" for k in may_change if k not in ("resume", "overwrite", "out_dir", "model_dir"))
                             + " may change), or start a new run")

    def read(path):
        try:
            return load_file(str(path))
        except (OSError, SafetensorError) as e:
            raise SystemExit(f"--resume: {path} is missing or corrupt ({e}); delete {d} to start over, or "
                             "restore it") from None

    weights = read(d / state["adapter"] / "adapter_model.safetensors")
    layers = lora_layers(net)
    want = {f"base_model.model.{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    missing = sorted(want - set(weights))
    if missing:                          # those layers would silently restart from their initialisation
        raise SystemExit(f"--resume: {d / state['adapter']} lacks {len(missing)} of this run's LoRA tensors "
                         f"({', '.join(missing[:2])}{', ...' if len(missing) > 2 else ''}): the resume state is "
                         "incomplete; restore it, or start a new run")
    for key, t in weights.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
        if m is None:
            raise SystemExit(f"--resume: {d / state['adapter']} holds {key}, which is not a LoRA tensor")
        name, ab = m.groups()
        if name not in layers:
            raise ValueError(f"--resume: saved adapter has {name}, which this run's LoRA does not "
                             "(different --lora_targets or model?)")
        p = layers[name].lora_A.weight if ab == "A" else layers[name].lora_B.weight
        if p.shape != t.shape:
            raise ValueError(f"--resume: {key} has shape {tuple(t.shape)}, this run needs {tuple(p.shape)} "
                             "(different --lora_r or model?)")
        with torch.no_grad():
            p.copy_(t)
    tensors = read(d / state["optim"])
    names = {id(p): n for n, p in net.named_parameters()}
    for p in lora_parameters(net):
        n = names[id(p)]
        if f"exp_avg/{n}" in tensors:
            opt.state[p] = {"step": tensors[f"step/{n}"].reshape(()).to(torch.float32),
                            "exp_avg": tensors[f"exp_avg/{n}"].to(p.device),
                            "exp_avg_sq": tensors[f"exp_avg_sq/{n}"].to(p.device)}
    def rng(name):                    # this rank's own state where the checkpoint has one per rank
        key = f"rng/{name}/rank{rank}"
        if rank > 0 and key not in tensors and f"rng/{name}" in tensors:
            raise SystemExit(f"--resume: {d / state['optim']} has no RNG state for rank {rank}: it was saved by a "
                             "run with fewer processes; resume with as many as it had")
        return tensors.get(key, tensors.get(f"rng/{name}"))
    if rng("torch_cpu") is None or rng("sampler") is None:
        raise SystemExit(f"--resume: {d / state['optim']} lacks the RNG states; restore it, or start a new run")
    torch.set_rng_state(rng("torch_cpu"))
    generator.set_state(rng("sampler").to(generator.device) if generator.device.type != "cpu" else rng("sampler"))
    if rng("torch_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng("torch_cuda"))
    return state


def save_final(net, out_dir: Path, step: int, base_model: str, log, rank: int = 0, world: int = 1):
    """Every training stage's end: the adapter in out_dir/final, run.json marked finished, torchrun closed."""
    if rank == 0:
        save_adapter(net, out_dir / "final", base_model=base_model)
        log.write_run(last_step=step, finished=True)
    if world > 1:
        import torch.distributed as dist
        if dist.is_initialized():   # (a vLLM engine under torchrun destroys the default group when it closes)
            dist.destroy_process_group()


def save_checkpoint(net, opt, out_dir: Path, step: int, data_state: dict, generator: torch.Generator,
                    base_model: str, log, run_args: dict | None = None, rank: int = 0, world: int = 1):
    """Every training stage's checkpoint: the adapter in out_dir/step_NNNNNN (PEFT format), the resume
    state and run.json's last_step (written by rank 0; other ranks wait at a barrier)."""
    rng = rng_tensors(generator, world)          # (every rank takes part in gathering the RNG states)
    if rank == 0:
        save_adapter(net, out_dir / f"step_{step:06d}", base_model=base_model)
        save_training_state(out_dir, net, opt, step, {**data_state, "args": run_args or {}}, generator, rng)
        log.write_run(last_step=step)
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


# -----------------------------------------------------------------------------------------------
# Custom autograd (read last): the fast no-dropout path of LoRALinear.forward. The plain formula above
# (base matmul + scale * B(A(dropout(x)))) is what it computes; the test named below holds it to that.


class MergedLoRA(torch.autograd.Function):
    """y = x (W + s B A)^T + b, W and b frozen, as ONE matmul on a merged weight built per call: the low-rank
    term costs no pass over y (the unmerged form reads and writes all of y once more, a quarter of a
    1536-wide layer's matmul time). Backward builds the merged weight again for x's gradient, and gives
    A and B theirs from rank-r products: dB = s grad^T (x A^T), dA = s (grad B)^T x; no full [out, in]
    weight gradient is ever formed. Used when no dropout applies (dropout acts on the LoRA input only, so
    it cannot be merged) and the rows are many enough that building the merged weight (about three
    passes over W) moves fewer bytes than the unmerged sum's extra passes over y and x. Matmuls run in
    the autocast dtype when autocast is on, else in W's.
    Checked against float64 autograd of the plain formula, values and all three gradients:
    tests/test_lora.py::test_lora_linear_forward_and_gradients_match_float64."""

    @staticmethod
    def _dtype(x, W):
        dev = x.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else W.dtype

    @staticmethod
    def _merged(W, A, B, s, dt):                               # W + s B A in dt, one matmul (rank r)
        return torch.addmm(W.to(dt), B.to(dt), A.to(dt), alpha=s)

    @staticmethod
    def forward(ctx, x, W, b, A, B, s):
        dt = MergedLoRA._dtype(x, W)
        ctx.save_for_backward(x, W, A, B)
        ctx.s, ctx.dt = s, dt
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dt), MergedLoRA._merged(W, A, B, s, dt), None if b is None else b.to(dt))

    @staticmethod
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def backward(ctx, grad):
        x, W, A, B = ctx.saved_tensors
        s, dt = ctx.s, ctx.dt
        g = grad.reshape(-1, grad.shape[-1]).to(dt)            # [N, out]
        x2 = x.reshape(-1, x.shape[-1]).to(dt)                 # [N, in]
        grad_x = dA = dB = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ MergedLoRA._merged(W, A, B, s, dt)).view(x.shape).to(x.dtype)
        if ctx.needs_input_grad[3]:
            dA = ((g @ B.to(dt)).t() @ x2).mul_(s).to(A.dtype)                 # [r, in]
        if ctx.needs_input_grad[4]:
            dB = (g.t() @ (x2 @ A.to(dt).t())).mul_(s).to(B.dtype)              # [out, r]
        return grad_x, None, None, dA, dB, None
