"""Tests for pixelcnn.py: exact causality, no blind spot, conditioning, exact NLL,
the sampler against a naive one, training and resume, coding images into bits
(round trips, the bound, bit-identical encoder and decoder logits), and the command line."""

import json
import math

import numpy as np
import pytest
import torch

import pixelcnn as P


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
    out = model(x, labels.repeat(T) if labels is not None else None)  # (T, L, H, W)
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
            seen = g != 0
            expected = receptive_field(i, j, model.rows_above, H, W)
            assert torch.equal(seen, expected), f"pixel {(i, j)} channel {c}"


def test_plain_masking_would_leave_a_blind_spot_the_test_catches():
    """The receptive-field check can fail: cut the vertical stack's link and the
    pixels above disappear from the field."""
    model = P.GatedPixelCNN(levels=2, channels=8, layers=3, first_kernel=3, num_classes=0).double()
    for layer in model.layers:
        torch.nn.init.zeros_(layer.link.weight)
    grads = input_gradients(model, 2, 6, 6, None)
    i, j = 4, 2
    assert not torch.equal(grads[i * 6 + j, 0] != 0, receptive_field(i, j, model.rows_above, 6, 6))


def test_cropped_rows_give_the_same_logits_as_the_full_image():
    """What the sampler relies on: rows more than rows_above up cannot matter."""
    model = labelled(P.GatedPixelCNN(levels=2, channels=8, layers=4, num_classes=10)).eval()
    x = torch.randint(0, 2, (3, 1, 28, 28))
    y = torch.tensor([1, 5, 9])
    with torch.no_grad():
        full = model(P.to_input(x, 2), y)
        for i in (0, model.rows_above, 20, 27):
            torch.testing.assert_close(P.row_logits(model, x, y, i), full[:, :, i],
                                       atol=1e-5, rtol=1e-5)


def naive_sample(model, labels, size, seed):
    """The reference: the whole image through the network for every pixel, the pixel's
    own logits read from it, drawn with the same seeded generator as P.sample."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(len(labels), 1, *size, dtype=torch.long)
    with torch.no_grad():
        for i in range(size[0]):
            for j in range(size[1]):
                logits = model(P.to_input(x, model.levels), labels)[:, :, i, j]
                x[:, 0, i, j] = torch.multinomial(torch.softmax(logits, 1), 1, generator=gen)[:, 0]
    return x


def test_sampler_matches_a_naive_full_image_sampler():
    """Catches the sampler reading another pixel's logits (e.g. `[:, :, 0, j]`, the
    crop's top row): every logit it drew from must equal the full forward pass on the
    image it generated, and the samples must equal the naive sampler's."""
    size = (12, 10)  # rows > rows_above, so the crop really is cut
    model = labelled(P.GatedPixelCNN(levels=3, channels=8, layers=3, num_classes=10)).eval()
    with torch.no_grad():
        model.head[-1].bias.copy_(torch.tensor([0.5, 0.0, -0.5]))
    labels = torch.tensor([0, 4, 7, 9])
    x, seen = P.sample(model, labels, size=size, seed=3, verbose=False, return_logits=True)
    with torch.no_grad():
        full = model(P.to_input(x, 3), labels)
    assert (seen - full).abs().max() < 1e-5
    assert torch.equal(x, naive_sample(model, labels, size, seed=3))
    assert len(x.unique()) == 3  # every value occurs: a wrong row changes the draws


@pytest.mark.parametrize("layers", [8, 20])
def test_activations_keep_a_sane_scale_at_init(mnist_dir, layers):
    """The residual is added once, so the horizontal stack does not blow up with
    depth (adding it twice grows it ~2^layers), and the initial NLL is near the
    784 ln 2 of a coin flip per pixel, not far above it."""
    model = P.GatedPixelCNN(levels=2, channels=32, layers=layers)
    u8, y = P.mnist_uint8(mnist_dir, "test")
    x = P.quantise_pixels(u8[:16], 2, generator=torch.Generator().manual_seed(0))
    stds = []
    hooks = [layer.register_forward_hook(lambda m, i, o: stds.append(o[1].std().item()))
             for layer in model.layers]
    with torch.no_grad():
        logits = model(P.to_input(x, 2), y[:16])
    for h in hooks:
        h.remove()
    assert len(stds) == layers
    assert all(0.02 < s < 3.0 for s in stds), stds
    assert logits.std() < 1.0
    nll = P.nll_per_image(logits, x).mean().item()
    assert 0.5 * 784 * math.log(2) < nll < 1.25 * 784 * math.log(2)


def test_conditioning_changes_the_output_and_unconditional_ignores_it():
    x = torch.randint(0, 2, (2, 1, 12, 12)).float()
    cond = P.GatedPixelCNN(channels=8, layers=3, num_classes=10)
    # Zero label embeddings at init: the conditional model starts as an unconditional one.
    assert torch.equal(cond(x, torch.tensor([0, 1])), cond(x, torch.tensor([7, 7])))
    # Once the embeddings have moved (as training moves them) the label matters.
    labelled(cond)
    a, b = cond(x, torch.tensor([0, 1])), cond(x, torch.tensor([7, 7]))
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    uncond = P.GatedPixelCNN(channels=8, layers=3, num_classes=0)
    assert torch.equal(uncond(x, torch.tensor([0, 1])), uncond(x, torch.tensor([7, 7])))


@pytest.mark.parametrize("levels", [2, 4])
def test_nll_of_a_logit_zero_model_is_784_ln_levels(levels):
    model = P.GatedPixelCNN(levels=levels, channels=8, layers=2)
    torch.nn.init.zeros_(model.head[-1].weight)
    torch.nn.init.zeros_(model.head[-1].bias)
    x = torch.randint(0, levels, (30, 1, 28, 28))
    m = P.evaluate(model, x, torch.randint(0, 10, (30,)), torch.device("cpu"), batch_size=7)
    assert m["test_nll_nats"] == pytest.approx(784 * math.log(levels), rel=1e-6)
    assert m["test_bits_per_dim"] == pytest.approx(math.log2(levels), rel=1e-6)


def test_quantise_binarises_with_the_pixel_intensity_as_probability():
    u8 = torch.tensor([0, 64, 191, 255], dtype=torch.uint8).view(1, 1, 1, 4).repeat(4000, 1, 1, 1)
    x = P.quantise_pixels(u8, 2, generator=torch.Generator().manual_seed(0)).float()
    np.testing.assert_allclose(x.mean(0).flatten().numpy(), [0, 64 / 255, 191 / 255, 1], atol=0.03)
    assert P.quantise_pixels(u8[:1], 4).flatten().tolist() == [0, 1, 2, 3]


def test_the_fixed_test_binarisation_ignores_the_seed(mnist_dir):
    """Catches the test set's binarisation following --seed (the global generator or a
    generator seeded from it): two seeds, the same 10,000 binary images; a limited run
    scores a prefix of them."""
    u8, _ = P.mnist_uint8(mnist_dir, "test")
    P.seed_everything(1)
    a = P.fixed_test_set(u8, 2)
    P.seed_everything(2)
    b = P.fixed_test_set(u8, 2)
    assert torch.equal(a, b) and a.shape == (10000, 1, 28, 28)
    assert torch.equal(P.fixed_test_set(u8, 2, limit=100), a[:100])
    assert 0.1 < a.float().mean() < 0.2  # binary MNIST: about 13% of the pixels are on


def test_vae_and_pixelcnn_binarise_the_test_set_identically(mnist_dir):
    """The two likelihoods (and the coded sizes) are measured on the same bits."""
    import vae
    x, _ = vae.mnist_tensors(mnist_dir, "test")
    bits_vae = vae.fixed_test_set(x, "bernoulli")                      # (N, 784)
    bits_pixelcnn = P.fixed_test_set(P.mnist_uint8(mnist_dir, "test")[0], 2)
    assert torch.equal(bits_vae.reshape(-1, 784).long(), bits_pixelcnn.reshape(-1, 784))


def test_samples_have_the_right_shape_values_and_seed():
    model = P.GatedPixelCNN(levels=4, channels=4, layers=2)
    labels = torch.tensor([0, 5, 9])
    x = P.sample(model, labels, seed=1, verbose=False)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.long
    assert set(x.unique().tolist()) <= {0, 1, 2, 3}
    assert torch.equal(x, P.sample(model, labels, seed=1, verbose=False))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_first_pixel_frequency_matches_the_model_probability(temperature):
    model = P.GatedPixelCNN(levels=4, channels=4, layers=2)
    with torch.no_grad():
        model.head[-1].bias.copy_(torch.tensor([1.0, -0.5, 0.0, -1.5]))
        labels = torch.full((4000,), 3)
        # The first pixel sees only padding, so its distribution is the same for every image.
        p = torch.softmax(model(torch.zeros(1, 1, 1, 2), labels[:1])[0, :, 0, 0] / temperature, 0)
    x = P.sample(model, labels, size=(1, 2), temperature=temperature, seed=0, verbose=False)
    freq = torch.bincount(x[:, 0, 0, 0], minlength=4).double() / len(labels)
    sigma = (p * (1 - p) / len(labels)).sqrt()
    assert ((freq - p).abs() < 4 * sigma).all(), (freq, p)


# ----------------------------------------------------------------------------- coding images into bits

def coding_model(levels=2, conditional=True, bias=None, seed=0):
    torch.manual_seed(seed)
    model = P.GatedPixelCNN(levels=levels, channels=6, layers=2, first_kernel=3,
                            num_classes=10 if conditional else 0)
    labelled(model, std=0.5)
    if bias is not None:
        with torch.no_grad():
            model.head[-1].weight.mul_(0.01)
            model.head[-1].bias.copy_(torch.tensor(bias))
    return model.eval()


def round_trip(model, x, labels):
    measure = {"model_bits": 0.0, "quantised_bits": 0.0}
    payload = P.encode_chunk(model, x, labels, measure)
    decoded, got_labels = P.decode_chunk(model, payload, len(x), tuple(x.shape[2:]),
                                         labels is not None)
    assert torch.equal(decoded, x)
    if labels is not None:
        assert torch.equal(got_labels, labels)
    return payload, measure


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
    logits, and a coder that wastes bits (size checked against -log2 p)."""
    levels, conditional, bias, make = CASES[case]
    model = coding_model(levels, conditional, bias)
    x = make((5, 1, 6, 7))
    labels = torch.tensor([0, 3, 9, 3, 5]) if conditional else None
    payload, measure = round_trip(model, x, labels)
    nll_bits = P.nll_per_image(model(P.to_input(x, levels), labels), x).sum().item() / math.log(2)
    assert measure["model_bits"] == pytest.approx(nll_bits, rel=1e-5, abs=1e-3)
    label_bits = 5 * math.log2(10) if conditional else 0.0
    bits = 8 * len(payload)
    bound = P.coding_bound_bits(x.numel(), 1, levels, len(x) if conditional else 0)
    assert bits <= measure["model_bits"] + label_bits + bound
    assert bits >= measure["quantised_bits"] + label_bits - 8  # no symbol left out


def encoder_vs_decoder_logits(model, x, labels, pixels):
    with torch.no_grad():
        full = model(P.to_input(x, 2), labels)                       # the encoder's
        for i, j in pixels:
            partial = x.clone()
            partial[:, :, i, j:] = 0
            partial[:, :, i + 1:] = 0
            decoder = P.pixel_logits(model, partial, labels, i, j)   # the decoder's
            assert torch.equal(decoder, full[:, :, i, j]), (i, j)


def test_one_pass_encoder_logits_equal_the_decoders_bit_for_bit_on_the_real_kernels():
    """The encoder reads every pixel's logits from one pass over whole images; the
    decoder computes pixel (i, j) from whole images decoded up to pixel j (the rest
    zero), at the same batch shape. On the default model's kernels the two must be
    equal bit for bit, or the frequencies would differ. Catches a future pixel leaking
    into the logits (mask A keeping the centre)."""
    model = labelled(P.build_model({"levels": 2, "channels": 32, "layers": 8,
                                    "unconditional": False})).eval()
    x = torch.randint(0, 2, (3, 1, 28, 28))
    encoder_vs_decoder_logits(model, x, torch.tensor([2, 7, 7]),
                              [(i, j) for i in range(28) for j in range(28)])


def test_decoder_logits_match_the_encoders_for_a_wider_model_and_a_full_chunk():
    """48 channels, 12 layers, a chunk of 100 images: here a decoder that crops the rows
    above (row_logits) moves logits by about 1e-6 against the one-pass encoder (the
    kernels sum in another order for another input height), and the archive fails its
    checksum. Catches decode_chunk computing logits from a crop."""
    torch.manual_seed(0)
    model = P.build_model({"levels": 2, "channels": 48, "layers": 12, "unconditional": True}).eval()
    x = torch.randint(0, 2, (100, 1, 28, 28))
    encoder_vs_decoder_logits(model, x, None, [(10, 14), (14, 10), (20, 20), (27, 27), (27, 3)])


def test_coded_labels_are_counted_and_the_unconditional_stream_holds_none():
    """A conditional archive carries its labels (log2 10 bits each), so it decodes from
    the file alone; an unconditional one does not pay for them."""
    x = torch.zeros(20, 1, 2, 2, dtype=torch.long)  # p(0) ~ 1 - e^-16 per pixel: ~0 bits
    with_labels = P.encode_chunk(coding_model(bias=[8.0, -8.0]), x, torch.arange(20) % 10)
    assert len(with_labels) * 8 >= 20 * math.log2(10)
    without = P.encode_chunk(coding_model(conditional=False, bias=[8.0, -8.0]), x, None)
    assert len(without) <= 2


# ----------------------------------------------------------------------------- training

def test_loss_falls_on_a_fixed_batch(mnist_dir):
    u8, y = P.mnist_uint8(mnist_dir, "test")
    x = P.quantise_pixels(u8[:16], 2, generator=torch.Generator().manual_seed(0))
    model = P.GatedPixelCNN(levels=2, channels=16, layers=4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = P.nll_per_image(model(P.to_input(x, 2), y[:16]), x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_cosine_lr_runs_from_one_to_zero():
    assert P.cosine_lr(0, 100) == 1.0 and P.cosine_lr(50, 100) == pytest.approx(0.5)
    assert P.cosine_lr(100, 100) == pytest.approx(0.0, abs=1e-12)
    assert P.cosine_lr(0, 100, warmup=10) == pytest.approx(0.1)


def test_weight_average_follows_its_warm_up_formula(mnist_dir):
    """One step with --ema-decay: d_0 = min(decay, 1/10) = 0.1, so the averaged
    weights are 0.1 w_0 + 0.9 w_1 (mostly the trained weights, not the random start)."""
    u8, y = P.mnist_uint8(mnist_dir, "test")
    args = P.parse_args(["--steps", "1", "--batch-size", "8", "--ema-decay", "0.999",
                         "--precision", "fp32"])
    P.seed_everything(0)
    model = P.GatedPixelCNN(levels=2, channels=8, layers=2)
    w0 = [w.detach().clone() for w in model.parameters()]
    average, steps, first = P.train(model, u8[:8], y[:8], args, torch.device("cpu"))
    assert steps == 1 and first == 0 and average is not model
    moved = 0
    for a, w, start in zip(average.parameters(), model.parameters(), w0):
        torch.testing.assert_close(a, 0.1 * start + 0.9 * w.detach())
        moved += int(not torch.equal(w, start))
    assert moved > 0  # the step did change the weights, so the check above has teeth


def test_bf16_training_lowers_the_loss_and_each_epoch_is_logged_and_saved(
        tiny_mnist_dir, tmp_path, capsys):
    u8, y = P.mnist_uint8(tiny_mnist_dir, "train")   # 64 images: 4 steps per epoch
    args = P.parse_args(["--epochs", "3", "--batch-size", "16", "--lr", "3e-3",
                         "--precision", "bf16"])
    P.seed_everything(0)
    model = P.GatedPixelCNN(levels=2, channels=16, layers=3)
    x = P.quantise_pixels(u8[:16], 2, generator=torch.Generator().manual_seed(0))
    monitor = (x, y[:16])
    before = P.evaluate(model, *monitor, torch.device("cpu"), show_progress=False)
    model, steps, _ = P.train(model, u8, y, args, torch.device("cpu"), monitor, tmp_path)
    after = P.evaluate(model, *monitor, torch.device("cpu"), show_progress=False)
    assert steps == 12
    assert after["test_nll_nats"] < 0.7 * before["test_nll_nats"], (before, after)
    logged = [l for l in capsys.readouterr().out.splitlines() if l.startswith("epoch ")]
    assert [l.split(":")[0] for l in logged] == ["epoch 1", "epoch 2"]  # not after the last
    assert P.load_checkpoint(tmp_path / "model.pt")["config"]["epochs"] == 3


class Stop(Exception):
    pass


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(
        tiny_mnist_dir, tmp_path, monkeypatch):
    """Stop in the middle of epoch 2, resume from the state saved after epoch 1 in a
    'new process' (other seed, fresh random model): every weight, and the average,
    must come out bit-identical -- Adam's moments, the cosine schedule's position,
    the EMA and the data order and binarisation (random-number state) all restored."""
    u8, y = P.mnist_uint8(tiny_mnist_dir, "train")   # 64 images: 4 steps per epoch
    args = P.parse_args(["--epochs", "3", "--batch-size", "16", "--ema-decay", "0.9",
                         "--precision", "fp32", "--channels", "8", "--layers", "3"])
    cpu = torch.device("cpu")

    def fresh(seed):
        P.seed_everything(seed)
        return P.build_model(vars(args))

    straight, steps, _ = P.train(fresh(0), u8, y, args, cpu, out=tmp_path / "a")
    assert steps == 12 and not (tmp_path / "a" / "train_state.pt").exists()

    real_update = P.Progress.update

    def stop_in_epoch_two(self, count, *rest, **kw):
        if count == 6:
            raise Stop
        return real_update(self, count, *rest, **kw)

    monkeypatch.setattr(P.Progress, "update", stop_in_epoch_two)
    with pytest.raises(Stop):
        P.train(fresh(0), u8, y, args, cpu, out=tmp_path / "b")
    monkeypatch.setattr(P.Progress, "update", real_update)
    assert P.load_checkpoint(tmp_path / "b" / "train_state.pt")["step"] == 4

    resumed, steps, first = P.train(fresh(1), u8, y, args, cpu, out=tmp_path / "b", resume=True)
    assert (steps, first) == (12, 4)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)

    # A resume with other settings than the stopped run is refused in one line.
    P.train(fresh(0), u8, y, args, cpu, out=tmp_path / "c", monitor=None)
    other = P.parse_args(["--epochs", "3", "--batch-size", "16", "--ema-decay", "0.9",
                          "--precision", "fp32", "--channels", "8", "--layers", "3",
                          "--lr", "1e-3"])
    monkeypatch.setattr(P.Progress, "update", stop_in_epoch_two)
    with pytest.raises(Stop):
        P.train(fresh(0), u8, y, args, cpu, out=tmp_path / "d")
    with pytest.raises(P.RunError, match="--lr"):
        P.train(fresh(0), u8, y, other, cpu, out=tmp_path / "d", resume=True)
    with pytest.raises(P.RunError, match="not found"):
        P.train(fresh(0), u8, y, args, cpu, out=tmp_path / "c", resume=True)


def test_a_non_finite_loss_stops_training_and_leaves_no_checkpoint(
        tiny_mnist_dir, tmp_path, monkeypatch):
    """The loss is read on the host only every CHECK_EVERY steps and at the end; a NaN
    must still stop the run before model.pt is written (catches a check dropped with
    the per-step .item())."""
    monkeypatch.setattr(P, "nll_per_image", lambda logits, x: logits.sum(dim=(1, 2, 3)) * math.nan)
    with pytest.raises(SystemExit) as e:
        P.main(["--data-dir", str(tiny_mnist_dir), "--out", str(tmp_path / "run"), "--steps", "3",
                "--batch-size", "8", "--channels", "4", "--layers", "2", "--precision", "fp32"])
    assert "error: non-finite nll" in str(e.value)
    assert not (tmp_path / "run" / "model.pt").exists()


# ----------------------------------------------------------------------------- the command line

def smoke_flags(data_dir):
    return ["--data-dir", str(data_dir), "--device", "cpu", "--num-samples", "10",
            "--test-limit", "8", "--steps", "2"]


def test_cli_smoke_run_writes_every_output_and_sample_only_reloads(tiny_mnist_dir, tmp_path, capsys):
    """Also: the judge's figures are in metrics.json, and another --seed scores the very
    same test images (catches the fixed binarisation following --seed)."""
    out = tmp_path / "run"
    m = P.main(smoke_flags(tiny_mnist_dir) + ["--out", str(out), "--batch-size", "8",
                                              "--channels", "8", "--layers", "2"])
    for name in ("samples.png", "samples.npy", "model.pt", "metrics.json"):
        assert (out / name).is_file(), name
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = np.load(out / "samples.npy")
    assert samples.shape == (10, 1, 28, 28) and set(np.unique(samples)) <= {0.0, 1.0}
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == 2 and saved["test_images"] == 8 and saved["conditional"]
    assert saved["precision"] in ("bf16", "fp32")
    assert saved["test_bits_per_dim"] * 784 * math.log(2) == pytest.approx(saved["test_nll_nats"])
    assert {"sample_fd", "sample_score", "sample_label_match", "judge_n"} <= set(saved)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == saved == m
    # Reloading gives the same model on the same fixed test binarisation, whatever the seed.
    again = P.main(smoke_flags(tiny_mnist_dir) + ["--out", str(tmp_path / "again"), "--seed", "7",
                                                  "--sample-only", "--ckpt", str(out / "model.pt")])
    assert again["test_set_sha256"] == m["test_set_sha256"]
    assert again["test_nll_nats"] == pytest.approx(m["test_nll_nats"], rel=1e-6)
    assert (tmp_path / "again" / "samples.png").is_file()
    assert json.loads((tmp_path / "again" / "eval_metrics.json").read_text()) == again
    assert not (tmp_path / "again" / "metrics.json").exists()


def test_cli_unconditional_grey_levels(tiny_mnist_dir, tmp_path):
    out = tmp_path / "grey"
    m = P.main(["--data-dir", str(tiny_mnist_dir), "--device", "cpu", "--out", str(out),
                "--steps", "1", "--batch-size", "4", "--channels", "4", "--layers", "2",
                "--levels", "4", "--unconditional", "--num-samples", "3", "--test-limit", "4",
                "--temperature", "0.8"])
    assert not m["conditional"] and m["levels"] == 4 and "sample_label_match" not in m
    samples = np.load(out / "samples.npy")
    assert samples.shape == (3, 1, 28, 28)
    assert set(np.round(np.unique(samples) * 3, 5)) <= {0.0, 1.0, 2.0, 3.0}


def tiny_checkpoint(path, conditional=True, seed=0):
    args = P.parse_args(["--channels", "4", "--layers", "2"] + ([] if conditional else ["--unconditional"]))
    torch.manual_seed(seed)
    model = labelled(P.build_model(vars(args)), std=0.3)
    P.save_checkpoint(path, model.state_dict(), vars(args))
    return path


def errors(argv):
    with pytest.raises(SystemExit) as e:
        P.main(argv)
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)
    return str(e.value)


def test_cli_compress_then_decompress_a_range_and_refuse_another_checkpoint(tiny_mnist_dir, tmp_path):
    """The archive decodes from the file and the checkpoint alone (labels inside), its
    real size obeys the stated bound, and any other checkpoint is refused in one line."""
    ckpt = tiny_checkpoint(tmp_path / "model.pt")
    m = P.main(["--compress", "--ckpt", str(ckpt), "--data-dir", str(tiny_mnist_dir),
                "--out", str(tmp_path / "code"), "--test-limit", "12", "--chunk", "5"])
    archive = tmp_path / "code" / P.ARCHIVE_NAME
    assert m["archive_bytes"] == archive.stat().st_size and m["test_images"] == 12
    assert m["test_coded_bits_per_image"] == pytest.approx(8 * m["archive_bytes"] / 12)
    assert m["test_coded_bits_per_dim"] == pytest.approx(m["test_coded_bits_per_image"] / 784)
    assert 0 < m["overhead_bits_per_image"] <= m["overhead_bound_bits_per_image"]
    assert m["test_nll_bits_per_image"] == pytest.approx(m["model_bits_per_image"], rel=1e-5)
    assert {"zlib_9_bits_per_image", "xz_9e_bits_per_image", "png_1bit_bits_per_image"} <= set(m)
    d = P.main(["--decompress", str(archive), "--ckpt", str(ckpt), "--data-dir", str(tiny_mnist_dir),
                "--out", str(tmp_path / "decoded"), "--image-range", "3:8"])
    assert d["identical_to_test_set"] and d["decoded_images"] == 5
    x = P.fixed_test_set(P.mnist_uint8(tiny_mnist_dir, "test")[0], 2)
    decoded = np.load(tmp_path / "decoded" / "decoded.npy")
    assert np.array_equal(decoded, x[3:8].numpy())
    other = tiny_checkpoint(tmp_path / "other.pt", seed=1)
    assert "only the model that coded it" in errors(
        ["--decompress", str(archive), "--ckpt", str(other), "--out", str(tmp_path / "x")])


def test_damaged_or_crafted_archives_are_refused_in_one_line(tmp_path):
    """Every header value is checked before use; nothing is written on a refusal."""
    ckpt = tiny_checkpoint(tmp_path / "model.pt", conditional=False)
    model, _, sha = P.load_model(ckpt, torch.device("cpu"))
    x = torch.zeros(3, 1, 28, 28, dtype=torch.long)
    good = {"checkpoint_sha256": sha, "levels": 2, "height": 28, "width": 28, "images": 3,
            "first_image": 0, "chunk": 3, "conditional": False, "coder_k": P.CODER_K,
            "state_bits": 32, "chunk_bytes": [0], "chunk_crc32": [P.images_crc(x, None)],
            "fingerprint": P.fingerprint()}
    payload = P.encode_chunk(model, x, None)
    good["chunk_bytes"] = [len(payload)]
    blob = P.pack_archive(good, [payload])
    (tmp_path / "good.pxc").write_bytes(blob)
    assert P.main(["--decompress", str(tmp_path / "good.pxc"), "--ckpt", str(ckpt),
                   "--out", str(tmp_path / "ok")])["decoded_images"] == 3
    crafted = {"bad magic": b"JUNK" + blob[4:], "version": blob[:4] + b"\x07" + blob[5:],
               "header crc": blob[:20] + bytes([blob[20] ^ 1]) + blob[21:],
               "truncated": blob[:-1], "empty": b""}
    for key, value in (("images", 10 ** 9), ("images", "3"), ("levels", 1), ("chunk", 0),
                       ("conditional", 1), ("chunk_bytes", [len(payload), 0]),
                       ("chunk_crc32", [-1]), ("coder_k", 24), ("checkpoint_sha256", "ab")):
        crafted[f"{key}={value!r}"] = P.pack_archive({**good, key: value}, [payload])
    crafted["payload flipped"] = blob[:-2] + bytes([blob[-2] ^ 0x40]) + blob[-1:]
    for name, data in crafted.items():
        path = tmp_path / "bad.pxc"
        path.write_bytes(data)
        msg = errors(["--decompress", str(path), "--ckpt", str(ckpt), "--out", str(tmp_path / "no")])
        assert "bad.pxc" in msg, (name, msg)
        if name == "truncated":  # caught by the header's byte counts, before any decoding
            assert "the file holds" in msg or "'chunk_bytes'" in msg, msg
        assert not (tmp_path / "no" / "decoded.npy").exists(), name


@pytest.mark.parametrize("argv", [
    ["--sample-only"], ["--levels", "1"], ["--levels", "300"], ["--temperature", "0"],
    ["--lr", "-1"], ["--lr", "nan"], ["--batch-size", "0"], ["--epochs", "0"], ["--steps", "-1"],
    ["--ema-decay", "1"], ["--test-limit", "-2"], ["--monitor", "-1"], ["--channels", "0"],
    ["--layers", "0"], ["--num-samples", "0"], ["--chunk", "0"], ["--precision", "fp16"],
    ["--compress"], ["--decompress", "a.pxc"], ["--compress", "--ckpt", "c", "--sample-only"],
    ["--resume", "--sample-only", "--ckpt", "c"], ["--image-range", "0:5"],
    ["--decompress", "a", "--ckpt", "c", "--image-range", "5:2"],
    ["--decompress", "a", "--ckpt", "c", "--image-range", "a:b"],
    ["--compress", "--ckpt", "c", "--device", "cuda"]])
def test_bad_flags_end_in_usage_and_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        P.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage:") and ": error: " in err[-1]
    assert sum(": error: " in line for line in err) == 1


def test_bad_files_and_states_give_one_line_errors(tiny_mnist_dir, tmp_path):
    base = ["--data-dir", str(tiny_mnist_dir), "--steps", "1", "--channels", "4", "--layers", "2"]
    other = tmp_path / "other.pt"
    torch.save({"script": "vae", "model": {}, "config": {}}, other)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    broken = tmp_path / "broken.pt"
    P.save_checkpoint(broken, {}, {"levels": "two", "channels": 4, "layers": 2, "unconditional": False})
    misfit = tmp_path / "misfit.pt"
    P.save_checkpoint(misfit, {"w": torch.zeros(1)}, {"levels": 2, "channels": 4, "layers": 2,
                                                       "unconditional": False})
    for ckpt, words in ((other, "checkpoint of vae"), (junk, "not a readable checkpoint"),
                        (tmp_path / "missing.pt", "not found"), (broken, "'levels'"),
                        (misfit, "do not fit")):
        assert words in errors(base + ["--sample-only", "--ckpt", str(ckpt), "--out", str(tmp_path / "x")])
    assert "larger than the training set" in errors(base + ["--batch-size", "128", "--out", str(tmp_path / "y")])
    (tmp_path / "file").write_text("")
    assert "is a file" in errors(base + ["--out", str(tmp_path / "file")])
    assert "not found" in errors(base + ["--resume", "--out", str(tmp_path / "fresh")])
