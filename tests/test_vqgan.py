"""Properties of vqgan.py: the adaptive GAN weight, the hinge losses and the
separation of the two players, the patch discriminator, the warm-up, the
transformer's causality and top-k sampling, the VQ gradients, and the CLI."""

import json
import math

import numpy as np
import pytest
import torch

import vqgan


def tiny_args(*extra):
    return vqgan.parse_args(["--K", "16", "--code-dim", "8", "--width", "8",
                             "--prior-width", "32", "--prior-layers", "2", *extra])


def tiny_models(args):
    model, disc, _ = vqgan.build(vars(args), torch.device("cpu"))
    return model, disc


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    # Tiny "decoder" whose last layer is y = h W^T; its gradients have a closed form:
    #   L_rec = mean |y - t|  ->  dL_rec/dW = mean_i sign(y_i - t_i) h_i
    #   L_GAN = -mean a * y   ->  dL_GAN/dW = -a mean_i h_i
    h, t, a = torch.randn(20, 5), torch.randn(20, 1), 0.3
    W = torch.randn(1, 5, requires_grad=True)
    y = h @ W.t()
    rec, gan = (y - t).abs().mean(), -(a * y).mean()
    g_rec = ((y - t).sign() * h).mean(0)
    g_gan = -a * h.mean(0)
    expected = g_rec.norm() / (g_gan.norm() + 1e-4)
    lam = vqgan.adaptive_weight(rec, gan, W)
    assert lam.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not lam.requires_grad
    assert vqgan.adaptive_weight(rec, gan, W, max_weight=1e-3).item() == pytest.approx(1e-3)


def test_adaptive_weight_in_the_model_uses_the_decoders_last_layer():
    args = tiny_args("--disc-start", "0")
    model, disc = tiny_models(args)
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    terms, _, _ = vqgan.generator_loss(model, disc, x, 0, args)
    rec = terms["l1"] + args.perceptual_weight * terms["perc"]
    g_rec, = torch.autograd.grad(rec, model.last_layer, retain_graph=True)
    g_gan, = torch.autograd.grad(terms["gan"], model.last_layer, retain_graph=True)
    assert model.last_layer is model.decoder[-1].weight
    assert terms["lambda"].item() == pytest.approx((g_rec.norm() / (g_gan.norm() + 1e-4)).item(), rel=1e-5)


def test_hinge_losses_on_hand_picked_logits():
    real = torch.tensor([2.0, 0.5, -1.0])   # relu(1 - real) = 0, 0.5, 2   -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])   # relu(1 + fake) = 0, 1, 2     -> mean 1
    assert vqgan.hinge_d_loss(real, fake).item() == pytest.approx(5 / 6 + 1)
    assert vqgan.hinge_g_loss(fake).item() == pytest.approx(1 / 3)
    # Beyond the margins the discriminator has nothing left to learn.
    assert vqgan.hinge_d_loss(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -5.0])).item() == 0.0


def test_each_player_step_leaves_the_other_players_weights_alone():
    args = tiny_args("--disc-start", "0")
    model, disc = tiny_models(args)
    opt_g = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-2, betas=(0.5, 0.9))
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    g0, d0 = params(model), params(disc)
    x_hat = model(x)[0]                      # still attached to the generator's graph
    vqgan.discriminator_step(disc, opt_d, x, x_hat)
    assert same(params(model), g0)
    assert all(p.grad is None for p in model.parameters())  # x_hat was detached
    assert not same(params(disc), d0)
    d1 = params(disc)
    terms, _, _ = vqgan.generator_step(model, disc, opt_g, x, 0, args)
    assert "gan" in terms
    assert same(params(disc), d1)
    assert not same(params(model), g0)


def test_discriminator_returns_a_patch_grid_with_a_small_receptive_field():
    disc = vqgan.PatchDiscriminator(8)
    x = torch.randn(1, 1, 28, 28, requires_grad=True)
    logits, _ = disc(x)
    assert logits.shape == (1, 1, 7, 7)
    logits[0, 0, 3, 3].backward()
    rows, cols = (x.grad[0, 0] != 0).nonzero().unbind(1)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert 4 < height <= 18 and 4 < width <= 18   # 18 x 18 patch, well inside 28 x 28


def test_gan_term_adds_exactly_nothing_before_disc_start():
    args = tiny_args("--disc-start", "5")
    no_gan = tiny_args("--disc-start", "5", "--no-gan")
    model, disc = tiny_models(args)
    x = torch.rand(4, 1, 28, 28) * 2 - 1

    def grads(a, step):
        model.zero_grad(set_to_none=True)
        terms, _, _ = vqgan.generator_loss(model, disc, x, step, a)
        terms["total"].backward()
        return [p.grad.clone() for p in model.parameters()], terms

    reference, _ = grads(no_gan, 4)
    before, terms = grads(args, 4)
    assert "gan" not in terms
    assert same(before, reference)
    after, terms = grads(args, 5)
    assert "gan" in terms and not same(after, reference)


def test_transformer_is_causal():
    prior = vqgan.Prior(K=16, T=10, E=32, n_layer=2, n_head=4)
    labels, tokens = torch.tensor([3, 7]), torch.randint(0, 16, (2, 9))
    h = prior.embed(labels, tokens).detach().requires_grad_(True)   # (B, T, E)
    logits = prior.forward_embeddings(h)                            # (B, T, K)
    for t in range(10):
        g, = torch.autograd.grad(logits[:, t].sum(), h, retain_graph=True)
        # Position t predicts code k_{t+1}; it must not see inputs t+1 .. (k_{t+1} onwards)
        assert torch.all(g[:, t + 1:] == 0)
        assert torch.all(g[:, :t + 1].abs().sum(-1) > 0)           # ...but does see the past


def test_top_k_never_returns_a_token_outside_the_top_k():
    logits = torch.randn(1, 50).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    draws = vqgan.sample_top_k(logits, temperature=3.0, top_k=5, generator=gen)
    top5 = set(logits[0].topk(5).indices.tolist())
    assert set(draws.tolist()) == top5          # every one of the 5, and nothing else
    greedy = vqgan.sample_top_k(logits[:10], temperature=1.0, top_k=1, generator=gen)
    assert torch.all(greedy == logits[0].argmax())


def test_straight_through_and_commitment_placement():
    vq = vqgan.VectorQuantizer(K=8, D=4)
    vq.codebook.weight.data.normal_()
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, idx, codebook, commit = vq(z_e)
    e = vq.codebook.weight
    assert torch.allclose(z_q.detach(), e[idx].permute(0, 3, 1, 2).detach(), atol=1e-6)
    # Straight-through: d(sum g * z_q)/dz_e = g exactly.
    g = torch.randn_like(z_q)
    grad_ze, = torch.autograd.grad((g * z_q).sum(), z_e, retain_graph=True)
    assert torch.equal(grad_ze, g)
    # The codebook term moves only the codes, the commitment term only the encoder.
    assert torch.autograd.grad(codebook, z_e, retain_graph=True, allow_unused=True)[0] is None
    assert torch.autograd.grad(commit, e, retain_graph=True, allow_unused=True)[0] is None
    # beta sits on the commitment: dL_VQ/dz_e = beta * 2 (z_e - z_q) / N.
    loss = vqgan.vq_loss(codebook, commit, 0.25)
    grad_ze, grad_e = torch.autograd.grad(loss, [z_e, e])
    assert torch.allclose(grad_ze, 0.25 * 2 * (z_e - z_q).detach() / z_e.numel())
    # ... and the codes get the full, unweighted pull towards the encoder outputs.
    zq_flat = z_q.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    ze_flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    expected = torch.zeros_like(e).index_add_(0, idx.flatten(), 2 * (zq_flat - ze_flat) / z_e.numel())
    assert torch.allclose(grad_e, expected)


def test_dead_codes_restart_onto_encoder_outputs():
    vq = vqgan.VectorQuantizer(K=8, D=4)
    vq.hits.copy_(torch.tensor([3.0, 0, 1, 0, 0, 2, 0, 5]))
    live_before = vq.codebook.weight.detach()[[0, 2, 5, 7]].clone()
    z_e = torch.randn(2, 4, 3, 3) * 5
    assert vq.restart_dead_codes(z_e) == 4
    w = vq.codebook.weight.detach()
    assert torch.equal(w[[0, 2, 5, 7]], live_before)
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 4)
    nearest = torch.cdist(w[[1, 3, 4, 6]], flat).min(1).values
    assert torch.all(nearest < 0.2)             # on a batch vector, up to the 0.01 noise
    assert torch.all(vq.hits == 0)


def test_losses_fall_on_a_fixed_batch(tiny_mnist_dir):
    torch.manual_seed(0)
    x, y = vqgan.mnist_tensors(tiny_mnist_dir, "train")
    args = tiny_args("--disc-start", "40", "--lr", "3e-3", "--disc-lr", "3e-3")
    model, disc = tiny_models(args)
    opt_g = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.disc_lr, betas=(0.5, 0.9))
    l1 = []
    for step in range(60):
        terms, x_hat, _ = vqgan.generator_step(model, disc, opt_g, x, step, args)
        vqgan.discriminator_step(disc, opt_d, x, x_hat)
        l1.append(terms["l1"].item())
    assert np.mean(l1[-5:]) < 0.6 * np.mean(l1[:5])
    prior = vqgan.Prior(K=16, T=49, E=32, n_layer=2, n_head=4)
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    tokens = torch.randint(0, 16, (8, 49))
    nll = []
    for _ in range(40):
        loss = vqgan.prior_nll(prior, y[:8], tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        nll.append(loss.item())
    assert nll[0] == pytest.approx(math.log(16), rel=0.15) and nll[-1] < 0.5 * nll[0]


def test_cli_smoke_run_and_sample_only(tiny_mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data-dir", str(tiny_mnist_dir), "--test-limit", "32", "--num-samples", "10",
              "--K", "16", "--code-dim", "8", "--width", "8", "--prior-width", "32",
              "--prior-layers", "1", "--restart-every", "1"]
    metrics = vqgan.main(common + ["--out", str(out), "--steps", "2", "--disc-start", "1"])
    for name in ("recon.png", "samples.png", "samples.npy", "model.pt", "metrics.json"):
        assert (out / name).is_file(), name
    samples = np.load(out / "samples.npy")
    assert samples.shape == (10, 1, 28, 28) and samples.min() >= 0 and samples.max() <= 1
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("test_recon_l1", "test_psnr_db", "codebook_usage", "codebook_perplexity",
                "test_prior_nll_bits", "train_seconds", "steps", "device"):
        assert key in saved, key
    assert saved["tokenizer_steps"] == 2 and saved["prior_steps"] == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == saved

    again = vqgan.main(common + ["--out", str(tmp_path / "again"), "--sample-only",
                                 "--ckpt", str(out / "model.pt")])
    assert again["test_recon_l1"] == pytest.approx(saved["test_recon_l1"])
    assert again["test_prior_nll_bits"] == pytest.approx(saved["test_prior_nll_bits"])
    assert (tmp_path / "again" / "samples.png").is_file()


def test_bad_inputs_fail_in_one_line(tiny_mnist_dir, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        vqgan.main(["--data-dir", str(tiny_mnist_dir), "--out", str(tmp_path),
                    "--sample-only", "--ckpt", str(bad)])
    assert "not a readable checkpoint" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        vqgan.parse_args(["--sample-only"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        vqgan.parse_args(["--temperature", "0"])
