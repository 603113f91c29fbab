"""The arena planner of issue 4: execution order, in-place ops, exact search, bounds; device profiles."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qdq_models as q
from edgeopt.analysis.memory import TensorLifetime, check_no_overlap, greedy_arena_plan, lower_bound_bytes
from edgeopt.codegen.c import compile_c, verify
from edgeopt.codegen.c.plan import exact_arena_plan, plan_memory, program_lifetimes
from edgeopt.codegen.c.schedule import choose_schedule, in_place_input, reorder
from edgeopt.devices import DeviceProfile, known_devices, load_device
from edgeopt.errors import ConfigError
from edgeopt.runtime.reference import IntOp, Program, ProgramIO, TensorInfo, lower

logging.getLogger("root").setLevel(logging.ERROR)
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None, reason="needs gcc")


def _qdq(name):
    return q.to_ir(q.quantize_with_ort(q.float_model(name)))


def _two_branches() -> Program:
    """x -> a1 (1000 B) -> a2 (10 B); x -> b1 (1000 B) -> b2 (10 B); c = a2 + b2, listed branch-interleaved."""
    sizes = {"x": 100, "a1": 1000, "b1": 1000, "a2": 10, "b2": 10, "c": 10}
    tensors = {name: TensorInfo(name=name, shape=(size,), scale=1.0, zero_point=0, layout=(0,))
               for name, size in sizes.items()}

    def op(kind, inputs, output):
        return IntOp(kind=kind, inputs=tuple(inputs), output=output, params=None, node=f"{output}_node")

    ops = (op("conv2d", ["x"], "a1"), op("conv2d", ["x"], "b1"), op("conv2d", ["a1"], "a2"),
           op("conv2d", ["b1"], "b2"), op("concat", ["a2", "b2"], "c"))
    return Program(tensors=tensors, ops=ops, inputs=(ProgramIO(name="x", tensor="x", is_float=True),),
                   outputs=(ProgramIO(name="c", tensor="c", is_float=True),))


def test_schedule_runs_one_branch_to_its_end_before_the_other():
    program = _two_branches()
    schedule = choose_schedule(program)
    # graph order holds x, a1, b1 at once (2100 B); branch by branch the peak is x + a2 + b1 = 1110 B
    assert schedule.graph_order_peak_bytes == 2100
    assert schedule.peak_bytes == 1110 and schedule.method == "searched"
    assert [program.ops[i].output for i in schedule.order] == ["a1", "a2", "b1", "b2", "c"]
    reordered = reorder(program, schedule.order)
    assert lower_bound_bytes(program_lifetimes(reordered)) == 1110
    assert plan_memory(reordered).arena_bytes < plan_memory(program).arena_bytes


def test_reorder_refuses_an_order_that_reads_before_writing():
    with pytest.raises(ValueError, match="before its input"):
        reorder(_two_branches(), [2, 0, 1, 3, 4])


@pytest.mark.parametrize("name", sorted(q.FLOAT_BUILDERS))
def test_in_place_never_raises_the_lower_bound(name):
    program = lower(_qdq(name))
    with_alias, without = plan_memory(program), plan_memory(program, in_place=False)
    assert with_alias.lower_bound_bytes <= without.lower_bound_bytes
    assert check_no_overlap(with_alias.plan, with_alias.buffers) == ()
    for source, target in with_alias.in_place:
        assert with_alias.offset(source) == with_alias.offset(target)


@needs_gcc
@pytest.mark.parametrize("name", ["lut_activations", "residual_add", "concat_pools"])
def test_in_place_code_is_bit_exact(name, tmp_path):
    model = _qdq(name)
    result = compile_c(model, tmp_path / "c")
    assert result.in_place_ops > 0
    feeds = [dict(batch) for batch in q.calibration_batches(q.float_model(name), 2)]
    outcome = verify(tmp_path / "c", feeds)
    assert outcome.bit_exact, outcome.first_mismatch


_lifetimes = st.lists(st.tuples(st.integers(1, 8), st.integers(0, 6), st.integers(0, 3)), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(_lifetimes)
def test_exact_search_is_valid_and_never_worse_than_greedy(specs):
    lifetimes = [TensorLifetime(name=f"t{i}", size_bytes=16 * size, start=start, end=start + length)
                 for i, (size, start, length) in enumerate(specs)]
    greedy = greedy_arena_plan(lifetimes, alignment=16)
    exact = exact_arena_plan(lifetimes, greedy, 16)
    assert check_no_overlap(exact, lifetimes) == ()
    assert exact.lower_bound_bytes <= exact.arena_bytes <= greedy.arena_bytes


def test_exact_search_reaches_the_bound_where_greedy_does_not():
    # A big buffer followed by a small one that greedy stacks on the wrong neighbour (the mobilenet_v2 case).
    lifetimes = [TensorLifetime(name="a", size_bytes=2048, start=2, end=3),
                 TensorLifetime(name="big", size_bytes=12288, start=3, end=4),
                 TensorLifetime(name="b", size_bytes=3072, start=4, end=5),
                 TensorLifetime(name="skip", size_bytes=1024, start=5, end=10),
                 TensorLifetime(name="c", size_bytes=6144, start=6, end=7),
                 TensorLifetime(name="d", size_bytes=6144, start=7, end=8),
                 TensorLifetime(name="e", size_bytes=6144, start=10, end=11)]
    greedy = greedy_arena_plan(lifetimes, alignment=16)
    exact = exact_arena_plan(lifetimes, greedy, 16)
    assert greedy.arena_bytes > greedy.lower_bound_bytes == 15360
    assert exact.arena_bytes == 15360 and check_no_overlap(exact, lifetimes) == ()


def test_mobilenet_v2_arena_is_within_5_percent_of_the_lower_bound():
    program = lower(q.to_ir(q.torch_qdq_model("mobilenet_v2")))
    memory = plan_memory(reorder(program, choose_schedule(program).order))
    assert memory.arena_bytes <= 1.05 * memory.lower_bound_bytes


# ------------------------------------------------------------------ device profiles


def test_every_built_in_profile_loads_and_names_its_board():
    assert {"cortex-m0plus", "cortex-m4", "cortex-m7", "cortex-m33", "cortex-m55", "cortex-a53", "cortex-a76",
            "x86-host"} <= set(known_devices())
    for name in known_devices():
        profile = load_device(name)
        assert profile.board and profile.flash_bytes > 0 and profile.sram_bytes > 0
    m4 = load_device("cortex-m4")
    assert (m4.flash_bytes, m4.sram_bytes, m4.clock_mhz) == (512 * 1024, 128 * 1024, 180)


def test_latency_estimate_is_macs_over_rate():
    m7 = load_device("cortex-m7")
    assert m7.estimated_latency_ms(960_000) == pytest.approx(960_000 / (2.0 * 480e6) * 1e3)


def test_unknown_device_lists_the_known_ones():
    with pytest.raises(ConfigError, match="cortex-m4.*cortex-m7"):
        load_device("pdp-11")


def test_unknown_key_names_the_allowed_keys(tmp_path):
    path = tmp_path / "board.yaml"
    path.write_text("board: b\nflash_bytes: 1 MiB\nsram_bytes: 256 KiB\nclock_mhz: 100\n"
                    "int8_macs_per_cycle: 1\nfp32_macs_per_cycle: 1\nram: 5\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) ram; allowed: board, flash_bytes, sram_bytes"):
        load_device(path)
    path.write_text(path.read_text().replace("ram: 5\n", ""))
    assert load_device(path) == DeviceProfile(name="board", board="b", flash_bytes=2**20, sram_bytes=256 * 1024,
                                              clock_mhz=100, int8_macs_per_cycle=1, fp32_macs_per_cycle=1)


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    # the later silently won: which sram_bytes counted depended on the order of the lines
    path = tmp_path / "board.yaml"
    path.write_text("board: b\nflash_bytes: 1 MiB\nsram_bytes: 256 KiB\nclock_mhz: 100\n"
                    "int8_macs_per_cycle: 1\nfp32_macs_per_cycle: 1\nsram_bytes: 128 KiB\n")
    with pytest.raises(ConfigError, match=r"board.yaml is not valid YAML: key 'sram_bytes' is given twice "
                                          r"\(again on line 7\)"):
        load_device(path)


def test_bad_values_are_config_errors(tmp_path):
    path = tmp_path / "board.yaml"
    for bad in ("sram_bytes: lots", "sram_bytes: -4", "clock_mhz: 0"):
        key = bad.split(":")[0]
        text = {"board": "b", "flash_bytes": "1 MiB", "sram_bytes": "1 KiB", "clock_mhz": 1,
                "int8_macs_per_cycle": 1, "fp32_macs_per_cycle": 1}
        lines = [f"{k}: {v}" for k, v in text.items() if k != key] + [bad]
        path.write_text("\n".join(lines))
        with pytest.raises(ConfigError, match=key):
            load_device(path)


def test_profile_numbers_are_consistent_across_the_family():
    m = [load_device(n) for n in ("cortex-m0plus", "cortex-m4", "cortex-m7", "cortex-m55")]
    assert [p.int8_macs_per_cycle for p in m] == sorted(p.int8_macs_per_cycle for p in m)
    assert np.all([p.sram_bytes <= p.flash_bytes for p in m])


# ------------------------------------------------------------------ conv -> residual Add fusion


def _tensor_overlaps(memory) -> list[tuple[str, str]]:
    """Tensors live at a common step whose bytes overlap, aliases (one buffer) excepted."""
    clashes = []
    for i, a in enumerate(memory.lifetimes):
        for b in memory.lifetimes[i + 1:]:
            if memory.buffer_of[a.name] == memory.buffer_of[b.name] or not a.overlaps_in_time(b):
                continue
            a_start, b_start = memory.offset(a.name), memory.offset(b.name)
            if a_start < b_start + b.size_bytes and b_start < a_start + a.size_bytes and a.size_bytes and b.size_bytes:
                clashes.append((a.name, b.name))
    return clashes


def _two_blocks():
    """Two basic blocks, Add(conv branch, shortcut); the second block's shortcut is read again by a Mul."""
    b = q._Builder(11)
    x0 = b.node("Relu", [b.conv("input", 3, 8)])
    x1 = b.node("Relu", [b.node("Add", [b.conv(b.node("Relu", [b.conv(x0, 8, 8)]), 8, 8), x0])])
    x2 = b.node("Add", [b.conv(b.node("Relu", [b.conv(x1, 8, 8)]), 8, 8), x1])
    return b.model(b.conv(b.node("Mul", [x2, x1]), 8, 4, k=1), (1, 3, 10, 10))


@pytest.mark.parametrize("name", sorted(q.FLOAT_BUILDERS))
def test_no_two_live_tensors_share_bytes_unless_aliased(name):
    program = lower(_qdq(name))
    memory = plan_memory(reorder(program, choose_schedule(program).order))
    assert _tensor_overlaps(memory) == []


def test_fused_add_is_written_over_the_shortcut_and_lowers_the_bound():
    model = _qdq("residual_add")
    fused, unfused = lower(model), lower(model, fuse=False)
    memory = plan_memory(reorder(fused, choose_schedule(fused).order))
    (op,) = [op for op in fused.ops if op.kind == "conv2d_add"]
    conv_input, shortcut = op.inputs
    assert (shortcut, op.output) in memory.in_place
    assert memory.buffer_of[op.output] == memory.buffer_of[shortcut] != memory.buffer_of[conv_input]
    unfused_memory = plan_memory(reorder(unfused, choose_schedule(unfused).order))
    # the block holds 2 activations instead of 3: 2 x 12 x 12 x 16 B
    assert memory.lower_bound_bytes == 2 * 2304 < unfused_memory.lower_bound_bytes == 3 * 2304
    assert memory.arena_bytes == memory.lower_bound_bytes


def test_shortcut_still_read_later_is_not_overwritten():
    program = lower(q.to_ir(q.quantize_with_ort(_two_blocks())))
    fused = [op for op in program.ops if op.kind == "conv2d_add"]
    assert len(fused) == 2
    memory = plan_memory(reorder(program, choose_schedule(program).order))
    aliased = {target: source for source, target in memory.in_place}
    first, second = fused
    assert aliased.get(first.output) == first.inputs[1]  # x0 dies at the first block's add
    assert aliased.get(second.output) is None  # x1 is read again by the Mul
    assert _tensor_overlaps(memory) == []


def test_in_place_never_picks_an_input_also_read_at_another_position():
    program = _two_branches()
    op = IntOp(kind="conv2d_add", inputs=("a1", "a1"), output="b1", params=None, node="n")
    assert in_place_input(op, program, lambda name: True) is None
    op = IntOp(kind="conv2d_add", inputs=("b1", "a1"), output="c", params=None, node="n")
    assert in_place_input(op, program, lambda name: True) is None  # a1 is 1000 B, c 10 B
    op = IntOp(kind="conv2d_add", inputs=("x", "b1"), output="a1", params=None, node="n")
    assert in_place_input(op, program, lambda name: True) == "b1"


@needs_gcc
def test_fused_blocks_are_bit_exact_in_c(tmp_path):
    float_model = _two_blocks()
    model = q.to_ir(q.quantize_with_ort(float_model))
    result = compile_c(model, tmp_path / "c")
    memory_map = json.loads((tmp_path / "c" / "memory_map.json").read_text())
    over = {t["tensor"]: t["in_place_over"] for t in memory_map["tensors"]}
    fused = [step for step in memory_map["schedule"] if step["kind"] == "conv2d_add"]
    assert len(fused) == 2 and sum(over[step["output"]] is not None for step in fused) == 1
    assert result.lower_bound_bytes == memory_map["lower_bound_bytes"]
    feeds = [{k: v * np.float32(s) for k, v in batch.items()}
             for s, batch in zip((0.5, 4.0), q.calibration_batches(float_model, 2))]
    outcome = verify(tmp_path / "c", feeds)
    assert outcome.bit_exact, outcome.first_mismatch


@pytest.mark.parametrize("line, message", [
    ("clock_mhz: .inf", "clock_mhz must be a positive finite number"),  # it reported 0.000 ms at inf MHz
    ("int8_macs_per_cycle: .nan", "int8_macs_per_cycle must be a positive finite number"),  # "nan ms"
    ("sram_bytes: 20000.7", "20000.7 is not a whole number of bytes"),  # silently 20000
    ("sram_bytes: 99999999999999999999999", "up to 1 TiB"),  # the generated model.c did not build
])
def test_a_profile_with_impossible_numbers_is_refused(tmp_path, line, message):
    key = line.split(":")[0]
    fields = {"board": "b", "flash_bytes": "1 MiB", "sram_bytes": "256 KiB", "clock_mhz": "100",
              "int8_macs_per_cycle": "1", "fp32_macs_per_cycle": "1"}
    path = tmp_path / "board.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in fields.items() if k != key) + line + "\n")
    with pytest.raises(ConfigError, match=message):
        load_device(path)
    path.write_text("".join(f"{k}: {v}\n" for k, v in fields.items() if k != "sram_bytes") + "sram_bytes: 1e5\n")
    assert load_device(path).sram_bytes == 100_000  # scientific notation was refused as "not a size"
