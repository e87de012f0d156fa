import numpy as np

from pipeline.report.metrics import mean_image_baseline, pixel_entropy


def test_mean_image_baseline_from_mean_images_equals_the_per_image_average():
    """The evaluate stage passes only the two splits' mean images; the value must be
    the mean over test images of -log p(x) under the training mean image."""
    rng = np.random.default_rng(0)
    train = rng.uniform(size=(300, 28, 28)) ** 3
    test = (rng.uniform(size=(50, 28, 28)) > 0.7).astype(np.float64)
    p = np.clip(train.reshape(300, -1).mean(0), 1e-6, 1 - 1e-6)
    x = test.reshape(50, -1)
    direct = -(x * np.log(p) + (1 - x) * np.log1p(-p)).sum(axis=1).mean()
    assert np.isclose(mean_image_baseline(train.mean(0), test.mean(0)), direct, rtol=1e-12)


def test_pixel_entropy_is_zero_for_binary_images_and_log2_per_grey_pixel():
    images = np.zeros((2, 28, 28))
    images[1, 0, :4] = 0.5
    np.testing.assert_allclose(pixel_entropy(images), [0.0, 4 * np.log(2.0)])


def test_continuous_bernoulli_mean_image_baseline_inverts_the_mean():
    from pipeline.report.metrics import mean_image_baseline
    from vae.continuous_bernoulli import cb_log_norm, cb_logits_for_means, cb_mean

    means = np.array([1e-6, 0.01, 0.3, 0.5, 0.77, 0.999, 1 - 1e-6])
    logits = cb_logits_for_means(means)
    np.testing.assert_allclose(cb_mean(logits), means, atol=1e-9)
    # At mean 1/2 the density is uniform (logit 0): every image scores 0 nats.
    flat = np.full(784, 0.5)
    assert abs(mean_image_baseline(flat, np.random.default_rng(0).uniform(size=784), "continuous_bernoulli")) < 1e-6
    assert abs(cb_log_norm(np.array([0.0]))[0] - np.log(2)) < 1e-12
