"""Loading real-world ONNX quirks: Constant weights, external data, dynamic dims, shadowed inputs."""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import pytest

from edgeopt import ir as eir
from edgeopt.errors import ModelError, OutputError
from edgeopt.io import load_model, parse_input_shapes, save_model
from tests.models import (
    constant_weights_model,
    dynamic_input_model,
    external_data_model,
    shadowed_initializer_model,
    tf_style_model,
)


def test_parse_input_shapes_refuses_two_shapes_for_one_input():
    # the last one given won silently
    with pytest.raises(ModelError, match=r"--input-shape gives x two shapes \(1x3x224x224 and 1x3x256x256\)"):
        parse_input_shapes(["x=1x3x224x224", "x=1x3x256x256"])
    assert parse_input_shapes(["x=1x8", "x=1x8"]) == {"x": (1, 8)}


def test_parse_input_shapes():
    assert parse_input_shapes(["x=1x3x224x224", "mask=1,16"]) == {"x": (1, 3, 224, 224), "mask": (1, 16)}
    for bad in ["x", "x=", "x=1xAx3", "x=1x0x3"]:
        with pytest.raises(ModelError):
            parse_input_shapes([bad])


def test_dynamic_input_needs_a_shape_and_names_the_input(tmp_path):
    path = dynamic_input_model(tmp_path / "dyn.onnx")
    with pytest.raises(ModelError, match="--input-shape"):
        load_model(path)
    name = onnx.load(str(path)).graph.input[0].name
    model = load_model(path, input_shapes={name: (1, 3, 16, 16)})
    assert eir.model_inputs(model)[0].shape == (1, 3, 16, 16)
    assert all(eir.static_shape(v) is not None for node in model.graph for v in node.outputs)


def test_fixing_a_static_dim_differently_is_refused(tmp_path):
    path = dynamic_input_model(tmp_path / "dyn.onnx")
    name = onnx.load(str(path)).graph.input[0].name
    with pytest.raises(ModelError, match="dim 1 is fixed to 3"):
        load_model(path, input_shapes={name: (1, 4, 16, 16)})
    with pytest.raises(ModelError, match="model's inputs are"):
        load_model(path, input_shapes={"nope": (1, 3, 16, 16)})


def test_shadowed_inputs_become_constants_and_unused_initializers_go(tmp_path):
    path = shadowed_initializer_model(tmp_path / "shadow.onnx")
    proto = onnx.load(str(path))
    model = load_model(path)
    initializer_names = {t.name for t in proto.graph.initializer}
    assert all(spec.name not in initializer_names for spec in eir.model_inputs(model))
    used = {v.name for node in model.graph for v in node.inputs if v is not None}
    assert set(model.graph.initializers) <= used


def test_constant_node_weights_are_readable(tmp_path):
    model = load_model(constant_weights_model(tmp_path / "const.onnx"))
    constants = [n for n in model.graph if n.op_type == "Constant"]
    assert constants
    assert all(eir.constant_array(n.outputs[0]) is not None for n in constants)


def test_external_data_is_loaded_and_the_files_are_untouched(tmp_path):
    path = external_data_model(tmp_path / "ext.onnx")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model = load_model(path)
    weights = [v for v in model.graph.initializers.values()]
    assert weights and all(np.asarray(v.const_value.numpy()).size > 0 for v in weights)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(ModelError, match=r"ext\.onnx: its external weight file ext\.onnx\.data is missing"):
        load_model(path)


def test_tf_style_nhwc_model_loads(tmp_path):
    model = load_model(tf_style_model(tmp_path / "tf.onnx"))
    assert [n.op_type for n in model.graph][:2] == ["Transpose", "Conv"]


def test_missing_truncated_and_foreign_files_are_model_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "missing.onnx")
    good = constant_weights_model(tmp_path / "good.onnx")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        load_model(truncated)
    foreign = tmp_path / "image.onnx"
    foreign.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        load_model(foreign)
    with pytest.raises(ModelError, match="folder"):
        load_model(tmp_path)


def _torch_checkpoint(path):
    torch = pytest.importorskip("torch")
    torch.save(torch.nn.Linear(4, 2).state_dict(), path)


def _tflite(path):
    path.write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(64))


def _keras_h5(path):
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))


def _saved_model(path):
    path.mkdir()
    (path / "saved_model.pb").write_bytes(bytes(16))


@pytest.mark.parametrize(("name", "write", "says"), [
    ("model.pt", _torch_checkpoint, r"is a PyTorch checkpoint \(torch\.save\), not an ONNX model: export the module"),
    ("model.tflite", _tflite, r"is a TensorFlow Lite model, not an ONNX model: convert it first"),
    ("model.h5", _keras_h5, r"is a Keras model, not an ONNX model: convert it first"),
    ("calib.npy", lambda path: np.save(path, np.zeros((2, 3), np.float32)),
     r"is NumPy data, not an ONNX model: give the model first, the data with --data"),
    ("saved_model", _saved_model, r"is a folder, not an \.onnx model file \(a TensorFlow SavedModel: convert it"),
])
def test_a_model_of_another_framework_is_named_with_what_to_do(tmp_path, name, write, says):
    """A first-day user passes the checkpoint they trained (or swaps model and data): 'is the file
    truncated or of another format?' said neither which format nor what to do."""
    write(tmp_path / name)
    with pytest.raises(ModelError, match=says):
        load_model(tmp_path / name)


def test_saving_is_atomic_and_round_trips(tmp_path):
    model = load_model(constant_weights_model(tmp_path / "m.onnx"))
    target = save_model(model, tmp_path / "out.onnx")
    assert load_model(target) is not None
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(OutputError, match="does not exist"):
        save_model(model, tmp_path / "no" / "such" / "dir.onnx")


def _conv_relu_graph(order: tuple[int, int] = (0, 1)) -> tuple[list, onnx.GraphProto]:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    initializers = [numpy_helper.from_array((rng.standard_normal((8, 8, 3, 3)) / 8).astype(np.float32), "w"),
                    numpy_helper.from_array(np.zeros(8, np.float32), "b")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])]
    return inputs, helper.make_graph([nodes[i] for i in order], "g", inputs, outputs, initializers)


def test_nodes_out_of_order_are_sorted_and_ordered_graphs_keep_their_order(tmp_path):
    """ONNX Runtime runs a graph whose nodes are listed out of order; copies and rewrites need the order."""
    from onnx import helper

    _, unordered = _conv_relu_graph(order=(1, 0))
    onnx.save(helper.make_model(unordered, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "u.onnx")
    assert [node.name for node in load_model(tmp_path / "u.onnx").graph] == ["conv", "relu"]
    load_model(tmp_path / "u.onnx").clone()  # failed on the unsorted graph (edgeopt compare's copy)
    _, ordered = _conv_relu_graph()
    ordered.node.insert(0, helper.make_node("Constant", [], ["unused_k"], value_float=1.0, name="k"))
    onnx.save(helper.make_model(ordered, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "o.onnx")
    assert [node.name for node in load_model(tmp_path / "o.onnx").graph][-2:] == ["conv", "relu"]


def test_a_stale_static_output_shape_gives_way_to_the_inferred_one(tmp_path):
    """A head swapped by hand keeps its old output shape in the file: ONNX's inference kept it over the
    one it computes, so inspect showed y 1x1000 and counted the Relu's FLOPs on it; a partial inferred
    shape still takes the exporter's static dims."""
    from onnx import TensorProto, helper

    _, graph = _conv_relu_graph()
    graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1000]))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "stale.onnx")
    assert eir.static_shape(load_model(tmp_path / "stale.onnx").graph.outputs[0]) == (1, 8, 8, 8)
    reshape = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])], "r",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    onnx.save(helper.make_model(reshape, opset_imports=[helper.make_opsetid("", 11)]), tmp_path / "r.onnx")
    assert eir.static_shape(load_model(tmp_path / "r.onnx").graph.outputs[0]) == (2, 3)


def test_an_ir3_model_listing_its_weights_as_inputs_converts_to_opset_13(tmp_path):
    """Old exporters (IR 3) list every initializer as a graph input; dropping those inputs needs IR >= 4,
    or the opset converter no longer sees the weights ('Input w is undefined')."""
    from onnx import TensorProto, helper

    from edgeopt.quant import Int8Config, quantize

    _, graph = _conv_relu_graph()
    graph.input.extend([helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 8, 3, 3]),
                        helper.make_tensor_value_info("b", TensorProto.FLOAT, [8])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    proto.ir_version = 3
    onnx.checker.check_model(proto)
    onnx.save(proto, tmp_path / "ir3.onnx")
    model = load_model(tmp_path / "ir3.onnx")
    assert [v.name for v in model.graph.inputs] == ["x"]
    data = [{"x": x} for x in np.random.default_rng(1).standard_normal((16, 1, 8, 8, 8)).astype(np.float32)]
    result = quantize(model, Int8Config(), data)
    assert result.tensors and any("opset 9" in note and "13" in note for note in result.notes)


def _sparse_matmul_model(tmp_path, *, as_constant: bool, coordinates: bool):
    """x @ w with w stored sparse: in a Constant's sparse_value or in graph.sparse_initializer."""
    from onnx import TensorProto, helper, numpy_helper

    dense = np.zeros((6, 4), np.float32)
    dense[[0, 2, 5], [1, 3, 0]] = [0.5, -1.25, 2.0]
    flat = np.flatnonzero(dense)
    indices = np.stack(np.unravel_index(flat, dense.shape), axis=1) if coordinates else flat
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(dense.ravel()[flat], "w"),
                                       numpy_helper.from_array(indices.astype(np.int64), "w_indices"), [6, 4])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    if as_constant:
        nodes.insert(0, helper.make_node("Constant", [], ["w"], sparse_value=sparse, name="w_const"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              sparse_initializer=[] if as_constant else [sparse])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "sparse.onnx")
    return tmp_path / "sparse.onnx", dense


@pytest.mark.parametrize("as_constant", [True, False], ids=["constant", "initializer"])
@pytest.mark.parametrize("coordinates", [False, True], ids=["linear", "coordinates"])
def test_sparse_weights_load_as_dense_ones(tmp_path, as_constant, coordinates):
    """onnx_ir reads no sparse tensor: a sparse Constant failed to load ('cannot read the graph'), a
    sparse initializer was dropped (its MatMul read an undefined tensor)."""
    from edgeopt.runtime.ort import OrtSession

    path, dense = _sparse_matmul_model(tmp_path, as_constant=as_constant, coordinates=coordinates)
    before = path.read_bytes()
    model = load_model(path)
    weight = next(node for node in model.graph if node.op_type == "MatMul").inputs[1]
    np.testing.assert_array_equal(eir.constant_array(weight), dense)
    x = np.arange(6, dtype=np.float32).reshape(1, 6)
    np.testing.assert_allclose(OrtSession(model).run({"x": x})["y"], x @ dense, rtol=1e-6)
    assert path.read_bytes() == before


def test_a_node_name_used_twice_gets_a_suffix_and_the_model_runs(tmp_path):
    """ONNX Runtime refuses a graph with two nodes of one name ('two nodes with same node name'),
    which onnx.checker lets pass; names are diagnostic only, so loading makes them unique."""
    from onnx import helper

    from edgeopt.runtime.ort import OrtSession

    _, graph = _conv_relu_graph()
    graph.node.append(helper.make_node("Relu", ["y"], ["z"], name="conv"))
    graph.node.append(helper.make_node("Relu", ["z"], ["out"], name="conv_1"))
    graph.output[0].name = "out"
    graph.node[1].name = "conv"  # the Relu after the Conv
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "dup.onnx")
    model = load_model(tmp_path / "dup.onnx")
    assert [node.name for node in model.graph] == ["conv", "conv_2", "conv_3", "conv_1"]
    OrtSession(model).run({"x": np.ones((1, 8, 8, 8), np.float32)})


def test_unnamed_nodes_are_named_as_inspect_labels_them(tmp_path):
    """An exporter may leave node names empty; ``inspect`` labels such a node ``{op_type}_{index}``,
    and loading names it so, so that ``--exclude Conv_0`` and every report use the name ``inspect``
    showed (a label already taken by a named node gets a suffix)."""
    from onnx import helper

    from edgeopt.analysis._graph import execution_steps

    _, graph = _conv_relu_graph()
    graph.node[0].name = ""
    graph.node[1].name = ""
    graph.node.append(helper.make_node("Relu", ["y"], ["z"], name="Relu_1"))
    graph.output[0].name = "z"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "unnamed.onnx")
    model = load_model(tmp_path / "unnamed.onnx")
    assert [node.name for node in model.graph] == ["Conv_0", "Relu_1_1", "Relu_1"]
    assert [label for label, _ in execution_steps(model.graph)] == ["Conv_0", "Relu_1_1", "Relu_1"]


def test_unnamed_nodes_of_a_subgraph_take_no_name_of_the_main_graph(tmp_path):
    from onnx import TensorProto, helper

    branch = helper.make_graph([helper.make_node("Relu", ["x"], ["r"])], "then", [],
                               [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["n"])], "else", [],
                              [helper.make_tensor_value_info("n", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Relu", ["x"], ["x0"]), helper.make_node("ReduceMean", ["x0"], ["m"], keepdims=0),
             helper.make_node("Cast", ["m"], ["c"], to=TensorProto.BOOL),
             helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=other)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "if.onnx")
    model = load_model(tmp_path / "if.onnx")
    assert [node.name for node in model.graph] == ["Relu_0", "ReduceMean_1", "Cast_2", "If_3"]
    branches = model.graph.node(3).attributes
    assert [node.name for node in branches["then_branch"].value] == ["Relu_0_1"]
    assert [node.name for node in branches["else_branch"].value] == ["Neg_0"]


def _nested_function_model(path):
    """y = Two(x): a local function calling another one twice (MatMul + Add + Relu), weights passed in."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    dense = helper.make_function("local", "Dense", ["x", "w", "b"], ["y"], [
        helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Add", ["t", "b"], ["u"]),
        helper.make_node("Relu", ["u"], ["y"])], opsets[:1])
    two = helper.make_function("local", "Two", ["x", "w1", "b1", "w2", "b2"], ["y"], [
        helper.make_node("Dense", ["x", "w1", "b1"], ["h"], domain="local", name="first"),
        helper.make_node("Dense", ["h", "w2", "b2"], ["y"], domain="local", name="second")], opsets)
    weights = [numpy_helper.from_array((rng.standard_normal(shape) / 4).astype(np.float32), name)
               for name, shape in [("w1", (8, 16)), ("b1", (16,)), ("w2", (16, 4)), ("b2", (4,))]]
    graph = helper.make_graph([helper.make_node("Two", ["x", "w1", "b1", "w2", "b2"], ["y"], domain="local",
                                                name="block")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], weights)
    onnx.save(helper.make_model(graph, opset_imports=opsets, functions=[dense, two]), path)
    return path


def test_local_functions_are_inlined_so_their_layers_quantize(tmp_path):
    """Calls of local functions (TorchScript's export_modules_as_functions) were opaque: every layer in
    them stayed float ('no integer kernel for Two') and edgeopt compile refused the model."""
    from edgeopt.quant import Int8Config, quantize
    from edgeopt.runtime.ort import OrtSession

    path = _nested_function_model(tmp_path / "functions.onnx")
    x = np.random.default_rng(4).standard_normal((1, 8)).astype(np.float32)
    expected = OrtSession(path).run({"x": x})["y"]
    model = load_model(path)
    assert [node.op_type for node in model.graph] == ["MatMul", "Add", "Relu"] * 2
    assert all(node.name for node in model.graph)
    np.testing.assert_allclose(OrtSession(model).run({"x": x})["y"], expected, rtol=1e-5, atol=1e-6)
    data = [{"x": sample} for sample in np.random.default_rng(5).standard_normal((16, 1, 8)).astype(np.float32)]
    result = quantize(model, Int8Config(), data)
    assert not result.float_nodes


def test_inlined_nodes_are_named_after_the_calls_that_run_them(tmp_path):
    """TorchScript's export_modules_as_functions calls Block as /b1/act/Block and /b2/act/Block, whose body
    names its nodes Conv_0, Relu_1: inlined, they were Conv_0__1 and Conv_0__2, names no user can place in
    the network (in float-node lists, compare's rows, --exclude)."""
    path = _nested_function_model(tmp_path / "functions.onnx")
    names = [node.name for node in load_model(path).graph]
    assert names == [f"block/{call}/{op}" for call in ("first", "second") for op in ("MatMul", "Add", "Relu")]


def test_a_function_written_for_an_older_opset_is_converted_as_it_is_inlined(tmp_path):
    """A function body may import another opset than the model (onnxscript writes its own): ReduceMean
    with an axes attribute (opset 13) inlined into an opset-18 graph, where axes is an input, was an
    invalid model (ONNX Runtime itself refuses the file)."""
    from onnx import TensorProto, helper

    from edgeopt.runtime.ort import OrtSession

    body = [helper.make_node("ReduceMean", ["a"], ["m"], axes=[-1], keepdims=1),
            helper.make_node("Sub", ["a", "m"], ["b"])]
    center = helper.make_function("local", "Center", ["a"], ["b"], body, [helper.make_opsetid("", 13)])
    graph = helper.make_graph([helper.make_node("Center", ["x"], ["y"], domain="local", name="c1")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("local", 1)],
                              functions=[center])
    proto.ir_version = 10
    onnx.save(proto, tmp_path / "center.onnx")
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    model = load_model(tmp_path / "center.onnx")
    np.testing.assert_allclose(OrtSession(model).run({"x": x})["y"], x - x.mean(axis=-1, keepdims=True))


def test_a_graph_with_a_cycle_is_refused_naming_its_nodes(tmp_path):
    """A cycle reached the fp16 conversion's topological sort, an internal error (exit 70) there."""
    from onnx import helper

    _, graph = _conv_relu_graph()
    graph.node[0].input[0] = "mixed"
    graph.node.append(helper.make_node("Add", ["x", "y"], ["mixed"], name="mix"))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "cycle.onnx")
    with pytest.raises(ModelError, match=r"cycle \('conv' -> 'relu' -> 'mix' -> 'conv'\)"):
        load_model(tmp_path / "cycle.onnx")


def test_values_after_a_group_normalization_get_their_shapes(tmp_path):
    """ONNX's inference leaves GroupNormalization's output (torch's dynamo export from opset 21)
    untyped, and everything after it: the float passes then could not pool a mean or rewrite a
    PRelu. Its output has its input's shape; the node itself is loaded as written."""
    helper, tensor = onnx.helper, onnx.numpy_helper.from_array
    nodes = [helper.make_node("GroupNormalization", ["x", "scale", "bias"], ["norm"], name="gn",
                              num_groups=2, epsilon=1e-5),
             helper.make_node("Relu", ["norm"], ["relu"], name="relu"),
             helper.make_node("ReduceMean", ["relu", "axes"], ["y"], name="mean", keepdims=1)]
    graph = helper.make_graph(
        nodes, "gn", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 3, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        initializer=[tensor(np.ones(4, np.float32), "scale"), tensor(np.zeros(4, np.float32), "bias"),
                     tensor(np.array([2, 3], np.int64), "axes")])
    path = tmp_path / "gn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    model = load_model(path)
    assert [tuple(node.outputs[0].shape) for node in model.graph] == [(1, 4, 3, 3), (1, 4, 3, 3), (1, 4, 1, 1)]
    norm = model.graph.node(0)
    assert norm.op_type == "GroupNormalization" and norm.attributes.get_int("num_groups") == 2
    assert [value.name for value in norm.inputs] == ["x", "scale", "bias"]


def _cache_model(path) -> pathlib.Path:
    """A decoder's cache step in one Concat: past [batch, past, 4] and x [batch, tokens, 4] -> y."""
    inputs = [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", "tokens", 4]),
              *(onnx.helper.make_tensor_value_info(f"past_{i}", onnx.TensorProto.FLOAT, ["batch", "past", 4])
                for i in range(3))]
    outputs = [onnx.helper.make_tensor_value_info(f"y_{i}", onnx.TensorProto.FLOAT, ["batch", "total", 4])
               for i in range(3)]
    nodes = [onnx.helper.make_node("Concat", [f"past_{i}", "x"], [f"y_{i}"], axis=1) for i in range(3)]
    graph = onnx.helper.make_graph(nodes, "cache", inputs, outputs)
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(path))
    return pathlib.Path(path)


def test_inputs_sharing_a_dim_name_take_its_size_from_the_one_given(tmp_path):
    path = _cache_model(tmp_path / "cache.onnx")
    with pytest.raises(ModelError, match=r"'past_0' has dynamic shape 1xpastx4: .*2 other inputs with the same dim"):
        load_model(path, input_shapes={"x": (1, 3, 4)})
    model = load_model(path, input_shapes={"x": (1, 3, 4), "past_0": (1, 5, 4)})
    assert [v.shape for v in eir.model_inputs(model)] == [(1, 3, 4), *[(1, 5, 4)] * 3]
    assert [tuple(v.shape) for v in model.graph.outputs] == [(1, 8, 4)] * 3
    # a name given two sizes binds nothing: the inputs not given stay dynamic
    with pytest.raises(ModelError, match="'past_2' has dynamic shape"):
        load_model(path, input_shapes={"x": (1, 3, 4), "past_0": (1, 5, 4), "past_1": (1, 6, 4)})


def test_a_model_without_outputs_an_empty_file_and_a_device_are_refused_at_load(tmp_path):
    # no graph outputs: quantize showed ONNX Runtime's internal text (exit 2), run blamed the data (3), bench its
    # worker (1), inspect said nothing; an empty file "had no nodes"; /dev/zero was read until memory ran out
    import edgeopt.demo

    proto = onnx.load(edgeopt.demo.demo_model_path())
    del proto.graph.output[:]
    onnx.save(proto, tmp_path / "no_outputs.onnx")
    with pytest.raises(ModelError, match="has no graph outputs: nothing it computes can be read"):
        load_model(tmp_path / "no_outputs.onnx")
    with pytest.raises(ModelError, match="has no graph outputs"):
        load_model(proto)
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelError, match="is empty \\(0 bytes\\)"):
        load_model(tmp_path / "empty.onnx")
    with pytest.raises(ModelError, match="is not a regular file"):
        load_model("/dev/zero")
