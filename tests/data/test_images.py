"""ImageFolderSource and ImagePreprocess."""

from __future__ import annotations

import numpy as np
import pytest

from edgeopt.data import ImageDtype, ImageFolderSource, ImagePreprocess, Layout, open_data
from edgeopt.errors import ConfigError, DataError
from tests.data.helpers import IMAGE, spec, write_png

COLOR = (255, 0, 51)  # scaled to [0, 1]: (1.0, 0.0, 0.2)


def solid(height: int, width: int, color=COLOR) -> np.ndarray:
    return np.broadcast_to(np.asarray(color, np.uint8), (height, width, 3)).copy()


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    write_png(folder / "a.png", solid(8, 8))
    write_png(folder / "b.png", solid(16, 12, (0, 0, 0)))
    return folder


def test_nchw_with_mean_and_std_per_channel(images):
    preprocess = ImagePreprocess.parse("mean=0.5/0.5/0.5,std=0.5/0.25/0.5")
    first, second = list(ImageFolderSource(images, [IMAGE], preprocess))
    assert first["input"].shape == (1, 3, 8, 8) and first["input"].dtype == np.float32
    np.testing.assert_allclose(first["input"][0, :, 3, 3], [1.0, -2.0, -0.6], atol=1e-6)
    np.testing.assert_allclose(second["input"][0, :, 0, 0], [-1.0, -2.0, -1.0], atol=1e-6)


def test_nhwc_layout_is_inferred_from_the_input_shape(images):
    nhwc = spec("input", (1, 8, 8, 3))
    batch = next(iter(ImageFolderSource(images, [nhwc])))
    assert batch["input"].shape == (1, 8, 8, 3)
    np.testing.assert_allclose(batch["input"][0, 5, 5], [1.0, 0.0, 0.2], atol=1e-6)


def test_images_are_resized_to_the_model_shape(images):
    _, resized = list(open_data(images, [IMAGE]))
    assert resized["input"].shape == (1, 3, 8, 8)
    assert np.all(resized["input"] == 0.0)


def test_dynamic_spatial_dims_keep_each_images_size_unless_size_is_given(images):
    dynamic = spec("input", ("n", 3, "h", "w"))
    assert [b["input"].shape for b in ImageFolderSource(images, [dynamic])] == [(1, 3, 8, 8), (1, 3, 16, 12)]
    source = ImageFolderSource(images, [dynamic], ImagePreprocess(size=(4, 6)))
    assert [b["input"].shape for b in source] == [(1, 3, 4, 6)] * 2
    wide = spec("input", ("n", 3, 10, "w"))  # a fixed height is resized to; the width stays each image's
    assert [b["input"].shape for b in ImageFolderSource(images, [wide])] == [(1, 3, 10, 8), (1, 3, 10, 12)]


def test_a_fixed_batch_of_images_of_different_sizes_is_refused(images):
    with pytest.raises(DataError, match=r"images of one batch of 2 differ in size .*pass size=HxW"):
        list(ImageFolderSource(images, [spec("input", (2, 3, "h", "w"))]))


def test_grayscale_input_gets_one_channel(images):
    gray = spec("input", (1, 1, 8, 8))
    batch = next(iter(ImageFolderSource(images, [gray])))
    expected = (255 * 299 + 51 * 114) / 1000 / 255  # Pillow's ITU-R 601-2 luma
    np.testing.assert_allclose(batch["input"][0, 0, 0, 0], expected, atol=1 / 255)


def test_uint8_and_int8_inputs_get_raw_pixels(images):
    raw = next(iter(ImageFolderSource(images, [spec("input", (1, 8, 8, 3), np.uint8)])))
    assert raw["input"].dtype == np.uint8 and tuple(raw["input"][0, 0, 0]) == COLOR
    shifted = next(iter(ImageFolderSource(images, [spec("input", (1, 3, 8, 8), np.int8)])))
    assert shifted["input"].dtype == np.int8
    assert tuple(shifted["input"][0, :, 0, 0]) == (127, -128, 51 - 128)


def test_folder_is_searched_recursively_in_natural_order(tmp_path):
    for name, value in (("class10/x.png", 10), ("class2/x.png", 2), ("class2/.thumb.png", 99), ("top.jpg", 50)):
        write_png(tmp_path / name, solid(8, 8, (value,) * 3))
    (tmp_path / "labels.csv").write_text("x,2\n")
    pixels = [b["input"][0, 0, 0, 0] for b in open_data(tmp_path, [spec("input", (1, 8, 8, 3), np.uint8)])]
    assert pixels[:2] == [2, 10] and len(pixels) == 3  # top.jpg is lossy; hidden file skipped


def test_static_batch_stacks_images_and_drops_the_remainder(images):
    write_png(images / "c.png", solid(8, 8))
    source = ImageFolderSource(images, [spec("input", (2, 3, 8, 8))])
    assert len(source) == 1
    assert [b["input"].shape for b in source] == [(2, 3, 8, 8)]


def test_describe_states_the_preprocessing(images):
    text = ImageFolderSource(images, [IMAGE], ImagePreprocess.parse("mean=0.5,std=0.5")).describe()
    assert text == f"image folder {images}/ (2 images as 1x3x8x8 NCHW float32, mean=(0.5,), std=(0.5,))"


def test_parse_the_compact_cli_form():
    parsed = ImagePreprocess.parse(
        "size=224x224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,layout=nchw,dtype=float32")
    assert parsed == ImagePreprocess(size=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                                     layout=Layout.NCHW, dtype=ImageDtype.FLOAT32)
    assert ImagePreprocess.parse(parsed.text()) == parsed
    assert ImagePreprocess.parse("") == ImagePreprocess()
    assert ImagePreprocess.parse("size=96").size == (96, 96)


@pytest.mark.parametrize(("text", "message"), [
    ("resize=224x224", r"allowed keys: size, mean, std, layout, dtype"),
    ("size=224by224", r"size='224by224' must be HxW"),
    ("layout=chw", r"layout='chw': choose one of auto, nchw, nhwc"),
    ("std=0.5/0", r"std=\(0.5, 0.0\) must hold positive numbers"),
    ("mean=a/b", r"mean='a/b' must be numbers"),
    ("dtype=uint8,mean=0.5", r"mean/std apply to float32 images only"),
    ("size=8,size=9", r"given twice"),
])
def test_parse_errors_are_config_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        ImagePreprocess.parse(text)


def test_enum_fields_are_validated():
    with pytest.raises(ConfigError, match=r"layout='nchw' must be a Layout"):
        ImagePreprocess(layout="nchw")


def test_mean_length_must_match_the_channels(images):
    with pytest.raises(ConfigError, match=r"mean has 2 values but the model input has 3 channels"):
        ImageFolderSource(images, [IMAGE], ImagePreprocess(mean=(0.1, 0.2)))


def test_unreadable_layout_and_ranks_are_refused(images):
    with pytest.raises(ConfigError, match=r"cannot tell the layout of input 'input' \(1x8x8x8\)"):
        ImageFolderSource(images, [spec("input", (1, 8, 8, 8))])
    with pytest.raises(DataError, match=r"image data feeds 4-D inputs"):
        ImageFolderSource(images, [spec("input", (1, 64))])


def test_corrupt_image_names_the_file(images):
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"cannot decode image .*broken\.png"):
        list(ImageFolderSource(images, [IMAGE]))


def test_folder_without_images_or_arrays(tmp_path):
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(DataError, match=r"holds no .npy, .npz or image files"):
        open_data(tmp_path, [IMAGE])


def test_images_of_more_than_8_bits_are_refused_not_clipped(tmp_path):
    """Pillow's conversion of a 16-bit PNG to 8 bits clips every value above 255: a depth map or an
    X-ray calibrated as mostly white, silently. It is named, with what to do."""
    from PIL import Image

    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).save(tmp_path / "depth.png")
    with pytest.raises(DataError, match=r"depth\.png has I;16 pixels \(more than 8 bits\): the image preprocessing "
                                        r"reads 8-bit images; scale and save the samples as .npy instead$"):
        list(open_data(tmp_path, [IMAGE]))
