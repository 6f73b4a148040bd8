"""Where a static-int8 CNN spends its time at batch 256, and what QNNPACK's pooling changes.

    python benchmarks/int8_pooling.py [--batch 256] [--rounds 5]

PyTorch runs max pooling (and adds) of quantized tensors with the kernels of the quantized
engine set when they run, while Conv2d and Linear run on the engine their weights were packed
for. This prints, on this machine, one thread:

1. max pooling (2x2) of quint8 channels-last tensors of the shapes a digits-cnn student
   pools, on the x86 and QNNPACK engines, and float pooling of the same shapes (NCHW and
   channels last);
2. digits-cnn students (widths 1, 0.5, 0.25; 8-bit weights, int8 activations calibrated on
   the task's data) at ``--batch``, built by slimsearch's ``build_executable`` with and without
   ``ops_engine = "qnnpack"``, against the float teacher, timed in interleaved rounds (medians;
   ratios within this run), and whether the two int8 forms give identical outputs.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from slimsearch.runtimes.int8 import OPS_ENGINE, ExecutionPlan, _calibrate, build_executable, engine
from slimsearch.tasks.digits import digits_cnn, make_digits_cnn_task
from slimsearch.timing.latency import pin_allocator


def median_ms(call: Callable[[], object], calls: int) -> float:
    call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def pooling(batch: int, rounds: int) -> None:
    print(f"max pooling 2x2, batch {batch} (ms, median of {rounds} rounds)")
    print("| channels x size | int8 x86 | int8 qnnpack | float NCHW | float channels last |")
    print("|---|---|---|---|---|")
    for channels, size in ((8, 32), (16, 16), (32, 8), (16, 32), (32, 16), (64, 8)):
        x = torch.rand(batch, channels, size, size)
        q = torch.quantize_per_tensor(x, 0.01, 0, torch.quint8).contiguous(
            memory_format=torch.channels_last)
        last = x.contiguous(memory_format=torch.channels_last)
        found: dict[str, list[float]] = {}
        for _ in range(rounds):
            for name in ("x86", "qnnpack"):
                torch.backends.quantized.engine = name
                found.setdefault(name, []).append(median_ms(lambda q=q: F.max_pool2d(q, 2), 20))
            found.setdefault("nchw", []).append(median_ms(lambda x=x: F.max_pool2d(x, 2), 20))
            found.setdefault("last", []).append(median_ms(lambda x=last: F.max_pool2d(x, 2), 20))
        torch.backends.quantized.engine = engine()
        row = " | ".join(f"{statistics.median(v):.3f}" for v in found.values())
        print(f"| {channels} x {size}x{size} | {row} |")


def students(batch: int, rounds: int) -> None:
    task = make_digits_cnn_task(0)
    x = task.example_inputs(batch)
    calibration = task.example_inputs(256)
    torch.manual_seed(0)
    teacher = digits_cnn().eval()
    forms: dict[str, nn.Module] = {"teacher, float": teacher}
    identical = {}
    for width in (1.0, 0.5, 0.25):
        model = digits_cnn(width=width, fc_width=0.5).eval()
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        plan = ExecutionPlan(mode="static", layers=dict.fromkeys(names, "int8"),
                             input_shape=[1, 32, 32], engine=engine(),
                             ranges=_calibrate(model, names, [1, 32, 32], calibration))
        plain = build_executable(model, plan)
        plan.ops_engine = OPS_ENGINE
        on_qnnpack = build_executable(model, plan)
        with torch.no_grad():
            identical[width] = torch.equal(plain(x), on_qnnpack(x))
        forms[f"width {width}, int8"] = plain
        forms[f"width {width}, int8, {OPS_ENGINE} ops"] = on_qnnpack
    calls = 10 if batch >= 64 else 300
    found: dict[str, list[float]] = {}
    with torch.no_grad():
        for _ in range(rounds):
            for label, form in forms.items():
                found.setdefault(label, []).append(median_ms(lambda f=form: f(x), calls))
    reference = statistics.median(found["teacher, float"])
    print(f"\ndigits-cnn at batch {batch} (ms, median of {rounds} interleaved rounds)")
    print("| form | ms | faster than the teacher |")
    print("|---|---|---|")
    for label, times in found.items():
        ms = statistics.median(times)
        print(f"| {label} | {ms:.3f} | {reference / ms:.2f}x |")
    print("identical outputs with and without the QNNPACK ops: "
          + ", ".join(f"width {w}: {same}" for w, same in identical.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if engine() is None or OPS_ENGINE not in torch.backends.quantized.supported_engines:
        raise SystemExit("this torch build lacks the x86 or QNNPACK int8 engine")
    warnings.simplefilter("ignore")  # torch.ao's deprecation notices
    pin_allocator()
    torch.set_num_threads(1)
    pooling(args.batch, args.rounds)
    students(args.batch, args.rounds)


if __name__ == "__main__":
    main()
