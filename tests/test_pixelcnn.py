"""Tests for pixelcnn.py: exact causality, no blind spot, conditioning, exact NLL,
sampling statistics, training, and the command line."""

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


@pytest.mark.parametrize("conditional,levels", [(True, 2), (False, 2), (True, 4)])
def test_causality_is_exact_and_there_is_no_blind_spot(conditional, levels):
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
    model = P.GatedPixelCNN(levels=2, channels=8, layers=4, num_classes=10).eval()
    x = torch.randint(0, 2, (3, 1, 28, 28)).float()
    y = torch.tensor([1, 5, 9])
    with torch.no_grad():
        full = model(x, y)
        for i in (model.rows_above, 20, 27):
            top = i - model.rows_above
            crop = model(x[:, :, top:i + 1], y)[:, :, -1]
            torch.testing.assert_close(crop, full[:, :, i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layers", [8, 20])
def test_activations_keep_a_sane_scale_at_init(mnist_dir, layers):
    """The residual is added once, so the horizontal stack does not blow up with
    depth (adding it twice grows it ~2^layers), and the initial NLL is near the
    784 ln 2 of a coin flip per pixel, not far above it."""
    model = P.GatedPixelCNN(levels=2, channels=32, layers=layers)
    u8, y = P.mnist_uint8(mnist_dir, "test")
    x = P.quantise(u8[:16], 2, generator=torch.Generator().manual_seed(0))
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
    for layer in cond.layers:
        torch.nn.init.normal_(layer.embed.weight, std=0.1)
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
    m = P.evaluate(model, x, torch.randint(0, 10, (30,)), "cpu", batch_size=7)
    assert m["test_nll_nats"] == pytest.approx(784 * math.log(levels), rel=1e-6)
    assert m["test_bits_per_dim"] == pytest.approx(math.log2(levels), rel=1e-6)


def test_quantise_binarises_with_the_pixel_intensity_as_probability():
    u8 = torch.tensor([0, 64, 191, 255], dtype=torch.uint8).view(1, 1, 1, 4).repeat(4000, 1, 1, 1)
    x = P.quantise(u8, 2, generator=torch.Generator().manual_seed(0)).float()
    np.testing.assert_allclose(x.mean(0).flatten().numpy(), [0, 64 / 255, 191 / 255, 1], atol=0.03)
    assert P.quantise(u8[:1], 4).flatten().tolist() == [0, 1, 2, 3]


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


def test_loss_falls_on_a_fixed_batch(mnist_dir):
    u8, y = P.mnist_uint8(mnist_dir, "test")
    x = P.quantise(u8[:16], 2, generator=torch.Generator().manual_seed(0))
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
    x = P.quantise(u8[:16], 2, generator=torch.Generator().manual_seed(0))
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


def test_cli_smoke_run_writes_every_output_and_sample_only_reloads(tiny_mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data-dir", str(tiny_mnist_dir), "--device", "cpu", "--num-samples", "10",
              "--test-limit", "8"]
    m = P.main(common + ["--out", str(out), "--steps", "2", "--batch-size", "8",
                         "--channels", "8", "--layers", "2"])
    for name in ("samples.png", "samples.npy", "model.pt", "metrics.json"):
        assert (out / name).is_file(), name
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = np.load(out / "samples.npy")
    assert samples.shape == (10, 1, 28, 28) and set(np.unique(samples)) <= {0.0, 1.0}
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == 2 and saved["test_images"] == 8 and saved["conditional"]
    assert saved["test_bits_per_dim"] * 784 * math.log(2) == pytest.approx(saved["test_nll_nats"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == saved == m
    # Reloading gives the same model on the same fixed test binarisation: the same NLL.
    again = P.main(common + ["--out", str(tmp_path / "again"), "--sample-only",
                             "--ckpt", str(out / "model.pt")])
    assert again["test_nll_nats"] == pytest.approx(m["test_nll_nats"], rel=1e-6)
    assert (tmp_path / "again" / "samples.png").is_file()


def test_cli_unconditional_grey_levels(tiny_mnist_dir, tmp_path):
    out = tmp_path / "grey"
    m = P.main(["--data-dir", str(tiny_mnist_dir), "--device", "cpu", "--out", str(out),
                "--steps", "1", "--batch-size", "4", "--channels", "4", "--layers", "2",
                "--levels", "4", "--unconditional", "--num-samples", "3", "--test-limit", "4",
                "--temperature", "0.8"])
    assert not m["conditional"] and m["levels"] == 4
    samples = np.load(out / "samples.npy")
    assert samples.shape == (3, 1, 28, 28)
    assert set(np.round(np.unique(samples) * 3, 5)) <= {0.0, 1.0, 2.0, 3.0}


def test_bad_input_gives_one_line_errors(tiny_mnist_dir, tmp_path, capsys):
    for argv in (["--sample-only"], ["--levels", "1"], ["--temperature", "0"]):
        with pytest.raises(SystemExit) as e:
            P.parse_args(argv)
        assert e.value.code == 2
    other = tmp_path / "other.pt"
    torch.save({"script": "vae", "model": {}, "config": {}}, other)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    for ckpt, words in ((other, "checkpoint of vae"), (junk, "not a readable checkpoint"),
                        (tmp_path / "missing.pt", "not found")):
        with pytest.raises(SystemExit) as e:
            P.main(["--data-dir", str(tiny_mnist_dir), "--sample-only", "--ckpt", str(ckpt),
                    "--out", str(tmp_path / "x")])
        assert str(e.value).startswith("error:") and words in str(e.value)
