"""cnnc predict: image files in, the most probable classes out, under parameters set by hand."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cnnc.cli import main

Image = pytest.importorskip("PIL.Image")

# fc3 sees a 1x4x4 image: class 0 answers to a bright top half, class 1 to a bright bottom half
TINY = """network tiny
input data: 1x4x4
input labels: label(3)
train { batch = 4 }
{placement}
fc3 = fc(data, outputs=3)
probs = softmax(fc3)
cost = logreg(labels, probs)
"""
TOP = np.repeat([1.0, 1.0, 0.0, 0.0], 4).reshape(4, 4)


def parameters() -> dict[str, np.ndarray]:
    w = np.zeros((16, 3), np.float32)
    w[:, 0] = 4 * TOP.reshape(-1)
    w[:, 1] = 4 * (1 - TOP).reshape(-1)
    return {"fc3.weights": w, "fc3.biases": np.zeros(3, np.float32)}


@pytest.fixture(params=["@gpu(0)", "@gpu(0,1)"], ids=["one-device", "two-replicas"])
def build(request, tmp_path) -> Path:
    source = tmp_path / "tiny.cnn"
    source.write_text(TINY.replace("{placement}", request.param))
    out = tmp_path / "build"
    result = CliRunner().invoke(main, ["compile", str(source), "-o", str(out), "--no-nvcc"])
    assert result.exit_code == 0, result.output
    return out


def grey(path: Path, top: int, bottom: int, size: int = 8) -> Path:
    pixels = np.full((size, size), bottom, np.uint8)
    pixels[: size // 2] = top
    Image.fromarray(pixels).save(path)
    return path


def predict(build: Path, weights: Path, *images: Path, extra=()):
    return CliRunner().invoke(main, ["predict", str(build), *map(str, images), "--init", str(weights),
                                     "--backend", "reference", *extra])


def test_predicts_the_class_the_weights_encode(build, tmp_path):
    """Five images (more than one batch of 4), resized from 8x8 and 12x10 to the network's 4x4."""
    weights = tmp_path / "weights.npz"
    np.savez(weights, **parameters())
    up, down = grey(tmp_path / "up.png", 255, 0), grey(tmp_path / "down.png", 0, 255)
    wide = tmp_path / "wide.png"
    pixels = np.zeros((12, 10), np.uint8)
    pixels[:6] = 255
    Image.fromarray(pixels).save(wide)
    result = predict(build, weights, up, down, up, down, wide, extra=["--top", "2"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if not line.startswith("note: ")]
    assert [line.split(": ")[1].split()[0] for line in lines] == ["0", "1", "0", "1", "0"]
    assert len(lines[0].split(", ")) == 2                           # --top 2
    assert float(lines[0].split()[2].rstrip(",")) > 0.99


def test_names_classes_and_subtracts_the_stored_mean(build, tmp_path):
    """With `classes` and `mean` stored with the parameters: a white image minus a mean that is
    bright at the top leaves the bottom bright."""
    weights = tmp_path / "weights.npz"
    np.savez(weights, **parameters(), classes=np.array(["top", "bottom", "none"]),
             mean=TOP[None].astype(np.float32))
    white = grey(tmp_path / "white.png", 255, 255)
    result = predict(build, weights, white, extra=["--top", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == f"{white}: bottom 1.0000"


@pytest.mark.parametrize("case, message", [
    ("missing", "{image}: no such image file"),
    ("folder", "{image}: no such image file"),
    ("text", "{image}: not a readable JPEG or PNG image (cannot identify image file '{image}')"),
    ("truncated", "{image}: not a readable JPEG or PNG image (image file is truncated)"),
    ("two-channels", "the network 'tiny' takes 2-channel images; image files give 1 (grey) or 3 (colour) channels"),
])
def test_hostile_images_are_one_line_errors(tmp_path, case, message):
    source = tmp_path / "tiny.cnn"
    source.write_text(TINY.replace("{placement}", "@gpu(0)").replace("1x4x4", "2x4x4" if case == "two-channels"
                                                                     else "1x4x4"))
    assert CliRunner().invoke(main, ["compile", str(source), "-o", str(tmp_path / "b"), "--no-nvcc"]).exit_code == 0
    weights = tmp_path / "weights.npz"
    w = parameters()
    if case == "two-channels":                       # fc3 then sees 2x4x4 inputs
        w["fc3.weights"] = np.concatenate([w["fc3.weights"]] * 2)
    np.savez(weights, **w)
    image = tmp_path / f"{case}.png"
    if case == "folder":
        image.mkdir()
    elif case == "two-channels":
        grey(image, 255, 0)
    elif case == "text":
        image.write_text("not a picture\n")
    elif case == "truncated":
        grey(image, 255, 0, size=64)
        image.write_bytes(image.read_bytes()[:60])
    result = predict(tmp_path / "b", weights, image)
    assert result.exit_code == 2
    assert result.output == "error: " + message.format(image=image) + "\n"


def test_colour_images_feed_a_grey_network_as_the_training_data_does(build, tmp_path):
    """Converted by Pillow to grey, as image folders are for a 1-channel network."""
    weights = tmp_path / "weights.npz"
    np.savez(weights, **parameters())
    pixels = np.zeros((8, 8, 3), np.uint8)
    pixels[4:] = 255
    Image.fromarray(pixels).save(tmp_path / "down.png")
    result = predict(build, weights, tmp_path / "down.png", extra=["--top", "1"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == f"{tmp_path / 'down.png'}: 1 1.0000"


def test_class_names_must_match_the_network(build, tmp_path):
    weights = tmp_path / "weights.npz"
    np.savez(weights, **parameters(), classes=np.array(["a", "b"]))
    result = predict(build, weights, grey(tmp_path / "up.png", 255, 0))
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == f"error: {weights}: 2 class names, but the network 'tiny' has 3 classes"
