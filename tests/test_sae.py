"""sae.py: sparsify interoperability and semantics, float64 references, insertion into the model."""
import json

import pytest
import torch

import lora as L
import model as M
import sae as S
from conftest import identity_sae, left_padded_batch


def sparsify_sae(d=32, m=256, k=8, seed=0, skip=False):
    from sparsify import SparseCoder, SparseCoderConfig
    torch.manual_seed(seed)
    sc = SparseCoder(d, SparseCoderConfig(num_latents=m, k=k, skip_connection=skip))
    with torch.no_grad():   # non-trivial biases so every term of encode / decode is exercised
        sc.encoder.bias.normal_(0, 0.1)
        sc.b_dec.normal_(0, 0.5)
        if skip:
            sc.W_skip.normal_(0, 0.05)
    return sc


def by_index(acts, idx):
    order = idx.argsort(-1)
    return acts.gather(-1, order), idx.gather(-1, order)


@pytest.mark.parametrize("skip", [False, True])
def test_sparsify_sae_loads_in_ours(tmp_path, skip):
    sc = sparsify_sae(skip=skip)
    sc.save_to_disk(tmp_path / "layers.3")
    ours = S.load_sae(str(tmp_path), hookpoint="layers.3")
    assert ours.layer == 3 and ours.k == 8 and ours.num_latents == 256
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = sc(x)
        got = ours(x)
    a1, i1 = by_index(ref.latent_acts, ref.latent_indices)
    a2, i2 = by_index(got.acts, got.indices)
    assert torch.equal(i1, i2)
    assert torch.allclose(a1, a2, atol=1e-6)
    assert torch.allclose(ref.sae_out, got.recon, atol=1e-5)
    assert torch.allclose(ref.fvu, got.fvu, atol=1e-6)
    with torch.no_grad():    # reconstruct (the path insertion uses, no losses) gives sparsify's output too
        assert torch.allclose(ours.reconstruct(x.view(4, 16, 32)).view(64, 32), ref.sae_out, atol=1e-5)


def test_relu_and_auxk_scale_match_sparsify():
    # negative biases: most selected pre-activations would be below zero without the ReLU; few dead latents:
    # AuxK's scale num_dead / (d / 2) < 1 and its k_aux = num_dead
    sc = sparsify_sae(d=16, m=64, k=8)
    with torch.no_grad():
        sc.encoder.bias.fill_(-0.8)
    ours = S.SAE(16, 64, 8)
    ours.load_state_dict(sc.state_dict())
    x = torch.randn(128, 16, generator=torch.Generator().manual_seed(2))
    dead = torch.zeros(64, dtype=torch.bool)
    dead[[3, 9, 40]] = True                                        # 3 dead of k_aux 8: scale 3/8
    with torch.no_grad():
        ref, got = sc(x, dead_mask=dead), ours(x, dead_mask=dead)
        rec = ours.reconstruct(x)                                  # the inference path (SAE-Tuning, evaluation)
    assert (ref.latent_acts == 0).float().mean() > 0.2          # the ReLU mattered
    assert torch.allclose(ref.sae_out, got.recon, atol=1e-5) and torch.allclose(ref.sae_out, rec, atol=1e-5)
    assert got.auxk_loss.item() == pytest.approx(ref.auxk_loss.item(), rel=1e-5) and got.auxk_loss > 0


def test_our_sae_loads_in_sparsify(tmp_path):
    from sparsify import SparseCoder
    ours = S.SAE(32, 128, 4, layer=5, source_model="random:tiny-qwen2")
    with torch.no_grad():
        ours.encoder.bias.normal_(0, 0.1)
        ours.b_dec.normal_(0, 0.3)
    ours.save(tmp_path / "layers.5")
    cfg = json.loads((tmp_path / "layers.5" / "cfg.json").read_text())
    assert cfg["layer"] == 5 and cfg["d_in"] == 32 and cfg["num_latents"] == 128 and cfg["k"] == 4
    sc = SparseCoder.load_from_disk(tmp_path / "layers.5")
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(2))
    dead = torch.zeros(128, dtype=torch.bool)
    dead[::3] = True
    with torch.no_grad():
        ref = sc(x, dead_mask=dead)
        got = ours(x, dead_mask=dead)
    assert torch.equal(by_index(ref.latent_acts, ref.latent_indices)[1], by_index(got.acts, got.indices)[1])
    assert torch.allclose(ref.sae_out, got.recon, atol=1e-5)
    assert torch.allclose(ref.fvu, got.fvu, atol=1e-6)
    assert got.auxk_loss > 0 and torch.allclose(ref.auxk_loss, got.auxk_loss, atol=1e-6)
    back = S.SAE.load(tmp_path / "layers.5")
    assert back.meta == {"layer": 5, "source_model": "random:tiny-qwen2"}


def test_losses_and_decode_match_float64_reference():
    sae = S.SAE(16, 64, 5)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.2)
        sae.encoder.bias.normal_(0, 0.1)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(3))
    out = sae(x)
    # dense float64 reference: full latent vector, keep top-k, dense matmul decode
    W, b, Wd, bd = (t.detach().double() for t in (sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec))
    pre = torch.relu((x.double() - bd) @ W.T + b)
    kth = pre.topk(5, -1).values[:, -1:]
    z = torch.where(pre >= kth, pre, torch.zeros_like(pre))
    recon = z @ Wd + bd
    fvu = (x.double() - recon).pow(2).sum() / (x.double() - x.double().mean(0)).pow(2).sum()
    assert torch.allclose(out.recon.double(), recon, atol=1e-5)
    assert abs(out.fvu.item() - fvu.item()) < 1e-6
    dense = torch.zeros(40, 64).scatter(-1, out.indices, out.acts)
    assert torch.allclose(sae.decode(out.acts, out.indices), dense @ sae.W_dec + sae.b_dec, atol=1e-5)


@pytest.mark.parametrize("aux", [True, False])       # AuxK: autograd through pre; without: _SelectedLatents
@pytest.mark.parametrize("m,k", [(64, 5), (256, 4)])     # torch.topk; top_k's grouped path (groups of 8)
def test_gradients_match_float64_reference(m, k, aux):
    # every parameter's gradient of FVU (+ AuxK) and the input's (for SAEs inserted with grad="pass")
    # against autograd through the plain formula in float64; latents that no token selects (zero rows of the
    # weight gradient) occur at these sizes
    sae = S.SAE(16, m, k)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.5)
        sae.encoder.bias.normal_(0, 0.1)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(4)).requires_grad_()
    dead = torch.zeros(m, dtype=torch.bool)
    dead[::3] = aux
    out = sae(x, dead_mask=dead)
    (out.fvu + out.auxk_loss).backward()
    ref = {n: p.detach().double().requires_grad_() for n, p in sae.named_parameters()}
    W, b, Wd, bd = ref["encoder.weight"], ref["encoder.bias"], ref["W_dec"], ref["b_dec"]
    x64 = x.detach().double().requires_grad_()
    pre = torch.relu((x64 - bd) @ W.T + b)                                  # [N, M]
    z = torch.zeros_like(pre).scatter(-1, out.indices, pre.gather(-1, out.indices))
    recon = z @ Wd + bd
    e, tv = x64 - recon, (x64 - x64.mean(0)).pow(2).sum()
    loss = e.pow(2).sum() / tv
    if aux:
        k_aux = min(8, int(dead.sum()))
        aux_idx = torch.where(dead, pre.detach(), -torch.inf).topk(k_aux).indices
        za = torch.zeros_like(pre).scatter(-1, aux_idx, pre.gather(-1, aux_idx))
        loss = loss + min(int(dead.sum()) / 8, 1.0) * (za @ Wd - e.detach()).pow(2).sum() / tv
    else:
        assert out.auxk_loss == 0
        assert (torch.bincount(out.indices.flatten(), minlength=m) == 0).any()     # unselected latents occur
    loss.backward()
    for n, p in sae.named_parameters():
        assert torch.allclose(p.grad.double(), ref[n].grad, atol=1e-5), n
    assert torch.allclose(x.grad.double(), x64.grad, atol=1e-5)


def test_sparse_encoder_gradient_under_autocast_matches_the_dense_one():
    # bf16 autocast (the GPU's training mode, here on a CPU): both encoder gradients in the same precision
    sae = S.SAE(32, 512, 8)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(5))
    grads = []
    for sparse in (True, False):
        sae.zero_grad()
        sae.SPARSE_ENCODER_GRAD = sparse
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sae(x)
        out.fvu.backward()
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=0.02, atol=2e-3 * grads[1][n].abs().max()), n


def test_training_helpers_match_sparsify():
    sc = sparsify_sae(d=8, m=24, k=3)
    ours = S.SAE(8, 24, 3)
    ours.load_state_dict(sc.state_dict())
    g = torch.randn(24, 8)
    sc.W_dec.grad, ours.W_dec.grad = g.clone(), g.clone()
    sc.remove_gradient_parallel_to_decoder_directions()
    ours.remove_gradient_parallel_to_decoder_directions()
    assert torch.allclose(sc.W_dec.grad, ours.W_dec.grad, atol=1e-6)
    assert (ours.W_dec.grad * ours.W_dec).sum(-1).abs().max() < 1e-5
    with torch.no_grad():
        ours.W_dec.mul_(3.0)
    ours.set_decoder_norm_to_unit_norm()
    assert torch.allclose(ours.W_dec.norm(dim=1), torch.ones(24), atol=1e-6)
    t = S.DeadLatentTracker(24, dead_tokens=10)
    t.update(torch.tensor([[0, 1, 2]] * 6))
    t.update(torch.tensor([[0, 3, 4]] * 6))
    assert t.dead_mask().tolist() == [False] * 5 + [True] * 19   # 12 silent tokens > 10; 6 are not
    t.update(torch.tensor([[0, 3, 4]] * 6))
    assert t.dead_mask().tolist() == [False, True, True] + [False] * 2 + [True] * 19


@pytest.mark.parametrize("multi_topk", [False, True])
def test_train_step_follows_sparsify_trainer(multi_topk):
    # sparsify's trainer (trainer.py, as Resa vendored it): decoder rows to unit norm before the forward, loss =
    # fvu + auxk_alpha * auxk + multi_topk_fvu / 8, backward, gradient parallel to the rows removed, step. Start
    # from rows that are not unit-norm (an --init_from SAE as published): the first step must see unit rows.
    # (sparsify 1.3.3's fused encoder passes no gradient from pre_acts, so its multi-TopK and AuxK terms reach
    # only the decoder; Resa's vendored copy, plain autograd, and ours reach the encoder too. So with multi_topk
    # the decoder is compared, without it every parameter.)
    from sparsify import SparseCoder, SparseCoderConfig
    torch.manual_seed(0)
    d, m, k = 16, 64, 4
    sc = SparseCoder(d, SparseCoderConfig(num_latents=m, k=k, multi_topk=multi_topk))
    with torch.no_grad():
        sc.encoder.bias.normal_(0, 0.1)
        sc.b_dec.normal_(0, 0.5)
        sc.W_dec.mul_(torch.rand(m, 1) + 0.5)                        # rows of norm 0.5 .. 1.5
    ours = S.SAE(d, m, k, multi_topk=multi_topk)
    ours.load_state_dict(sc.state_dict())
    x = torch.randn(256, d)
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    out = S.train_step(ours, opt, x)
    ref_opt = torch.optim.SGD(sc.parameters(), lr=0.1)
    sc.set_decoder_norm_to_unit_norm()                                 # the reference, step by step
    ref = sc(x)
    (ref.fvu + ref.multi_topk_fvu / 8).backward()
    sc.remove_gradient_parallel_to_decoder_directions()
    ref_opt.step()
    assert out.fvu.item() == pytest.approx(ref.fvu.item(), rel=1e-5)
    assert out.multi_topk_fvu.item() == pytest.approx(ref.multi_topk_fvu.item(), rel=1e-5)
    assert (out.multi_topk_fvu.item() > 0) == multi_topk
    for name, p in sc.state_dict().items():
        if name == "W_dec" or not multi_topk:
            assert torch.allclose(ours.state_dict()[name], p, atol=1e-6), name


def test_training_recovers_hidden_sparse_dictionary():
    # data = sparse non-negative combinations of 48 hidden unit directions in 24 dimensions
    g = torch.Generator().manual_seed(0)
    d, n_atoms, k = 24, 48, 3
    D = torch.nn.functional.normalize(torch.randn(n_atoms, d, generator=g), dim=-1)

    def batch(n=512):
        idx = torch.rand(n, n_atoms, generator=g).argsort(-1)[:, :k]
        coef = torch.rand(n, k, generator=g) + 0.5
        return torch.zeros(n, n_atoms).scatter(-1, idx, coef) @ D + 0.3

    torch.manual_seed(0)
    sae = S.SAE(d, 96, k)
    sae.init_b_dec(batch())
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    tracker = S.DeadLatentTracker(96, dead_tokens=5000)
    for step in range(600):
        out = S.train_step(sae, opt, batch(), tracker.dead_mask(), auxk_alpha=1 / 32)
        tracker.update(out.indices)
        assert abs(sae.W_dec.norm(dim=1).mean().item() - 1) < 1e-2      # rows renormalised before each step
    with torch.no_grad():
        fvu = sae(batch(4096)).fvu.item()
    assert fvu < 0.1, fvu


def test_perfect_sae_leaves_logits_unchanged_and_grad_modes(hf_models):
    ours = M.load_model(str(hf_models["qwen2"][1]))
    ids, mask = left_padded_batch(128, [9, 4], seed=11)
    with torch.no_grad():
        base = ours(ids, mask)
    hook = S.insert_sae(ours, identity_sae(64), layer=1)
    with torch.no_grad():
        got = ours(ids, mask)
    assert (got - base).abs().max() < 1e-5 and hook.last_mse < 1e-10
    hook.remove()
    # an imperfect SAE changes the logits, and its error is reported
    rough = S.SAE(64, 128, 4)
    h2 = S.insert_sae(ours, rough, layer=1)
    with torch.no_grad():
        assert (ours(ids, mask) - base).abs().max() > 1e-3
    assert h2.last_mse > 0
    h2.remove()
    # grad="block": LoRA at or below the SAE's layer gets no gradient; "pass": it does
    L.attach_lora(ours, r=2, alpha=4, dropout=0.0)
    with torch.no_grad():
        for m in L.lora_layers(ours).values():
            m.lora_B.weight.normal_(0, 0.1)
    for mode, expect in (("block", False), ("pass", True)):
        h = S.insert_sae(ours, identity_sae(64), layer=1, grad=mode)
        ours.zero_grad()
        ours.logprobs(ids, mask).sum().backward()
        below = ours.model.layers[0].mlp.up_proj.lora_B.weight.grad
        above = ours.model.layers[2].mlp.up_proj.lora_B.weight.grad
        assert above is not None and above.abs().sum() > 0
        assert (below is not None and below.abs().sum() > 0) == expect, mode
        h.remove()


def test_sae_that_does_not_fit_is_refused(tmp_path):
    m = M.load_model("random:tiny-qwen2")            # hidden 64, 3 layers
    with pytest.raises(ValueError, match="d_in=32"):
        S.insert_sae(m, S.SAE(32, 64, 4), layer=0)
    with pytest.raises(ValueError, match="does not exist"):
        S.insert_sae(m, S.SAE(64, 128, 4), layer=3)
    with pytest.raises(ValueError, match="names no layer"):
        S.insert_sae(m, S.SAE(64, 128, 4))
    S.SAE(64, 128, 4, layer=1).save(tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    (tmp_path / "s" / "cfg.json").write_text(json.dumps({**cfg, "d_in": 48}))
    with pytest.raises(ValueError, match="do not match cfg.json"):
        S.SAE.load(tmp_path / "s")
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "s" / "sae.safetensors").write_bytes(b"\x00" * 7)
    with pytest.raises(ValueError, match="safetensors"):
        S.SAE.load(tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="hookpoint folders"):
        S.load_sae(str(tmp_path))


@pytest.mark.parametrize("n,m,k", [(50, 1024, 32), (30, 4096, 8), (20, 256, 4), (9, 90, 3), (6, 64, 5)])
def test_top_k_selects_what_torch_topk_selects(n, m, k):
    # the grouped selection (groups of 4, 16, 8; then 90 % 4 != 0 and 64 / 5 too small: torch.topk itself)
    # against torch.topk: the same values (ties everywhere in the integer rows, -inf in the masked ones),
    # k distinct indices that hold them, and the gradient lands on exactly those entries
    g = torch.Generator().manual_seed(n)
    for pre in (torch.randn(n, m, generator=g), torch.randint(-3, 4, (n, m), generator=g).float(),
                torch.randn(n, m, generator=g).masked_fill(torch.rand(n, m, generator=g) < 0.9, -torch.inf)):
        pre.requires_grad_()
        vals, idx = S.top_k(pre, k)
        assert vals.shape == idx.shape == (n, k)
        assert torch.equal(vals.sort(-1).values, pre.topk(k, -1).values.sort(-1).values)
        assert torch.equal(pre.detach().gather(1, idx), vals.detach())
        assert (idx.sort(-1).values.diff(dim=-1) > 0).all()
        w = torch.rand(n, k, generator=g) + 0.5
        (vals.nan_to_num(neginf=0.0) * w).sum().backward()
        want = torch.zeros(n, m).scatter(1, idx, w.masked_fill(vals.detach().isinf(), 0.0))
        assert torch.equal(pre.grad, want)


def test_relu_applies_when_fewer_than_k_latents_are_positive():
    # a TopK SAE keeps the k largest pre-activations and then applies the ReLU: a latent selected with a
    # negative pre-activation contributes nothing (float64 reference)
    torch.manual_seed(0)
    sae = S.SAE(16, 32, 8).double()
    with torch.no_grad():
        sae.encoder.bias.copy_(torch.linspace(-6.0, 1.0, 32, dtype=torch.float64))  # most latents negative
    x = torch.randn(20, 16, dtype=torch.float64) * 0.3
    pre = (x - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias
    assert ((pre > 0).sum(-1) < 8).any()                                        # the case under test occurs
    vals, idx = pre.topk(8, -1)
    dense = torch.zeros_like(pre).scatter(-1, idx, vals.clamp(min=0))
    want = dense @ sae.W_dec + sae.b_dec
    out = sae(x)
    assert (out.acts >= 0).all()
    assert torch.allclose(sae.reconstruct(x), want, atol=1e-10)
    assert torch.allclose(out.fvu, ((x - want) ** 2).sum() / ((x - x.mean(0)) ** 2).sum(), atol=1e-10)


def test_dead_latent_tracker_counts_tokens_since_each_latent_fired():
    tr = S.DeadLatentTracker(5, dead_tokens=8)
    idx = torch.tensor([[0, 1]] * 4)                       # 4 tokens select latents 0 and 1
    acts = torch.tensor([[1.0, 0.0]] * 4)                  # latent 1 is selected but never positive
    tr.update(idx, acts)
    tr.update(idx, acts)
    assert tr.since_fired.tolist() == [0, 8, 8, 8, 8] and not tr.dead_mask().any()   # 8 tokens: not yet dead
    tr.update(idx, acts)
    assert tr.dead_mask().tolist() == [False, True, True, True, True] and tr.dead_fraction() == pytest.approx(0.8)
    tr.update(torch.tensor([[3, 1]]), torch.tensor([[2.0, 0.5]]))                     # 3 and 1 fire: alive again
    assert tr.dead_mask().tolist() == [False, False, True, False, True]


def test_signum_matches_schedulefree_around_sparsifys_signsgd():
    # float64: our Signum against schedulefree's ScheduleFreeWrapper wrapping sparsify's SignSGD (the pair
    # sparsify builds for optimizer="signum"), over steps with a warm-up (the lr-max weights) and a decoder
    # renormalisation between steps, then eval() (the average) and train() back
    from schedulefree import ScheduleFreeWrapper
    from sparsify.sign_sgd import SignSGD
    torch.manual_seed(0)
    ours_p = [torch.randn(6, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    ref_p = [p.clone() for p in ours_p]
    ours = S.Signum([p.requires_grad_() for p in ours_p], lr=0.1, momentum=0.95)
    ref = ScheduleFreeWrapper(SignSGD([p.requires_grad_() for p in ref_p], lr=0.1), momentum=0.95)
    ref.train()
    for step in range(7):
        lr = 0.1 * min(1.0, (step + 1) / 3)
        for g in (ours.param_groups, ref.param_groups):
            g[0]["lr"] = lr
        grads = [torch.randn_like(p) for p in ours_p]
        for a, b, gr in zip(ours_p, ref_p, grads):
            a.grad, b.grad = gr.clone(), gr.clone()
        ours.step()
        ref.step()
        with torch.no_grad():                          # what train_step does to the decoder after each step
            for p in (ours_p[0], ref_p[0]):
                p.div_(p.norm(dim=1, keepdim=True))
        for a, b in zip(ours_p, ref_p):
            assert torch.allclose(a, b, atol=1e-12), step
    ours.eval()
    ref.eval()
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(ours_p, ref_p))
    ours.train()
    ref.train()
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(ours_p, ref_p))


def test_signum_update_rule_in_float64():
    # the rule written out for one scalar: z -= lr sign(g); x += c (z - x), c = lr^2 / sum lr^2; y = m x + (1-m) z
    p = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    opt = S.Signum([p], lr=0.5, momentum=0.9)
    z = x = 0.3
    wsum = 0.0
    for g, lr in ((1.0, 0.5), (-2.0, 0.5), (0.5, 0.25)):
        opt.param_groups[0]["lr"] = lr
        p.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        z -= lr * (1 if g > 0 else -1)
        wsum += 0.5 ** 2                                # weights use the largest lr so far
        x += (0.5 ** 2 / wsum) * (z - x)
        assert p.item() == pytest.approx(0.9 * x + 0.1 * z, abs=1e-12)
    opt.eval()
    assert p.item() == pytest.approx(x, abs=1e-12)


def test_train_sae_saves_the_schedule_free_average_and_trains_on(tmp_path):
    # Signum's parameters hold y = m x + (1 - m) z while training; the saved SAE must be x, the average (what
    # sparsify's ScheduleFree wrapper evaluates), and training must go on from y afterwards
    import train_sae as T
    torch.manual_seed(0)
    sae = S.SAE(8, 16, 2)
    opt = S.Signum(sae.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        for p in sae.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    y = {n: p.detach().clone() for n, p in sae.named_parameters()}
    x = {n: (p.detach() - 0.1 * opt.state[p]["z"]) / 0.9 for n, p in sae.named_parameters()}
    T.save_all({0: sae}, tmp_path, {0: opt})
    saved = S.SAE.load(tmp_path / "layers.0").state_dict()
    assert all(torch.allclose(saved[n], x[n], atol=1e-6) for n in x)
    assert any((x[n] - y[n]).abs().max() > 1e-3 for n in x)                  # the two iterates differ here
    assert all(torch.allclose(p, y[n], atol=1e-6) for n, p in sae.named_parameters()) and opt.training
