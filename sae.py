"""
sae.py -- a TopK sparse autoencoder with EleutherAI sparsify's semantics and file format.

    encode:  z = relu(W_enc (x - b_dec) + b_enc), keep the k largest      -> values, indices [N, k]
             (top_k: the same selection as torch.topk, in two short passes, see there)
    decode:  x_hat = sum_j z_j W_dec[j] + b_dec                            (embedding_bag, never [N, M])
    loss:    FVU = ||x - x_hat||^2 / ||x - mean(x)||^2 over the batch; optional AuxK on dead latents

Files (a folder per hookpoint, e.g. out/layers.12/): cfg.json with sparsify's keys (num_latents, k,
d_in, normalize_decoder, multi_topk, skip_connection, activation, expansion_factor, transcode) plus
ours (layer, source_model, ...), and sae.safetensors with encoder.weight [M, d], encoder.bias [M],
W_dec [M, d], b_dec [d]. SAEs published by EleutherAI load here, and ours load in sparsify.

insert_sae() puts a frozen SAE into a model.py Transformer so that the residual stream after layer L
is replaced by its reconstruction (Resa's SAE-Tuning). grad="block" runs it under no_grad, as Resa's
code does (LoRA in layers <= L then gets no gradient); grad="pass" lets gradients flow through it.

Simplifications versus sparsify: no groupmax activation, no transcoders, no fused Triton kernels. The
encoder's gradient comes from the k selected latents only (_SelectedLatents, read last; with AuxK or
multi_topk, plain autograd through all M pre-activations).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from common import atomic_write, autocast, read_json

SPARSIFY_KEYS = ("activation", "expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk",
                 "skip_connection", "transcode")


class SAEOutput(NamedTuple):
    recon: torch.Tensor        # [N, d]
    acts: torch.Tensor         # [N, k] values of the active latents
    indices: torch.Tensor      # [N, k] their indices
    fvu: torch.Tensor          # scalar
    auxk_loss: torch.Tensor    # scalar (0 without dead latents)
    multi_topk_fvu: torch.Tensor  # scalar (0 unless multi_topk)


class SAE(nn.Module):
    def __init__(self, d_in: int, num_latents: int, k: int, *, normalize_decoder: bool = True,
                 multi_topk: bool = False, skip_connection: bool = False, device=None, dtype=None, **meta):
        super().__init__()
        if not 0 < k <= num_latents:
            raise ValueError(f"k={k} must be between 1 and num_latents={num_latents}")
        self.d_in, self.num_latents, self.k = d_in, num_latents, k
        self.normalize_decoder, self.multi_topk, self.skip_connection = normalize_decoder, multi_topk, skip_connection
        self.meta = meta                               # our own cfg.json keys: layer, source_model, ...
        self.encoder = nn.Linear(d_in, num_latents, device=device, dtype=dtype)
        with torch.no_grad():
            self.encoder.bias.zero_()
        self.W_dec = nn.Parameter(self.encoder.weight.detach().clone())   # [M, d], rows = decoder directions
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device, dtype=dtype))
        self.W_skip = nn.Parameter(torch.zeros(d_in, d_in, device=device, dtype=dtype)) if skip_connection else None
        if normalize_decoder:
            self.set_decoder_norm_to_unit_norm()

    @property
    def layer(self) -> int | None:
        return self.meta.get("layer")

    def cfg(self) -> dict:
        return {"activation": "topk", "expansion_factor": max(1, self.num_latents // self.d_in),
                "normalize_decoder": self.normalize_decoder, "num_latents": self.num_latents, "k": self.k,
                "multi_topk": self.multi_topk, "skip_connection": self.skip_connection, "transcode": False,
                "d_in": self.d_in, **self.meta}

    # --- the model -----------------------------------------------------------------------------

    # the encoder's gradient only from the k selected latents of each token (_SelectedLatents), not through
    # the dense [N, M] pre-activations; False: plain autograd (what AuxK and multi_topk always use)
    SPARSE_ENCODER_GRAD = True

    def encode(self, x, dense_grad: bool = False):
        """x [N, d] -> (top values [N, k], top indices [N, k], pre-activations [N, M] before the ReLU; with
        a gradient path only for dense_grad or without SPARSE_ENCODER_GRAD).

        relu(topk(pre)) == topk(relu(pre)): the ReLU runs on the k winners only, not on all M latents
        (one pass less over the [N, M] tensor, forward and backward)."""
        W, b_enc = self.encoder.weight, self.encoder.bias
        if dense_grad or not self.SPARSE_ENCODER_GRAD or not torch.is_grad_enabled():
            pre = _pre_activations(x, W, b_enc, self.b_dec)                   # (x - b_dec) W^T + b_enc
            vals, idx = top_k(pre, self.k)
            return F.relu(vals), idx, pre
        xc = x - self.b_dec.detach()                                          # [N, d] (b_dec: see below)
        with torch.no_grad():
            pre = F.linear(xc, W, b_enc)                                      # [N, M], no gradient path
        idx = top_k(pre, self.k)[1]
        return F.relu(_SelectedLatents.apply(pre, idx, xc, W, b_enc, self.b_dec)), idx, pre

    def decode(self, acts, idx):
        """Sparse decode: sum_j acts_j W_dec[idx_j] + b_dec, [N, d]."""
        return _sparse_decode(acts, idx, self.W_dec) + self.b_dec

    def reconstruct(self, x):
        """Reconstruction of x [..., d] (any leading shape), no losses."""
        shape = x.shape
        x = x.reshape(-1, shape[-1]).to(self.W_dec.dtype)
        acts, idx, _ = self.encode(x)
        out = self.decode(acts, idx)
        if self.W_skip is not None:
            out = out + x @ self.W_skip.T
        return out.view(shape)

    def forward(self, x, dead_mask: torch.Tensor | None = None) -> SAEOutput:
        """x [N, d]; dead_mask [M] bool marks latents for the AuxK loss."""
        x = x.to(self.W_dec.dtype)
        num_dead = int(dead_mask.sum()) if dead_mask is not None else 0    # (AuxK's gradient needs pre's)
        acts, idx, pre = self.encode(x, dense_grad=num_dead > 0 or self.multi_topk)
        recon = self.decode(acts, idx)
        if self.W_skip is not None:
            recon = recon + x @ self.W_skip.T
        e = x - recon                                                      # residual [N, d]
        total_variance = (x - x.mean(0)).pow(2).sum()
        fvu = e.pow(2).sum() / total_variance
        auxk = recon.new_zeros(())
        if num_dead > 0:
            k_aux = min(x.shape[-1] // 2, num_dead)                        # top half-width of dead latents
            scale = min(num_dead / (x.shape[-1] // 2), 1.0)
            aux_acts, aux_idx = top_k(torch.where(dead_mask[None], pre, -torch.inf), k_aux)
            e_hat = _sparse_decode(F.relu(aux_acts), aux_idx, self.W_dec)   # predicts the residual, no b_dec
            auxk = scale * (e_hat - e.detach()).pow(2).sum() / total_variance
        multi = recon.new_zeros(())
        if self.multi_topk:
            m_acts, m_idx = top_k(pre, 4 * self.k)
            multi = (self.decode(F.relu(m_acts), m_idx) - x).pow(2).sum() / total_variance
        return SAEOutput(recon, acts, idx, fvu, auxk, multi)

    # --- training helpers ----------------------------------------------------------------------

    @torch.no_grad()
    def init_b_dec(self, x):
        """b_dec = mean of a batch x [N, d] (sparsify's geometric-median stand-in)."""
        self.b_dec.copy_(x.reshape(-1, self.d_in).float().mean(0).to(self.b_dec.dtype))

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self):
        eps = torch.finfo(self.W_dec.dtype).eps
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True) + eps)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self):
        """After backward: drop the part of each W_dec row's gradient along that row."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)   # [M, 1]
        self.W_dec.grad.sub_(parallel * self.W_dec)

    # --- files ---------------------------------------------------------------------------------

    def save(self, path):
        """sparsify layout: path/cfg.json + path/sae.safetensors (written atomically)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        atomic_write(path / "sae.safetensors", lambda p: save_file(sd, str(p)))
        atomic_write(path / "cfg.json", lambda p: Path(p).write_text(json.dumps(self.cfg(), indent=2)))

    @classmethod
    def load(cls, path, device="cpu", dtype=None) -> "SAE":
        """Load one SAE folder (ours or sparsify's). Checks the config against the tensors."""
        path = Path(path)
        cfg_file, w_file = path / "cfg.json", path / "sae.safetensors"
        if not cfg_file.exists() or not w_file.exists():
            subs = sorted(p.parent.name for p in path.glob("*/cfg.json")) if path.is_dir() else []
            hint = f"; it holds hookpoint folders {subs}: pass one" if subs else ""
            raise FileNotFoundError(f"{path} is not an SAE folder (needs cfg.json and sae.safetensors){hint}")
        cfg = read_json(cfg_file)
        if cfg.get("activation", "topk") != "topk":
            raise ValueError(f"{path}: activation {cfg['activation']!r} is not supported (only topk)")
        if cfg.get("transcode"):
            raise ValueError(f"{path}: a transcoder, not an autoencoder; not supported")
        if "d_in" not in cfg:
            raise ValueError(f"{cfg_file} has no d_in (the SAE's input width): not a sparsify SAE config")
        d_in = cfg["d_in"]
        num_latents = cfg.get("num_latents") or d_in * cfg.get("expansion_factor", 32)
        meta = {k: v for k, v in cfg.items() if k not in SPARSIFY_KEYS and k != "d_in"}
        try:
            with safe_open(str(w_file), framework="pt", device="cpu") as f:
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, RuntimeError, SafetensorError) as e:
            raise ValueError(f"{w_file} is not a readable safetensors file: {e}") from None
        with torch.device("meta"):
            sae = cls(d_in, num_latents, cfg.get("k", 32), normalize_decoder=cfg.get("normalize_decoder", True),
                      multi_topk=cfg.get("multi_topk", False), skip_connection=cfg.get("skip_connection", False),
                      **meta)
        bad = [k for k, v in sd.items() if not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"{w_file}: {', '.join(bad)} hold NaN or inf values: the SAE is corrupt")
        want = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in sd.items()}
        if want != got:
            raise ValueError(f"{w_file}: tensors {got} do not match cfg.json (d_in={d_in}, "
                             f"num_latents={num_latents}), which needs {want}")
        sae.load_state_dict(sd, assign=True)
        return sae.to(device=device, dtype=dtype or next(iter(sd.values())).dtype)


def top_k(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pre [N, M] -> (values, indices) [N, k] of each row's k largest entries, in no particular order: the
    values pre.topk(k) gives (among tied entries either index may be kept), and the gradient flows to the
    same entries. A long row is split into G groups of g entries (g ~ sqrt(M / k); group c holds entries c,
    c + G, c + 2G, ...): every one of the k largest entries lies in one of the k groups with the largest
    maxima (a group outside them has k groups above its maximum, so k entries above each of its own), so a
    max over each group, a top-k over the G group maxima and one over the k * g entries of the chosen groups
    find them. One pass over [N, M] instead of torch.topk's several (65,536 latents, k 32, one CPU core:
    2.5x faster in float32 and in bfloat16)."""
    n, m = pre.shape
    g = 2 ** int(0.5 * math.log2(m / k)) if m > k else 1       # group size, a power of two <= sqrt(M / k)
    if g < 4 or m % g:
        return pre.topk(k, dim=-1, sorted=False)
    G = m // g
    with torch.no_grad():
        groups = pre.detach().view(n, g, G)                       # [N, g, G]: column c is group c
        best = groups.amax(1).topk(k, dim=-1, sorted=False).indices                        # [N, k] groups
        cand = groups.gather(2, best[:, None, :].expand(n, g, k)).view(n, g * k)          # [N, g*k] their entries
        pick = cand.topk(k, dim=-1, sorted=False).indices                                  # [N, k] = i * k + j
        idx = (pick // k) * G + best.gather(1, pick % k)                                   # [N, k] into the row
    return pre.gather(1, idx), idx


def _sparse_decode(acts, idx, W_dec):
    """sum_j acts[n, j] * W_dec[idx[n, j]]: [N, k] x [M, d] -> [N, d], no dense [N, M] matrix."""
    return F.embedding_bag(idx, W_dec, per_sample_weights=acts.to(W_dec.dtype), mode="sum")


def _sparse_accumulate(idx, weights, rows, m: int):
    """The transpose of _sparse_decode: out[j] = sum of weights[n, i] * rows[n] over the pairs with
    idx[n, i] == j; idx, weights [N, k], rows [N, d] -> [M, d], no dense [N, M] matrix. The (token, latent)
    pairs are sorted by latent once, so each latent's row is one embedding_bag sum over its tokens."""
    k = idx.shape[1]
    lat, order = idx.flatten().sort()                                               # pairs by latent [N*k]
    counts = torch.bincount(lat, minlength=m)                                       # [M] pairs per latent
    return F.embedding_bag(order // k, rows, counts.cumsum(0) - counts,             # (each latent's first pair)
                           per_sample_weights=weights.flatten()[order].to(rows.dtype), mode="sum")


def load_sae(name: str, hookpoint: str | None = None, device="cpu", dtype=None) -> SAE:
    """A local SAE folder, a folder of hookpoint folders plus `hookpoint`, or a hub repo (+ hookpoint)."""
    p = Path(name)
    if not p.exists() and name.count("/") == 1 and not name.startswith((".", "/")):
        from huggingface_hub import snapshot_download
        p = Path(snapshot_download(name, allow_patterns=f"{hookpoint}/*" if hookpoint else None))
    if hookpoint is not None and (p / hookpoint).is_dir():
        p = p / hookpoint
    sae = SAE.load(p, device=device, dtype=dtype)
    m = re.fullmatch(r"(?:model\.)?layers\.(\d+)", p.name)
    if "layer" not in sae.meta and m:
        sae.meta["layer"] = int(m.group(1))   # sparsify names hookpoint folders layers.N / model.layers.N
    return sae


def train_step(sae, opt, x, dead_mask=None, auxk_alpha: float = 0.0):
    """One update on activations x [N, d], sparsify's way (its trainer.py, as Resa vendored it): decoder rows
    renormalised before the forward (so an SAE loaded with --init_from starts from unit rows too), FVU +
    auxk_alpha x AuxK + multi-TopK FVU / 8 (0 unless multi_topk) backward, the gradient parallel to each
    decoder row removed, optimiser step. Returns the forward output. Works as well for sparsify's own
    SparseCoder (the same method names), which bench.py uses."""
    cfg = getattr(sae, "cfg", None)
    if getattr(cfg, "normalize_decoder", getattr(sae, "normalize_decoder", True)):   # (sparsify: sae.cfg.*)
        sae.set_decoder_norm_to_unit_norm()
    with autocast(x.device):
        out = sae(x, dead_mask=dead_mask)
    loss = out.fvu + auxk_alpha * out.auxk_loss + out.multi_topk_fvu / 8
    if not torch.isfinite(loss):
        raise FloatingPointError(f"SAE loss is {loss.item()}; lower the learning rate")
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out


# -----------------------------------------------------------------------------------------------
# Signum: sparsify's default SAE optimizer, as Resa trained with it


class Signum(torch.optim.Optimizer):
    """Schedule-free sign descent: sparsify's "signum" optimizer (schedulefree's ScheduleFreeWrapper around
    SignSGD, momentum 0.95), written out. Three sequences per parameter: z takes plain sign steps,
    z <- z - lr sign(g); x is a running average of the z's, x <- x + c (z - x) with c = w_t / sum of w
    (w_t = the largest lr so far, squared); the gradient is taken at y = m x + (1 - m) z, which is what the
    parameter holds while training. Only z is stored: x = (y - (1 - m) z) / m. Call eval() before using or
    saving the weights (the parameter then holds x, the average) and train() before the next step.
    Checked in float64 against schedulefree's wrapper and sparsify's SignSGD (tests/test_sae.py)."""

    def __init__(self, params, lr: float, momentum: float = 0.95, weight_lr_power: float = 2.0):
        super().__init__(params, dict(lr=lr))
        self.momentum, self.weight_lr_power, self.training = momentum, weight_lr_power, True

    @torch.no_grad()
    def step(self, closure=None):
        if not self.training:
            raise RuntimeError("Signum.step() in eval mode: call train() first")
        m = self.momentum
        for group in self.param_groups:
            lr = group["lr"]
            group["lr_max"] = max(lr, group.get("lr_max", 0.0))
            group["weight_sum"] = group.get("weight_sum", 0.0) + group["lr_max"] ** self.weight_lr_power
            c = group["lr_max"] ** self.weight_lr_power / group["weight_sum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                z = self.state[p].setdefault("z", p.detach().clone())
                x = (p - (1 - m) * z) / m                     # the average, from y = m x + (1 - m) z
                z.add_(p.grad.sign(), alpha=-lr)              # SignSGD on z, the gradient taken at y
                x.lerp_(z, c)
                p.copy_(x.lerp(z, 1 - m))                     # the next y

    @torch.no_grad()
    def eval(self):                                           # parameters <- x
        if self.training:
            for group in self.param_groups:
                for p in group["params"]:
                    if "z" in self.state[p]:
                        p.lerp_(self.state[p]["z"], 1 - 1 / self.momentum)
        self.training = False

    @torch.no_grad()
    def train(self):                                          # parameters <- y
        if not self.training:
            for group in self.param_groups:
                for p in group["params"]:
                    if "z" in self.state[p]:
                        p.lerp_(self.state[p]["z"], 1 - self.momentum)
        self.training = True


# -----------------------------------------------------------------------------------------------
# Dead latents


class DeadLatentTracker:
    """Counts tokens since each latent last fired; dead = silent for more than `dead_tokens` tokens."""

    def __init__(self, num_latents: int, dead_tokens: int = 10_000_000, device=None):
        self.since_fired = torch.zeros(num_latents, dtype=torch.long, device=device)
        self.dead_tokens = dead_tokens

    def update(self, indices: torch.Tensor, acts: torch.Tensor | None = None):
        """indices [N, k] of the latents that were selected for N tokens (acts > 0 when given)."""
        self.since_fired += indices.shape[0]
        fired = indices if acts is None else indices[acts > 0]
        self.since_fired[fired.flatten()] = 0

    def dead_mask(self) -> torch.Tensor:
        return self.since_fired > self.dead_tokens

    def dead_fraction(self) -> float:
        return self.dead_mask().float().mean().item()


# -----------------------------------------------------------------------------------------------
# Insertion into a model.py Transformer


def collect_residuals(net, ids, layers: list[int]) -> dict[int, torch.Tensor]:
    """One forward that stops after max(layers); -> {L: residual stream after layer L, [B, T, D]}."""
    got = {}

    def keep(layer):
        def hook(h):
            got[layer] = h
            return h        # the residual stream itself is left unchanged
        return hook

    for layer in layers:
        net.set_residual_hook(layer, keep(layer))
    try:
        with torch.no_grad():
            net(ids, stop_after=max(layers))
    finally:
        for layer in layers:
            net.set_residual_hook(layer, None)
    return got


class GaussianNoise(nn.Module):
    """A control for SAE-Tuning (sae_tune.py --perturb noise): the residual stream plus isotropic Gaussian
    noise, x + sigma N(0, I), in place of an SAE's reconstruction; it has an SAE's insertion interface
    (d_in, layer, meta, reconstruct). The noise comes from torch's global RNG (saved in the resume state)."""

    def __init__(self, d_in: int, sigma: float, **meta):
        super().__init__()
        self.d_in, self.meta = d_in, meta
        self.register_buffer("sigma", torch.tensor(float(sigma)))

    @property
    def layer(self) -> int | None:
        return self.meta.get("layer")

    def reconstruct(self, x):                               # x [..., d]
        return x + self.sigma.to(x.dtype) * torch.randn_like(x)


def _tokens(xs: list[torch.Tensor]) -> torch.Tensor:
    """Activations [..., d] (a list of any leading shapes) -> one [N, d] float32 tensor."""
    return torch.cat([t.reshape(-1, t.shape[-1]).float() for t in xs])


def perturbation_fvu(perturb, xs: list[torch.Tensor]) -> float:
    """FVU of a perturbation (an SAE or GaussianNoise) over activations xs ([..., d] each), in float64:
    sum ||x - f(x)||^2 / sum ||x - mean(x)||^2, the mean over every token of xs."""
    x = _tokens(xs)
    with torch.no_grad():
        err = (x.double() - perturb.reconstruct(x).double()).pow(2).sum()
    return float(err / (x.double() - x.double().mean(0)).pow(2).sum())


def noise_matching(sae: "SAE", xs: list[torch.Tensor]) -> GaussianNoise:
    """Gaussian noise with the FVU `sae` has on xs: sigma^2 = FVU x total variance / (tokens x d)."""
    x = _tokens(xs).double()
    var = (x - x.mean(0)).pow(2).sum() / x.numel()
    return GaussianNoise(sae.d_in, math.sqrt(perturbation_fvu(sae, xs) * float(var)), **sae.meta)


def random_like(sae: "SAE", xs: list[torch.Tensor], seed: int) -> "SAE":
    """An untrained SAE of `sae`'s shape and k (encoder at its random initialisation, decoder rows = the encoder's,
    unit norm, as every SAE starts), b_dec = the mean of xs (sparsify's initialisation before the first step)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = SAE(sae.d_in, sae.num_latents, sae.k, **{**sae.meta, "random_init_seed": seed})
    out.init_b_dec(_tokens(xs))
    return out


class SAEHook:
    """Replaces the residual stream after `layer` by the SAE's reconstruction; remove() undoes it."""

    def __init__(self, model, sae: SAE, layer: int, grad: str):
        self.model, self.sae, self.layer, self.grad = model, sae, layer, grad
        self.last_mse: torch.Tensor | None = None     # mean squared reconstruction error, last forward

    def __call__(self, h):                            # h [B, T, D]
        if self.grad == "block":
            with torch.no_grad():
                out = self.sae.reconstruct(h)
        else:
            out = self.sae.reconstruct(h)
        self.last_mse = (out.detach().float() - h.detach().float()).pow(2).mean()
        return out.to(h.dtype)

    def remove(self):
        self.model.set_residual_hook(self.layer, None)


def insert_sae(model, sae: SAE, layer: int | None = None, grad: str = "block") -> SAEHook:
    """Insert a frozen SAE after decoder layer `layer` (default: the SAE's own cfg layer)."""
    if grad not in ("block", "pass"):
        raise ValueError(f"grad must be 'block' or 'pass', not {grad!r}")
    layer = sae.layer if layer is None else layer
    if layer is None:
        raise ValueError("the SAE's cfg.json names no layer: pass layer= (--layer)")
    n = model.cfg.num_hidden_layers
    if not 0 <= layer < n:
        raise ValueError(f"SAE layer {layer} does not exist: the model has {n} layers (0..{n - 1})")
    if sae.d_in != model.cfg.hidden_size:
        raise ValueError(f"SAE d_in={sae.d_in} does not fit the model's hidden size "
                         f"{model.cfg.hidden_size}: it was trained on another architecture")
    for p in sae.parameters():
        p.requires_grad_(False)
    hook = SAEHook(model, sae, layer, grad)
    model.set_residual_hook(layer, hook)
    return hook


# -----------------------------------------------------------------------------------------------
# Custom gradient routing (read last): the encoder's pre-activations, (x - b_dec) W_enc^T + b_enc.


def _pre_activations(x, W, b_enc, b_dec):
    """(x - b_dec) W^T + b_enc [N, M], with b_dec's gradient routed around the big matmul: its input then
    needs no gradient when x needs none, so backward skips a [N, M] x [M, d] product. `zero` is exactly 0
    and carries b_dec's gradient as -W^T colsum(d pre) (a [d, M] x [M] product); values are unchanged.
    Checked against float64 autograd of the plain formula (parameters and input, FVU + AuxK):
    tests/test_sae.py::test_gradients_match_float64_reference."""
    b_dec_value, bias = b_dec.detach(), b_enc
    if b_dec.requires_grad and torch.is_grad_enabled():
        zero = b_dec - b_dec_value
        bias = bias - W.detach() @ zero                                                  # [M], == b_enc
    return F.linear(x - b_dec_value, W, bias)


class _SelectedLatents(torch.autograd.Function):
    """The pre-activations of the selected latents, pre[n, idx[n, j]] [N, k], with their gradient in sparse
    form. pre [N, M] = xc W^T + b_enc was computed without a gradient path; with G [N, M] the loss's
    gradient there (g at the selected entries, 0 elsewhere), autograd's dense backward would form G and
    then G^T xc [M, d], G.sum(0) and, for b_dec, W^T G.sum(0): an [M, N] x [N, d] matmul over mostly zeros.
    Here every (token, latent) pair is sorted by latent once, and each latent's row of the weight gradient is
    the g-weighted sum of its tokens' xc rows (embedding_bag over the sorted tokens, no [N, M] tensor);
    b_enc's is the sum of its g's; b_dec's, as in _pre_activations, -W^T of that (xc = x - b_dec without
    b_dec's gradient); x's, for an SAE inserted with grad="pass", sum_j g_j W[idx_j] (embedding_bag).
    Checked against float64 autograd: tests/test_sae.py::test_gradients_match_float64_reference."""

    @staticmethod
    def forward(ctx, pre, idx, xc, W, b_enc, b_dec):
        ctx.save_for_backward(idx, xc, W)
        ctx.dtype = pre.dtype                     # (bf16 under autocast: the matmul's input precision)
        return pre.gather(1, idx)

    @staticmethod
    def backward(ctx, g):                         # g [N, k]
        idx, xc, W = ctx.saved_tensors
        need_xc, need_W, need_b, need_bdec = ctx.needs_input_grad[2:6]
        grad_xc = grad_W = grad_b = grad_bdec = None
        m = W.shape[0]
        if need_W:
            grad_W = _sparse_accumulate(idx, g.to(ctx.dtype), xc.to(ctx.dtype), m).to(W.dtype)   # [M, d]
        if need_b or need_bdec:
            col = torch.zeros(m, dtype=torch.float32, device=g.device).index_add_(
                0, idx.flatten(), g.flatten().float())                              # [M] = G.sum(0)
            grad_b = col.to(W.dtype) if need_b else None
            grad_bdec = -(col.to(W.dtype) @ W) if need_bdec else None               # [d]
        if need_xc:
            grad_xc = _sparse_decode(g, idx, W.to(ctx.dtype)).to(xc.dtype)         # [N, d]
        return None, None, grad_xc, grad_W, grad_b, grad_bdec

