"""check_feed: one batch against the model inputs."""

from __future__ import annotations

import numpy as np
import pytest

from edgeopt.data import check_feed
from edgeopt.errors import DataError
from edgeopt.io import model_to_bytes
from tests.data.helpers import IMAGE, TOKENS, VECTOR, spec


def test_valid_feed_is_returned_as_owned_contiguous_arrays():
    data = np.arange(8, dtype=np.float32).reshape(4, 2).T[:1]  # a strided view
    data.flags.writeable = False
    out = check_feed([spec("x", (1, 4))], {"x": data}, where="t")
    assert out["x"].flags.c_contiguous and out["x"].flags.writeable
    np.testing.assert_array_equal(out["x"], data)


def test_dynamic_dims_accept_any_size():
    for batch in (1, 7):
        out = check_feed([TOKENS], {"ids": np.zeros((batch, 5), np.int64)}, where="t")
        assert out["ids"].shape == (batch, 5)
    free = spec("x", (None, "n"))
    assert check_feed([free], {"x": np.zeros((3, 11), np.float32)}, where="t")["x"].shape == (3, 11)


def test_float64_and_int_data_cast_into_float_input(caplog):
    out = check_feed([VECTOR], {"x": np.ones((1, 4), np.float64)}, where="t")
    assert out["x"].dtype == np.float32 and not caplog.records
    pixels = spec("pixels", (1, 4))  # a name no other test feeds integers to: warned once per process
    for _ in range(3):  # raw uint8 pixels are the classic mistake: said once, not per batch
        out = check_feed([pixels], {"pixels": np.arange(4, dtype=np.uint8).reshape(1, 4)}, where="t")
    assert out["pixels"].dtype == np.float32 and out["pixels"][0, 3] == 3.0
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "input 'pixels' gets uint8 data, cast to float32" in warnings[0]


def test_int32_data_cast_into_int64_input():
    out = check_feed([TOKENS], {"ids": np.ones((2, 5), np.int32)}, where="t")
    assert out["ids"].dtype == np.int64


def test_zero_one_integers_cast_into_a_bool_input():
    """An attention mask saved as int64 for a model taking a bool mask was refused ('convert it')."""
    mask = spec("mask", ("batch", "seq"), np.bool_)
    out = check_feed([mask], {"mask": np.array([[1, 1, 0]], np.int64)}, where="t")
    assert out["mask"].dtype == np.bool_ and out["mask"].tolist() == [[True, True, False]]
    with pytest.raises(DataError, match=r"t: input 'mask' wants bool but the values span 0\.\.2: give booleans"):
        check_feed([mask], {"mask": np.array([[1, 2, 0]], np.int64)}, where="t")
    with pytest.raises(DataError, match=r"wants bool but the data is float32"):  # rounding floats is a guess
        check_feed([mask], {"mask": np.ones((1, 3), np.float32)}, where="t")


@pytest.mark.parametrize(("shape", "input_shape", "how"), [
    ((2, 8, 8, 3), (1, 3, 8, 8), r"\(channels-last to NCHW: x\.transpose\(0, 3, 1, 2\)\)"),
    ((8, 8, 3), (1, 3, 8, 8), r"\(channels-last to NCHW: x\.transpose\(2, 0, 1\)\)"),
    ((1, 3, 8, 8), (1, 8, 8, 3), r"\(NCHW to channels-last: x\.transpose\(0, 2, 3, 1\)\)"),
    ((1, 4, 16), (1, 16, 4), r"$"),
    ((5, 32, 40, 3), ("n", 3, "h", "w"), r"\(channels-last to NCHW: x\.transpose\(0, 3, 1, 2\)\)"),
    ((4, 1, 8, 8, 3), (1, 3, 8, 8), r"\(channels-last to NCHW: x\.transpose\(0, 1, 4, 2, 3\)\)"),  # np.stack
    ((4, 1, 3, 8, 8), (1, 8, 8, 3), r"\(NCHW to channels-last: x\.transpose\(0, 1, 3, 4, 2\)\)"),
])
def test_dims_in_another_order_are_told_to_transpose_not_reshape(shape, input_shape, how):
    """Channels-last images for an NCHW model were told 'reshape or resize the data': a reshape
    scrambles the pixels, and calibration runs on it without a word."""
    with pytest.raises(DataError, match=r"its dims are the input's in another order: transpose the data, do not "
                                        r"reshape it ?" + how):
        check_feed([spec("x", input_shape)], {"x": np.zeros(shape, np.float32)}, where="t")
    with pytest.raises(DataError, match=r"reshape or resize the data$"):  # not a reordering
        check_feed([spec("x", input_shape)], {"x": np.zeros((1, 5, 8, 8), np.float32)}, where="t")


def test_stacked_samples_of_the_wrong_shape_name_the_samples_shape_not_the_rank():
    """N x 1 x ... is the documented np.stack layout: its rank is right, its samples' shape is what is
    wrong, and the message said '(rank 5, the model wants rank 4)'."""
    with pytest.raises(DataError, match=r"wants shape 1x3x8x8 but got 4x1x3x6x6 \(4 stacked samples of 1x3x6x6\): "
                                        r"reshape or resize the data$"):
        check_feed([IMAGE], {"input": np.zeros((4, 1, 3, 6, 6), np.float32)}, where="s.npy")
    with pytest.raises(DataError, match=r"got 4x1x3x8x8 \(4 stacked samples of 1x3x8x8\): yield one sample per item"):
        check_feed([IMAGE], {"input": np.zeros((4, 1, 3, 8, 8), np.float32)}, where="item 0")  # a generator's item


def test_unknown_input_name_lists_the_models_inputs():
    with pytest.raises(DataError, match=r"s\.npy has data for 'image', .*model's inputs are: input"):
        check_feed([IMAGE], {"image": np.zeros((1, 3, 8, 8), np.float32)}, where="s.npy")


def test_missing_input_is_named():
    specs = [spec("a", (1, 2)), spec("b", (1, 2))]
    with pytest.raises(DataError, match=r"no data for model input 'b'"):
        check_feed(specs, {"a": np.zeros((1, 2), np.float32)}, where="s.npz")


def test_wrong_shape_shows_expected_with_question_marks():
    dynamic = spec("input", ("n", 3, None, None))
    with pytest.raises(DataError, match=r"s\.npy: input 'input' wants shape \?x3x\?x\? but got 1x1x8x8"):
        check_feed([dynamic], {"input": np.zeros((1, 1, 8, 8), np.float32)}, where="s.npy")


def test_wrong_rank_says_so():
    with pytest.raises(DataError, match=r"wants shape 1x3x8x8 but got 3x8x8 \(rank 3, the model wants rank 4\)"):
        check_feed([IMAGE], {"input": np.zeros((3, 8, 8), np.float32)}, where="s.npy")


def test_non_numeric_dtype_is_refused():
    with pytest.raises(DataError, match=r"input 'x' holds <U1 data, not real numbers"):
        check_feed([VECTOR], {"x": np.array([["a", "b", "c", "d"]])}, where="t")


def test_float_data_into_int_input_is_refused():
    with pytest.raises(DataError, match=r"input 'ids' wants int64 but the data is float32: convert it"):
        check_feed([TOKENS], {"ids": np.ones((1, 5), np.float32)}, where="t")


def test_float32_data_into_a_bfloat16_input_points_to_ml_dtypes_not_numpy():
    """numpy has no bfloat16: the hint said array.astype(np.bfloat16), which raises AttributeError."""
    import ml_dtypes

    with pytest.raises(DataError, match=r"wants bfloat16 but the data is float32: convert it "
                                        r"\(array\.astype\(ml_dtypes\.bfloat16\)\)"):
        check_feed([spec("x", (1, 4), ml_dtypes.bfloat16)], {"x": np.ones((1, 4), np.float32)}, where="t")


def test_int_values_out_of_range_are_refused():
    small = spec("q", (1, 2), np.int8)
    with pytest.raises(DataError, match=r"wants int8 but the values span 0\.\.300"):
        check_feed([small], {"q": np.array([[0, 300]], np.int64)}, where="t")
    assert check_feed([small], {"q": np.array([[-5, 100]], np.int64)}, where="t")["q"].dtype == np.int8


@pytest.mark.parametrize(("bad", "word"), [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_nan_and_inf_are_refused(bad, word):
    data = np.zeros((1, 4), np.float32)
    data[0, 2] = bad
    with pytest.raises(DataError, match=rf"^x\.npy holds {word} values in input 'x': clean the data$"):
        check_feed([VECTOR], {"x": data}, where="x.npy")


def test_float64_beyond_float32_range_is_refused():
    with pytest.raises(DataError, match=r"beyond the float32 range"):
        check_feed([VECTOR], {"x": np.full((1, 4), 1e300)}, where="t")


def test_a_named_dynamic_dim_has_one_size_across_the_inputs():
    # token ids of 8 and a mask of 9 once went to ONNX Runtime, which failed inside an Add
    ids, mask = spec("ids", ("batch", "seq"), np.int64), spec("mask", ("batch", "seq"), np.int64)
    ok = check_feed([ids, mask], {"ids": np.ones((2, 8), np.int64), "mask": np.ones((2, 8), np.int64)}, where="s0")
    assert ok["ids"].shape == (2, 8)
    with pytest.raises(DataError, match=r"s1\.npz: input 'mask' has seq=9 but 'ids' has seq=8"):
        check_feed([ids, mask], {"ids": np.ones((1, 8), np.int64), "mask": np.ones((1, 9), np.int64)}, where="s1.npz")
    unnamed = spec("mask", (None, None), np.int64)  # dims without a name may differ
    check_feed([ids, unnamed], {"ids": np.ones((1, 8), np.int64), "mask": np.ones((1, 9), np.int64)}, where="s2")


def test_a_scalar_input_stacks_as_a_vector_of_samples():
    # x [1, 16] and a scalar s []: a file of 20 samples holds x (20, 16) and s (20,); s counted as 1
    # sample before ("holds different numbers of samples per input (x: 20, s: 1)")
    from edgeopt.data import dataset_from_arrays

    specs = [spec("x", (1, 16)), spec("s", ())]
    source = dataset_from_arrays({"x": np.ones((20, 16), np.float32), "s": np.arange(20, dtype=np.float32)}, specs)
    feeds = list(source)
    assert len(feeds) == 20 and feeds[3]["s"].shape == () and float(feeds[3]["s"]) == 3.0
    assert feeds[3]["x"].shape == (1, 16)


def test_per_sample_lengths_stack_with_the_samples_they_describe(tmp_path):
    """An LSTM with ``sequence_lens``: x [N, T, 40] and lengths [N], a file holding x (4, 90, 40) and
    lengths (4,) was refused: "holds different numbers of samples per input (x: 4, lengths: 1)". The
    lengths vector is cut with x, one value per sample; alone (or of another length) it is one batch."""
    from edgeopt.data import dataset_from_arrays, open_data

    specs = [spec("x", ("N", "T", 40)), spec("lengths", ("N",), np.int32)]
    arrays = {"x": np.ones((4, 90, 40), np.float32), "lengths": np.array([90, 70, 50, 30], np.int32)}
    np.savez(tmp_path / "s0.npz", **arrays)
    for source in (dataset_from_arrays(arrays, specs), open_data(tmp_path, specs)):
        feeds = list(source)
        assert len(feeds) == 4 and feeds[2]["x"].shape == (1, 90, 40) and feeds[2]["lengths"].tolist() == [50]
    lengths = [spec("lengths", ("N",), np.int32)]
    assert [f["lengths"].tolist() for f in dataset_from_arrays({"lengths": arrays["lengths"]}, lengths)] == [
        [90, 70, 50, 30]]
    with pytest.raises(DataError, match=r"different numbers of samples per input \(x: 4, lengths: 1\)"):
        list(dataset_from_arrays({**arrays, "lengths": arrays["lengths"][:3]}, specs))


def test_a_vector_of_another_dim_than_the_batch_is_not_cut_into_samples():
    """Beside x [1, 8] (batch 1), a vector input class_ids [K] is the model's, whatever its length: four
    samples of x and class_ids (4,) fed each sample one class id ([3], [1], ...) instead of refusing."""
    from edgeopt.data import dataset_from_arrays

    arrays = {"x": np.ones((4, 8), np.float32), "class_ids": np.array([3, 1, 4, 1], np.int64)}
    for batch in (1, "N"):
        specs = [spec("x", (batch, 8)), spec("class_ids", ("K",), np.int64)]
        with pytest.raises(DataError, match=r"different numbers of samples per input \(x: 4, class_ids: 1\)"):
            list(dataset_from_arrays(arrays, specs))
    specs = [spec("x", (None, 8)), spec("class_ids", (None,), np.int64)]  # unnamed dims: may be the batch
    assert [feed["class_ids"].tolist() for feed in dataset_from_arrays(arrays, specs)] == [[3], [1], [4], [1]]


def test_a_dataloaders_batches_for_a_batch_1_model_are_cut_into_samples():
    # a DataLoader's batches of 32 for a model exported at batch 1 were refused ("the model takes batch 1, this is
    # a batch of 32"), though a stacked array of the same samples is cut into them: the same model either way
    import edgeopt
    from edgeopt.data import IterableSource
    from edgeopt.demo import demo_calibration_path, demo_model_path

    samples = np.load(demo_calibration_path())[:64]
    batches = [{"input": b} for b in samples.reshape(2, 32, 1, 8, 8)]
    from_batches = edgeopt.quantize(demo_model_path(), edgeopt.Int8Config(), batches, check_speed=False)
    stacked = edgeopt.quantize(demo_model_path(), edgeopt.Int8Config(), {"input": samples}, check_speed=False)
    assert from_batches.calibration_samples == stacked.calibration_samples == 64
    assert model_to_bytes(from_batches.model) == model_to_bytes(stacked.model)
    source = IterableSource(batches, [spec("input", (1, 1, 8, 8))])
    assert source.num_samples == 64 and len(list(source)) == 64
    assert IterableSource(iter(batches), [spec("input", (1, 1, 8, 8))]).num_samples is None
    dynamic = IterableSource(batches, [spec("input", ("N", 1, 8, 8))])  # a model of dynamic batch takes them whole
    assert dynamic.num_samples == 2 and [feed["input"].shape[0] for feed in dynamic] == [32, 32]


def test_a_batch_a_source_checked_against_the_same_inputs_is_not_checked_again():
    from edgeopt.data import LabelledFeed, checked_feed, dataset_from_arrays

    specs = (spec("x", (1, 4)),)
    batch = next(iter(dataset_from_arrays({"x": np.zeros((3, 4), np.float32)}, specs)))
    assert isinstance(batch, LabelledFeed) and batch.checked == specs
    assert checked_feed(specs, batch, where="t") is batch  # checked once, by the source
    other = (spec("x", (1, 5)),)  # another model's inputs: checked against them
    with pytest.raises(DataError, match="x"):
        checked_feed(other, batch, where="t")
    unchecked = LabelledFeed({"x": np.full((1, 4), np.nan, np.float32)}, "t")  # labelled, never checked
    with pytest.raises(DataError, match="NaN"):
        checked_feed(specs, unchecked, where="t")
