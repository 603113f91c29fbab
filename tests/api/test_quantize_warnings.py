"""The warnings quantize adds about the model it wrote, from what it measured."""

from __future__ import annotations

from types import SimpleNamespace as Item

from edgeopt.api._quantize_warnings import clipping_ranges



def test_a_range_clipping_what_calibration_saw_at_a_large_loss_is_warned_about():
    # QA: --calibration entropy clipped a trained MobileNet's stem ReLU6 at 2.5 of the 3.56 seen, 19.5 dB lost
    # in that tensor and 16 dB at the output, and nothing was said
    def result(method):
        seen = Item(minmax=Item(range=(0.0, 3.5626)))
        tensors = (Item(name="stem", kind="activation", method=method, range=(0.0, 2.5019)),)
        return Item(details={"calibration": Item(tensors={"stem": seen})}, tensors=tensors)

    def fidelity(lost_db):
        return Item(layers=(Item(tensor="stem", lost_db=lost_db), Item(tensor="other", lost_db=None)))

    assert clipping_ranges(result("entropy"), fidelity(19.46)) == [
        "1 activation loses 10 dB or more at its own quantization where the calibrated range clips values "
        "calibration saw: the worst, stem (entropy), loses 19.5 dB with [0, 2.502] against [0, 3.563] seen; "
        "--calibration percentile (the default) or minmax keeps those values"]
    assert not clipping_ranges(result("entropy"), fidelity(4.9))  # a loss below 10 dB: the fidelity line says it
    assert not clipping_ranges(result("minmax"), fidelity(19.46))  # minmax clips nothing calibration saw
