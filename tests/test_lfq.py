"""Tests for lfq.py: the sign quantiser, its index convention and straight-through gradient,
the entropy loss against brute force, FSQ, the token prior and its sampler, forward() on
images of any size, and the command line with its outputs and errors."""

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


@pytest.mark.parametrize("levels", [None, (8, 5, 5, 5)])
def test_straight_through_gradient_from_the_reconstruction_term_alone(levels):
    """Catches the straight-through estimator removed (z_q = sign(z_e), or FSQ's plain
    round): the encoder would get no gradient from the reconstruction, only from the
    commitment and entropy terms. From recon alone, dL/dz_e must be dL/dz_q (LFQ), or
    dL/dz_q times the derivative of FSQ's bound, and reach the encoder's weights."""
    torch.manual_seed(0)
    model = lfq.Tokenizer(bits=4, width=8, levels=levels).double()
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    z_e = model.encoder(x)
    z_q = model.quantize(z_e)
    recon = (model.decoder(z_q) - x).pow(2).mean()
    g_e, g_q = torch.autograd.grad(recon, (z_e, z_q))
    assert g_q.abs().sum() > 0
    if levels is None:
        assert torch.equal(g_e, g_q)
    else:  # z_q = round(bound(z_e)) / floor(L/2), d bound / dz = half (1 - tanh^2(z + shift))
        L = torch.tensor(levels, dtype=torch.float64).view(1, -1, 1, 1)
        half = (L - 1) * (1 - 1e-3) / 2
        shift = torch.atanh(0.5 * (L % 2 == 0) / half)
        slope = half * (1 - torch.tanh(z_e.detach() + shift) ** 2) / (L // 2)
        torch.testing.assert_close(g_e, g_q * slope)
    model(x)[1]["recon"].backward()  # the same through forward()
    assert model.encoder[0].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- entropy loss

def brute_force_entropies(z, tau, groups):
    """Loop over codes: p(c|z) from explicit distances -||z - c||^2 / tau, per group of bits."""
    n, d = z.shape
    per_sample, batch, g0 = 0.0, 0.0, 0
    for g in groups:
        codes = list(itertools.product([-1.0, 1.0], repeat=g))
        p = np.zeros((n, len(codes)))
        for k, c in enumerate(codes):
            p[:, k] = np.exp(-((z[:, g0:g0 + g] - np.array(c)) ** 2).sum(1) / tau)
        p /= p.sum(1, keepdims=True)
        per_sample += -(p * np.log(p)).sum(1).mean()
        avg = p.mean(0)
        batch += -(avg * np.log(avg)).sum()
        g0 += g
    return per_sample, batch


@pytest.mark.parametrize("groups", [(4,), (2, 2), (1, 1, 1, 1), (3, 1), (1, 3)])
def test_entropy_terms_match_brute_force(groups):
    """Also groups of unequal size, in either order (catches wrong group offsets)."""
    z = torch.randn(7, 4, dtype=torch.float64)
    z[:, 3] = z[:, 0] + 0.3 * z[:, 3]  # correlated bits, so (3, 1) and (1, 3) differ
    per_sample, batch = lfq.entropy_terms(z, 0.7, groups)
    ps_ref, b_ref = brute_force_entropies(z.numpy(), 0.7, groups)
    assert per_sample.item() == pytest.approx(ps_ref, rel=1e-10)
    assert batch.item() == pytest.approx(b_ref, rel=1e-10)
    if len(set(groups)) == 1:  # one size: the int form means the same
        assert lfq.entropy_terms(z, 0.7, groups[0])[1].item() == pytest.approx(b_ref, rel=1e-10)


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


@pytest.mark.parametrize("d", [10, 17])
def test_exact_batch_entropy_from_two_halves_equals_the_full_softmax(d):
    """For d > 8 the batch entropy is computed from P_low^T P_high, never building the
    (N, 2^d) table. It must equal, in value and in gradient, the entropy of the batch
    average of the full softmax over all 2^d codes, also when the bits are correlated
    across the two halves (where a sum of two half entropies would be too high), and for
    odd d, whose halves have 8 and 9 bits."""
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
    per_sample, batch = lfq.entropy_terms(z, 0.8, (d,))
    (g,) = torch.autograd.grad(batch, z)
    assert batch.item() == pytest.approx(reference.item(), rel=1e-10)
    assert torch.allclose(g, g_ref, rtol=1e-8, atol=1e-12)
    assert per_sample.item() == pytest.approx(-(p * p.log()).sum(1).mean().item(), rel=1e-10)
    # The half-by-half sum is an upper bound, strictly above here (correlated halves).
    halves = lfq.entropy_terms(z.detach(), 0.8, (d // 2, d - d // 2))[1]
    assert halves.item() > batch.item() + 0.01


def test_entropy_form_choice_never_falls_back_to_per_bit():
    """Catches `--entropy auto` (and groups) falling back to the per-bit form when d has
    no divisor between 2 and 8 (d = 11, 13, 17, 19, 23): auto is exact up to d = 20, and
    above, and for `groups`, the bits go into the fewest groups of <= 8, as equal as
    possible (23 = 8 + 8 + 7)."""
    group = lfq.entropy_group_bits
    for d in (10, 16, 17, 19, 20):
        assert group(d) == (d,)                               # exact over all 2^d codes
    assert group(21) == (7, 7, 7) and group(22) == (8, 7, 7)
    assert group(23) == (8, 8, 7) and group(24) == (8, 8, 8)
    assert group(16, "groups") == (8, 8) and group(6, "groups") == (6,)
    assert group(13, "groups") == (7, 6) and group(17, "groups") == (6, 6, 5)
    assert group(16, "per-bit") == (1,) * 16 and group(20, "exact") == (20,)
    for d in range(1, 25):
        for form in ("auto", "groups"):
            g = group(d, form)
            assert sum(g) == d and max(g) - min(g) <= 1
            assert len(g) == (1 if form == "auto" and d <= 20 else -(-d // 8))


def capture_z_e(model):
    """z_e of the next forward(), kept with its gradient."""
    seen = {}

    def hook(module, inputs, output):
        output.retain_grad()
        seen["z_e"] = output
    model.encoder.register_forward_hook(hook)
    return seen


@pytest.mark.parametrize("shape", [(2, 1, 28, 28), (3, 3, 8, 12)])
def test_forward_returns_the_reconstruction_and_every_term(shape):
    """forward on (B, C, H, W): x_hat of the same shape and each term, checked against its
    formula: recon per pixel, commit = mean (z_e - sign z_e)^2 with its gradient through z_e
    only (catches a missing sg[z_q]: then commit's gradient vanishes), the entropies of
    entropy_terms over the tokens' rows; stage_one_loss adds them with the signs of the
    docstring (catches a flipped sign on either entropy)."""
    torch.manual_seed(0)
    x = torch.rand(shape, dtype=torch.float64)
    model = lfq.Tokenizer(bits=4, width=16, channels=shape[1]).double()
    seen = capture_z_e(model)
    x_hat, t = model(x, tau=0.7, groups=(4,))
    z_e = seen["z_e"]
    assert x_hat.shape == x.shape and set(t) == {"recon", "commit", "per_sample", "batch"}
    assert z_e.shape == (shape[0], 4, shape[2] // 4, shape[3] // 4)
    torch.testing.assert_close(t["recon"], (x_hat - x).pow(2).mean())
    s = torch.where(z_e > 0, 1.0, -1.0).double()
    torch.testing.assert_close(t["commit"], (z_e - s).pow(2).mean())
    rows = z_e.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    per_sample, batch = lfq.entropy_terms(rows, 0.7, 4)
    torch.testing.assert_close(t["per_sample"], per_sample)
    torch.testing.assert_close(t["batch"], batch)
    t["commit"].backward(retain_graph=True)
    torch.testing.assert_close(z_e.grad, 2 * (z_e - s).detach() / z_e.numel())
    loss = lfq.stage_one_loss(t, beta=0.3, entropy_weight=0.7, gamma=0.5)
    expected = t["recon"] + 0.3 * t["commit"] + 0.7 * (t["per_sample"] - 0.5 * t["batch"])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    # FSQ: the reconstruction is the whole loss.
    fsq = lfq.Tokenizer(bits=4, width=16, levels=(5, 3), channels=shape[1]).double()
    x_hat, t = fsq(x)
    assert x_hat.shape == x.shape and set(t) == {"recon"} and lfq.stage_one_loss(t) is t["recon"]


def test_entropy_terms_pull_the_right_way():
    """The signs of L_ent, by their gradients: minimising it makes each latent surer (the
    per-sample entropy falls) and the batch more spread (the batch entropy rises). Catches
    a sign flipped in stage_one_loss, which the value check alone reads the same way."""
    torch.manual_seed(1)
    z = (0.3 * torch.randn(64, 3, dtype=torch.float64) + 0.2).requires_grad_(True)
    before = lfq.entropy_terms(z.detach(), 1.0, 3)
    terms = dict(zip(("per_sample", "batch"), lfq.entropy_terms(z, 1.0, 3)), recon=torch.zeros(()),
                 commit=torch.zeros(()))
    lfq.stage_one_loss(terms, beta=0.0, entropy_weight=1.0, gamma=1.0).backward()
    after = lfq.entropy_terms(z.detach() - 0.05 * z.grad, 1.0, 3)
    assert after[0] < before[0] and after[1] > before[1]


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


def test_fsq_levels_are_a_buffer_not_rebuilt_per_call(monkeypatch):
    """Catches FSQ's level tensor built from the Python tuple at every call (a host-to-device
    copy per step on a GPU): the tokenizer holds it as a buffer that moves with the model
    and stays out of the checkpoint, and quantising, indexing and decoding build none."""
    model = lfq.Tokenizer(bits=10, width=8, levels=(8, 5, 5, 5))
    assert "fsq_levels" in dict(model.named_buffers()) and "fsq_levels" not in model.state_dict()
    x = torch.rand(2, 1, 28, 28)
    expected = lfq.fsq_quantize(model.encoder(x), (8, 5, 5, 5))

    as_tensor = torch.as_tensor

    def no_tensor(*args, **kwargs):
        raise AssertionError("torch.tensor called inside the tokenizer")

    def only_from_tensors(data, *args, **kwargs):
        assert isinstance(data, torch.Tensor), "a tensor built from Python data inside the tokenizer"
        return as_tensor(data, *args, **kwargs)
    monkeypatch.setattr(torch, "tensor", no_tensor)
    monkeypatch.setattr(torch, "as_tensor", only_from_tensors)
    with torch.no_grad():
        z_q = model.quantize(model.encoder(x))
        tokens = model.encode(x)
        model.decode_tokens(tokens)
    assert torch.equal(z_q, expected) and tokens.shape == (2, 7, 7)


@pytest.mark.parametrize("levels", [None, (8, 5, 5, 5)])
def test_tokens_carry_the_whole_code_and_evaluation_counts_them(levels):
    """Catches an index convention that the decoder side reads differently from the encoder
    side (decode_tokens(encode(x)) must be exactly the decoder applied to z_q), and
    evaluation figures computed from anything but those tokens, reconstructions and the
    prior's NLL of every test image (in batches that do not divide N)."""
    torch.manual_seed(0)
    model = lfq.Tokenizer(bits=6, width=8, levels=levels).eval()
    prior = lfq.TokenPrior(model.codebook_size, 49, 10, width=16, layers=1, heads=2, levels=levels)
    x, y = torch.rand(20, 1, 28, 28), torch.arange(20) % 10
    with torch.no_grad():
        model.decoder[-1].bias.fill_(0.5)  # outputs inside (0, 1): no clamp hides a difference
        x_hat = model(x)[0].clamp(0, 1)
        tokens = model.encode(x)                                                    # (N, 7, 7)
        torch.testing.assert_close(model.decode_tokens(tokens), x_hat, rtol=0, atol=1e-6)
        nll = lfq.prior_nll(prior.eval(), tokens.flatten(1), y).item()
    metrics, test_tokens = lfq.evaluate(model, prior, x, y, "cpu", batch_size=6)
    assert torch.equal(test_tokens, tokens)
    assert metrics["test_recon_mse"] == pytest.approx((x_hat - x).pow(2).mean().item(), rel=1e-5)
    assert metrics["test_prior_nll_bits"] == pytest.approx(nll * 49 / math.log(2), rel=1e-5)
    counts = np.bincount(tokens.flatten().numpy(), minlength=model.codebook_size)
    p = counts[counts > 0] / counts.sum()
    assert metrics["codes_used"] == (counts > 0).sum() and metrics["codebook_size"] == len(counts)
    assert metrics["codebook_perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))


# ----------------------------------------------------------------------------- prior

def peaked_prior(codebook_size, seq_len=4, scale=8.0, levels=None):
    """A tiny fp32 prior whose outputs are far from uniform and differ between positions."""
    torch.manual_seed(3)
    prior = lfq.TokenPrior(codebook_size, seq_len, 10, width=16, layers=1, heads=2, levels=levels)
    with torch.no_grad():
        prior.head.weight.mul_(scale)
        prior.pos_emb.normal_()
    return prior.eval()


@pytest.mark.parametrize("K", [16, 1024])
def test_prior_is_causal(K):
    """Output t depends on tokens < t only: changing tokens >= t leaves it exactly as it was,
    changing token t - 1 changes it."""
    prior = lfq.TokenPrior(K, 12, 10, width=16, layers=2, heads=2).eval()
    tokens = torch.randint(0, K, (2, 12))
    y = torch.tensor([3, 7])
    with torch.no_grad():
        base = prior(tokens, y)
        for t in (1, 5, 11):
            later = tokens.clone()
            later[:, t:] = torch.randint(0, K, later[:, t:].shape)
            assert torch.equal(prior(later, y)[:, :t], base[:, :t]), f"output < {t} sees tokens >= {t}"
            earlier = tokens.clone()
            earlier[:, t - 1] = (earlier[:, t - 1] + 1) % K
            assert not torch.allclose(prior(earlier, y)[:, t], base[:, t])


@pytest.mark.parametrize("levels", [None, (5, 4, 3)])
def test_prior_reads_each_token_by_the_code_the_decoder_gets(levels):
    """The prior's input for token z is code(z), exactly the d numbers decode_tokens gives the
    decoder (LFQ: d = log2 K bits; FSQ: one number per channel). Catches FSQ tokens read as
    bits (only 2^d of them distinct) or LFQ tokens read with the wrong number of bits."""
    model = lfq.Tokenizer(bits=6, width=8, levels=levels)
    K = model.codebook_size
    prior = lfq.TokenPrior(K, 2, 10, width=16, layers=1, heads=2, levels=levels)
    seen = {}
    prior.tok_emb.register_forward_hook(lambda module, inputs, output: seen.update(code=inputs[0]))
    tokens = torch.stack([torch.arange(K), torch.zeros(K, dtype=torch.long)], 1)  # (K, 2)
    with torch.no_grad():
        prior(tokens, torch.zeros(K, dtype=torch.long))
    assert torch.equal(seen["code"][:, 0], model.to_code(torch.arange(K)))      # (K, d)
    assert len({tuple(c) for c in seen["code"][:, 0].tolist()}) == K


@pytest.mark.parametrize("K,levels", [(16, None), (60, (5, 4, 3))])
def test_prior_is_a_normalised_distribution(K, levels):
    """sum over all K one-token sequences of p(token | y) = 1, and prior_nll is the mean
    of -log p: the head and the token's code agree (for FSQ, a softmax over prod L_i codes)."""
    prior = lfq.TokenPrior(K, 1, 10, width=16, layers=1, heads=2, levels=levels).eval()
    tokens = torch.arange(K).view(K, 1)
    for label in (0, 9):
        y = torch.full((K,), label)
        with torch.no_grad():
            logits = prior(tokens, y)                                  # (K, 1, K)
            logp = logits.log_softmax(-1)[torch.arange(K), 0, tokens[:, 0]]
            assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-4)
            assert lfq.prior_nll(prior, tokens, y).item() == pytest.approx(-logp.mean().item(), rel=1e-5)
            # Token by token too (a mean over all K codes cannot see bits read the wrong way round).
            assert lfq.prior_nll(prior, tokens[:3], y[:3]).item() == pytest.approx(-logp[:3].mean().item(), rel=1e-5)


def reference_sampler(prior, labels, generator, temperature=1.0):
    """Naive ancestral sampling: at every step the full T-token sequence (placeholders at
    >= t) goes through the prior and output t gives the distribution of token t."""
    tokens = torch.zeros(len(labels), prior.seq_len, dtype=torch.long)
    for t in range(prior.seq_len):
        logits = prior(tokens, labels)[:, t] / temperature
        tokens[:, t] = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
    return tokens


@pytest.mark.parametrize("K", [16, 1024])
def test_sampler_equals_a_full_recompute_reference(K):
    """Catches a sampler reading the wrong output (position 0, or t - 1) or feeding the
    wrong token back: same seeded generator, same samples as the naive reference; the
    logits of the generated sequence at t are those the sampler drew token t from."""
    prior = peaked_prior(K, seq_len=10)
    y = torch.arange(6) % 10
    with torch.no_grad():
        fast = lfq.sample_tokens(prior, y, 0.9, generator=torch.Generator().manual_seed(5))
        slow = reference_sampler(prior, y, torch.Generator().manual_seed(5), 0.9)
        assert torch.equal(fast, slow)
        full = prior(fast, y)
        for t in range(prior.seq_len):
            torch.testing.assert_close(prior(fast[:, :t + 1], y)[:, t], full[:, t], rtol=0, atol=1e-5)
    assert fast.min() >= 0 and fast.max() < K


@pytest.mark.parametrize("K,levels", [(8, None), (60, (5, 4, 3))])
def test_sampled_token_frequencies_follow_the_prior(K, levels):
    """Catches the sampler reading output position 0 at every step: after a fixed
    two-token prefix, the frequencies of token 2 over 4,000 draws match the prior's
    softmax at position 2, and differ from output 0's, so the test can tell them apart."""
    prior = peaked_prior(K, seq_len=3, levels=levels)
    n = 4000
    prefix = torch.tensor([[K - 1, 2]]).repeat(n, 1)
    y = torch.full((n,), 4)
    with torch.no_grad():
        tokens = lfq.sample_tokens(prior, y, generator=torch.Generator().manual_seed(0), prefix=prefix)
        logits = prior(tokens[:1], y[:1])[0]                          # (T, K)
    assert torch.equal(tokens[:, :2], prefix)
    observed = torch.bincount(tokens[:, 2], minlength=K).double() / n
    expected, at_0 = logits[2].softmax(-1).double(), logits[0].softmax(-1).double()
    assert (expected - at_0).abs().max() > 0.15                       # position 0 is distinguishable
    sd = (expected * (1 - expected) / n).sqrt()
    assert torch.all((observed - expected).abs() <= 4.5 * sd + 1e-3)


def test_draw_samples_asks_each_class_and_restores_the_thread_count():
    """Samples (n, C, H, W) in [0, 1] with labels 0..9 repeated (none asked of an unconditional
    prior), drawn at one thread; the caller's thread setting is restored afterwards."""
    model = lfq.Tokenizer(bits=4, width=8, channels=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        samples, labels = lfq.draw_samples(model, peaked_prior(16, seq_len=6), 12, (2, 3), chunk=5)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert samples.shape == (12, 3, 8, 12) and samples.min() >= 0 and samples.max() <= 1
    assert torch.equal(labels, torch.arange(12) % 10)
    unconditional = lfq.TokenPrior(16, 6, 0, width=16, layers=1, heads=2)
    assert torch.equal(lfq.draw_samples(model, unconditional, 3, (2, 3))[1], torch.zeros(3, dtype=torch.long))


# ----------------------------------------------------------------------------- training

def test_losses_fall_on_a_fixed_batch(tiny_mnist_dir):
    torch.manual_seed(0)
    x = lfq.load_images("mnist", tiny_mnist_dir, "test")[0]  # 32 real digits
    model = lfq.Tokenizer(bits=6, width=16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss = lfq.stage_one_loss(model(x, 1.0, (6,))[1], 0.25, 0.1, 1.0)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first

    prior = lfq.TokenPrior(64, 49, 10, width=32, layers=1, heads=4)
    tokens, y = model.encode(x).detach().flatten(1), torch.arange(32) % 10
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    nll0 = lfq.prior_nll(prior, tokens, y).item()
    for _ in range(30):
        nll = lfq.prior_nll(prior, tokens, y)
        opt.zero_grad()
        nll.backward()
        opt.step()
    assert nll.item() < 0.8 * nll0


# ----------------------------------------------------------------------------- command line

SMALL = ["--steps", "3", "--batch-size", "16", "--width", "16", "--prior-width", "32",
         "--prior-layers", "1", "--num-samples", "4", "--test-limit", "32"]


def test_cli_smoke_run_writes_every_output_and_sample_only_reloads(tiny_mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    metrics = lfq.main(["--data-dir", str(tiny_mnist_dir), "--out", str(out), "--bits", "6"] + SMALL)
    saved = json.loads((out / "metrics.json").read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == saved == metrics
    assert saved["steps"] == 6 and saved["steps_stage1"] == 3 and saved["steps_stage2"] == 3
    assert saved["bits_per_image"] == 49 * 6 and saved["codebook_size"] == 64
    assert 0 < saved["codebook_usage"] <= 1 and 1 <= saved["codebook_perplexity"] <= 64
    assert saved["test_prior_nll_bits"] > 0 and saved["train_seconds"] >= 0 and saved["device"] == "cpu"
    for name in ("model.pt", "samples.png", "recon.png"):
        assert (out / name).is_file(), name
    samples, recon = np.load(out / "samples.npy"), np.load(out / "recon.npy")
    assert samples.shape == (4, 1, 28, 28) and samples.dtype == np.float32
    assert samples.min() >= 0 and samples.max() <= 1
    assert np.array_equal(np.load(out / "sample_labels.npy"), np.arange(4))
    assert recon.shape == (32, 1, 28, 28) and recon.min() >= 0 and recon.max() <= 1

    # --sample-only writes beside the training run (sample_only/), never over it.
    again = lfq.main(["--data-dir", str(tiny_mnist_dir), "--sample-only", "--ckpt", str(out / "model.pt"),
                      "--num-samples", "4", "--test-limit", "32"])
    assert again["test_recon_mse"] == pytest.approx(saved["test_recon_mse"], rel=1e-5)
    assert again["test_prior_nll_bits"] == pytest.approx(saved["test_prior_nll_bits"], rel=1e-5)
    assert np.array_equal(np.load(out / "sample_only" / "samples.npy"), samples)  # same seed, same samples
    assert np.array_equal(np.load(out / "sample_only" / "recon.npy"), recon)
    assert json.loads((out / "metrics.json").read_text()) == saved
    before = (out / "samples.npy").read_bytes()
    says = one_line_error(["--data-dir", str(tiny_mnist_dir), "--sample-only", "--ckpt", str(out / "model.pt"),
                           "--out", str(out)])
    assert "model.pt" in says and (out / "samples.npy").read_bytes() == before


def test_recon_grid_takes_any_number_of_test_images(tiny_mnist_dir, tmp_path):
    """lfq.py --test-limit 50 crashed after training (a grid of 64 // 16 rows of 16 cut
    from 50 images): any --test-limit from 17 to 63 that is not a multiple of 16."""
    out = tmp_path / "t20"
    m = lfq.main(["--data-dir", str(tiny_mnist_dir), "--out", str(out), "--bits", "6", "--prior-epochs", "0"]
                 + SMALL[:-2] + ["--test-limit", "20"])
    assert m["test_images"] == 20 and (out / "metrics.json").is_file() and (out / "recon.png").is_file()
    assert np.load(out / "recon.npy").shape == (20, 1, 28, 28)


def test_stage_one_only_run_with_an_odd_number_of_bits(tiny_mnist_dir, tmp_path):
    out = tmp_path / "s1"
    m = lfq.main(["--data-dir", str(tiny_mnist_dir), "--out", str(out), "--bits", "17",
                  "--prior-epochs", "0"] + SMALL)
    assert m["codebook_size"] == 2 ** 17 and m["steps_stage2"] == 0 and (out / "recon.npy").is_file()
    assert "test_prior_nll_bits" not in m and not (out / "samples.png").exists()


def test_cli_fsq_run_and_reload(tiny_mnist_dir, tmp_path):
    out = tmp_path / "fsq"
    m = lfq.main(["--data-dir", str(tiny_mnist_dir), "--out", str(out), "--quantizer", "fsq",
                  "--bits", "8"] + SMALL)
    assert m["quantizer"] == "fsq" and m["levels"] == [8, 6, 5] and m["codebook_size"] == 240
    assert m["bits_per_image"] == pytest.approx(49 * math.log2(240), abs=0.01)
    assert 0 < m["codes_used"] <= 240 and m["test_prior_nll_bits"] > 0
    assert np.load(out / "samples.npy").shape == (4, 1, 28, 28)
    again = lfq.main(["--data-dir", str(tiny_mnist_dir), "--out", str(tmp_path / "again"),
                      "--sample-only", "--ckpt", str(out / "model.pt")] + SMALL[-4:])
    assert again["test_recon_mse"] == pytest.approx(m["test_recon_mse"], rel=1e-5)
    assert again["codebook_size"] == 240


@pytest.mark.parametrize("shape", [(40, 3, 12, 8), (40, 16, 20)])
def test_own_images_of_another_size(tmp_path, shape):
    """A user's unlabelled .npy, (N, C, H, W) with C = 3 or (N, H, W): the model takes C, H, W
    from the data, the prior is unconditional (no sample_labels.npy), samples have its shape."""
    data = tmp_path / "mine.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
    out = tmp_path / "out"
    m = lfq.main(["--data", str(data), "--out", str(out), "--steps", "2", "--batch-size", "8", "--width", "8",
                  "--prior-width", "16", "--prior-layers", "1", "--num-samples", "3"])
    c, h, w = (1,) + shape[1:] if len(shape) == 3 else shape[1:]
    assert np.load(out / "samples.npy").shape == (3, c, h, w)
    assert np.load(out / "recon.npy").shape == (4, c, h, w)                    # the last tenth
    assert m["bits_per_image"] == (h // 4) * (w // 4) * 10 and m["test_prior_nll_bits"] > 0
    assert not (out / "sample_labels.npy").exists()
    model, config = lfq.load_checkpoint(out / "model.pt", lfq.build)
    assert config["image_shape"] == [c, h, w] and config["num_classes"] == 0
    tokens = model["prior"](torch.zeros(2, (h // 4) * (w // 4), dtype=torch.long), torch.zeros(2, dtype=torch.long))
    assert tokens.shape == (2, (h // 4) * (w // 4), 1024)                       # the prior's logits


@pytest.mark.parametrize("argv,says", [
    (["--lr", "-1"], "--lr"), (["--lr", "nan"], "--lr"), (["--prior-lr", "0"], "--prior-lr"),
    (["--beta", "-0.1"], "--beta"), (["--entropy-weight", "-1"], "--entropy-weight"),
    (["--temperature", "0"], "--temperature"),
    (["--top-k", "-1"], "--top-k"), (["--epochs", "0"], "--epochs"), (["--prior-epochs", "-1"], "--prior-epochs"),
    (["--steps", "-1"], "--steps"), (["--batch-size", "0"], "--batch-size"), (["--width", "1"], "--width"),
    (["--num-samples", "0"], "--num-samples"), (["--test-limit", "-1"], "--test-limit"),
    (["--seed", "-1"], "--seed"), (["--bits", "0"], "--bits"), (["--bits", "25"], "--bits"),
    (["--prior-heads", "0"], "--prior-heads"), (["--prior-width", "30"], "multiple of --prior-heads"),
    (["--prior-layers", "0"], "--prior-layers"),
    (["--sample-only"], "--ckpt"), (["--ckpt", "x.pt"], "--sample-only"),
    (["--sample-only", "--ckpt", "x.pt", "--bits", "8"], "--bits"),
    (["--sample-only", "--ckpt", "x.pt", "--quantizer", "fsq", "--prior-width", "64"], "--quantizer, --prior-width"),
    (["--quantizer", "fsq", "--bits", "11"], "--bits in [8, 10, 12, 14, 16]"),
    (["--quantizer", "fsq", "--bits", "16"], "--prior-epochs 0"),   # a softmax over 64,000 codes
    (["--bits", "13"], "--prior-epochs 0"),                         # a softmax over 8,192 codes
])
def test_bad_flags_are_refused_in_one_line(argv, says, capsys):
    with pytest.raises(SystemExit) as e:
        lfq.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: ") and says in err[-1], err


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        lfq.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--epochs", "--batch-size", "--lr", "--bits", "--num-samples", "--data"):
        assert f"{flag} " in text
    assert text.count("(default:") >= 25 and "23 = 8 + 8 + 7" in text


def small_checkpoint(path, **change):
    """A valid (untrained) lfq checkpoint of a tiny model on 28 x 28 digits, without training."""
    config = {"bits": 6, "width": 16, "levels": [], "image_shape": [1, 28, 28], "num_classes": 10,
              "prior": True, "prior_width": 32, "prior_layers": 1, "prior_heads": 4}
    model = lfq.build(config)
    lfq.save_checkpoint(path, {**config, **change}, model.state_dict())
    return path


def one_line_error(argv):
    with pytest.raises(SystemExit) as e:
        lfq.main(argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_bad_files_and_states_give_one_line_errors(tmp_path, tiny_mnist_dir):
    data = ["--data-dir", str(tiny_mnist_dir), "--test-limit", "16", "--num-samples", "4"]
    out = ["--out", str(tmp_path / "out")]
    assert "MNIST not found" in one_line_error(["--data-dir", str(tmp_path)] + out)
    for name, content in (("missing.pt", None), ("garbage.pt", b"not a checkpoint at all")):
        if content:
            (tmp_path / name).write_bytes(content)
        assert "not a usable lfq.py checkpoint" in one_line_error(
            ["--sample-only", "--ckpt", str(tmp_path / name)] + data + out)
    torch.save({"script": "vqvae", "model": {}, "config": {}}, tmp_path / "other.pt")
    assert "not written by lfq.py" in one_line_error(["--sample-only", "--ckpt", str(tmp_path / "other.pt")] + data + out)
    good = small_checkpoint(tmp_path / "good.pt")
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:2000])
    # Truncated; a config of the wrong type, with a key missing, of another model (weights do not fit).
    for name, change in (("type", {"bits": "ten"}), ("missing", {"prior_width": None}), ("weights", {"width": 32})):
        small_checkpoint(tmp_path / f"{name}.pt", **change)
    for name in ("cut", "type", "missing", "weights"):
        assert "not a usable" in one_line_error(["--sample-only", "--ckpt", str(tmp_path / f"{name}.pt")] + data + out)
    assert not (tmp_path / "out" / "metrics.json").exists()
    # Images of another size than the checkpoint's.
    np.save(tmp_path / "big.npy", np.zeros((20, 32, 32), np.uint8))
    assert "[1, 28, 28]" in one_line_error(["--sample-only", "--ckpt", str(good), "--data", str(tmp_path / "big.npy")] + out)
    # --out naming a file; a batch larger than the training set (64 images): nothing written.
    (tmp_path / "file").write_text("mine")
    assert "File exists" in one_line_error(SMALL + ["--data-dir", str(tiny_mnist_dir), "--out", str(tmp_path / "file")])
    assert (tmp_path / "file").read_text() == "mine"
    big = ["--data-dir", str(tiny_mnist_dir), "--out", str(tmp_path / "big"), "--batch-size", "65"]
    assert "larger than the training set" in one_line_error(big)
    assert list((tmp_path / "big").iterdir()) == []
    np.save(tmp_path / "odd.npy", np.zeros((20, 30, 28), np.uint8))
    assert "multiples of 4" in one_line_error(["--data", str(tmp_path / "odd.npy")] + out)

