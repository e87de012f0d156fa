import numpy as np
import pytest

from vae import bernoulli_log_likelihood, iwae_bound, kl_divergence, neg_elbo, reparameterize


def test_analytic_kl_matches_monte_carlo():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(3, 4)).astype(np.float32)
    log_var = rng.normal(scale=0.5, size=(3, 4)).astype(np.float32)
    analytic = np.asarray(kl_divergence(mean, log_var))
    eps = rng.normal(size=(200_000, 3, 4))
    z = mean + np.exp(0.5 * log_var) * eps
    log_q = -0.5 * (np.log(2 * np.pi) + log_var + eps**2).sum(-1)
    log_p = -0.5 * (np.log(2 * np.pi) + z**2).sum(-1)
    monte_carlo = (log_q - log_p).mean(0)
    np.testing.assert_allclose(analytic, monte_carlo, atol=0.03)


def test_bernoulli_likelihood_is_finite_at_extremes():
    images = np.array([0.0, 1.0, 0.0, 1.0, 0.5, 0.5], np.float32).reshape(1, 1, 6, 1)
    logits = np.array([-1e4, 1e4, 1e4, -1e4, 80.0, -80.0], np.float32).reshape(1, 1, 6, 1)
    value = np.asarray(bernoulli_log_likelihood(images, logits))
    assert np.isfinite(value).all()
    # Confident and right costs ~0; confident and wrong costs |logit|; x=0.5 costs |l|/2.
    np.testing.assert_allclose(value, [-(1e4 + 1e4 + 40 + 40)], rtol=1e-5)


def test_bernoulli_likelihood_matches_naive_formula_in_safe_range():
    rng = np.random.default_rng(1)
    images = rng.uniform(size=(2, 28, 28, 1)).astype(np.float32)
    logits = rng.normal(scale=3, size=(2, 28, 28, 1)).astype(np.float32)
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    naive = (images * np.log(p) + (1 - images) * np.log1p(-p)).reshape(2, -1).sum(-1)
    np.testing.assert_allclose(np.asarray(bernoulli_log_likelihood(images, logits)), naive, rtol=1e-4)


def test_neg_elbo_is_reconstruction_plus_beta_kl():
    rng = np.random.default_rng(2)
    images = rng.uniform(size=(4, 28, 28, 1)).astype(np.float32)
    logits = rng.normal(size=(4, 28, 28, 1)).astype(np.float32)
    mean, log_var = rng.normal(size=(2, 4, 3)).astype(np.float32)
    loss, reconstruction, kl = (np.asarray(t) for t in neg_elbo(images, logits, mean, log_var, beta=2.0))
    np.testing.assert_allclose(loss, reconstruction + 2.0 * kl, rtol=1e-6)
    assert loss.shape == (4,)


def fixed_decoder(latent, seed=0):
    weights = np.random.default_rng(seed).normal(size=(latent, 784)).astype(np.float32)

    def decode(z):
        from keras import ops

        return ops.reshape(ops.matmul(z, weights), (-1, 28, 28, 1))

    return decode


def test_iwae_with_one_sample_equals_elbo_estimate():
    import keras

    rng = np.random.default_rng(3)
    images = rng.uniform(size=(5, 28, 28, 1)).astype(np.float32)
    mean, log_var = rng.normal(scale=0.3, size=(2, 5, 2)).astype(np.float32)
    decode = fixed_decoder(2)
    bound = np.asarray(iwae_bound(images, mean, log_var, decode, k=1, seed=keras.random.SeedGenerator(7)))
    # Reproduce the same single draw and compute log p(x|z) - KL-free estimate by hand.
    eps = np.asarray(keras.random.normal((1, 5, 2), seed=keras.random.SeedGenerator(7)))[0]
    z = np.asarray(reparameterize(mean, log_var, eps))
    log_px = np.asarray(bernoulli_log_likelihood(images, decode(z)))
    log_pz = -0.5 * (np.log(2 * np.pi) + z**2).sum(-1)
    log_qz = -0.5 * (np.log(2 * np.pi) + log_var + eps**2).sum(-1)
    np.testing.assert_allclose(bound, log_px + log_pz - log_qz, rtol=1e-5)


def test_iwae_bound_tightens_with_more_samples():
    rng = np.random.default_rng(4)
    images = rng.uniform(size=(50, 28, 28, 1)).astype(np.float32)
    mean, log_var = rng.normal(scale=0.5, size=(2, 50, 2)).astype(np.float32)
    decode = fixed_decoder(2, seed=1)
    one = np.mean([np.asarray(iwae_bound(images, mean, log_var, decode, k=1, seed=s)).mean() for s in range(20)])
    many = np.mean([np.asarray(iwae_bound(images, mean, log_var, decode, k=32, seed=s)).mean() for s in range(20)])
    assert many >= one


def test_iwae_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be >= 1"):
        iwae_bound(np.zeros((1, 28, 28, 1)), np.zeros((1, 2)), np.zeros((1, 2)), fixed_decoder(2), k=0)


def test_free_bits_hold_each_dimension_at_its_floor_without_gradient():
    import tensorflow as tf

    from vae import free_bits_kl, kl_divergence

    rng = np.random.default_rng(0)
    # Dimension 0 carries ~2 nats, dimension 1 almost none.
    mean = tf.Variable(np.stack([rng.normal(0, 2, 64), rng.normal(0, 0.01, 64)], axis=1).astype(np.float32))
    log_var = tf.Variable(np.full((64, 2), -1.0, np.float32) * np.array([1.0, 0.0], np.float32))
    with tf.GradientTape() as tape:
        term = free_bits_kl(mean, log_var, 0.5)
    per_dim = np.asarray(kl_divergence(mean[:, :1], log_var[:, :1])).mean()
    np.testing.assert_allclose(float(term), per_dim + 0.5, rtol=1e-5)
    grad_mean = tape.gradient(term, mean).numpy()
    assert np.all(grad_mean[:, 1] == 0) and np.any(grad_mean[:, 0] != 0)
    # With no floor it is the plain mean KL.
    np.testing.assert_allclose(
        float(free_bits_kl(mean, log_var, 0.0)), np.asarray(kl_divergence(mean, log_var)).mean(), rtol=1e-5
    )


LOGITS = np.array([-60.0, -12.0, -3.0, -0.7, -1e-4, 0.0, 2e-4, 5e-4, 1e-3, 0.3, 1.5, 4.0, 20.0, 300.0], np.float32)


def cb_log_density(x, logits):
    """The continuous Bernoulli log-density of pixels x for each logit: (len(x), len(logits))."""
    from vae.objective import continuous_bernoulli_log_likelihood

    images = np.broadcast_to(x[:, None], (len(x), len(logits))).astype(np.float32)
    return np.stack(
        [
            np.asarray(
                continuous_bernoulli_log_likelihood(
                    images[:, j].reshape(-1, 1, 1, 1), np.full((len(x), 1, 1, 1), logits[j], np.float32)
                )
            )
            for j in range(len(logits))
        ],
        axis=1,
    )


def test_continuous_bernoulli_density_integrates_to_one_over_the_unit_interval():
    # Gauss-Legendre on [0, 1], split in 64 panels: exact enough for the steep densities
    # of large logits (mass piled against 0 or 1).
    nodes, weights = np.polynomial.legendre.leggauss(24)
    edges = np.linspace(0.0, 1.0, 65)
    x = np.concatenate([(a + b) / 2 + (b - a) / 2 * nodes for a, b in zip(edges[:-1], edges[1:], strict=True)])
    w = np.concatenate([(b - a) / 2 * weights for a, b in zip(edges[:-1], edges[1:], strict=True)])
    mass = (
        np.exp(cb_log_density(x, LOGITS[np.abs(LOGITS) <= 20].astype(np.float64)).astype(np.float64)) * w[:, None]
    ).sum(0)
    np.testing.assert_allclose(mass, 1.0, atol=2e-4)
    # And it is finite (no NaN or Inf) for every logit, even far beyond that range.
    assert np.isfinite(cb_log_density(np.array([0.0, 0.3, 1.0]), LOGITS)).all()


def test_continuous_bernoulli_matches_its_closed_form():
    # l = 0: the uniform density, log p = 0 everywhere.
    np.testing.assert_allclose(cb_log_density(np.array([0.0, 0.25, 1.0]), np.array([0.0]))[:, 0], 0.0, atol=1e-6)
    # l = log 3 (lambda = 3/4): tanh(l/2) = 1/2, so C = 2 log 3 and p(x) = 2 log 3 (3/4)^x (1/4)^(1-x).
    x = np.array([0.0, 0.5, 1.0])
    expected = np.log(2 * np.log(3)) + x * np.log(0.75) + (1 - x) * np.log(0.25)
    np.testing.assert_allclose(cb_log_density(x, np.array([np.log(3)]))[:, 0], expected, rtol=1e-5)
    # Large |l|: C -> |l| (all mass in a sliver of width ~1/|l| at one end).
    from vae.objective import continuous_bernoulli_log_norm

    np.testing.assert_allclose(
        np.asarray(continuous_bernoulli_log_norm(np.float32([300.0, -300.0]))), np.log(300.0), rtol=1e-6
    )
    # Across the switch to the series at |l| = 1e-3 the constant is continuous.
    near = np.float32([0.999e-3, 1.001e-3])
    values = np.asarray(continuous_bernoulli_log_norm(near)).astype(np.float64)
    np.testing.assert_allclose(values, np.log(2) + near.astype(np.float64) ** 2 / 12, atol=2e-6)


def test_continuous_bernoulli_pixel_mean_is_the_density_mean():
    from vae.objective import CB_SERIES_BELOW, pixel_mean

    nodes, weights = np.polynomial.legendre.leggauss(24)
    edges = np.linspace(0.0, 1.0, 65)
    x = np.concatenate([(a + b) / 2 + (b - a) / 2 * nodes for a, b in zip(edges[:-1], edges[1:], strict=True)])
    w = np.concatenate([(b - a) / 2 * weights for a, b in zip(edges[:-1], edges[1:], strict=True)])
    logits = np.array(
        [-20.0, -3.0, -CB_SERIES_BELOW * 1.01, -CB_SERIES_BELOW * 0.99, -1e-3, 0.0, 0.2, 2.0, 9.0], np.float32
    )
    density = np.exp(cb_log_density(x, logits).astype(np.float64))
    numeric = (x[:, None] * density * w[:, None]).sum(0)
    mean = np.asarray(pixel_mean(logits, "continuous_bernoulli")).astype(np.float64)
    np.testing.assert_allclose(mean, numeric, atol=2e-6)
    # Far out it stays finite and in (0, 1): 1/|l| from the nearer end.
    far = np.asarray(pixel_mean(np.float32([-1e4, -200.0, 200.0, 1e4]), "continuous_bernoulli"))
    np.testing.assert_allclose(far, [1e-4, 1 / 200, 1 - 1 / 200, 1 - 1e-4], rtol=1e-4)
    np.testing.assert_allclose(np.asarray(pixel_mean(logits, "bernoulli")), 1 / (1 + np.exp(-logits)), rtol=1e-6)


def test_neg_elbo_takes_the_likelihood_by_name():
    rng = np.random.default_rng(5)
    images = rng.uniform(size=(3, 28, 28, 1)).astype(np.float32)
    logits = rng.normal(size=(3, 28, 28, 1)).astype(np.float32)
    mean, log_var = np.zeros((3, 2), np.float32), np.zeros((3, 2), np.float32)
    from vae.objective import continuous_bernoulli_log_norm

    bern = np.asarray(neg_elbo(images, logits, mean, log_var)[1])
    cb = np.asarray(neg_elbo(images, logits, mean, log_var, likelihood="continuous_bernoulli")[1])
    log_norm = np.asarray(continuous_bernoulli_log_norm(logits)).reshape(3, -1).sum(1)
    np.testing.assert_allclose(bern - cb, log_norm, rtol=1e-5)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        neg_elbo(images, logits, mean, log_var, likelihood="gaussian")


def test_info_nce_is_log_n_for_views_it_cannot_tell_apart_and_near_zero_for_clear_pairs():
    from vae import info_nce

    n = 8
    same = np.ones((n, 4), np.float32)
    np.testing.assert_allclose(np.asarray(info_nce(same, same, 0.2)), np.log(n), rtol=1e-6)
    clear = np.eye(n, dtype=np.float32) * 3.0  # each row's partner is itself, every other row orthogonal
    assert np.all(np.asarray(info_nce(clear, clear, 0.05)) < 1e-6)
    swapped = clear[::-1]  # every partner is the wrong one: far worse than chance
    assert np.all(np.asarray(info_nce(clear, swapped, 0.2)) > np.log(n))


def test_info_nce_uses_only_directions_and_is_symmetric_in_its_views():
    from vae import info_nce

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(16, 6)).astype(np.float32), rng.normal(size=(16, 6)).astype(np.float32)
    loss = np.asarray(info_nce(a, b, 0.3))
    np.testing.assert_allclose(np.asarray(info_nce(5.0 * a, 0.1 * b, 0.3)), loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(info_nce(b, a, 0.3)), loss, rtol=1e-5)
    # the closed form, row by row
    na, nb = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    s = na @ nb.T / 0.3
    lse = lambda m, axis: np.log(np.exp(m).sum(axis=axis))  # noqa: E731
    np.testing.assert_allclose(loss, 0.5 * (lse(s, 1) + lse(s, 0)) - np.diag(s), rtol=1e-5)


def objective_inputs(n=6, latent=3, seed=7):
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(n, 28, 28, 1)).astype(np.float32)
    logits = rng.normal(size=(n, 28, 28, 1)).astype(np.float32)
    z_mean = rng.normal(scale=0.1, size=(n, latent)).astype(np.float32)
    z_log_var = rng.normal(scale=0.1, size=(n, latent)).astype(np.float32) - 2.0
    view_mean = z_mean + rng.normal(scale=0.5, size=(n, latent)).astype(np.float32)
    return images, logits, z_mean, z_log_var, view_mean


def test_training_objective_is_the_elbo_over_the_global_batch_plus_its_training_only_terms():
    """Without tf.distribute: plain, with free bits (a floor above the small KL lifts
    it), and with the contrastive term; the reported terms are always the true ELBO's."""
    from vae import free_bits_kl, info_nce, training_objective

    images, logits, z_mean, z_log_var, view_mean = objective_inputs()
    loss, reconstruction, kl = (np.asarray(t) for t in neg_elbo(images, logits, z_mean, z_log_var))
    plain, terms = training_objective(images, logits, z_mean, z_log_var, 12)
    np.testing.assert_allclose(float(plain), loss.sum() / 12, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(terms[0]), loss)

    floored, terms = training_objective(images, logits, z_mean, z_log_var, 12, free_bits=2.0)
    floor = 6 * float(free_bits_kl(z_mean, z_log_var, 2.0))
    assert floor > kl.sum()  # each dimension's KL is below 2 nats here, so the floor holds
    np.testing.assert_allclose(float(floored), (reconstruction.sum() + floor) / 12, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(terms[2]), kl)

    nce = np.asarray(info_nce(z_mean, view_mean, 0.2)).sum()
    both, _ = training_objective(
        images, logits, z_mean, z_log_var, 12, view_mean=view_mean, contrastive_weight=10.0, temperature=0.2
    )
    np.testing.assert_allclose(float(both), loss.sum() / 12 + 10.0 * nce / 12, rtol=1e-6)
    off, _ = training_objective(images, logits, z_mean, z_log_var, 12, view_mean=view_mean, contrastive_weight=0.0)
    assert float(off) == float(plain)
