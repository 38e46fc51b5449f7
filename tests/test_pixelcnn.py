"""Tests for pixelcnn.py: exact causality, no blind spot, conditioning, the exact NLL, the
sampler against a naive one, training, coding images into bits (round trips, the bound,
bit-identical encoder and decoder logits, any thread count, crafted archives), and the
command line (own images, --sample-only beside the run, bad input in one line)."""

import argparse
import hashlib
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import pixelcnn as P
from conftest import ROOT


def receptive_field(i, j, rows_above, H, W):
    """Pixels the output at (i, j) should see: the R rows above, R columns either
    side (above-right included: no blind spot), and R pixels to the left."""
    R = rows_above
    field = torch.zeros(H, W, dtype=torch.bool)
    field[max(0, i - R):i, max(0, j - R):j + R + 1] = True
    field[i, max(0, j - R):j] = True
    return field


def input_gradients(model, levels, H, W, labels):
    """grad[t, c] = d logits[channel c at pixel t] / d x, as (H*W, L, H, W).

    One backward pass per channel: H*W copies of the same input, copy t
    differentiated at its own pixel t (the copies do not interact)."""
    T = H * W
    x = torch.rand(1, 1, H, W, dtype=torch.float64).repeat(T, 1, 1, 1).requires_grad_()
    out = model(x, labels.repeat(T) if labels is not None else None)[:, :, 0]  # (T, L, H, W)
    grads = []
    for c in range(levels):
        picked = out[torch.arange(T), c].flatten(1)[torch.arange(T), torch.arange(T)]
        (g,) = torch.autograd.grad(picked.sum(), x, retain_graph=True)
        grads.append(g[:, 0])
    return torch.stack(grads, 1)


def labelled(model, std=0.1):
    """Give a conditional model's label embeddings non-zero values (training moves them
    off their zero start), so the label really reaches the logits."""
    for layer in model.layers:
        if layer.embed is not None:
            torch.nn.init.normal_(layer.embed.weight, std=std)
    return model


@pytest.mark.parametrize("conditional,levels", [(True, 2), (False, 2), (True, 4)])
def test_causality_is_exact_and_there_is_no_blind_spot(conditional, levels):
    """Catches mask A keeping the centre pixel, and a blind spot above-right."""
    H, W = 9, 11
    model = P.GatedPixelCNN(levels=levels, channels=16, layers=5, kernel=3, first_kernel=5,
                            num_classes=10 if conditional else 0).double()
    labels = torch.tensor([3]) if conditional else None
    grads = input_gradients(model, levels, H, W, labels)  # (T, L, H, W)
    for t in range(H * W):
        i, j = divmod(t, W)
        future = torch.arange(H * W).view(H, W) >= t
        for c in range(levels):
            g = grads[t, c]
            # causality: x_s for s >= t (x_t itself included) has exactly no influence
            assert (g[future] == 0).all(), f"pixel {t} channel {c} sees the future"
            # no blind spot: every earlier pixel in the receptive field does
            expected = receptive_field(i, j, model.rows_above, H, W)
            assert torch.equal(g != 0, expected), f"pixel {(i, j)} channel {c}"


def test_plain_masking_would_leave_a_blind_spot_the_test_catches():
    """The receptive-field check can fail: cut the vertical stack's link and the
    pixels above disappear from the field."""
    model = P.GatedPixelCNN(levels=2, channels=8, layers=3, first_kernel=3, num_classes=0).double()
    for layer in model.layers:
        torch.nn.init.zeros_(layer.link.weight)
    grads = input_gradients(model, 2, 6, 6, None)
    i, j = 4, 2
    assert not torch.equal(grads[i * 6 + j, 0] != 0, receptive_field(i, j, model.rows_above, 6, 6))


def naive_sample(model, labels, seed):
    """The reference: the whole image through the network for every pixel, the pixel's
    own logits read from it, drawn with the same seeded generator as P.sample."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(len(labels), *model.image_shape, dtype=torch.long)
    with torch.no_grad():
        for i, j in np.ndindex(*model.image_shape[1:]):
            logits = model(x, labels)[:, :, 0, i, j]
            x[:, 0, i, j] = torch.multinomial(torch.softmax(logits, 1), 1, generator=gen)[:, 0]
    return x


def test_sampler_matches_a_naive_full_image_sampler():
    """Catches the sampler reading another pixel's logits (e.g. the crop's first column instead of
    pixel j's), a crop or a vertical-stack cone that cuts pixels the pixel sees, and the link
    feeding the last row from another: every logit it drew from must equal the full pass over
    the image it made, and its samples the naive sampler's."""
    model = labelled(P.GatedPixelCNN((1, 12, 13), levels=3, channels=8, layers=3)).eval()
    with torch.no_grad():  # H, W > 2 rows_above + 1 = 11: crops are cut above, left and right
        model.head[-1].bias.copy_(torch.tensor([0.5, 0.0, -0.5]))
    labels, seen, R = torch.tensor([0, 4, 7, 9]), [], model.rows_above
    hook = model.register_forward_hook(lambda module, inputs, out: seen.append(out[:, :, 0, -1]))
    x = P.sample(model, 4, labels, seed=3)
    hook.remove()
    with torch.no_grad():
        full = model(x, labels)[:, :, 0]                           # (B, L, H, W) of the final images
    drawn_from = torch.stack([seen[t][:, :, t % 13 - max(0, t % 13 - R)] for t in range(156)], -1)
    assert (drawn_from.view(4, 3, 12, 13) - full).abs().max() < 1e-5
    assert torch.equal(x, naive_sample(model, labels, seed=3))
    assert len(x.unique()) == 3  # every value occurs: a wrong row changes the draws


@pytest.mark.parametrize("layers", [8, 20])
def test_activations_keep_a_sane_scale_at_init(mnist_dir, layers):
    """The residual is added once, so the horizontal stack does not blow up with
    depth (adding it twice grows it ~2^layers), and the initial NLL is near the
    784 ln 2 of a coin flip per pixel, not far above it."""
    model = P.GatedPixelCNN(levels=2, channels=32, layers=layers)
    images, y = P.load_images("mnist", mnist_dir, "test")
    x = P.binarise(images[:16], torch.Generator().manual_seed(0))
    stds = []
    hooks = [layer.register_forward_hook(lambda m, i, o: stds.append(o[1].std().item()))
             for layer in model.layers]
    with torch.no_grad():
        logits = model(x, y[:16])
    for h in hooks:
        h.remove()
    assert len(stds) == layers
    assert all(0.02 < s < 3.0 for s in stds), stds
    assert logits.std() < 1.0
    nll = P.nll_per_image(logits, x).mean().item()
    assert 0.5 * 784 * math.log(2) < nll < 1.25 * 784 * math.log(2)


def test_conditioning_changes_the_output_and_unconditional_ignores_it():
    x = torch.randint(0, 2, (2, 1, 12, 12))
    cond = P.GatedPixelCNN(channels=8, layers=3, num_classes=10)
    # Zero label embeddings at init: the conditional model starts as an unconditional one.
    assert torch.equal(cond(x, torch.tensor([0, 1])), cond(x, torch.tensor([7, 7])))
    # Once the embeddings have moved (as training moves them) the label matters.
    labelled(cond)
    a, b = cond(x, torch.tensor([0, 1])), cond(x, torch.tensor([7, 7]))
    assert (a - b).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-3
    uncond = P.GatedPixelCNN(channels=8, layers=3, num_classes=0)
    assert torch.equal(uncond(x, torch.tensor([0, 1])), uncond(x))


def test_forward_takes_what_sample_gives_and_the_loss_takes_what_forward_gives():
    """Issue 26.2: from Python, model(x) on (B, C, H, W) pixels gives logits the NLL takes;
    samples come at the model's size, with values in 0 .. L-1, the same for the same seed."""
    model = P.GatedPixelCNN((1, 7, 9), levels=4, channels=4, layers=2, num_classes=0)
    x = P.sample(model, 3, seed=1)
    assert x.shape == (3, 1, 7, 9) and x.dtype == torch.long and set(x.unique().tolist()) <= {0, 1, 2, 3}
    assert torch.equal(x, P.sample(model, 3, seed=1)) and not torch.equal(x, P.sample(model, 3, seed=2))
    logits = model(x)
    assert logits.shape == (3, 4, 1, 7, 9)
    assert P.nll_per_image(logits, x).shape == (3,)


@pytest.mark.parametrize("levels", [2, 4])
def test_nll_of_a_logit_zero_model_is_784_ln_levels(levels):
    model = P.GatedPixelCNN(levels=levels, channels=8, layers=2)
    torch.nn.init.zeros_(model.head[-1].weight)
    torch.nn.init.zeros_(model.head[-1].bias)
    x = torch.randint(0, levels, (30, 1, 28, 28))
    m = P.evaluate(model, x, torch.randint(0, 10, (30,)), batch_size=7)
    assert m["test_nll_nats"] == pytest.approx(784 * math.log(levels), rel=1e-6)
    assert m["test_bits_per_dim"] == pytest.approx(math.log2(levels), rel=1e-6)


def test_binarise_uses_the_pixel_intensity_as_probability():
    images = torch.tensor([0, 64 / 255, 191 / 255, 1]).view(1, 1, 1, 4).repeat(4000, 1, 1, 1)
    x = P.binarise(images, torch.Generator().manual_seed(0)).float()
    np.testing.assert_allclose(x.mean(0).flatten().numpy(), [0, 64 / 255, 191 / 255, 1], atol=0.03)


def test_the_test_set_is_the_same_binarisation_as_before_and_as_vae_py(mnist_dir):
    """The test images every number is measured on: the 10,000 MNIST test digits binarised with
    seed 1234 whatever --seed says, bit for bit the set the HEAD code and vae.py score (its
    sha256 pinned); catches the binarisation moving to another generator or intensity."""
    images, _ = P.load_images("mnist", mnist_dir, "test")
    P.seed_everything(7)
    x = P.binarise(images, torch.Generator().manual_seed(P.TEST_BINARISATION_SEED))
    assert x.shape == (10000, 1, 28, 28) and 0.1 < x.float().mean() < 0.2
    assert hashlib.sha256(x.numpy().astype(np.uint8)).hexdigest() == TEST_SET_SHA256


TEST_SET_SHA256 = "a770f93b08373b2cf128be36aee038cecfd811bb002b53189a691fd37cdfe7db"


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_first_pixel_frequency_matches_the_model_probability(temperature):
    model = P.GatedPixelCNN((1, 1, 2), levels=4, channels=4, layers=2)
    with torch.no_grad():
        model.head[-1].bias.copy_(torch.tensor([1.0, -0.5, 0.0, -1.5]))
        labels = torch.full((4000,), 3)
        # The first pixel sees only padding, so its distribution is the same for every image.
        p = torch.softmax(model(torch.zeros(1, 1, 1, 2), labels[:1])[0, :, 0, 0, 0] / temperature, 0)
    x = P.sample(model, 4000, labels, temperature=temperature, seed=0)
    freq = torch.bincount(x[:, 0, 0, 0], minlength=4).double() / len(labels)
    sigma = (p * (1 - p) / len(labels)).sqrt()
    assert ((freq - p).abs() < 4 * sigma).all(), (freq, p)


def test_loss_falls_on_a_fixed_batch(mnist_dir):
    images, y = P.load_images("mnist", mnist_dir, "test")
    x = P.binarise(images[:16], torch.Generator().manual_seed(0))
    model = P.GatedPixelCNN(levels=2, channels=16, layers=4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = P.nll_per_image(model(x, y[:16]), x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_weight_average_follows_its_warm_up_formula(tiny_mnist_dir):
    """One step with ema_decay: d_0 = min(decay, 1/10) = 0.1, so the averaged weights are
    0.1 w_0 + 0.9 w_1 (mostly the trained weights, not the random start)."""
    images, y = P.load_images("mnist", tiny_mnist_dir, "train")
    model = P.GatedPixelCNN(channels=8, layers=2)
    w0 = [w.detach().clone() for w in model.parameters()]
    average = P.train(model, images[:8], y[:8], 1, batch_size=8, ema_decay=0.999, bf16=False)
    assert average is not model
    moved = 0
    for a, w, start in zip(average.parameters(), model.parameters(), w0):
        torch.testing.assert_close(a, 0.1 * start + 0.9 * w.detach())
        moved += int(not torch.equal(w, start))
    assert moved > 0  # the step did change the weights, so the check above has teeth


def test_bf16_training_lowers_the_loss(tiny_mnist_dir):
    images, y = P.load_images("mnist", tiny_mnist_dir, "train")   # 64 images: 4 steps an epoch
    model = P.GatedPixelCNN(channels=16, layers=3)
    x = P.binarise(images[:16], torch.Generator().manual_seed(0))
    before = P.evaluate(model, x, y[:16])["test_nll_nats"]
    model = P.train(model, images, y, 12, batch_size=16, lr=3e-3, bf16=True)
    assert P.evaluate(model, x, y[:16])["test_nll_nats"] < 0.7 * before


def test_a_non_finite_loss_stops_training_and_leaves_no_checkpoint(tiny_mnist_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(P, "nll_per_image", lambda logits, x: logits.sum(dim=(1, 2, 3, 4)) * math.nan)
    message = errors(["--data-dir", str(tiny_mnist_dir), "--out", str(tmp_path / "run"), "--steps", "3",
                      "--batch-size", "8", "--channels", "4", "--layers", "2", "--no-bf16"])
    assert "non-finite nll_nats" in message
    assert not (tmp_path / "run" / "model.pt").exists()


# ----------------------------------------------------------------------------- coding images into bits

def coding_model(levels=2, conditional=True, bias=None, seed=0, shape=(1, 6, 7)):
    torch.manual_seed(seed)
    model = P.GatedPixelCNN(shape, levels=levels, channels=6, layers=2, first_kernel=3,
                            num_classes=10 if conditional else 0)
    labelled(model, std=0.5)
    if bias is not None:
        with torch.no_grad():
            model.head[-1].weight.mul_(0.01)
            model.head[-1].bias.copy_(torch.tensor(bias))
    return model.eval()


CASES = {  # name: (levels, conditional, head bias, images)
    "random": (2, True, None, lambda s: torch.randint(0, 2, s)),
    "all zero": (2, True, None, lambda s: torch.zeros(s, dtype=torch.long)),
    "all one": (2, False, None, lambda s: torch.ones(s, dtype=torch.long)),
    # p(x_t = 1) ~ e^-60: the images below hold many "impossible" ones
    "p near 0 and 1": (2, True, [30.0, -30.0], lambda s: torch.randint(0, 2, s)),
    "grey levels": (4, False, None, lambda s: torch.randint(0, 4, s)),
}


@pytest.mark.parametrize("case", CASES)
def test_coder_round_trip_is_bit_exact_and_within_its_bound(case):
    """Catches: the probability clamp removed (a pixel the model calls impossible gets no
    interval), the last symbol not flushed, a future pixel leaking into the encoder's
    logits, and a coder that wastes bits (size checked against -log2 p and the bound)."""
    levels, conditional, bias, make = CASES[case]
    model = coding_model(levels, conditional, bias)
    x = make((5, 1, 6, 7))
    labels = torch.tensor([0, 3, 9, 3, 5]) if conditional else None
    measure = {"bits": 0.0}
    payload = P.encode_chunk(model, x, labels, measure)
    decoded, got_labels = P.decode_chunk(model, payload, len(x))
    assert torch.equal(decoded, x)
    assert got_labels is None if labels is None else torch.equal(got_labels, labels)
    nll_bits = P.nll_per_image(model(x, labels), x).sum().item() / math.log(2)
    assert measure["bits"] == pytest.approx(nll_bits, rel=1e-5, abs=1e-3)
    label_bits = 5 * math.log2(10) if conditional else 0.0
    assert 8 * len(payload) <= nll_bits + label_bits + P.coding_bound_bits(x.numel(), 1, levels, 5 * conditional)


def encoder_vs_decoder_logits(model, x, labels, pixels):
    with torch.no_grad(), P.threads(1):  # as the coder runs
        full = model(x, labels)[:, :, 0]                                # the encoder's
        for i, j in pixels:
            partial = x.clone()
            partial[:, :, i, j:] = 0
            partial[:, :, i + 1:] = 0
            decoder = P.pixel_logits(model, partial, labels, i, j)      # the decoder's
            assert torch.equal(decoder, full[:, :, i, j]), (i, j)


def test_one_pass_encoder_logits_equal_the_decoders_bit_for_bit_on_the_real_kernels():
    """The encoder reads every pixel's logits from one pass over whole images; the decoder
    computes pixel (i, j) from whole images decoded up to pixel j (the rest zero), at the
    same batch shape. On the default model's kernels the two must be equal bit for bit, or
    the frequencies would differ. Catches a future pixel leaking into the logits (mask A
    keeping the centre)."""
    model = labelled(P.GatedPixelCNN()).eval()
    x = torch.randint(0, 2, (3, 1, 28, 28))
    encoder_vs_decoder_logits(model, x, torch.tensor([2, 7, 7]),
                              [(i, j) for i in range(0, 28, 3) for j in range(i % 4, 28, 5)])


def test_decoder_logits_match_the_encoders_for_a_wider_model():
    """48 channels, 12 layers, a chunk of 16 images: here a decoder that crops the rows above
    (as the sampler does) moves logits by about 1e-6 against the one-pass encoder (the kernels
    sum in another order for another input height), and the archive would fail its checksum.
    Catches pixel_logits computing from a crop."""
    torch.manual_seed(0)
    model = P.GatedPixelCNN(channels=48, layers=12, num_classes=0).eval()
    encoder_vs_decoder_logits(model, torch.randint(0, 2, (16, 1, 28, 28)), None, [(14, 10), (27, 3)])


def test_coded_labels_are_counted_and_the_unconditional_stream_holds_none():
    """A conditional archive carries its labels (log2 10 bits each), so it decodes from
    the file alone; an unconditional one does not pay for them."""
    x = torch.zeros(20, 1, 2, 2, dtype=torch.long)  # p(0) ~ 1 - e^-16 per pixel: ~0 bits
    with_labels = P.encode_chunk(coding_model(bias=[8.0, -8.0], shape=(1, 2, 2)), x, torch.arange(20) % 10)
    assert len(with_labels) * 8 >= 20 * math.log2(10)
    without = P.encode_chunk(coding_model(conditional=False, bias=[8.0, -8.0], shape=(1, 2, 2)), x, None)
    assert len(without) <= 2


def test_coding_and_sampling_run_at_one_thread_and_give_the_callers_count_back():
    """Issue 27: the coder's floats must not depend on torch.set_num_threads, so every model
    pass of the encoder and decoder runs at one thread (sampling too: faster, measured), and
    the caller's count is restored after. Catches a pass outside threads(1)."""
    model, x = coding_model(conditional=False), torch.randint(0, 2, (3, 1, 6, 7))
    seen = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        P.decode_chunk(model, P.encode_chunk(model, x, None), 3)
        P.sample(model, 2)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert len(seen) == 1 + 2 * 42 and set(seen) == {1}


# ----------------------------------------------------------------------------- the command line

def smoke_flags(data_dir, *more):
    return ["--data-dir", str(data_dir), "--device", "cpu", "--num-samples", "10", "--test-limit", "8",
            "--steps", "2", "--batch-size", "8", "--channels", "8", "--layers", "2", *more]


def errors(argv):
    with pytest.raises(SystemExit) as e:
        P.main(argv)
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value), str(e.value)
    return str(e.value)


def test_cli_smoke_run_writes_every_output_and_sample_only_writes_beside_it(tiny_mnist_dir, tmp_path, capsys):
    """--sample-only with the default --out writes into <ckpt folder>/sample_only, never over the
    run (issue 26); another --seed scores the very same test images (catches the fixed
    binarisation following --seed); into a folder holding a model.pt it is refused."""
    out = tmp_path / "run"
    m = P.main(smoke_flags(tiny_mnist_dir, "--out", str(out)))
    for name in ("samples.png", "samples.npy", "sample_labels.npy", "model.pt", "metrics.json"):
        assert (out / name).stat().st_size > 0, name
    samples = np.load(out / "samples.npy")
    assert samples.shape == (10, 1, 28, 28) and samples.dtype == np.float32 and set(np.unique(samples)) <= {0, 1}
    assert np.load(out / "sample_labels.npy").tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == m and json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == m
    assert saved["steps"] == 2 and saved["test_images"] == 8 and saved["conditional"]
    assert {"train_seconds", "device", "test_nll_nats"} <= set(saved)
    assert saved["test_bits_per_dim"] * 784 * math.log(2) == pytest.approx(saved["test_nll_nats"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = P.main(["--sample-only", "--ckpt", str(out / "model.pt"), "--data-dir", str(tiny_mnist_dir),
                    "--test-limit", "8", "--num-samples", "10", "--seed", "7"])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert again["test_nll_nats"] == pytest.approx(m["test_nll_nats"], rel=1e-6) and again["steps"] == 0
    assert json.loads((out / "sample_only" / "metrics.json").read_text()) == again
    assert "model.pt" in errors(["--sample-only", "--ckpt", str(out / "model.pt"), "--out", str(out),
                                 "--data-dir", str(tiny_mnist_dir)])


@pytest.mark.parametrize("shape", [(40, 10, 12), (40, 1, 9, 16)])
def test_trains_on_a_users_images_of_another_size(tmp_path, shape):
    """Issue 26: the model takes H, W from the data, unlabelled data trains an unconditional
    model, and the samples come out at the data's size (a 32 x 32 patch drew 28 x 28)."""
    np.save(tmp_path / "mine.npy", np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
    out = tmp_path / "run"
    m = P.main(smoke_flags(tmp_path, "--data", str(tmp_path / "mine.npy"), "--out", str(out)))
    assert np.load(out / "samples.npy").shape == (10, 1, *shape[-2:])
    assert not m["conditional"] and not (out / "sample_labels.npy").exists() and m["test_images"] == 4
    again = P.main(["--sample-only", "--ckpt", str(out / "model.pt"), "--data", str(tmp_path / "mine.npy"),
                    "--num-samples", "3"])
    assert np.load(out / "sample_only" / "samples.npy").shape == (3, 1, *shape[-2:])
    assert again["test_nll_nats"] == pytest.approx(m["test_nll_nats"], rel=1e-6)


def test_unconditional_on_mnist_draws_no_class_rows(tiny_mnist_dir, tmp_path):
    m = P.main(smoke_flags(tiny_mnist_dir, "--unconditional", "--num-samples", "3", "--out", str(tmp_path)))
    assert not m["conditional"] and not (tmp_path / "sample_labels.npy").exists()
    assert P.load_checkpoint(tmp_path / "model.pt", lambda c: P.GatedPixelCNN(**c))[1]["num_classes"] == 0


def tiny_checkpoint(path, conditional=True, seed=0, shape=(1, 28, 28), channels=4):
    torch.manual_seed(seed)
    model = labelled(P.GatedPixelCNN(shape, channels=channels, layers=2, num_classes=10 if conditional else 0), 0.3)
    P.save_checkpoint(path, model.config, model.state_dict())
    return path


def test_cli_compress_then_decompress_a_range_and_refuse_another_checkpoint(tiny_mnist_dir, tmp_path):
    """The archive decodes from the file and the checkpoint alone (labels inside), its real
    size obeys the stated bound, and any other checkpoint is refused in one line."""
    ckpt = tiny_checkpoint(tmp_path / "model.pt")
    m = P.main(["--compress", "--ckpt", str(ckpt), "--data-dir", str(tiny_mnist_dir), "--test-limit", "12",
                "--chunk", "5"])
    archive = tmp_path / "compress" / P.ARCHIVE_NAME
    assert m["archive_bytes"] == archive.stat().st_size and m["test_images"] == 12
    assert m["test_coded_bits_per_image"] == pytest.approx(8 * m["archive_bytes"] / 12)
    assert 0 < m["overhead_bits_per_image"] <= m["overhead_bound_bits_per_image"]
    d = P.main(["--decompress", str(archive), "--ckpt", str(ckpt), "--image-range", "3:8"])
    assert d["decoded_images"] == 5 and d["image_range"] == [3, 8]
    images, _ = P.load_images("mnist", tiny_mnist_dir, "test")
    x = P.binarise(images, torch.Generator().manual_seed(P.TEST_BINARISATION_SEED))
    assert np.array_equal(np.load(tmp_path / "decompress" / "decoded.npy"), x[3:8].numpy())
    (tmp_path / "other").mkdir()
    other = tiny_checkpoint(tmp_path / "other" / "model.pt", seed=1)
    assert "another checkpoint" in errors(["--decompress", str(archive), "--ckpt", str(other)])


def test_an_archive_decodes_whatever_the_thread_count(tiny_mnist_dir, tmp_path):
    """Issue 27: written at 3 threads, read at 1, in two processes (OMP/MKL_NUM_THREADS), the archive
    decodes bit for bit: the fingerprint names no thread count and the coder fixes its own. (With
    the passes at the caller's count, one pixel's frequencies differ here and chunk 0 fails to
    decode; such flips are rare and kernel-specific: the sure guard is the one-thread spy above.)"""
    ckpt = tiny_checkpoint(tmp_path / "model.pt", conditional=False, channels=6)
    for threads, argv in (("3", ["--compress", "--data-dir", str(tiny_mnist_dir), "--test-limit", "5"]),
                          ("1", ["--decompress", str(tmp_path / "compress" / P.ARCHIVE_NAME)])):
        run = subprocess.run([sys.executable, str(ROOT / "pixelcnn.py"), *argv, "--ckpt", str(ckpt)],
                             env={**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-500:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["decoded_images"] == 5


def test_damaged_or_crafted_archives_are_refused_in_one_line(tmp_path, monkeypatch):
    """Every header field is checked before use, an archive of another machine's floats is
    refused before decoding and says what differs, and nothing is written on a refusal."""
    np.save(tmp_path / "small.npy", np.random.default_rng(0).integers(0, 256, (30, 6, 7), dtype=np.uint8))
    ckpt = tiny_checkpoint(tmp_path / "model.pt", conditional=False, shape=(1, 6, 7))
    P.main(["--compress", "--ckpt", str(ckpt), "--data", str(tmp_path / "small.npy"), "--chunk", "2"])
    blob = (tmp_path / "compress" / P.ARCHIVE_NAME).read_bytes()
    magic, sha, fingerprint, n, chunk = P.HEAD.unpack_from(blob)
    assert (n, chunk) == (3, 2)
    head, table, payload = P.HEAD.size, blob[P.HEAD.size:P.HEAD.size + 16], blob[P.HEAD.size + 16:]

    def craft(**fields):
        f = {"magic": magic, "sha": sha, "fingerprint": fingerprint, "n": n, "chunk": chunk, **fields}
        return P.HEAD.pack(*f.values()) + blob[head:]

    crafted = {"bad magic": craft(magic=b"JUNK"), "empty": b"", "short": blob[:50], "truncated": blob[:-1],
               "longer": blob + b"\0", "no images": craft(n=0), "too many": craft(n=2 ** 32 - 1),
               "chunk 0": craft(chunk=0), "one chunk": craft(chunk=3),
               "chunk over the limit": craft(n=20000, chunk=20000)[:head] + struct.pack(">II", len(payload), 0) + payload,
               "length": blob[:head] + bytes([table[0], table[1], table[2], (table[3] + 1) % 256]) + blob[head + 4:],
               "crc": blob[:head + 7] + bytes([table[7] ^ 1]) + table[8:] + payload,
               "payload flipped": blob[:-2] + bytes([blob[-2] ^ 0x40]) + blob[-1:],
               "other checkpoint": craft(sha=bytes(32))}
    for name, data in crafted.items():
        (tmp_path / "bad.pxc").write_bytes(data)
        msg = errors(["--decompress", str(tmp_path / "bad.pxc"), "--ckpt", str(ckpt), "--out", str(tmp_path / "no")])
        assert "bad.pxc" in msg, (name, msg)
        if name in ("truncated", "longer", "length"):  # caught by the byte counts, before decoding
            assert "truncated" in msg, msg
        if name in ("no images", "too many", "chunk 0", "chunk over the limit"):  # a batch of 20,000: refused
            assert "header is damaged" in msg, msg
        assert not (tmp_path / "no" / "decoded.npy").exists(), name
    monkeypatch.setattr(P, "decode_chunk", None)  # refused before any decoding
    (tmp_path / "bad.pxc").write_bytes(craft(fingerprint=b"torch 9.9, riscv64 VLEN"))
    msg = errors(["--decompress", str(tmp_path / "bad.pxc"), "--ckpt", str(ckpt), "--out", str(tmp_path / "no")])
    assert "coded under torch 9.9, riscv64 VLEN, this is " + P.FINGERPRINT in msg


def test_help_shows_every_default(monkeypatch):
    """Issue 26: --batch-size and --lr had no help string, so --help showed no default."""
    parsers, parse = [], argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda self, *a: parsers.append(self) or parse(self, *a))
    P.parse_args([])
    assert parsers[0].formatter_class is argparse.ArgumentDefaultsHelpFormatter
    assert all(action.help for action in parsers[0]._actions)


@pytest.mark.parametrize("argv", [
    ["--sample-only"], ["--temperature", "0"], ["--lr", "-1"], ["--lr", "nan"], ["--batch-size", "0"],
    ["--epochs", "0"], ["--steps", "-1"], ["--ema-decay", "1"], ["--test-limit", "-2"], ["--channels", "0"],
    ["--layers", "0"], ["--num-samples", "0"], ["--chunk", "0"], ["--compress"], ["--decompress", "a.pxc"],
    ["--compress", "--ckpt", "c", "--sample-only"], ["--image-range", "0:5"], ["--ckpt", "model.pt"],
    ["--decompress", "a", "--ckpt", "c", "--image-range", "5:2"],
    ["--decompress", "a", "--ckpt", "c", "--image-range", "a:b"],
    ["--compress", "--ckpt", "c", "--device", "cuda"],
    ["--chunk", "20000", "--compress", "--ckpt", "c"],          # one limit, checked when writing
    ["--sample-only", "--ckpt", "c", "--channels", "8"],        # the model is the checkpoint's
    ["--compress", "--ckpt", "c", "--unconditional"]])
def test_bad_flags_end_in_usage_and_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        P.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage:") and ": error: " in err[-1]
    assert sum(": error: " in line for line in err) == 1
    assert P.parse_args(["--chunk", str(P.MAX_CHUNK), "--compress", "--ckpt", "c"]).chunk == P.MAX_CHUNK


def test_bad_files_and_data_give_one_line_errors(tiny_mnist_dir, tmp_path):
    base = ["--data-dir", str(tiny_mnist_dir), "--steps", "1", "--channels", "4", "--layers", "2"]
    good = tiny_checkpoint(tmp_path / "good.pt")
    torch.save({"script": "vae", "model": {}, "config": {}}, tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "half.pt").write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    P.save_checkpoint(tmp_path / "misfit.pt", {**P.GatedPixelCNN(channels=4, layers=2).config, "layers": 3},
                      torch.load(good, weights_only=True)["model"])
    for name in ("other.pt", "junk.pt", "half.pt", "missing.pt", "misfit.pt"):
        assert "not a usable pixelcnn.py checkpoint" in errors(
            ["--sample-only", "--ckpt", str(tmp_path / name), "--data-dir", str(tiny_mnist_dir),
             "--out", str(tmp_path / "x")])
    assert "larger than the training set" in errors(base + ["--batch-size", "128", "--out", str(tmp_path / "y")])
    (tmp_path / "file").write_text("mine")
    errors(base + ["--out", str(tmp_path / "file")])
    assert (tmp_path / "file").read_text() == "mine"
    assert "MNIST not found" in errors(["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "z")])
    np.save(tmp_path / "rgb.npy", np.zeros((20, 3, 8, 8), np.uint8))
    assert "grey" in errors(base + ["--data", str(tmp_path / "rgb.npy"), "--out", str(tmp_path / "w")])
    np.save(tmp_path / "small.npy", np.zeros((20, 8, 8), np.uint8))  # a size the checkpoint was not made for
    assert "the model takes" in errors(["--sample-only", "--ckpt", str(good), "--data", str(tmp_path / "small.npy")])
