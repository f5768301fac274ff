"""What travels to a model: ModelInput (model-sized, with the original's geometry), and one
decode that serves every model of an index."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from conftest import write_localizing_bundle
from fracray.data.synthetic import render_radiograph


def _jpeg(h: int, w: int, seed: int = 0) -> bytes:
    pixels = render_radiograph(np.random.default_rng(seed), "wrist", h, w, fracture=True).pixels
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def big_classifier_index(tmp_path_factory, untrained_index):
    """untrained_index's router (224 px) with a wrist model at 320 px that has a fracture map."""
    from fracray.artifacts.index import ModelIndex, read_model_index, write_model_index

    root = tmp_path_factory.mktemp("big")
    base = read_model_index(untrained_index)
    wrist = write_localizing_bundle(str(root / "fracture_wrist"), image_size=320)
    index = str(root / "model_index.json")
    write_model_index(index, ModelIndex(router=base.router, classifiers={"humerus": base.classifiers["humerus"],
                                                                          "wrist": wrist}))
    return index


def test_one_decode_serves_the_largest_model(big_classifier_index):
    """A JPEG's draft decode is sized for the largest model: the 320 px classifier never gets an
    image the 224 px router's draft shrank below 320 px."""
    from fracray.imaging.preprocess import decode_for
    from fracray.inference.predictor import FracturePredictor

    predictor = FracturePredictor(big_classifier_index)
    assert predictor.router.config.image_size == (224, 224)
    assert predictor.decode_config.image_size == (320, 320)
    decoded = decode_for(_jpeg(2400, 1800), predictor.decode_config)
    assert max(decoded.shape) >= 320 and decoded.height == 2400  # reduced grid, original geometry


def test_model_inputs_give_the_same_answers_as_decoded_images(big_classifier_index):
    from fracray.imaging.preprocess import decode_for
    from fracray.inference.predictor import FracturePredictor

    predictor = FracturePredictor(big_classifier_index)
    wrist = predictor.classifiers["wrist"]
    decoded = [decode_for(_jpeg(900, 700, seed=s), predictor.decode_config) for s in range(2)]
    prepared = [wrist.prepare(d) for d in decoded]
    assert prepared[0].base.shape == (320, 320) and (prepared[0].height, prepared[0].width) == (900, 700)
    assert prepared[0].base.nbytes < decoded[0].pixels.nbytes * 4  # model-sized, not the image
    probs_d, maps_d = wrist.predict(decoded)
    probs_p, maps_p = wrist.predict(prepared)
    np.testing.assert_allclose(probs_p, probs_d, atol=1e-6)
    for k in range(2):
        assert wrist.findings(maps_p[k], prepared[k]) == wrist.findings(maps_d[k], decoded[k])
        np.testing.assert_allclose(wrist.heatmap(prepared[k], max_side=512), wrist.heatmap(decoded[k], max_side=512),
                                   atol=1e-5)
    with pytest.raises(ValueError, match="another preprocessing"):
        predictor.router.predict([prepared[0]])  # made for the 320 px classifier, not the 224 px router
