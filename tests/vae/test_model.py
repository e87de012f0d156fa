import numpy as np
import pytest

from vae import VAEConfig, build_vae, get_state, preset, set_state


def test_seed_preset_matches_keras_tutorial_shapes_and_parameters():
    model = build_vae(preset("seed"))
    encoder_shapes = [tuple(layer.output.shape[1:]) for layer in model.encoder.layers[1:]]
    assert encoder_shapes[:3] == [(14, 14, 32), (7, 7, 64), (3136,)]
    decoder_shapes = [tuple(layer.output.shape[1:]) for layer in model.decoder.layers[1:]]
    assert decoder_shapes == [(3136,), (7, 7, 64), (14, 14, 64), (28, 28, 32), (28, 28, 1)]
    # Parameter counts printed by the keras.io tutorial's encoder.summary() / decoder.summary().
    assert model.encoder.count_params() == 69_076
    assert model.decoder.count_params() == 65_089


@pytest.mark.parametrize("name", ["seed", "default"])
def test_output_shapes(name):
    config = preset(name)
    model = build_vae(config, seed=0)
    z_mean, z_log_var, logits = model(np.zeros((3, 28, 28, 1), np.float32))
    assert z_mean.shape == (3, config.latent_dim) and z_log_var.shape == (3, config.latent_dim)
    assert logits.shape == (3, 28, 28, 1)
    images = model.generator()(np.zeros((2, config.latent_dim), np.float32))
    assert images.shape == (2, 28, 28, 1)
    assert 0.0 <= float(np.min(images)) and float(np.max(images)) <= 1.0


def test_bad_architecture_is_a_value_error():
    with pytest.raises(ValueError, match="activation"):
        VAEConfig(activation="tanhh")
    with pytest.raises(ValueError, match="unknown VAEConfig field"):
        VAEConfig.from_dict({"latent": 3})


def test_config_rebuilds_from_dict():
    config = VAEConfig(latent_dim=5, filters=(8, 16), dense_units=12)
    assert VAEConfig.from_dict(config.to_dict()) == config
    deeper = VAEConfig(latent_dim=5, filters=(8, 16), dense_units=12, encoder_convs_per_stage=2)
    assert VAEConfig.from_dict(deeper.to_dict()) == deeper
    with pytest.raises(ValueError, match="encoder_convs_per_stage must be >= 1"):
        VAEConfig(encoder_convs_per_stage=0)


def test_the_encoder_can_be_deeper_than_the_decoder():
    import keras

    config = VAEConfig(latent_dim=3, filters=(4, 8), dense_units=8, encoder_convs_per_stage=2)
    model = build_vae(config, seed=0)
    convs = lambda part: sorted(layer.name for layer in part.layers if isinstance(layer, keras.layers.Conv2D))  # noqa: E731
    assert convs(model.encoder) == ["encoder_conv1_1", "encoder_conv1_2", "encoder_conv2_1", "encoder_conv2_2"]
    shallow = build_vae(VAEConfig(latent_dim=3, filters=(4, 8), dense_units=8), seed=0)
    assert convs(model.decoder) == convs(shallow.decoder)  # Conv2DTranspose is a Conv2D subclass: both counted
    assert model.encoder.count_params() > shallow.encoder.count_params()


def test_the_decoder_can_be_narrower_than_the_encoder():
    config = VAEConfig(latent_dim=3, filters=(4, 8), dense_units=8, decoder_filters=(4, 2), context="above")
    assert VAEConfig.from_dict(config.to_dict()) == config
    model = build_vae(config, seed=0)
    assert [tuple(layer.output.shape[1:]) for layer in model.decoder.layers[1:]] == [
        (98,),
        (7, 7, 2),
        (14, 14, 2),
        (28, 28, 4),
        (28, 28, 2),
    ]
    wide = build_vae(VAEConfig(latent_dim=3, filters=(4, 8), dense_units=8, context="above"), seed=0)
    assert model.encoder.count_params() == wide.encoder.count_params()
    images = np.random.default_rng(0).uniform(size=(2, 28, 28, 1)).astype(np.float32)
    z_mean, z_log_var, logits = model(images)
    assert tuple(logits.shape[:3]) == (2, 28, 28) and z_mean.shape == (2, 3)
    for bad in ((4,), (4, 0)):
        with pytest.raises(ValueError, match="decoder_filters must be two integers from 1 to 1024"):
            VAEConfig(decoder_filters=bad)


def train_steps(model, optimizer, images, steps):
    import tensorflow as tf

    losses = []
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(model.losses_per_example(images, training=True)[0])
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        losses.append(float(loss))
    return losses


def test_save_load_round_trips_weights_and_optimizer_exactly():
    import keras

    config = VAEConfig(latent_dim=3, filters=(4, 8), dense_units=8)
    images = np.random.default_rng(0).uniform(size=(16, 28, 28, 1)).astype(np.float32)
    model = build_vae(config, seed=1)
    optimizer = keras.optimizers.Adam(1e-3)
    train_steps(model, optimizer, images, 2)
    state = get_state(model, optimizer)

    clone = build_vae(VAEConfig.from_dict(config.to_dict()), seed=1)
    clone_optimizer = keras.optimizers.Adam(1e-3)
    set_state(state, clone, clone_optimizer)
    eps = np.random.default_rng(1).normal(size=(16, 3)).astype(np.float32)
    for a, b in zip(model(images, eps=eps), clone(images, eps=eps), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Optimizer state too: the next step gives identical weights.
    keras.utils.set_random_seed(5)
    train_steps(model, optimizer, images, 1)
    keras.utils.set_random_seed(5)
    train_steps(clone, clone_optimizer, images, 1)
    for a, b in zip(get_state(model, optimizer).values(), get_state(clone, clone_optimizer).values(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_set_state_rejects_wrong_shapes():
    state = get_state(build_vae(VAEConfig(latent_dim=3)))
    with pytest.raises(ValueError, match="shape"):
        set_state(state, build_vae(VAEConfig(latent_dim=4)))


def test_a_few_steps_lower_the_loss():
    import keras

    keras.utils.set_random_seed(0)
    images = np.random.default_rng(0).uniform(size=(32, 28, 28, 1)).astype(np.float32) ** 4
    model = build_vae(VAEConfig(latent_dim=2, filters=(8, 16), dense_units=16), seed=0)
    losses = train_steps(model, keras.optimizers.Adam(3e-3), images, 15)
    assert losses[-1] < losses[0] - 10


def test_state_is_matched_by_variable_path_not_position():
    one_conv = build_vae(VAEConfig(latent_dim=3, filters=(4, 8), dense_units=8), seed=0)
    two_convs = build_vae(VAEConfig(latent_dim=3, filters=(4, 8), dense_units=8, convs_per_stage=2), seed=0)
    state = get_state(one_conv)
    assert "model/encoder_dense/kernel" in state and "model/0" not in state
    with pytest.raises(ValueError, match="no array for model/decoder_conv1_2/bias .8 missing"):
        set_state(state, two_convs)
    # A second model built in the same process gets the same paths (no global name counters).
    assert list(get_state(build_vae(VAEConfig(latent_dim=3, filters=(4, 8), dense_units=8)))) == list(state)


@pytest.mark.parametrize("imports", ["import vae.model, keras", "import keras, vae.model"])
def test_a_saved_model_opens_with_plain_keras_once_vae_model_is_imported(tmp_path, imports):
    """In a fresh interpreter, whichever of keras and vae.model is imported first."""
    import subprocess
    import sys

    model = build_vae(VAEConfig(latent_dim=3, filters=(4, 8), dense_units=8, context="above"), seed=2)
    model.save(tmp_path / "vae.keras")
    images = np.random.default_rng(0).uniform(size=(4, 28, 28, 1)).astype(np.float32)
    eps = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
    np.savez(tmp_path / "batch.npz", images=images, eps=eps)
    expected = np.asarray(model.losses_per_example(images, eps=eps)[0])
    code = (
        f"{imports}\nimport numpy as np\n"
        f"model = keras.saving.load_model({str(tmp_path / 'vae.keras')!r})\n"
        f"batch = np.load({str(tmp_path / 'batch.npz')!r})\n"
        "print(type(model).__name__, list(np.asarray(model.losses_per_example(batch['images'], eps=batch['eps'])[0])))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    name, values = result.stdout.strip().splitlines()[-1].split(" ", 1)
    assert name == "VAE"
    np.testing.assert_array_equal(np.array(eval(values), np.float32), expected)
