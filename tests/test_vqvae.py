"""Properties of vqvae.py: nearest code, straight-through, which term moves what,
EMA and dead-code restart, perplexity, prior causality and sampling, training, own data, CLI."""

import json
import math

import numpy as np
import pytest
import torch

import vqvae as V


def brute_force_nearest(z, e):
    """Index of the nearest code, looping over codes in float64; ties -> lowest index."""
    z, e = z.double(), e.double()
    best = torch.full((len(z),), float("inf"), dtype=torch.float64)
    idx = torch.zeros(len(z), dtype=torch.long)
    for k in range(len(e)):
        d = (z - e[k]).pow(2).sum(1)
        better = d < best  # strict: an equal distance keeps the earlier code
        best[better], idx[better] = d[better], k
    return idx, best


def test_quantiser_returns_the_nearest_code_against_brute_force():
    vq = V.VectorQuantizer(K=64, D=8)
    vq.codebook.data.normal_()
    z = torch.randn(2000, 8)
    got = vq.nearest(z)
    want, best = brute_force_nearest(z, vq.codebook.data)
    dist_got = (z.double() - vq.codebook.data.double()[got]).pow(2).sum(1)
    assert torch.allclose(dist_got, best, rtol=0, atol=1e-4)  # always a nearest code
    # ... and exactly the brute-force one wherever the runner-up is not a near-tie
    d_all = torch.cdist(z.double(), vq.codebook.data.double()).pow(2)
    gap = d_all.topk(2, largest=False).values.diff(dim=1).squeeze(1)
    clear = gap > 1e-4
    assert clear.float().mean() > 0.99
    assert torch.equal(got[clear], want[clear])


def test_quantiser_breaks_exact_ties_towards_the_lowest_index():
    vq = V.VectorQuantizer(K=4, D=2)
    # Codes 1 and 3 are the same vector; code 0 and code 2 are mirror images.
    vq.codebook.data = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[0.0, 0.0],    # equidistant from codes 0 and 2 -> 0
                      [0.0, 2.5],    # codes 1 and 3 tie -> 1
                      [-0.9, 0.1]])  # plainly code 2
    want, _ = brute_force_nearest(z, vq.codebook.data)
    assert vq.nearest(z).tolist() == want.tolist() == [0, 1, 2]


def test_straight_through_passes_the_gradient_unchanged():
    z_e = torch.randn(4, 16, 7, 7, requires_grad=True)
    vq = V.VectorQuantizer(K=32, D=16)
    vq.codebook.data.normal_()
    e, _ = vq(z_e)
    z_q = V.straight_through(z_e, e)
    assert torch.allclose(z_q, e.detach(), atol=1e-6)  # forward: the quantised value (to rounding) ...
    g = torch.randn_like(z_q)
    z_q.backward(g)
    assert torch.equal(z_e.grad, g)  # ... backward: the identity, bit for bit


@pytest.mark.parametrize("ema", [False, True])
def test_reconstruction_gradient_reaches_the_encoder_straight_through(ema):
    """Catches the straight-through estimator removed from the model (z_q = e): from
    the reconstruction term alone, the encoder output z_e gets exactly the gradient
    the decoder sends back to its input z_q, and the encoder's weights a nonzero one.
    (The commitment term alone also reaches the encoder, so it is left out here.)"""
    model = V.VQVAE(K=32, D=4, width=8, ema=ema)
    model.quantizer.codebook.data.normal_()
    seen = {}

    def keep_input(module, inputs):
        if inputs[0].requires_grad:
            inputs[0].retain_grad()
        seen["z_q"] = inputs[0]

    model.decoder.register_forward_pre_hook(keep_input)
    x = torch.rand(2, 1, 28, 28)
    x_hat, terms, z_e, tokens = model(x)
    e = model.quantizer.codebook[tokens].permute(0, 3, 1, 2).detach()
    z_e.retain_grad()
    terms["recon"].backward()
    assert terms["recon"].item() == pytest.approx((x_hat - x).pow(2).mean().item())
    z_q = seen["z_q"]
    assert torch.allclose(z_q, e, atol=1e-6)  # the decoder reads the chosen codes ...
    assert z_q.grad is not None and z_q.grad.abs().sum() > 0
    assert z_e.grad is not None and torch.equal(z_e.grad, z_q.grad)  # ... and z_e gets their gradient
    assert model.encoder[0].weight.grad.abs().sum() > 0


def test_commitment_moves_the_encoder_only_and_codebook_term_the_codes_only():
    beta = 0.25
    vq = V.VectorQuantizer(K=8, D=3, ema=False)
    vq.codebook.data.normal_()
    z_e = torch.randn(2, 3, 4, 4, requires_grad=True)
    e, codes = vq(z_e)
    N = z_e.numel()
    codebook, commit = V.vq_loss_terms(z_e, e, beta)

    commit.backward(retain_graph=True)
    assert torch.allclose(z_e.grad, 2 * beta * (z_e - e).detach() / N, rtol=1e-6, atol=1e-9)
    assert vq.codebook.grad is None or not vq.codebook.grad.any()

    z_e.grad = None
    codebook.backward()
    assert z_e.grad is None or not z_e.grad.any()
    # Hand computation: d/de_k of sum_i ||z_i - e_k||^2 / N over the z_i assigned to k.
    z_flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    want = torch.zeros(8, 3)
    for i, k in enumerate(codes.flatten().tolist()):
        want[k] += 2 * (vq.codebook.data[k] - z_flat[i]) / N
    assert torch.allclose(vq.codebook.grad, want, rtol=1e-5, atol=1e-8)


def test_ema_update_matches_the_formula_by_hand():
    vq = V.VectorQuantizer(K=3, D=2, ema=True, decay=0.9, eps=0.01)
    vq.codebook.data = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    vq.ema_sum.copy_(vq.codebook.data)
    vq.ema_count.fill_(1.0)
    z = torch.tensor([[0.2, 0.0], [0.0, 0.4], [1.0, 2.0]])
    codes = torch.tensor([0, 0, 1])
    vq.ema_update(z, codes)
    # N = 0.9 * 1 + 0.1 * n_k with n = (2, 1, 0)
    count = [0.9 + 0.2, 0.9 + 0.1, 0.9]
    # m = 0.9 * e_k + 0.1 * sum of assigned z
    m = [[0.1 * 0.2, 0.1 * 0.4], [0.9 + 0.1, 0.9 + 0.2], [4.5, 4.5]]
    n = sum(count)
    for k in range(3):
        smoothed = (count[k] + 0.01) / (n + 3 * 0.01) * n
        for d in range(2):
            assert vq.codebook.data[k, d].item() == pytest.approx(m[k][d] / smoothed, rel=1e-6)
    assert vq.ema_count.tolist() == pytest.approx(count)


def test_a_dead_code_is_restarted_on_an_encoder_output_and_then_used():
    vq = V.VectorQuantizer(K=4, D=2, ema=True)
    vq.codebook.data = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    vq.ema_sum.copy_(vq.codebook.data)
    z = torch.rand(50, 2)  # in [0, 1]^2: code 3 is never the nearest
    for step in range(1, 6):
        codes = vq.nearest(z)
        assert 3 not in codes.tolist()
        vq.last_used[codes] = step
        vq.ema_update(z, codes)
        # steps 1-4: not dead yet; step 5: unused for 5 steps (since step 0)
        assert vq.restart_dead_codes(z, step, dead_after=5) == (step == 5)
    assert vq.last_used.tolist() == [5, 5, 5, 5]
    new = vq.codebook.data[3]
    assert (z == new).all(1).any()  # it now sits on one of the encoder outputs
    assert vq.ema_sum[3].tolist() == new.tolist() and vq.ema_count[3] == 1
    codes = vq.nearest(z)
    assert 3 in codes.tolist()  # and wins that output: it is used again
    vq.last_used[codes] = 6
    vq.ema_update(z, codes)
    assert vq.restart_dead_codes(z, 6, dead_after=5) == 0
    assert vq.codebook.data[3].abs().max() <= 1  # it followed its new cluster, inside [0, 1]^2


def test_perplexity_is_K_for_uniform_and_1_for_a_single_code():
    s = V.codebook_stats(torch.full((512,), 7))
    assert s["codebook_perplexity"] == pytest.approx(512, rel=1e-9)
    assert s["codebook_usage"] == 1.0
    one = torch.zeros(512)
    one[17] = 1000
    s = V.codebook_stats(one)
    assert s["codebook_perplexity"] == pytest.approx(1.0, abs=1e-12)
    assert s["codebook_usage"] == pytest.approx(1 / 512)


# ----------------------------------------------------------------------------- the token prior

def tiny_prior(K=6, T=8, num_classes=3, width=16, layers=2, heads=2, sharpen=6.0):
    """A random fp32 prior whose next-token distributions are far from uniform and
    differ from position to position (a scaled-up head), so that reading the wrong
    position's logits changes what is drawn."""
    prior = V.TokenPrior(K, T, num_classes, width, layers, heads).eval()
    with torch.no_grad():
        prior.head.weight.mul_(sharpen)
        prior.tok_emb.weight.mul_(3.0)
    return prior


def reference_sample(prior, labels, temperature, top_k, generator):
    """Full recompute: at step t run the prior on the whole length-T sequence (the
    positions >= t hold random junk) and draw z_t from output t; top-k by rank."""
    B, T = len(labels), prior.seq_len
    tokens = torch.zeros(B, T, dtype=torch.long)
    junk = torch.Generator().manual_seed(123)
    for t in range(T):
        tokens[:, t:] = torch.randint(0, prior.codebook_size, (B, T - t), generator=junk)
        with torch.no_grad():
            logits = prior(tokens, labels)[:, t] / temperature  # (B, K)
        if top_k:
            rank = logits.argsort(-1, descending=True).argsort(-1)
            logits = logits.masked_fill(rank >= top_k, float("-inf"))
        tokens[:, t] = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
    return tokens


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 3)])
def test_sampler_matches_a_full_recompute_reference(monkeypatch, temperature, top_k):
    """Catches the sampler reading the logits of the wrong position (output 0, or
    t - 1, at every step) and a top-k that keeps the wrong tokens: per-step logits
    equal the full forward on the generated sequence, and the draws equal those of a
    full-recompute sampler with the same seeded generator, over 16 x 64 steps."""
    prior = tiny_prior(K=6, T=64, num_classes=3)
    labels = torch.tensor([0, 1, 2, 3] * 4)  # 3 = "no label"
    seen = []
    draw = V.draw_token
    monkeypatch.setattr(V, "draw_token", lambda logits, *a: seen.append(logits) or draw(logits, *a))
    fast = V.sample_tokens(prior, labels, temperature, top_k, torch.Generator().manual_seed(5))
    slow = reference_sample(prior, labels, temperature, top_k, torch.Generator().manual_seed(5))
    assert fast.shape == (16, 64) and len(seen) == 64
    full = prior(fast, labels).detach()  # (B, T, K)
    assert torch.allclose(torch.stack(seen, 1), full, rtol=0, atol=1e-5)
    assert torch.equal(fast, slow)


def test_token_frequencies_after_a_fixed_prefix_follow_the_prior():
    """Catches the sampler reading output position 0 (or any other wrong position) at
    every step, a temperature applied the wrong way and a top-k keeping the wrong
    codes: after a fixed prefix z_0, z_1, the frequencies of z_2 over 20,000 draws
    match softmax(logits[:, 2] / temperature) restricted to the top k."""
    prior = tiny_prior(K=6, T=4, num_classes=3)
    n, temperature, top_k = 20000, 0.8, 4
    labels = torch.full((n,), 1)
    prefix = torch.tensor([[4, 2]]).expand(n, 2)
    with torch.no_grad():
        logits = prior(torch.tensor([[4, 2, 0]]), labels[:1])[0] / temperature  # (3, K)
    kth = logits[2].topk(top_k).values[-1]
    p2 = logits[2].masked_fill(logits[2] < kth, float("-inf")).softmax(-1)
    p0 = logits[0].softmax(-1)
    assert (p2 - p0).abs().sum() > 0.3  # the test can tell position 2 from position 0
    tokens = V.sample_tokens(prior, labels, temperature, top_k, torch.Generator().manual_seed(0),
                             prefix=prefix)
    assert torch.equal(tokens[:, :2], prefix)
    freq = torch.bincount(tokens[:, 2], minlength=6).double() / n
    sigma = (p2.double() * (1 - p2.double()) / n).sqrt()
    assert torch.all((freq - p2.double()).abs() <= 5 * sigma + 1e-12), (freq, p2)
    assert torch.all(freq[p2 == 0] == 0)  # never a code outside the top k


def test_prior_is_causal_exactly():
    """Catches a mask that lets position t see t + 1 (triu(2), tril) and a missing or
    doubled input shift: the gradient of logits[:, t] w.r.t. the embeddings of tokens
    >= t is exactly zero, and nonzero for every token < t and for the label."""
    prior = V.TokenPrior(16, 49, 10, width=32, layers=2, heads=4)
    tokens = torch.randint(0, 16, (2, 49))
    labels = torch.tensor([3, 10])
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured[module] = output

    prior.tok_emb.register_forward_hook(keep)
    prior.start_emb.register_forward_hook(keep)
    logits = prior(tokens, labels)
    emb, start = captured[prior.tok_emb], captured[prior.start_emb]  # emb[:, s] is token s
    assert emb.shape == (2, 48, 32)
    for t in (0, 1, 24, 48):
        emb.grad = start.grad = None
        logits[:, t].sum().backward(retain_graph=True)
        assert torch.all(emb.grad[:, t:] == 0)
        if t:
            assert emb.grad[:, :t].abs().sum(-1).min() > 0
        assert start.grad.abs().sum(-1).min() > 0


def test_prior_output_does_not_change_when_future_tokens_do():
    """Catches a non-causal mask: changing tokens >= 20 leaves logits[:, :21] bit for
    bit unchanged, and a prefix gives the same logits as the whole sequence."""
    prior = V.TokenPrior(16, 49, 10, width=32, layers=2, heads=4).eval()
    a = torch.randint(0, 16, (1, 49))
    b = a.clone()
    b[0, 20:] = (a[0, 20:] + 1 + torch.randint(0, 15, (29,))) % 16
    y = torch.tensor([1])
    with torch.no_grad():
        la, lb, prefix = prior(a, y), prior(b, y), prior(a[:, :21], y)
    assert torch.equal(la[:, :21], lb[:, :21])
    assert not torch.equal(la[:, 21:], lb[:, 21:])
    assert torch.allclose(prefix, la[:, :21], rtol=0, atol=1e-5)


def test_batches_cover_each_epoch_once_and_reject_a_batch_larger_than_the_data():
    """Catches an iterator that repeats or skips examples within an epoch, or yields
    a short or empty batch: 3 epochs of 10 // 3 batches, each epoch 9 distinct indices."""
    got = list(V.batches(10, 3, 9))
    assert len(got) == 9 and all(len(b) == 3 for b in got)
    for e in range(3):
        epoch = torch.cat(got[3 * e:3 * e + 3])
        assert len(epoch.unique()) == 9 and epoch.max() < 10
    with pytest.raises(ValueError):
        next(V.batches(10, 11, 5))


def test_cosine_lr_warms_up_then_falls_to_zero():
    """Catches a schedule off by one (a zero first step) or not ending near 0."""
    assert V.cosine_lr(0, 100, warmup=10) == pytest.approx(0.1)
    assert V.cosine_lr(9, 100, warmup=10) == pytest.approx(1.0)
    assert V.cosine_lr(10, 100, warmup=10) == pytest.approx(1.0)
    assert V.cosine_lr(55, 100, warmup=10) == pytest.approx(0.5)
    assert V.cosine_lr(0, 100) == 1.0 and V.cosine_lr(100, 100) == pytest.approx(0.0, abs=1e-12)
    assert all(V.cosine_lr(s, 100) > V.cosine_lr(s + 1, 100) for s in range(100))


def test_losses_fall_on_a_fixed_batch(mnist_dir):
    """Stage one's recon falls on 32 digits; then the prior's NLL on their tokens starts
    near log K (uniform) and falls."""
    torch.manual_seed(0)
    x, y = V.load_images("mnist", mnist_dir, "test")
    x, y = x[:32], y[:32]
    model = V.VQVAE(K=64, D=8, width=32)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = None
    for step in range(1, 61):
        _, terms, z_e, codes = model(x)
        opt.zero_grad()
        (terms["recon"] + terms["commit"]).backward()
        opt.step()
        model.quantizer.upkeep(z_e, codes, step, dead_after=5)
        first = terms["recon"].item() if first is None else first
    assert terms["recon"].item() < 0.6 * first

    tokens = model.encode(x).flatten(1)
    prior = V.TokenPrior(64, 49, 10, width=32, layers=1, heads=2)
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        nll = V.prior_nll(prior, tokens, y)
        opt.zero_grad()
        nll.backward()
        opt.step()
        losses.append(nll.item())
    assert losses[0] == pytest.approx(math.log(64), rel=0.15)  # starts near uniform
    assert losses[-1] < 0.7 * losses[0]


def test_forward_takes_images_of_any_channels_and_size_and_returns_the_loss_terms():
    """Issue 26: model(x) on (B, C, H, W) gives the reconstruction and the terms the loss is
    made of (a user's training loop: sum them and step); encode/decode_tokens round the grid."""
    model = V.VQVAE(K=16, D=4, width=8, ema=False, channels=3)
    x = torch.rand(2, 3, 12, 20)
    x_hat, terms, z_e, tokens = model(x, beta=0.5)
    assert x_hat.shape == x.shape and z_e.shape == (2, 4, 3, 5) and tokens.shape == (2, 3, 5)
    assert set(terms) == {"recon", "codebook", "commit"}
    assert terms["commit"].item() == pytest.approx(0.5 * terms["codebook"].item())
    sum(terms.values()).backward()
    assert model.quantizer.codebook.grad.abs().sum() > 0 and model.encoder[0].weight.grad.abs().sum() > 0
    assert torch.equal(model.encode(x), tokens)
    assert model.decode_tokens(tokens).shape == x.shape


def test_the_prior_tokenises_only_the_images_its_steps_draw(monkeypatch):
    """Issue 26: a 2-step prior run tokenised all 60,000 training images first (67 s). Now
    the tokenizer sees only the batches the prior trains on."""
    model = V.VQVAE(K=16, D=4, width=8)
    prior = V.TokenPrior(16, 4, 0, width=16, layers=1, heads=2)
    seen, encode = [], model.encode
    monkeypatch.setattr(model, "encode", lambda x: seen.append(len(x)) or encode(x))
    V.train_prior(prior, model, torch.rand(1000, 1, 8, 8), torch.zeros(1000, dtype=torch.long),
                  steps=2, batch_size=16, lr=1e-3, device="cpu")
    assert sum(seen) == 32


# ----------------------------------------------------------------------------- the command line

def one_line_error(argv):
    with pytest.raises(SystemExit) as e:
        V.main(argv)
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


SMALL = ["--codebook-size", "32", "--width", "16", "--prior-width", "16", "--device", "cpu", "--batch-size", "16"]


def test_cli_writes_every_output_and_sample_only_reloads_beside_it(tiny_mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data-dir", str(tiny_mnist_dir), "--test-limit", "20", "--num-samples", "12", "--top-k", "5"]
    metrics = V.main(common + SMALL + ["--out", str(out), "--steps", "2"])
    for name in ("model.pt", "metrics.json", "samples.png", "recon.png"):
        assert (out / name).is_file(), name
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == metrics
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == metrics
    for key in ("test_recon_mse", "codebook_usage", "codebook_perplexity", "test_prior_nll_bits",
                "naive_rate_bits", "train_seconds", "steps", "device", "sample_seconds"):
        assert key in saved, key
    assert saved["naive_rate_bits"] == pytest.approx(49 * 5) and saved["steps"] == 4
    samples, labels = np.load(out / "samples.npy"), np.load(out / "sample_labels.npy")
    assert samples.shape == (12, 1, 28, 28) and samples.dtype == np.float32
    assert samples.min() >= 0 and samples.max() <= 1
    assert labels.dtype == np.int64 and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    recon = np.load(out / "recon.npy")
    assert recon.shape == (20, 1, 28, 28) and recon.dtype == np.float32  # min(500, test images)
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --sample-only writes beside the training run, never over it (issue 26)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    m2 = V.main(common + ["--sample-only", "--ckpt", str(out / "model.pt")])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    again = out / "sample_only"
    assert json.loads((again / "metrics.json").read_text()) == m2 and not (again / "model.pt").exists()
    assert np.array_equal(np.load(again / "recon.npy"), recon)
    assert m2["test_recon_mse"] == pytest.approx(saved["test_recon_mse"], rel=1e-6)
    assert m2["test_prior_nll_bits"] == pytest.approx(saved["test_prior_nll_bits"], rel=1e-5)
    assert np.array_equal(np.load(again / "samples.npy"), samples)  # same seed, same samples
    # ... and refuses a folder that holds a training run, in one line, nothing touched
    assert "model.pt" in one_line_error(common + ["--sample-only", "--ckpt", str(out / "model.pt"),
                                                  "--out", str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("channels", [1, 3])
def test_own_unlabelled_images_of_another_size(tmp_path, channels):
    """Issue 26: a .npy of 12 x 20 images (grey as (N, H, W), or RGB) trains two steps; the
    model takes C, H, W from the data, the prior is unconditional (one "no label" class),
    and there are no class rows: no sample_labels.npy."""
    shape = (40, 12, 20) if channels == 1 else (40, 3, 12, 20)
    data = tmp_path / "images.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
    out = tmp_path / "run"
    metrics = V.main(["--data", str(data), "--out", str(out), "--steps", "2", "--num-samples", "5"] + SMALL)
    assert np.load(out / "samples.npy").shape == (5, channels, 12, 20)
    assert np.load(out / "recon.npy").shape == (4, channels, 12, 20)  # the last tenth is the test split
    assert not (out / "sample_labels.npy").exists() and metrics["prior_conditional_on_label"] is False
    assert metrics["naive_rate_bits"] == pytest.approx(3 * 5 * 5)
    models, config = V.load_checkpoint(out / "model.pt", V.build)
    assert config["image_shape"] == [channels, 12, 20] and models["prior"].num_classes == 0


def test_images_the_encoder_cannot_halve_twice_are_refused_in_one_line(tmp_path):
    data = tmp_path / "odd.npy"
    np.save(data, np.zeros((20, 14, 16), np.uint8))
    msg = one_line_error(["--data", str(data), "--out", str(tmp_path / "o"), "--steps", "1"])
    assert "14 x 16" in msg and "multiples of 4" in msg
    assert not (tmp_path / "o").exists()


def test_sampling_runs_on_one_thread_and_restores_the_callers_setting(monkeypatch, tmp_path):
    """Per-token sampling of small matrices is faster on one thread (measured); the
    caller's thread count comes back afterwards, also when sampling fails."""
    models = V.build({"image_shape": [1, 8, 8], "num_classes": 0, "codebook_size": 8, "code_dim": 2,
                      "width": 4, "codebook": "ema", "decay": 0.99, "prior": True, "prior_width": 8,
                      "prior_layers": 1, "prior_heads": 2})
    args = V.parse_args(["--num-samples", "3"])
    threads, seen = torch.get_num_threads(), []
    sample = V.sample_tokens
    monkeypatch.setattr(V, "sample_tokens", lambda *a: seen.append(torch.get_num_threads()) or sample(*a))
    torch.set_num_threads(2)
    try:
        V.evaluate_and_sample(args, models, 0, torch.rand(4, 1, 8, 8), None, tmp_path, "cpu")
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("flags", [
    ["--lr", "-1"], ["--lr", "0"], ["--lr", "nan"], ["--prior-lr", "0"], ["--prior-lr", "-1e-3"],
    ["--beta", "-0.1"], ["--top-k", "-1"], ["--decay", "1"], ["--decay", "-0.5"],
    ["--temperature", "0"], ["--dead-after", "-1"], ["--steps", "-1"], ["--epochs", "0"],
    ["--prior-epochs", "0"], ["--batch-size", "0"], ["--codebook-size", "0"], ["--code-dim", "0"],
    ["--num-samples", "0"], ["--test-limit", "-1"], ["--prior-width", "130"], ["--prior-heads", "0"],
    ["--prior-layers", "0"], ["--width", "1"], ["--sample-only"],
    ["--sample-only", "--ckpt", "m.pt", "--code-dim", "8"], ["--sample-only", "--ckpt", "m.pt", "--no-prior"]])
def test_bad_flags_get_usage_and_one_error_line(flags, capsys):
    """Catches a flag that slips through unchecked (--lr -1 used to end in a traceback), and
    a model-shaping flag given with --sample-only silently ignored (issue 26)."""
    with pytest.raises(SystemExit) as e:
        V.parse_args(flags)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and len([l for l in err.splitlines() if "error:" in l]) == 1


def test_help_shows_every_default_and_reads_the_right_way_round(capsys):
    with pytest.raises(SystemExit):
        V.parse_args(["--help"])
    text = capsys.readouterr().out
    options = text[text.index("options:"):].split("\n  -")[2:]  # each flag's entry, after --help
    assert len(options) > 20
    for entry in options:
        assert "(default:" in " ".join(entry.split()), entry
    assert "--prior, --no-prior" in text and "--no-restart" not in text


def test_batch_larger_than_the_training_set_and_out_a_file_are_one_line(tiny_mnist_dir, tmp_path):
    """Catches a batch larger than the training set training on a silently smaller
    batch (or dividing by zero), and --out naming a file ending in a traceback."""
    common = ["--data-dir", str(tiny_mnist_dir), "--device", "cpu", "--steps", "1"]
    msg = one_line_error(common + ["--out", str(tmp_path / "o"), "--batch-size", "65"])
    assert "--batch-size 65" in msg and "64" in msg
    assert not (tmp_path / "o").exists()  # nothing half-written
    (tmp_path / "file").write_text("mine")
    assert "file" in one_line_error(common + ["--out", str(tmp_path / "file"), "--batch-size", "16"])
    assert (tmp_path / "file").read_text() == "mine"


def tiny_checkpoint(path, config_changes=(), state_change=None):
    """A real vqvae checkpoint of a tiny model, then damaged as asked."""
    config = {"image_shape": [1, 28, 28], "num_classes": 10, "codebook_size": 8, "code_dim": 2, "width": 4,
              "codebook": "ema", "decay": 0.99, "prior": True, "prior_width": 8, "prior_layers": 1,
              "prior_heads": 2}
    state = V.build(config).state_dict()
    if state_change:
        state_change(state)
    V.save_checkpoint(path, {**config, **dict(config_changes)}, state)
    return path


@pytest.mark.parametrize("config, state_change", [
    pytest.param({"codebook_size": "8"}, None, id="wrong-type"),
    pytest.param({"codebook_size": 9}, None, id="disagrees-with-codebook"),
    pytest.param({"prior_layers": 2}, None, id="more-layers-than-weights"),
    pytest.param({"image_shape": [3, 28, 28]}, None, id="other-channels"),
    pytest.param({"num_classes": None}, None, id="missing-value"),
    pytest.param({}, lambda s: s.pop("vqvae.decoder.0.weight"), id="weights-missing"),
    pytest.param({}, lambda s: s.update({"prior.head.bias": torch.zeros(3)}), id="weights-shape"),
    pytest.param({}, lambda s: s.update({"extra": torch.zeros(1)}), id="unexpected-weights"),
])
def test_broken_checkpoint_of_the_right_script_is_one_line(tiny_mnist_dir, tmp_path, config, state_change):
    """Catches a damaged config or damaged weights ending in a KeyError or a torch
    traceback from deep inside: one line naming the file, nothing written."""
    ckpt = tiny_checkpoint(tmp_path / "model.pt", config, state_change)
    msg = one_line_error(["--data-dir", str(tiny_mnist_dir), "--device", "cpu", "--out", str(tmp_path / "o"),
                          "--sample-only", "--ckpt", str(ckpt)])
    assert str(ckpt) in msg
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other-script", "missing"])
def test_unusable_checkpoint_file_is_one_line(tiny_mnist_dir, tmp_path, damage):
    ckpt = tiny_checkpoint(tmp_path / "model.pt")
    if damage == "garbage":
        ckpt.write_bytes(b"not a checkpoint")
    elif damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:-200])
    elif damage == "other-script":
        torch.save({**torch.load(ckpt, weights_only=True), "script": "vqgan"}, ckpt)
    else:
        ckpt.unlink()
    msg = one_line_error(["--data-dir", str(tiny_mnist_dir), "--out", str(tmp_path / "o"),
                          "--sample-only", "--ckpt", str(ckpt)])
    assert str(ckpt) in msg and not (tmp_path / "o").exists()


def test_an_intact_tiny_checkpoint_loads(tmp_path):
    models, config = V.load_checkpoint(tiny_checkpoint(tmp_path / "model.pt"), V.build)
    assert models["prior"].codebook_size == 8 and config["prior_layers"] == 1
    assert models["vqvae"].quantizer.D == 2 and models["prior"].seq_len == 49
