"""Tests for lfq.py: the sign quantiser, its index convention, the entropy loss
against brute force, the causal prior, and the command line."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

import lfq


# ----------------------------------------------------------------------------- quantiser

@pytest.mark.parametrize("d", [1, 2, 5, 8])
def test_index_code_bijection_for_every_code(d):
    index = torch.arange(2 ** d)
    codes = lfq.index_to_code(index, d)                      # (K, d)
    assert set(codes.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(lfq.code_to_index(codes), index)      # index -> code -> index
    assert len({tuple(c) for c in codes.tolist()}) == 2 ** d  # all 2^d codes are distinct
    # The stated convention: index = sum_i 2^i [c_i > 0], bit 0 = channel 0.
    for i, c in zip(index.tolist(), codes.tolist()):
        assert i == sum(2 ** j for j, cj in enumerate(c) if cj > 0)


def test_quantize_is_exactly_pm1_and_straight_through():
    z = torch.randn(4, 6, 7, 7, dtype=torch.float64)
    z[0, 0, 0, :3] = torch.tensor([0.0, 1e-30, -1e-30], dtype=torch.float64)
    z.requires_grad_(True)
    q = lfq.quantize(z)
    assert torch.equal(q.detach(), torch.where(z > 0, 1.0, -1.0).double())  # exactly +-1, sign(0) = -1
    g = torch.randn_like(z)
    (q * g).sum().backward()
    assert torch.equal(z.grad, g)  # the gradient reaching z is the one that arrived at q(z)
    # And the token index follows the same sign convention as q.
    idx = lfq.code_to_index(z.detach().permute(0, 2, 3, 1))
    assert torch.equal(lfq.index_to_code(idx, 6), q.detach().permute(0, 2, 3, 1).float())


# ----------------------------------------------------------------------------- entropy loss

def brute_force_entropies(z, tau, group_bits):
    """Loop over codes: p(c|z) from explicit distances -||z - c||^2 / tau, per group."""
    n, d = z.shape
    per_sample, batch = 0.0, 0.0
    for g0 in range(0, d, group_bits):
        codes = list(itertools.product([-1.0, 1.0], repeat=group_bits))
        p = np.zeros((n, len(codes)))
        for k, c in enumerate(codes):
            p[:, k] = np.exp(-((z[:, g0:g0 + group_bits] - np.array(c)) ** 2).sum(1) / tau)
        p /= p.sum(1, keepdims=True)
        per_sample += -(p * np.log(p)).sum(1).mean()
        avg = p.mean(0)
        batch += -(avg * np.log(avg)).sum()
    return per_sample, batch


@pytest.mark.parametrize("group_bits", [4, 2, 1])
def test_entropy_terms_match_brute_force(group_bits):
    z = torch.randn(7, 4, dtype=torch.float64)
    per_sample, batch = lfq.entropy_terms(z, 0.7, group_bits)
    ps_ref, b_ref = brute_force_entropies(z.numpy(), 0.7, group_bits)
    assert per_sample.item() == pytest.approx(ps_ref, rel=1e-10)
    assert batch.item() == pytest.approx(b_ref, rel=1e-10)


def test_batch_entropy_maximal_for_uniform_use_and_per_sample_zero_when_confident():
    d = 5
    z = 3.0 * lfq.index_to_code(torch.arange(2 ** d), d).double()  # every code once, far from 0
    per_sample, batch = lfq.entropy_terms(z, 0.1, d)
    assert batch.item() == pytest.approx(d * math.log(2), abs=1e-9)  # the maximum, log 2^d
    assert per_sample.item() < 1e-9
    # A batch that collapses onto one code has (near) zero batch entropy...
    per_sample, batch = lfq.entropy_terms(z[:1].repeat(32, 1), 0.1, d)
    assert batch.item() < 1e-9
    # ...and latents at the origin are maximally unsure: H = d ln 2 each.
    per_sample, batch = lfq.entropy_terms(torch.zeros(3, d, dtype=torch.float64), 0.1, d)
    assert per_sample.item() == pytest.approx(d * math.log(2))
    # No random batch beats the uniform one.
    assert lfq.entropy_terms(torch.randn(64, d, dtype=torch.float64), 1.0, d)[1] < d * math.log(2)


def test_exact_and_per_bit_forms_agree_per_sample_and_per_bit_bounds_batch():
    torch.manual_seed(1)
    z = torch.randn(40, 6, dtype=torch.float64)
    z[:, 1] = z[:, 0] + 0.1 * z[:, 1]  # correlated bits: where the two batch terms differ
    exact = lfq.entropy_terms(z, 0.5, 6)
    groups = lfq.entropy_terms(z, 0.5, 3)
    per_bit = lfq.entropy_terms(z, 0.5, 1)
    # The softmax over 2^d codes factorises over bits: the per-sample entropy is the same.
    assert per_bit[0].item() == pytest.approx(exact[0].item(), rel=1e-12)
    assert groups[0].item() == pytest.approx(exact[0].item(), rel=1e-12)
    # Sum of marginal entropies >= joint entropy, strictly here (correlated bits).
    assert per_bit[1].item() >= groups[1].item() >= exact[1].item()
    assert per_bit[1].item() > exact[1].item() + 0.05


@pytest.mark.parametrize("d", [10, 16])
def test_exact_batch_entropy_from_two_halves_equals_the_full_softmax(d):
    """For d > 8 the batch entropy is computed from P_low^T P_high, never building the
    (N, 2^d) table. It must equal, in value and in gradient, the entropy of the batch
    average of the full softmax over all 2^d codes, also when the bits are correlated
    across the two halves (where a sum of two half entropies would be too high)."""
    torch.manual_seed(2)
    z = torch.randn(24, d, dtype=torch.float64)
    z[:, d - 1] = z[:, 0] + 0.2 * z[:, d - 1]  # a low bit and a high bit move together
    z.requires_grad_(True)
    codes = lfq.index_to_code(torch.arange(2 ** d), d).double()           # (2^d, d)
    dist = torch.cdist(z, codes, compute_mode="donot_use_mm_for_euclid_dist") ** 2  # (N, 2^d)
    p = torch.softmax(-dist / 0.8, -1)  # the full softmax, from explicit distances
    p_avg = p.mean(0)
    reference = -(p_avg * p_avg.log()).sum()
    (g_ref,) = torch.autograd.grad(reference, z)
    per_sample, batch = lfq.entropy_terms(z, 0.8, d)
    (g,) = torch.autograd.grad(batch, z)
    assert batch.item() == pytest.approx(reference.item(), rel=1e-10)
    assert torch.allclose(g, g_ref, rtol=1e-8, atol=1e-12)
    assert per_sample.item() == pytest.approx(-(p * p.log()).sum(1).mean().item(), rel=1e-10)
    # The half-by-half sum is an upper bound, strictly above here (correlated halves).
    halves = lfq.entropy_terms(z.detach(), 0.8, d // 2)[1]
    assert halves.item() > batch.item() + 0.01


def test_entropy_form_choice():
    def group(*argv):
        return lfq.entropy_group_bits(lfq.parse_args(list(argv)))
    assert group("--bits", "10") == 10                        # exact, all 1,024 codes
    assert group("--bits", "16") == 16                        # exact, all 65,536 codes
    assert group("--bits", "18") == 6 and group("--bits", "20") == 5  # groups of <= 8 bits
    assert group("--bits", "16", "--entropy", "groups") == 8
    assert group("--bits", "16", "--entropy", "per-bit") == 1
    assert group("--bits", "6", "--entropy", "groups") == 6
    assert group("--bits", "20", "--entropy", "exact") == 20


def test_lfq_loss_returns_every_term():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 28, 28)
    model = lfq.Tokenizer(bits=4, width=16)
    x_hat, z, q = model(x)
    t = lfq.lfq_loss(x_hat, x, z, q, tau=1.0, gamma=0.5)
    assert set(t) == {"recon", "commit", "per_sample", "batch", "entropy"}
    assert t["entropy"].item() == pytest.approx((t["per_sample"] - 0.5 * t["batch"]).item())
    assert t["recon"].item() == pytest.approx((x_hat - x).pow(2).mean().item())
    # Commitment is zero exactly when z sits on a corner of the cube.
    on_corner = lfq.lfq_loss(x_hat, x, q.detach(), q, tau=1.0)
    assert on_corner["commit"].item() == 0.0


# ----------------------------------------------------------------------------- FSQ, the sibling

@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (3, 4), (7, 6, 3)])
def test_fsq_index_code_bijection_on_an_even_grid(levels):
    K = math.prod(levels)
    index = torch.arange(K)
    codes = lfq.fsq_index_to_code(index, levels)                      # (K, d)
    assert torch.equal(lfq.fsq_code_to_index(codes, levels), index)
    assert len({tuple(c) for c in codes.tolist()}) == K               # K distinct codes
    for i, L in enumerate(levels):                                    # channel i: L levels,
        values = np.array(sorted(set(codes[:, i].tolist())))          # -1 upwards in steps
        assert len(values) == L and values[0] == -1.0 and values[-1] <= 1.0  # of 1 / floor(L/2)
        np.testing.assert_allclose(np.diff(values), 1 / (L // 2))
    # Channel 0 is the least significant digit: index 1 differs from index 0 there only.
    assert torch.nonzero(codes[1] != codes[0]).flatten().tolist() == [0]


def test_fsq_quantize_reaches_every_level_and_passes_the_bound_gradient():
    levels = (8, 5, 4, 3)
    z = torch.linspace(-8, 8, 4001, dtype=torch.float64).view(1, 1, -1, 1).repeat(1, 4, 1, 1)
    z.requires_grad_(True)
    q = lfq.fsq_quantize(z, levels)                                   # (1, 4, N, 1)
    codes = q.detach()[0, :, :, 0].T                                  # (N, 4)
    for i, L in enumerate(levels):
        assert codes[:, i].unique().numel() == L                      # every level is reached
    # The values are exactly the grid that the index functions decode to.
    assert torch.equal(lfq.fsq_index_to_code(lfq.fsq_code_to_index(codes, levels), levels).double(),
                       codes)
    assert torch.all(lfq.fsq_quantize(torch.zeros(1, 4, 1, 1), levels) == 0)  # 0 -> level 0
    # Straight-through rounding: the gradient is the bound's, never the zero of round().
    g = torch.rand_like(z) + 0.5
    (q * g).sum().backward()
    assert torch.all(z.grad > 0)
    for i, L in enumerate(levels):
        if L % 2:  # odd L: no offset, bound = tanh(z) (L - 1)(1 - eps) / 2, divided by (L - 1) / 2
            expected = g[0, i] * (1 - torch.tanh(z.detach()[0, i]) ** 2) * (1 - 1e-3)
            torch.testing.assert_close(z.grad[0, i], expected)


# ----------------------------------------------------------------------------- prior

@pytest.mark.parametrize("head", ["softmax", "bits"])
def test_prior_is_causal(head):
    prior = lfq.Prior(bits=5, n_tokens=49, dim=32, layers=2, head=head)
    prior.eval()
    codes = lfq.index_to_code(torch.randint(0, 32, (2, 49)), 5).requires_grad_(True)
    y = torch.tensor([3, 7])
    for t in (0, 1, 20, 48):
        codes.grad = None
        prior(codes, y)[:, t].sum().backward()
        grad = codes.grad.abs().sum((0, 2))  # (T,)
        assert torch.all(grad[t:] == 0), f"output {t} depends on tokens >= {t}"
        assert torch.all(grad[:t] > 0), f"output {t} ignores some earlier token"


@pytest.mark.parametrize("head", ["softmax", "bits"])
def test_prior_is_a_normalised_distribution(head):
    """sum over all 2^d one-token sequences of p(t | y) = 1: the nll and the index
    convention of the head agree (for the bits head the product of Bernoullis)."""
    prior = lfq.Prior(bits=4, n_tokens=1, dim=16, layers=1, head=head)
    index = torch.arange(16).view(16, 1)
    for label in (0, 9):
        nll = prior.nll(index, torch.full((16,), label))
        assert torch.exp(-nll).sum().item() == pytest.approx(1.0, abs=1e-5)


def test_prior_sampling_shapes_both_heads():
    for bits in (6, 14):  # softmax head, factorised bits head
        prior = lfq.Prior(bits=bits, dim=16, layers=1)
        index = prior.sample(torch.arange(3), 49, generator=torch.Generator().manual_seed(0))
        assert index.shape == (3, 49) and index.min() >= 0 and index.max() < 2 ** bits
    assert prior.head_kind == "bits"


# ----------------------------------------------------------------------------- training

def test_losses_fall_on_a_fixed_batch(mnist_dir):
    torch.manual_seed(0)
    x = lfq.mnist_tensors(mnist_dir, "test")[0][:32]
    model = lfq.Tokenizer(bits=6, width=16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        x_hat, z, q = model(x)
        t = lfq.lfq_loss(x_hat, x, z, q)
        loss = t["recon"] + 0.25 * t["commit"] + 0.1 * t["entropy"]
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first

    prior = lfq.Prior(bits=6, dim=32, layers=1)
    tokens, y = model.tokens(x).detach(), torch.arange(32) % 10
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    nll0 = prior.nll(tokens, y).mean().item()
    for _ in range(30):
        nll = prior.nll(tokens, y).mean()
        opt.zero_grad()
        nll.backward()
        opt.step()
    assert nll.item() < 0.8 * nll0


# ----------------------------------------------------------------------------- command line

SMALL = ["--steps", "3", "--batch-size", "16", "--width", "16", "--prior-dim", "32",
         "--prior-layers", "1", "--num-samples", "4", "--test-limit", "32"]


def test_cli_smoke_run_writes_every_output_and_sample_only_reloads(tiny_mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    metrics = lfq.main(["--data-dir", str(tiny_mnist_dir), "--out", str(out), "--bits", "6"] + SMALL)
    for name in ("model.pt", "metrics.json", "samples.png", "samples.npy", "recon.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == saved
    assert saved["steps_stage1"] == 3 and saved["steps_stage2"] == 3
    assert saved["bits_per_image"] == 49 * 6 and saved["codebook_size"] == 64
    assert 0 < saved["codebook_usage"] <= 1 and 1 <= saved["codebook_perplexity"] <= 64
    assert saved["test_prior_nll_bits"] > 0
    samples = np.load(out / "samples.npy")
    assert samples.shape == (4, 1, 28, 28) and samples.min() >= 0 and samples.max() <= 1

    again = lfq.main(["--data-dir", str(tiny_mnist_dir), "--out", str(tmp_path / "again"),
                      "--sample-only", "--ckpt", str(out / "model.pt")] + SMALL)
    assert again["test_recon_mse"] == pytest.approx(saved["test_recon_mse"], rel=1e-5)
    assert again["test_prior_nll_bits"] == pytest.approx(saved["test_prior_nll_bits"], rel=1e-5)
    assert (tmp_path / "again" / "samples.png").is_file()


def test_stage_one_only_run(tiny_mnist_dir, tmp_path):
    out = tmp_path / "s1"
    m = lfq.main(["--data-dir", str(tiny_mnist_dir), "--out", str(out), "--bits", "16",
                  "--prior-epochs", "0"] + SMALL)
    assert m["codebook_size"] == 2 ** 16 and m["steps_stage2"] == 0
    assert "test_prior_nll_bits" not in m and (out / "recon.png").is_file()


def test_cli_fsq_run_and_reload(tiny_mnist_dir, tmp_path):
    out = tmp_path / "fsq"
    m = lfq.main(["--data-dir", str(tiny_mnist_dir), "--out", str(out), "--quantizer", "fsq",
                  "--bits", "8"] + SMALL)
    assert m["quantizer"] == "fsq" and m["levels"] == [8, 6, 5] and m["codebook_size"] == 240
    assert m["bits_per_image"] == pytest.approx(49 * math.log2(240), abs=0.01)
    assert 0 < m["codes_used"] <= 240 and m["test_prior_nll_bits"] > 0
    assert np.load(out / "samples.npy").shape == (4, 1, 28, 28)
    again = lfq.main(["--data-dir", str(tiny_mnist_dir), "--out", str(tmp_path / "again"),
                      "--sample-only", "--ckpt", str(out / "model.pt")] + SMALL)
    assert again["test_recon_mse"] == pytest.approx(m["test_recon_mse"], rel=1e-5)
    assert again["codebook_size"] == 240


@pytest.mark.parametrize("argv", [["--quantizer", "fsq", "--bits", "11"],
                                  ["--quantizer", "fsq", "--levels", "2,5"],
                                  ["--quantizer", "fsq", "--levels", "8,x"],
                                  ["--levels", "8,5,5,5"],
                                  ["--quantizer", "fsq", "--bits", "16"]])  # prior over 64,000
def test_bad_fsq_flags_are_refused(argv):
    with pytest.raises(SystemExit) as e:
        lfq.parse_args(argv)
    assert e.value.code == 2


def test_bad_input_gives_one_line_errors(tmp_path, tiny_mnist_dir):
    with pytest.raises(SystemExit) as e:
        lfq.main(["--sample-only", "--ckpt", str(tmp_path / "missing.pt"),
                  "--data-dir", str(tiny_mnist_dir)])
    assert "not found" in str(e.value.code)
    foreign = tmp_path / "other.pt"
    torch.save({"script": "vqvae", "model": {}, "config": {}}, foreign)
    with pytest.raises(SystemExit) as e:
        lfq.main(["--sample-only", "--ckpt", str(foreign), "--data-dir", str(tiny_mnist_dir)])
    assert "not of lfq.py" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        lfq.parse_args(["--bits", "0"])
    assert e.value.code == 2
