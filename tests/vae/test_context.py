import numpy as np
import pytest

from vae import VAEConfig, build_vae
from vae.config import CONTEXTS
from vae.context import context_logits, fill_rows


def random_decoded(context, n=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 28, 28, 1 + len(CONTEXTS[context]))).astype(np.float32)


@pytest.mark.parametrize("context", ["above", "rows"])
def test_a_pixel_logit_depends_only_on_rows_above(context):
    rng = np.random.default_rng(1)
    decoded = random_decoded(context)
    images = rng.uniform(size=(3, 28, 28, 1)).astype(np.float32)
    logits = np.asarray(context_logits(decoded, images, CONTEXTS[context]))
    for row in (0, 5, 27):
        changed = images.copy()
        changed[:, row:] = rng.uniform(size=changed[:, row:].shape)
        after = np.asarray(context_logits(decoded, changed, CONTEXTS[context]))
        np.testing.assert_array_equal(after[:, : row + 1], logits[:, : row + 1])
        if row < 27:
            assert not np.allclose(after[:, row + 1 :], logits[:, row + 1 :])


@pytest.mark.parametrize("context", ["above", "rows"])
def test_generated_rows_are_the_teacher_forced_fixed_point(context):
    decoded = random_decoded(context)
    filled = np.asarray(fill_rows(decoded, CONTEXTS[context]))
    assert filled.shape == (3, 28, 28, 1)
    forced = 1.0 / (1.0 + np.exp(-np.asarray(context_logits(decoded, filled, CONTEXTS[context]))))
    np.testing.assert_allclose(forced, filled, atol=1e-6)


def test_without_context_the_decoder_output_is_the_logit():
    decoded = random_decoded("none")
    images = np.zeros((3, 28, 28, 1), np.float32)
    np.testing.assert_array_equal(np.asarray(context_logits(decoded, images, ())), decoded)
    np.testing.assert_allclose(np.asarray(fill_rows(decoded, ())), 1.0 / (1.0 + np.exp(-decoded)), rtol=1e-6)


def test_a_context_model_decodes_weights_and_generates_images():
    model = build_vae(VAEConfig(latent_dim=3, dense_units=8, context="rows"), seed=0)
    assert model.decoder.output.shape[-1] == 1 + len(CONTEXTS["rows"])
    images = np.random.default_rng(2).uniform(size=(2, 28, 28, 1)).astype(np.float32)
    _, _, logits = model(images)
    assert logits.shape == (2, 28, 28, 1)
    generated = np.asarray(model.generator()(np.zeros((2, 3), np.float32)))
    assert generated.shape == (2, 28, 28, 1) and 0.0 <= generated.min() and generated.max() <= 1.0


def test_unknown_context_is_rejected():
    with pytest.raises(ValueError, match="context must be one of"):
        VAEConfig(context="left")
