"""edgeopt's generated C next to TensorFlow Lite for Microcontrollers, on the same float models.

For each architecture (a demo-like CNN on 8x8 digits, a MobileNetV2/V3-style
and a ResNet-style CNN on digits upsampled to 32x32x3, ``kws1d``, a 1-D
CNN in the style of keyword-spotting and sensor models, and ``kws_lstm``, an
LSTM on the same sequences), one float model is trained once in Keras
(fixed seeds) on scikit-learn's digits
(``train_test_split(test_size=0.25, random_state=0, stratify=y)``).

kws1d reads each digit as a sequence: the 8x8 image bilinearly upsampled to
32x32 (one channel), image row t (top to bottom) is time step t, its 32
pixels (left to right) the step's 32 features, as the frames and mel bands of
a spectrogram: Keras input ``(32, 32)``, NLC. Layers: Conv1D stem (32, k=3),
a depthwise-separable block (DepthwiseConv1D k=3, pointwise Conv1D to 48),
MaxPooling1D(2), two residual blocks of two dilated Conv1D each (k=3,
dilation 2 then 4), every conv followed by BatchNormalization and ReLU (the
second conv of a residual block: BatchNormalization, then ReLU after the
Add), GlobalAveragePooling1D, Dense(10). Its ONNX export is NCL (input
``[1, 32 features, 32 steps]``, kernels ``[O, I/g, k]``, Conv ``dilations``,
``MaxPool`` with ``kernel_shape [2]``), the same choice as the 2-D models'
NCHW. edgeopt's C stores that input ``[1, L, C]`` (its manifest layout
``(0, 2, 1)``), the layout of every tensor between its 1-D layers
(``lift_1d``), so it runs no transpose; the ``.tflite`` takes ``[1, L, C]``
too (TFLite runs Conv1D as CONV_2D between RESHAPEs).

kws_lstm reads the same sequences with one Keras LSTM (32 units, Keras'
defaults: tanh, recurrent sigmoid, not unrolled; its last hidden state) and
Dense(10). Its ONNX export keeps Keras' input ``[1, 32 steps, 32 features]``
and transposes it to an ONNX LSTM's ``[steps, 1, features]`` (layout 0, no
initial states), Y_h flattened to ``[1, 32]`` for the Gemm; Keras' gate
blocks i, f, c, o become ONNX's i, o, f, c, and ONNX's B is Keras' bias
followed by zeros (Keras has one bias per gate, ONNX adds two). edgeopt's
C runs it as the LSTM (``eo_lstm_s8``) and the Gemm: the Transpose, which moves only the batch axis of 1,
and the flatten are reshapes written in place.
TFLite's converter fuses a Keras LSTM into UNIDIRECTIONAL_SEQUENCE_LSTM
(which TFLM runs in int8, with an int16 cell state) only for Keras 2's
layer, whose function carries the ``api_implements`` attribute the converter
looks for. Keras 3's LSTM (TF 2.21, Keras 3.15) converts to a WHILE loop
instead, and its full-int8 conversion crashes (segmentation fault in the
converter's calibration). So kws_lstm alone is built, trained, exported and
converted with Keras 2 (``tf_keras``, in the ``tflm`` extra): its worker
runs with ``TF_USE_LEGACY_KERAS=1`` (the other models stay in Keras 3), its
cache folder is named ``kws_lstm-keras2-...``, and the converted model has a
fixed batch of 1 (as every model here). Its ``.tflite`` runs
UNIDIRECTIONAL_SEQUENCE_LSTM (all 32 steps; its hidden and cell states are
variable tensors, reset before every sample, else one sample's last state
starts the next), STRIDED_SLICE (the last step's hidden state) and
FULLY_CONNECTED.

Then, for every model:

* **TFLite Micro**: the Keras model is converted with ``tf.lite.TFLiteConverter``
  to a full-int8 ``.tflite`` (``Optimize.DEFAULT``, the calibration samples as
  representative dataset, ``TFLITE_BUILTINS_INT8``, int8 input and output) and
  run in TFLM's Python interpreter (PyPI ``tflite-micro``, reference kernels).
* **edgeopt**: the *same trained weights* are written to ONNX (opset 17,
  NCHW or NCL, BatchNormalization nodes kept, Keras' asymmetric ``same`` padding as
  Conv pads) by a small exporter in this script; the ONNX float outputs are
  checked against Keras' on the test split. Then ``edgeopt.api.quantize``
  (``Int8Config(target=Target.MCU)``, defaults otherwise, the same calibration
  samples) and ``compile_c`` (``rounding="double"``, TFLite's default).

Measured per model and side:

* **arena**: TFLM: the smallest ``arena_size`` with which the interpreter
  allocates and runs (bisection, 16-byte steps), and its split into the
  planned non-persistent part (activations, scratch: "head") and the
  persistent part (tensor structs, per-channel multipliers, op data: "tail")
  from ``print_allocations()``. edgeopt: ``CompileResult.arena_bytes`` (the
  only RAM the generated code uses besides the caller's input/output
  buffers) and the planner's lower bound (the largest sum of live tensors).
* **flash**: edgeopt: model + code, as the bytes (``text + data``) of a
  program that runs the model (the generated ``model.c`` + ``kernels.c`` at
  ``-O2``, the generated Makefile's level; weights are ``const`` arrays),
  linked with ``-ffunction-sections -fdata-sections -fno-unwind-tables
  -Wl,--gc-sections``, minus an empty program's (same flags; libc stays a
  shared library). TFLM: only the PyPI wheel is used, so the code size of an
  interpreter built for just these ops is not measured; the ``.tflite`` bytes
  alone are reported as a *lower bound* of TFLM's flash (the interpreter,
  allocator and kernels come on top), and the target reads "edgeopt's weights
  + code below TFLM's ``.tflite`` alone". Separately, labelled as not
  comparable, the ``size`` of the wheel's compiled library (``_runtime.so``:
  every TFLM kernel, the Python bindings, dynamic-linking tables): an upper
  bound of TFLM's code on this host.
* **host latency per inference**: median (and min) over ``--repeats`` passes
  of the test split of one inference: for TFLM around ``invoke()`` of the
  wheel's Python interpreter (its C++ interpreter and reference kernels; the
  variable tensors reset, input set and output read outside the timer, so the
  timer adds only a Python call into the binding), in a long-lived
  ``.venv-tflm`` process that warms up with one pass; for edgeopt around
  ``model_run()`` in a C driver (every sample in one process after a warm-up
  pass, ``-O2``). The two processes take turns, one pass each, the first of
  each pair alternating, so drift of a shared machine hits both alike.
* **accuracy** (top-1) on the digits test split, and the top-1 agreement of
  the two int8 models; whether edgeopt's C is bit-exact with edgeopt's integer
  reference interpreter (``verify``: every intermediate tensor, on
  ``--verify-samples`` test images).

Host caveats: x86-64, not a Cortex-M. TFLM's persistent arena part holds
structs with pointers (8 bytes here, 4 on a 32-bit MCU), so its host arena
overstates the device's; code sizes are x86-64 code (Thumb-2 is smaller);
the ``.tflite``/weight bytes are the same on any target. The wheel's C++ is
compiled by the wheel's own build, with flags this script does not choose.

TensorFlow and tflite-micro live in their own virtual environment (the
``tflm`` extra; TF pins its own numpy/protobuf): this script, run with
edgeopt's Python, calls itself in ``.venv-tflm``: with ``--tflm-worker`` to
train, convert and size the arena, with ``--tflm-timer`` for the latency
passes.

Run from the repository root::

    python3 -m venv .venv-tflm && .venv-tflm/bin/pip install -e '.[tflm]'   # once (or: make tflm-venv)
    .venv/bin/python benchmarks/mcu_vs_tflm.py [--models demo,mobilenet,resnet,kws1d,kws_lstm] [--seed 0]
        [--repeats 5] [--verify-samples 100] [--markdown out.md] [--json out.json]
        [--tflm-python .venv-tflm/bin/python] [--retrain]

Trained Keras weights and the ``.tflite`` files are cached in
``benchmarks/.cache/mcu_vs_tflm/`` (``--retrain`` ignores the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

SCRIPT = pathlib.Path(__file__).resolve()
REPO_ROOT = SCRIPT.parents[1]
RESULT_PREFIX = "TFLM-RESULT "
ALL_MODELS = ("demo", "mobilenet", "resnet", "kws1d", "kws_lstm")
SEQUENCE_MODELS = ("kws1d", "kws_lstm")  # digits read as 32 steps of 32 features (digits_data)
EPOCHS = {"demo": 40, "mobilenet": 25, "resnet": 20, "kws1d": 30, "kws_lstm": 30}
NOISE = 0.03  # run-to-run spread of median latencies seen on a shared 2-core machine
CFLAGS = ["-std=c99", "-O2"]  # the generated Makefile's optimisation level
# for the flash probe: no unwind tables, unused sections dropped
SECTION_FLAGS = ["-ffunction-sections", "-fdata-sections", "-fno-unwind-tables", "-fno-asynchronous-unwind-tables"]


# ---------------------------------------------------------------- architectures (shared by both sides)
#
# A model is a list of layers, each a dict: {"name", "op", "in": [names], ...}.
# ops: input (shape: spatial sizes then channels, channels last as Keras), conv (kernel, stride, dilation,
# filters, depthwise, bias, bn, act), add (act), mul, pool (kind: max or avg, size = stride, valid padding),
# gap (keepdims), dense (units), act (act), lstm (units: Keras LSTM, its last hidden state). act: None, relu,
# relu6, hswish, hsigmoid. An input of shape (L, C) makes every conv and pool 1-D (Keras Conv1D, ONNX Conv over
# [N, C, L]), (H, W, C) 2-D. A model with an lstm keeps Keras' [N, L, C] as its ONNX input (onnx_layout).


class _Spec:
    def __init__(self, shape):
        self.layers = [{"name": "input", "op": "input", "in": [], "shape": list(shape)}]
        self._count = 0

    def _add(self, op, inputs, **kw):
        self._count += 1
        name = f"{op}{self._count}"
        self.layers.append({"name": name, "op": op, "in": list(inputs), **kw})
        return name

    def conv(self, x, filters, kernel, stride=1, act=None, depthwise=False, bn=True, bias=False, dilation=1):
        return self._add("conv", [x], filters=filters, kernel=kernel, stride=stride, act=act,
                         depthwise=depthwise, bn=bn, bias=bias, dilation=dilation)

    def pool(self, x, kind, size):
        return self._add("pool", [x], kind=kind, size=size)

    def add(self, a, b, act=None):
        return self._add("add", [a, b], act=act)

    def mul(self, a, b):
        return self._add("mul", [a, b])

    def gap(self, x, keepdims):
        return self._add("gap", [x], keepdims=keepdims)

    def dense(self, x, units):
        return self._add("dense", [x], units=units)

    def act(self, x, act):
        return self._add("act", [x], act=act)

    def lstm(self, x, units):
        return self._add("lstm", [x], units=units)

    def se(self, x, channels, squeeze):
        s = self.gap(x, keepdims=True)
        s = self.conv(s, squeeze, 1, act="relu", bn=False, bias=True)
        s = self.conv(s, channels, 1, act="hsigmoid", bn=False, bias=True)
        return self.mul(x, s)

    def inverted_residual(self, x, cin, expanded, cout, stride, act, se=False):
        y = self.conv(x, expanded, 1, act=act) if expanded != cin else x
        y = self.conv(y, expanded, 3, stride=stride, act=act, depthwise=True)
        if se:
            y = self.se(y, expanded, max(8, expanded // 4))
        y = self.conv(y, cout, 1)
        return self.add(x, y) if stride == 1 and cin == cout else y

    def dilated_residual(self, x, channels, kernel, dilation):
        y = self.conv(x, channels, kernel, act="relu", dilation=dilation)
        y = self.conv(y, channels, kernel, dilation=dilation)
        return self.add(x, y, act="relu")


def architecture(name: str) -> list[dict]:
    if name == "demo":  # scripts/train_demo.py's DigitsNet, in Keras layers
        s = _Spec((8, 8, 1))
        x = s.conv("input", 16, 3, act="relu6")
        x = s.inverted_residual(x, 16, 32, 16, 1, "relu6", se=True)
        x = s.conv(x, 16, 3, stride=2, act="hswish", depthwise=True)
        x = s.conv(x, 32, 1, act="hswish")
        x = s.inverted_residual(x, 32, 64, 32, 1, "hswish", se=True)
        s.dense(s.gap(x, keepdims=False), 10)
        return s.layers
    if name == "mobilenet":  # MobileNetV2 blocks, V3's SE and hardswish in the second half
        s = _Spec((32, 32, 3))
        x = s.conv("input", 16, 3, stride=2, act="relu6")                    # 16x16
        x = s.inverted_residual(x, 16, 16, 16, 1, "relu6")
        x = s.inverted_residual(x, 16, 64, 24, 2, "relu6")                   # 8x8
        x = s.inverted_residual(x, 24, 72, 24, 1, "relu6")
        x = s.inverted_residual(x, 24, 72, 40, 2, "hswish", se=True)         # 4x4
        x = s.inverted_residual(x, 40, 120, 40, 1, "hswish", se=True)
        x = s.conv(x, 96, 1, act="hswish")
        s.dense(s.gap(x, keepdims=False), 10)
        return s.layers
    if name == "resnet":  # ResNet basic blocks, projection shortcuts
        s = _Spec((32, 32, 3))
        x = s.conv("input", 16, 3, act="relu")
        for cin, cout, stride in ((16, 16, 1), (16, 32, 2), (32, 64, 2)):
            y = s.conv(x, cout, 3, stride=stride, act="relu")
            y = s.conv(y, cout, 3)
            shortcut = x if stride == 1 and cin == cout else s.conv(x, cout, 1, stride=stride)
            x = s.add(shortcut, y, act="relu")
        s.dense(s.gap(x, keepdims=False), 10)
        return s.layers
    if name == "kws1d":  # a keyword-spotting / sensor 1-D CNN: 32 time steps of 32 features (digits_data)
        s = _Spec((32, 32))
        x = s.conv("input", 32, 3, act="relu")                                 # 32 steps x 32
        x = s.conv(x, 32, 3, act="relu", depthwise=True)                       # depthwise-separable block
        x = s.conv(x, 48, 1, act="relu")                                       # 32 x 48
        x = s.pool(x, "max", 2)                                                # 16 x 48
        x = s.dilated_residual(x, 48, 3, dilation=2)
        x = s.dilated_residual(x, 48, 3, dilation=4)
        s.dense(s.gap(x, keepdims=False), 10)
        return s.layers
    if name == "kws_lstm":  # the same sequences through one LSTM (32 units), its last hidden state classified
        s = _Spec((32, 32))
        s.dense(s.lstm("input", 32), 10)
        return s.layers
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(ALL_MODELS)}")


def same_pads(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's ``padding='same'``: the extra pixel goes at the end (bottom/right)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def channels_first(x: np.ndarray) -> np.ndarray:
    """Keras' channels-last batch (NHWC, NLC) in ONNX's layout (NCHW, NCL)."""
    return np.ascontiguousarray(np.moveaxis(x, -1, 1))


def recurrent(layers: list[dict]) -> bool:
    """Whether the model has an LSTM: its TFLM side runs in Keras 2 (tf_keras, docstring), its ONNX input is
    [N, steps, features]."""
    return any(layer["op"] == "lstm" for layer in layers)


def onnx_layout(layers: list[dict], x: np.ndarray) -> np.ndarray:
    """A Keras batch in the ONNX export's input layout: channels first for the CNNs; a recurrent model's
    [N, steps, features] as given (its export transposes to the LSTM's [steps, N, features] itself)."""
    return np.ascontiguousarray(x) if recurrent(layers) else channels_first(x)


# ---------------------------------------------------------------- TFLM worker (runs in .venv-tflm)


def _keras():
    """Keras 3, or Keras 2 (tf_keras) in a worker started with TF_USE_LEGACY_KERAS=1 (a model with an LSTM:
    run_tflm_worker), the variable that also makes TensorFlow's own code (the converter) use tf_keras."""
    if os.environ.get("TF_USE_LEGACY_KERAS") == "1":
        import tf_keras

        return tf_keras
    import keras

    return keras


def _keras_model(layers, batch_size=None):
    keras = _keras()
    L = keras.layers

    def activation(x, act, name):
        if act is None:
            return x
        if act == "relu":
            return L.ReLU(name=name)(x)
        if act == "relu6":
            return L.ReLU(max_value=6.0, name=name)(x)
        if act == "hswish":
            return L.Activation("hard_swish", name=name)(x)
        if act == "hsigmoid":
            return L.Activation("hard_sigmoid", name=name)(x)
        raise ValueError(act)

    one_d = len(layers[0]["shape"]) == 2  # (L, C): Conv1D and friends
    conv_layer, depthwise_layer = (L.Conv1D, L.DepthwiseConv1D) if one_d else (L.Conv2D, L.DepthwiseConv2D)
    pool_layers = {"max": L.MaxPooling1D, "avg": L.AveragePooling1D} if one_d else \
        {"max": L.MaxPooling2D, "avg": L.AveragePooling2D}
    gap_layer = L.GlobalAveragePooling1D if one_d else L.GlobalAveragePooling2D
    values = {}
    for layer in layers:
        name, op, ins = layer["name"], layer["op"], [values.get(i) for i in layer["in"]]
        if op == "input":
            out = keras.Input(shape=tuple(layer["shape"]), batch_size=batch_size, name="input")
        elif op == "conv":
            if layer["depthwise"]:
                out = depthwise_layer(layer["kernel"], strides=layer["stride"], padding="same",
                                      dilation_rate=layer["dilation"], use_bias=layer["bias"], name=name)(ins[0])
            else:
                out = conv_layer(layer["filters"], layer["kernel"], strides=layer["stride"], padding="same",
                                 dilation_rate=layer["dilation"], use_bias=layer["bias"], name=name)(ins[0])
            if layer["bn"]:
                out = L.BatchNormalization(momentum=0.9, name=name + "_bn")(out)  # torch-like
            out = activation(out, layer["act"], name + "_act")
        elif op == "add":
            out = activation(L.Add(name=name)(ins), layer["act"], name + "_act")
        elif op == "mul":
            out = L.Multiply(name=name)(ins)
        elif op == "pool":
            out = pool_layers[layer["kind"]](layer["size"], name=name)(ins[0])
        elif op == "gap":
            out = gap_layer(keepdims=layer["keepdims"], name=name)(ins[0])
        elif op == "dense":
            out = L.Dense(layer["units"], name=name)(ins[0])
        elif op == "act":
            out = activation(ins[0], layer["act"], name)
        elif op == "lstm":  # defaults: tanh, recurrent sigmoid, unit forget bias, not unrolled
            out = L.LSTM(layer["units"], name=name)(ins[0])
        else:
            raise ValueError(op)
        values[name] = out
    return keras.Model(values["input"], out)


def _export_weights(model, layers) -> dict[str, np.ndarray]:
    """Every trained parameter, keyed ``layer/param`` (Keras layouts: HWIO, HWC1, IO; 1-D: LIO, LC1; LSTM:
    kernel [I, 4H], recurrent_kernel [H, 4H], bias [4H], gates i, f, c, o)."""
    weights = {}
    for layer in layers:
        if layer["op"] == "conv":
            conv = model.get_layer(layer["name"])
            params = conv.get_weights()
            weights[layer["name"] + "/kernel"] = params[0]
            if layer["bias"]:
                weights[layer["name"] + "/bias"] = params[1]
            if layer["bn"]:
                bn = model.get_layer(layer["name"] + "_bn")
                gamma, beta, mean, var = bn.get_weights()
                weights.update({layer["name"] + "/gamma": gamma, layer["name"] + "/beta": beta,
                                layer["name"] + "/mean": mean, layer["name"] + "/var": var,
                                layer["name"] + "/eps": np.float32(bn.epsilon)})
        elif layer["op"] == "dense":
            kernel, bias = model.get_layer(layer["name"]).get_weights()
            weights[layer["name"] + "/kernel"], weights[layer["name"] + "/bias"] = kernel, bias
        elif layer["op"] == "lstm":
            kernel, recurrent, bias = model.get_layer(layer["name"]).get_weights()
            weights.update({layer["name"] + "/kernel": kernel, layer["name"] + "/recurrent_kernel": recurrent,
                            layer["name"] + "/bias": bias})
    return {k: np.asarray(v, np.float32) for k, v in weights.items()}


def _train_keras(layers, data, *, epochs: int, seed: int):
    import tensorflow as tf

    keras = _keras()
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    model = _keras_model(layers)
    steps = epochs * -(-len(data["x_train"]) // 32)
    schedule = keras.optimizers.schedules.CosineDecay(0.0, steps, warmup_target=4e-3, warmup_steps=steps // 10)
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    rng = np.random.default_rng(seed)
    x, y = data["x_train"], data["y_train"]

    def shifted():  # random shifts of up to one input-grid step (8x8 digits: 1 px; 32x32: 4 px)
        step = 1 if x.shape[1] == 8 else 4
        image = x if x.ndim == 4 else x[..., None]  # kws1d, kws_lstm: the image behind the sequence (rows)
        padded = np.pad(image, ((0, 0), (step, step), (step, step), (0, 0)))
        out = np.empty_like(image)
        for i, (dy, dx) in enumerate(rng.integers(0, 3, (len(x), 2)) * step):
            out[i] = padded[i, dy:dy + x.shape[1], dx:dx + x.shape[2]]
        return out.reshape(x.shape)

    for _ in range(epochs):
        model.fit(shifted(), y, batch_size=32, epochs=1, shuffle=True, verbose=0)
    return model


def _convert_int8(model, layers, calib: np.ndarray) -> bytes:
    import tensorflow as tf

    static = _keras_model(layers, batch_size=1)  # the same layers and weights, batch fixed to 1 for TFLM
    static.set_weights(model.get_weights())
    converter = tf.lite.TFLiteConverter.from_keras_model(static)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([calib[i:i + 1]] for i in range(len(calib)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


def _tflite_ops(flatbuffer: bytes) -> list[str]:
    from tflite_micro.python.tflite_micro import runtime
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema

    model = runtime.convert_bytearray_to_object(bytearray(flatbuffer))
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    ops = []
    for op in model.subgraphs[0].operators:
        ops.append(names[runtime.get_builtin_code_from_operator_code(model.operatorCodes[op.opcodeIndex])])
    return ops


def _capture_stderr(function):
    """Run ``function`` and return what C++ code wrote to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            function()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        return capture.read().decode(errors="replace")


def _tflm_interpreter(flatbuffer: bytes, arena: int):
    from tflite_micro.python.tflite_micro import runtime

    return runtime.Interpreter.from_bytes(flatbuffer, arena_size=arena)


def _set_sample(interpreter, x: np.ndarray) -> None:
    """A new, independent inference: ``reset()`` zeroes TFLM's variable tensors (UNIDIRECTIONAL_SEQUENCE_LSTM's
    hidden and cell state, which otherwise carry one sample's last state into the next: kws_lstm's accuracy
    drops to about 30%; nothing for the CNNs), then the input is set. Outside the latency timer."""
    interpreter.reset()
    interpreter.set_input(x, 0)


def _tflm_min_arena(flatbuffer: bytes, sample: np.ndarray) -> int:
    """The smallest arena (16-byte steps) with which the interpreter allocates and invokes."""

    def works(size: int) -> bool:
        try:
            interpreter = _tflm_interpreter(flatbuffer, size)
            interpreter.set_input(sample, 0)
            interpreter.invoke()
            return True
        except Exception:
            return False

    high = 16 * 1024
    while not works(high):
        high *= 2
    low = 0
    while high - low > 16:
        middle = (low + high) // 32 * 16
        low, high = (low, middle) if _quiet(works, middle) else (middle, high)
    return high


def _quiet(function, *args):
    result = []
    _capture_stderr(lambda: result.append(function(*args)))
    return result[0]


def _quantize_input(x: np.ndarray, details: dict) -> np.ndarray:
    scale = details["quantization_parameters"]["scales"][0]
    zero = details["quantization_parameters"]["zero_points"][0]
    return np.clip(np.round(x / scale) + zero, -128, 127).astype(np.int8)


def tflm_worker(payload: dict) -> dict:
    import tensorflow as tf
    import tflite_micro

    tf.config.threading.set_intra_op_parallelism_threads(2)
    layers = payload["layers"]
    data = dict(np.load(payload["data"]))
    work = pathlib.Path(payload["work"])
    weights_file, tflite_file = work / "keras_weights.npz", work / "model.tflite"
    result = {"versions": {"tensorflow": tf.__version__, "keras": _keras().__version__,
                           "tflite-micro": tflite_micro.__version__}}
    model = _keras_model(layers)
    if payload.get("cached") and weights_file.exists() and tflite_file.exists():
        cached = np.load(weights_file)
        model.load_weights(str(work / "keras.weights.h5"))
        result["train_s"] = float(cached["train_s"])
    else:
        start = time.perf_counter()
        model = _train_keras(layers, data, epochs=payload["epochs"], seed=payload["seed"])
        result["train_s"] = time.perf_counter() - start
        model.save_weights(str(work / "keras.weights.h5"))
        np.savez(weights_file, train_s=result["train_s"], **_export_weights(model, layers))
        tflite_file.write_bytes(_convert_int8(model, layers, data["calib"]))
    export = _export_weights(model, layers)
    np.savez(work / "weights.npz", **export)
    keras_logits = model.predict(data["x_test"], batch_size=64, verbose=0)
    np.save(work / "keras_logits.npy", keras_logits)
    result["keras_accuracy"] = float((keras_logits.argmax(1) == data["y_test"]).mean())

    flatbuffer = tflite_file.read_bytes()
    result["tflite_bytes"] = len(flatbuffer)
    result["ops"] = _tflite_ops(flatbuffer)
    probe = _tflm_interpreter(flatbuffer, 1 << 20)
    in_details, out_details = probe.get_input_details(0), probe.get_output_details(0)
    x_q = _quantize_input(data["x_test"], in_details)
    np.save(work / "tflm_inputs.npy", x_q)
    result["arena_bytes"] = _tflm_min_arena(flatbuffer, x_q[:1])

    interpreter = _tflm_interpreter(flatbuffer, result["arena_bytes"])
    outputs = []
    for i in range(len(x_q)):  # the outputs (latency: tflm_timer, taking turns with edgeopt's driver)
        _set_sample(interpreter, x_q[i:i + 1])
        interpreter.invoke()
        outputs.append(np.array(interpreter.get_output(0)).reshape(-1))
    text = _capture_stderr(interpreter.print_allocations)
    for key, pattern in (("arena_head", r"head\s+(\d+)"), ("arena_tail", r"tail\s+(\d+)"),
                         ("arena_total", r"total\s+(\d+)")):
        match = re.search(r"Arena allocation " + pattern, text)
        result[key] = int(match.group(1)) if match else None
    result["allocations"] = text.strip().splitlines()[:40]
    outputs = np.stack(outputs).astype(np.int8)
    np.save(work / "tflm_outputs.npy", outputs)
    result["accuracy"] = float((outputs.argmax(1) == data["y_test"]).mean())
    result["output_scale"] = float(out_details["quantization_parameters"]["scales"][0])
    result["wheel_library"] = _wheel_library_size()
    return result


def _wheel_library_size() -> dict | None:
    """``size`` of the wheel's compiled interpreter library: every TFLM kernel plus the Python bindings."""
    from tflite_micro.python.tflite_micro import runtime

    libraries = sorted(pathlib.Path(runtime.__file__).parent.glob("_runtime*.so"))
    if not libraries:
        return None
    try:
        berkeley = subprocess.run(["size", str(libraries[0])], capture_output=True, text=True, check=True).stdout
        sysv = subprocess.run(["size", "-A", str(libraries[0])], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    text, data, bss = map(int, berkeley.splitlines()[1].split()[:3])
    sections = {f[0]: int(f[1]) for f in (line.split() for line in sysv.splitlines()) if len(f) >= 3
                and f[0].startswith(".") and f[1].isdigit()}
    return {"file": libraries[0].name, "text": text, "data": data, "bss": bss,
            "text_section": sections.get(".text"), "rodata_section": sections.get(".rodata")}


def tflm_timer(payload: dict) -> None:
    """Latency passes of the wheel's interpreter, one per ``pass`` line on stdin (runs in .venv-tflm).

    Loads the ``.tflite`` with the measured arena, runs one warm-up pass, then for each request times
    ``invoke()`` on every test sample and writes the ns as int64 to ``payload["times"]``.
    """
    work = pathlib.Path(payload["work"])
    inputs = np.load(work / "tflm_inputs.npy")
    interpreter = _tflm_interpreter((work / "model.tflite").read_bytes(), payload["arena"])
    times = np.empty(len(inputs), np.int64)
    for i in range(len(inputs)):  # warm-up pass
        _set_sample(interpreter, inputs[i:i + 1])
        interpreter.invoke()
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "pass":
            break
        for i in range(len(inputs)):
            _set_sample(interpreter, inputs[i:i + 1])
            start = time.perf_counter_ns()
            interpreter.invoke()
            times[i] = time.perf_counter_ns() - start
        times.tofile(payload["times"])
        print("done", flush=True)


# ---------------------------------------------------------------- ONNX export of the Keras weights


def export_onnx(layers: list[dict], weights: dict[str, np.ndarray], path: pathlib.Path) -> None:
    """The Keras model as ONNX (NCHW, or NCL for a 1-D model): Conv [+BatchNormalization] [+act], Add, Mul,
    MaxPool/AveragePool, GAP, Gemm. Keras kernels (spatial..., in, out) become ONNX's (out, in, spatial...).

    A model with an LSTM takes Keras' [1, steps, features] (onnx_layout), transposed to the ONNX LSTM's
    [steps, 1, features] (layout 0, the layout edgeopt's MCU target and ONNX Runtime run); its Y_h
    [1 direction, 1, H] is flattened to [1, H] for the Gemm. Keras' gate blocks i, f, c, o become ONNX's i, o,
    f, c; W [1, 4H, I] and R [1, 4H, H] are the transposed kernels, B [1, 8H] Keras' bias then zeros (Keras
    has one bias per gate, ONNX adds Wb + Rb); no initial states (zeros, as Keras')."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, sizes = [], [], {}

    def const(name, array):
        inits.append(numpy_helper.from_array(np.array(array, np.float32, order="C"), name))  # 0-d stays 0-d
        return name

    def act(x, kind, name):
        if kind is None:
            return x
        out = name + "_act"
        if kind == "relu":
            nodes.append(helper.make_node("Relu", [x], [out], name=out))
        elif kind == "relu6":
            nodes.append(helper.make_node("Clip", [x, const(out + "_min", np.array(0.0)),
                                                   const(out + "_max", np.array(6.0))], [out], name=out))
        elif kind == "hswish":
            nodes.append(helper.make_node("HardSwish", [x], [out], name=out))
        elif kind == "hsigmoid":
            nodes.append(helper.make_node("HardSigmoid", [x], [out], name=out, alpha=1.0 / 6.0, beta=0.5))
        return out

    value = {}
    for layer in layers:
        name, op = layer["name"], layer["op"]
        ins = [value[i] for i in layer["in"]]
        if op == "input":
            *spatial, c = layer["shape"]
            shape = [1, *spatial, c] if recurrent(layers) else [1, c, *spatial]
            graph_input = helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)
            value[name], sizes[name] = "input", tuple(spatial)
            continue
        if op == "conv":
            k, stride, dilation = layer["kernel"], layer["stride"], layer["dilation"]
            spatial = sizes[layer["in"][0]]
            rank = len(spatial)
            pads = [same_pads(size, k, stride, dilation) for size in spatial]
            kernel = weights[name + "/kernel"]
            if layer["depthwise"]:  # HWC1 -> C1HW (1-D: LC1 -> C1L)
                weight, group = kernel.transpose(rank, rank + 1, *range(rank)), kernel.shape[rank]
            else:  # HWIO -> OIHW (1-D: LIO -> OIL)
                weight, group = kernel.transpose(rank + 1, rank, *range(rank)), 1
            inputs = [ins[0], const(name + "_W", weight)]
            if layer["bias"]:
                inputs.append(const(name + "_B", weights[name + "/bias"]))
            out = name
            nodes.append(helper.make_node("Conv", inputs, [out], name=name, kernel_shape=[k] * rank,
                                          strides=[stride] * rank, dilations=[dilation] * rank,
                                          pads=[b for b, _ in pads] + [e for _, e in pads], group=group))
            if layer["bn"]:
                bn = name + "_bn"
                nodes.append(helper.make_node(
                    "BatchNormalization",
                    [out] + [const(f"{bn}_{p}", weights[f"{name}/{p}"]) for p in ("gamma", "beta", "mean", "var")],
                    [bn], name=bn, epsilon=float(weights[name + "/eps"])))
                out = bn
            value[name], sizes[name] = act(out, layer["act"], name), tuple(-(-size // stride) for size in spatial)
        elif op == "add":
            nodes.append(helper.make_node("Add", ins, [name], name=name))
            value[name], sizes[name] = act(name, layer["act"], name), sizes[layer["in"][0]]
        elif op == "mul":
            nodes.append(helper.make_node("Mul", ins, [name], name=name))
            value[name], sizes[name] = name, sizes[layer["in"][0]]
        elif op == "pool":  # Keras' default: stride = pool size, 'valid' padding
            spatial, size = sizes[layer["in"][0]], layer["size"]
            kind = {"max": "MaxPool", "avg": "AveragePool"}[layer["kind"]]
            nodes.append(helper.make_node(kind, ins, [name], name=name, kernel_shape=[size] * len(spatial),
                                          strides=[size] * len(spatial)))
            value[name], sizes[name] = name, tuple(n // size for n in spatial)
        elif op == "gap":
            pooled = name if layer["keepdims"] else name + "_pool"
            nodes.append(helper.make_node("GlobalAveragePool", ins, [pooled], name=pooled))
            if not layer["keepdims"]:
                nodes.append(helper.make_node("Flatten", [pooled], [name], name=name, axis=1))
            value[name], sizes[name] = name, (1,) * len(sizes[layer["in"][0]])
        elif op == "dense":
            nodes.append(helper.make_node("Gemm", [ins[0], const(name + "_W", weights[name + "/kernel"]),
                                                   const(name + "_B", weights[name + "/bias"])], [name], name=name))
            value[name] = name
        elif op == "act":
            value[name], sizes[name] = act(ins[0], layer["act"], name), sizes[layer["in"][0]]
        elif op == "lstm":
            units = layer["units"]

            def onnx_gates(a):  # the last axis' Keras gate blocks i, f, c, o in ONNX's order i, o, f, c
                return np.concatenate([a[..., g * units:(g + 1) * units] for g in (0, 3, 1, 2)], axis=-1)

            bias = np.concatenate([onnx_gates(weights[name + "/bias"]), np.zeros(4 * units, np.float32)])
            nodes.append(helper.make_node("Transpose", ins, [name + "_steps"], name=name + "_steps", perm=[1, 0, 2]))
            nodes.append(helper.make_node(
                "LSTM", [name + "_steps", const(name + "_W", onnx_gates(weights[name + "/kernel"]).T[None]),
                         const(name + "_R", onnx_gates(weights[name + "/recurrent_kernel"]).T[None]),
                         const(name + "_B", bias[None])], ["", name + "_h"], name=name, hidden_size=units))
            nodes.append(helper.make_node("Flatten", [name + "_h"], [name], name=name + "_flat", axis=2))
            value[name] = name
    last = layers[-1]
    nodes.append(helper.make_node("Identity", [value[last["name"]]], ["logits"], name="output"))
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, last["units"]])
    graph = helper.make_graph(nodes, "keras_export", [graph_input], [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="benchmarks/mcu_vs_tflm.py", ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, path)


# ---------------------------------------------------------------- edgeopt side


def _compile(cc: str, flags: list[str], sources: list[pathlib.Path], output: pathlib.Path, cwd: pathlib.Path,
             extra: list[str] = ()) -> None:
    command = [cc, *flags, *map(str, sources), "-o", str(output), *extra]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed:\n{done.stderr[-2000:]}")


def size_of(binary: pathlib.Path) -> dict:
    """``size`` (Berkeley format) of a binary: text (code + read-only data, i.e. flash), data, bss."""
    out = subprocess.run(["size", str(binary)], capture_output=True, text=True, check=True).stdout
    text, data, bss = map(int, out.splitlines()[1].split()[:3])
    return {"text": text, "data": data, "bss": bss}


def time_driver(binary: pathlib.Path, inputs: str, count: int, repeats: int) -> np.ndarray:
    """Run the latency driver (eo_bench): outputs of the warm-up pass, then per-inference ns of ``repeats`` passes."""
    stem = binary.name
    done = subprocess.run([str(binary), inputs, f"{stem}_outputs.bin", f"{stem}_times.bin", str(count),
                           str(repeats)], cwd=binary.parent, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{binary} exited {done.returncode}: {done.stderr[-500:]}")
    return np.fromfile(binary.parent / f"{stem}_times.bin", np.int64)


_EMPTY_C = "int main(void) { return 0; }\n"

_BENCH_C = r"""/* Benchmark driver: every sample in one process; per-inference time around {name}_run(). */
#define _POSIX_C_SOURCE 199309L
#include "{name}.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int8_t input0[{P}_INPUT0_BYTES], output0[{P}_OUTPUT0_BYTES];

static long long now_ns(void) {{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}}

int main(int argc, char **argv) {{
    FILE *in, *out, *times;
    long count, i, r, repeats;
    int8_t *all;
    if (argc < 6) return 2;
    count = atol(argv[4]);
    repeats = atol(argv[5]);
    all = malloc((size_t)count * {P}_INPUT0_BYTES);
    in = fopen(argv[1], "rb");
    if (!in || fread(all, {P}_INPUT0_BYTES, (size_t)count, in) != (size_t)count) return 1;
    fclose(in);
    out = fopen(argv[2], "wb");
    for (i = 0; i < count; i++) {{  /* warm-up pass, also the outputs */
        memcpy(input0, all + i * {P}_INPUT0_BYTES, {P}_INPUT0_BYTES);
        {name}_run(input0, output0);
        fwrite(output0, 1, {P}_OUTPUT0_BYTES, out);
    }}
    fclose(out);
    times = fopen(argv[3], "wb");
    for (r = 0; r < repeats; r++) {{
        for (i = 0; i < count; i++) {{
            long long start, ns;
            memcpy(input0, all + i * {P}_INPUT0_BYTES, {P}_INPUT0_BYTES);
            start = now_ns();
            {name}_run(input0, output0);
            ns = now_ns() - start;
            fwrite(&ns, sizeof ns, 1, times);
        }}
    }}
    fclose(times);
    free(all);
    return 0;
}}
"""

_FLASH_C = r"""/* Flash probe: the model linked into a program that calls it once. */
#include "{name}.h"
static int8_t input0[{P}_INPUT0_BYTES], output0[{P}_OUTPUT0_BYTES];
int main(void) {{ {name}_run(input0, output0); return output0[0]; }}
"""


def empty_program_size(work: pathlib.Path, cc: str, flags: list[str]) -> dict:
    (work / "empty.c").write_text(_EMPTY_C)
    _compile(cc, flags, [work / "empty.c"], work / "empty", work, ["-Wl,--gc-sections"])
    return size_of(work / "empty")


def edgeopt_side(layers: list[dict], onnx_path: pathlib.Path, data: dict, work: pathlib.Path, args) -> dict:
    from edgeopt import api
    from edgeopt.codegen.c import compile_c, verify
    from edgeopt.codegen.c.api import read_manifest
    from edgeopt.io import load_model
    from edgeopt.quant import Int8Config, Target

    calib = [{"input": onnx_layout(layers, data["calib"][i:i + 1])} for i in range(len(data["calib"]))]
    qdq_path = work / "edgeopt_int8.onnx"
    start = time.perf_counter()
    api.quantize(str(onnx_path), Int8Config(target=Target.MCU), calib, output=str(qdq_path), check_speed=False)
    quantize_s = time.perf_counter() - start
    out_dir = work / "c"
    # the folder also holds this script's own measurement programs (eo_flash, empty ...), which compile
    # --force rightly refuses to delete: the benchmark clears its own cache folder instead
    shutil.rmtree(out_dir, ignore_errors=True)
    result = compile_c(load_model(qdq_path), out_dir, name="model", rounding="double")
    report = {"quantize_s": quantize_s, "arena_bytes": result.arena_bytes,
              "lower_bound_bytes": result.lower_bound_bytes, "weight_bytes": result.weight_bytes,
              "plan_method": result.plan_method, "c_ops": result.ops}
    x_test = onnx_layout(layers, data["x_test"])
    checked = x_test[: args.verify_samples]
    start = time.perf_counter()
    check = verify(out_dir, ({"input": checked[i:i + 1].copy()} for i in range(len(checked))))
    report.update(bit_exact=check.bit_exact, verified_samples=check.batches,
                  tensors_compared=check.tensors_compared, verify_s=time.perf_counter() - start,
                  first_mismatch=None if check.first_mismatch is None else vars(check.first_mismatch))

    # input quantization with the C model's own input scale / zero point (model.h), in its stored layout
    # (the manifest's permutation of the ONNX layout: NHWC for a 2-D model, [N, L, C] for a 1-D model's
    # [N, C, L] input)
    header = (out_dir / "model.h").read_text()
    scale = float(re.search(r"#define MODEL_INPUT0_SCALE ([^f\s]+)f", header).group(1))
    zero = int(re.search(r"#define MODEL_INPUT0_ZERO_POINT (-?\d+)", header).group(1))
    layout = read_manifest(out_dir)["inputs"][0]["layout"]
    x_q = np.clip(np.round(x_test / scale) + zero, -128, 127).astype(np.int8).transpose(layout).copy()
    (out_dir / "eo_bench.c").write_text(_BENCH_C.format(name="model", P="MODEL"))
    sources = [out_dir / f for f in ("eo_bench.c", "model.c", "kernels.c")]
    _compile(args.cc, CFLAGS, sources, out_dir / "eo_bench", out_dir)
    (out_dir / "eo_inputs.bin").write_bytes(x_q.tobytes())
    time_driver(out_dir / "eo_bench", "eo_inputs.bin", len(x_q), 0)  # the outputs; latency: run_model
    outputs = np.fromfile(out_dir / "eo_bench_outputs.bin", np.int8).reshape(len(x_q), -1)
    report.update(accuracy=float((outputs.argmax(1) == data["y_test"]).mean()))
    np.save(work / "edgeopt_outputs.npy", outputs)

    # flash: model.c + kernels.c linked into a program that calls the model, minus an empty program
    (out_dir / "eo_flash.c").write_text(_FLASH_C.format(name="model", P="MODEL"))
    flags = CFLAGS + SECTION_FLAGS
    _compile(args.cc, flags, [out_dir / f for f in ("eo_flash.c", "model.c", "kernels.c")], out_dir / "eo_flash",
             out_dir, ["-Wl,--gc-sections"])
    linked, empty = size_of(out_dir / "eo_flash"), empty_program_size(out_dir, args.cc, flags)
    objects = {}
    for source in ("model.c", "kernels.c"):
        _compile(args.cc, flags + ["-c"], [out_dir / source], out_dir / (source[:-2] + ".o"), out_dir)
        objects[source] = size_of(out_dir / (source[:-2] + ".o"))
    code_and_weights = (linked["text"] + linked["data"]) - (empty["text"] + empty["data"])
    report.update(flash_bytes=code_and_weights, flash_code_bytes=code_and_weights - result.weight_bytes,
                  objects=objects, static_ram_bss=linked["bss"] - empty["bss"])
    return report


# ---------------------------------------------------------------- driver


def digits_data(name: str, calib_samples: int, seed: int) -> dict:
    """Digits NHWC float32 in [0,1]: 8x8x1 (demo) or bilinearly upsampled to 32x32x3; calibration subset.

    kws1d, kws_lstm: upsampled to 32x32x1 and read as a sequence, NLC [32, 32]: time step t is image row t
    (top to bottom), its 32 features the row's pixels (left to right), as a spectrogram's frames of mel bands."""
    sys.path.insert(0, str(SCRIPT.parent))
    from _common import digits_split

    x_train, x_test, y_train, y_test = digits_split()
    if name != "demo":
        import torch
        from torch.nn import functional as F

        def up(x):
            return F.interpolate(torch.from_numpy(x), size=(32, 32), mode="bilinear",
                                 align_corners=False).repeat(1, 1 if name in SEQUENCE_MODELS else 3, 1, 1).numpy()

        x_train, x_test = up(x_train), up(x_test)
    x_train, x_test = x_train.transpose(0, 2, 3, 1).copy(), x_test.transpose(0, 2, 3, 1).copy()
    if name in SEQUENCE_MODELS:  # [N, 32, 32, 1] -> [N, 32 steps, 32 features]
        x_train, x_test = x_train[..., 0].copy(), x_test[..., 0].copy()
    pick = np.random.default_rng(seed).choice(len(x_train), size=min(calib_samples, len(x_train)), replace=False)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test, "calib": x_train[pick]}


def run_tflm_worker(python: str, payload: dict, timeout_s: float = 3600.0) -> dict:
    """Train, convert and run one model in ``.venv-tflm``; a model with an LSTM in Keras 2 (docstring)."""
    command = [python, str(SCRIPT), "--tflm-worker", json.dumps(payload)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    if recurrent(payload["layers"]):  # read before TensorFlow is imported, so set for the process
        env["TF_USE_LEGACY_KERAS"] = "1"
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=REPO_ROOT, env=env)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    raise RuntimeError(f"TFLM worker exited {done.returncode}:\n{done.stderr[-3000:]}")


class TflmTimer:
    """The wheel's interpreter in a long-lived ``.venv-tflm`` process that times one pass per request."""

    def __init__(self, python: str, work: pathlib.Path, arena: int):
        self.times = work / "tflm_wheel_times.bin"
        payload = {"work": str(work), "arena": arena, "times": str(self.times)}
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
        self.process = subprocess.Popen([python, str(SCRIPT), "--tflm-timer", json.dumps(payload)], cwd=REPO_ROOT,
                                        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._expect("ready")

    def _expect(self, word: str) -> None:
        line = self.process.stdout.readline().strip()
        if line != word:
            self.close()
            raise RuntimeError(f"TFLM timer: expected {word!r}, got {line!r} (exit code {self.process.returncode})")

    def run_pass(self) -> np.ndarray:
        self.process.stdin.write("pass\n")
        self.process.stdin.flush()
        self._expect("done")
        return np.fromfile(self.times, np.int64)

    def close(self) -> None:
        if self.process.stdin and not self.process.stdin.closed:
            self.process.stdin.close()
        self.process.wait(timeout=60)


def alternate_latency(name: str, work: pathlib.Path, args, arena: int, count: int) -> tuple[dict, dict]:
    """edgeopt's C driver and the TFLM wheel take turns, one pass over the test split each; the first of
    each pair alternates (edgeopt, TFLM, TFLM, edgeopt, ...), so drift of a shared machine hits both alike."""
    timer = TflmTimer(args.tflm_python, work, arena)
    eo_times, tflm_times = [], []
    try:
        for repeat in range(args.repeats):
            turns = ("edgeopt", "tflm") if repeat % 2 == 0 else ("tflm", "edgeopt")
            for side in turns:
                if side == "edgeopt":
                    eo_times.append(time_driver(work / "c" / "eo_bench", "eo_inputs.bin", count, 1))
                else:
                    tflm_times.append(timer.run_pass())
    finally:
        timer.close()
    eo, tflm = np.concatenate(eo_times), np.concatenate(tflm_times)
    print(f"[{name}] latency, median: edgeopt C {np.median(eo) / 1000:.1f} us, "
          f"TFLM wheel {np.median(tflm) / 1000:.1f} us", flush=True)
    return ({"latency_us": float(np.median(eo)) / 1000.0, "latency_min_us": float(eo.min()) / 1000.0},
            {"latency_us": float(np.median(tflm)) / 1000.0, "latency_min_us": float(tflm.min()) / 1000.0})


def run_model(name: str, args, cache: pathlib.Path) -> dict:
    import onnxruntime as ort

    layers = architecture(name)
    epochs = EPOCHS[name] if args.epochs is None else args.epochs
    keras2 = "-keras2" if recurrent(layers) else ""  # not a Keras 3 model's cached weights (no .tflite)
    work = cache / f"{name}{keras2}-seed{args.seed}-e{epochs}-c{args.calib_samples}"
    work.mkdir(parents=True, exist_ok=True)
    data = digits_data(name, args.calib_samples, args.seed)
    np.savez(work / "data.npz", **data)
    print(f"[{name}] TFLM side: train (or load cached) in Keras, convert, run in TFLM ...", flush=True)
    tflm = run_tflm_worker(args.tflm_python, {
        "layers": layers, "data": str(work / "data.npz"), "work": str(work), "seed": args.seed,
        "epochs": epochs, "repeats": args.repeats,
        "cached": not args.retrain})
    weights = dict(np.load(work / "weights.npz"))
    onnx_path = work / "float.onnx"
    export_onnx(layers, weights, onnx_path)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x_test_onnx = onnx_layout(layers, data["x_test"])
    onnx_logits = np.concatenate([session.run(None, {"input": x_test_onnx[i:i + 1]})[0]
                                  for i in range(len(x_test_onnx))])
    keras_logits = np.load(work / "keras_logits.npy")
    export_diff = float(np.abs(onnx_logits - keras_logits).max())
    if export_diff > 1e-3:  # the two sides would not be running the same model
        raise RuntimeError(f"{name}: the ONNX export differs from Keras by {export_diff:.2e} (max |diff| of logits)")
    print(f"[{name}] ONNX export vs Keras: max |diff| {export_diff:.2e}; edgeopt quantize + compile ...", flush=True)
    edgeopt = edgeopt_side(layers, onnx_path, data, work, args)
    print(f"[{name}] latency: edgeopt's C driver and the TFLM wheel take turns, {args.repeats} pass(es) each ...",
          flush=True)
    eo_latency, tflm_latency = alternate_latency(name, work, args, tflm["arena_bytes"], len(data["y_test"]))
    edgeopt.update(eo_latency)
    tflm.update(tflm_latency)
    both = np.load(work / "tflm_outputs.npy").argmax(1) == np.load(work / "edgeopt_outputs.npy").argmax(1)
    return {"name": name, "tflm": tflm, "edgeopt": edgeopt, "export_max_abs_diff": export_diff,
            "float_accuracy": float((onnx_logits.argmax(1) == data["y_test"]).mean()),
            "agreement": float(both.mean()), "test_samples": int(len(data["y_test"])),
            "calib_samples": int(len(data["calib"]))}


# ---------------------------------------------------------------- report


def _n(value) -> str:
    return "n/a" if value is None else f"{value:,}"


def checks(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        t, e, name = r["tflm"], r["edgeopt"], r["name"]
        rows.append(["bit-exact C vs edgeopt's reference", name,
                     f"{e['tensors_compared']:,} tensors, {e['verified_samples']} images", "",
                     "PASS" if e["bit_exact"] else f"FAIL (first mismatch: {e['first_mismatch']})"])
        ratio = e["arena_bytes"] / t["arena_bytes"]
        rows.append(["arena <= 0.75x TFLM's", name, f"{e['arena_bytes']:,} B", f"{t['arena_bytes']:,} B",
                     f"{ratio:.2f}x " + ("PASS" if ratio <= 0.75 else "FAIL")])
        over = e["arena_bytes"] / e["lower_bound_bytes"] - 1
        rows.append(["arena within 5% of the lower bound", name, f"{e['arena_bytes']:,} B",
                     f"(bound {e['lower_bound_bytes']:,} B)", f"+{over:.1%} " + ("PASS" if over <= 0.05 else "FAIL")])
        ratio = e["flash_bytes"] / t["tflite_bytes"]
        rows.append(["flash: edgeopt weights + code < TFLM's .tflite alone (a lower bound of TFLM's flash)", name,
                     f"{e['flash_bytes']:,} B", f".tflite {t['tflite_bytes']:,} B (+ interpreter code, not measured)",
                     f"{ratio:.2f}x " + ("PASS" if ratio < 1 else "FAIL")])
        ratio = e["latency_us"] / t["latency_us"]
        noise = " (within the ~3% noise of this machine)" if abs(ratio - 1) < NOISE else ""
        rows.append(["host latency below TFLM's (wheel, reference kernels)", name, f"{e['latency_us']:.1f} us",
                     f"{t['latency_us']:.1f} us", f"{ratio:.3f}x " + ("PASS" if ratio < 1 else "FAIL") + noise])
    return rows


def _versions(results: list[dict]) -> str:
    """The TF side's package versions, as the first model's; a model that differs (kws_lstm's Keras 2) named."""
    first = results[0]["tflm"]["versions"]
    parts = []
    for package, version in first.items():
        others = [f"{r['name']}: {r['tflm']['versions'][package]}" for r in results
                  if r["tflm"]["versions"][package] != version]
        parts.append(f"{package} {version}" + (f" ({', '.join(others)})" if others else ""))
    return ", ".join(parts)


def report(results: list[dict], env: dict, args) -> str:
    sys.path.insert(0, str(SCRIPT.parent))
    from _common import environment_markdown, markdown_table

    first = results[0]
    library = first["tflm"].get("wheel_library")
    load = env.get("loadavg", {})
    lines = ["## MCU: edgeopt C vs TensorFlow Lite Micro", "",
             "`benchmarks/mcu_vs_tflm.py` (issue 4): the same trained float models, once as a full-int8 `.tflite` "
             "run by TensorFlow Lite for Microcontrollers (the PyPI `tflite-micro` wheel: TFLM's C++ interpreter "
             "and reference kernels behind a Python binding), once as edgeopt's generated C "
             "(`Int8Config(target=Target.MCU)`, `compile_c`). Each model is trained in Keras; its weights are "
             "written to ONNX unchanged for edgeopt and converted with `tf.lite.TFLiteConverter` for TFLM. "
             "How each number is measured: the script's docstring, summarised under the tables.", "",
             *environment_markdown(env),
             "- TF side (`.venv-tflm`, the `tflm` extra): " + _versions(results),
             f"- seed {args.seed}; the same {first['calib_samples']} calibration images (digits training split) "
             f"for both; accuracy on the {first['test_samples']} test images; latency: median over {args.repeats} "
             f"timed pass(es) of the test split after a warm-up pass, edgeopt's C driver and the TFLM wheel's "
             f"interpreter (a long-lived process) taking turns, one pass each; edgeopt's C built with "
             f"`{args.cc} {' '.join(CFLAGS)}` (the generated Makefile's level)"]
    if load:
        lines.append("- load average (1/5/15 min): " + "; ".join(
            f"{when} {' / '.join(f'{v:.2f}' for v in values)}" for when, values in load.items()))
    lines.append("")
    headers = ["model", "runtime", "ops", "arena B", "flash B", "of which model B", "latency us, median (min)",
               "accuracy"]
    rows = []
    for r in results:
        t, e = r["tflm"], r["edgeopt"]
        rows.append([r["name"], "TFLite Micro (wheel)", len(t["ops"]), f"{t['arena_bytes']:,}",
                     f"> {t['tflite_bytes']:,} (lower bound)", f"{t['tflite_bytes']:,} (.tflite)",
                     f"{t['latency_us']:.0f} ({t['latency_min_us']:.0f})", f"{t['accuracy']:.2%}"])
        rows.append([r["name"], "edgeopt C", e["c_ops"], f"{e['arena_bytes']:,}", f"{e['flash_bytes']:,}",
                     f"{e['weight_bytes']:,} (weights)", f"{e['latency_us']:.0f} ({e['latency_min_us']:.0f})",
                     f"{e['accuracy']:.2%}"])
    lines += markdown_table(headers, rows, right=[False, False] + [True] * 6)
    lines += ["", "TFLM flash is the `.tflite` alone, a lower bound: TFLM's interpreter, allocator and kernels "
              "come on top and are not measured (that needs TFLM built for just these ops, which this benchmark "
              "does not do)."]
    if library:
        lines += ["", f"Not comparable, an upper bound of TFLM's code on this host: the wheel's compiled library "
                  f"`{library['file']}` has text + data {library['text'] + library['data']:,} B "
                  f"(`.text` section {_n(library['text_section'])} B): every TFLM kernel, not only these models' "
                  f"ops, plus the pybind11 Python bindings and dynamic-linking tables."]
    lines += ["", "Details:", ""]
    detail_rows = []
    for r in results:
        t, e = r["tflm"], r["edgeopt"]
        detail_rows.append([r["name"], f"{_n(t.get('arena_head'))} / {_n(t.get('arena_tail'))}",
                            f"{e['lower_bound_bytes']:,}", f"{e['flash_code_bytes']:,}",
                            f"{r['float_accuracy']:.2%}", f"{r['agreement']:.2%}", f"{r['export_max_abs_diff']:.1e}"])
    lines += markdown_table(["model", "TFLM arena head / tail B", "edgeopt lower bound B", "edgeopt code B",
                             "float accuracy", "TFLM vs edgeopt top-1 agreement",
                             "ONNX export vs Keras max abs diff"], detail_rows, right=[False] + [True] * 6)
    lines += ["", "TFLM ops: " + "; ".join(
        f"{r['name']}: " + ", ".join(f"{op} x{r['tflm']['ops'].count(op)}" for op in sorted(set(r['tflm']['ops'])))
        for r in results) + ".", "", "Targets (issue 4):", ""]
    lines += markdown_table(["target", "model", "edgeopt", "TFLite Micro", "result"], checks(results))
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ALL_MODELS), help="comma-separated, a subset of the default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="override the per-model epochs")
    parser.add_argument("--calib-samples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the test split")
    parser.add_argument("--verify-samples", type=int, default=50, help="test images for the bit-exact check")
    parser.add_argument("--tflm-python", default=str(REPO_ROOT / ".venv-tflm" / "bin" / "python"))
    parser.add_argument("--cc", default="gcc")
    parser.add_argument("--retrain", action="store_true", help="ignore the cached Keras weights")
    parser.add_argument("--markdown", type=pathlib.Path, help="also write the report here")
    parser.add_argument("--json", type=pathlib.Path, help="also write every number here")
    parser.add_argument("--tflm-worker", help=argparse.SUPPRESS)
    parser.add_argument("--tflm-timer", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.tflm_worker:
        result = tflm_worker(json.loads(args.tflm_worker))
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    if args.tflm_timer:
        tflm_timer(json.loads(args.tflm_timer))
        return 0
    if not pathlib.Path(args.tflm_python).exists():
        print(f"error: {args.tflm_python} not found. TensorFlow and tflite-micro live in their own environment:\n"
              f"  python3 -m venv .venv-tflm && .venv-tflm/bin/pip install -e '.[tflm]'\n"
              f"or pass --tflm-python PATH", file=sys.stderr)
        return 2
    sys.path.insert(0, str(SCRIPT.parent))
    from _common import environment, prepare_cache_dir, publish

    env = environment(sys.argv)
    env["loadavg"] = {"start": list(os.getloadavg())}
    cache = prepare_cache_dir() / "mcu_vs_tflm"
    results = [run_model(name, args, cache) for name in args.models.split(",")]
    env["loadavg"]["end"] = list(os.getloadavg())
    text = report(results, env, args)
    publish(text, args.markdown)
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
