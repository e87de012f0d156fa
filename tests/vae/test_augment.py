import numpy as np
import pytest

from vae import augment


def garments():
    rng = np.random.default_rng(0)
    x = np.zeros((3, 28, 28, 1), np.float32)
    x[:, 6:22, 8:20, 0] = rng.uniform(0.2, 1.0, (3, 16, 12))  # asymmetric, away from the border
    return x


def args(n, **given):
    value = {"shift_x": 0.0, "shift_y": 0.0, "mirror": 0.0, "zoom": 1.0, "gain": 1.0, **given}
    return {k: np.full(n, v, np.float32) for k, v in value.items()}


def test_no_transform_is_the_image():
    x = garments()
    np.testing.assert_array_equal(np.asarray(augment(x, **args(3))), x)


@pytest.mark.parametrize("dx, dy", [(2, 0), (0, -1), (-2, 2)])
def test_whole_pixel_shifts_move_the_image(dx, dy):
    x = garments()
    moved = np.roll(np.roll(x, dx, axis=2), dy, axis=1)  # the content stays clear of the border
    np.testing.assert_allclose(np.asarray(augment(x, **args(3, shift_x=dx, shift_y=dy))), moved, atol=1e-6)


def test_mirror_flips_left_right_and_gain_scales_the_ink():
    x = garments()
    out = np.asarray(augment(x, **args(3, mirror=1.0, gain=0.6)))
    np.testing.assert_allclose(out, 0.6 * x[:, :, ::-1], atol=1e-6)


def test_zoom_above_one_shrinks_the_garment_about_the_centre():
    x = garments()
    ink = lambda images: (np.asarray(images)[..., 0] > 0.05).sum(axis=(1, 2))  # noqa: E731
    smaller, larger = augment(x, **args(3, zoom=1.2)), augment(x, **args(3, zoom=0.85))
    assert np.all(ink(smaller) < ink(x)) and np.all(ink(larger) > ink(x))
    centre = np.asarray(smaller)[:, 13:15, 13:15, 0]
    np.testing.assert_allclose(centre, x[:, 13:15, 13:15, 0], atol=0.25)  # the centre stays in place


def test_each_image_gets_its_own_transform():
    x = garments()
    per_image = {k: v.copy() for k, v in args(3).items()}
    per_image["mirror"][1] = 1.0
    out = np.asarray(augment(x, **per_image))
    np.testing.assert_array_equal(out[[0, 2]], x[[0, 2]])
    np.testing.assert_allclose(out[1], x[1, :, ::-1], atol=1e-6)


def test_random_view_is_fixed_by_its_seed_and_differs_per_image():
    import tensorflow as tf

    from vae import random_view

    x = np.repeat(garments()[:1], 4, axis=0)
    one = np.asarray(random_view(tf.constant(x), tf.constant([3, 5])))
    again = np.asarray(random_view(tf.constant(x), tf.constant([3, 5])))
    other = np.asarray(random_view(tf.constant(x), tf.constant([3, 6])))
    np.testing.assert_array_equal(one, again)
    assert not np.array_equal(one, other)
    assert len({one[i].tobytes() for i in range(4)}) == 4  # one image, four different views
    assert one.shape == x.shape and one.min() >= 0 and one.max() <= 1
