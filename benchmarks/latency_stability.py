"""How stable is one latency measurement? Measure the same model N times in one process.

    python benchmarks/latency_stability.py [--model digits_mlp|digits_cnn] [--repeats 30]

Each repeat is one full `measure_latency` call (on the CPU, the model's latency at rest: the
fastest of a few bursts; a trial is timed against the teacher instead, see
`latency_under_load.py`). Prints every median (microseconds) and the max/min ratio: on a
shared machine the same model can move between regimes from one repeat to the next.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from slimsearch.evaluators import measure_latency
from slimsearch.tasks.digits import digits_cnn, digits_mlp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["digits_mlp", "digits_cnn"], default="digits_mlp")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = {"digits_mlp": digits_mlp, "digits_cnn": digits_cnn}[args.model]().eval()
    shape = (64,) if args.model == "digits_mlp" else (1, 32, 32)
    inputs = torch.randn(args.batch_size, *shape)
    medians = []
    for _ in range(args.repeats):
        result = measure_latency(model, inputs, device=torch.device("cpu"), threads=1)
        medians.append(result.median_ms * 1e3)
    print(f"{args.model}, batch {args.batch_size}, 1 thread: medians (us) of {args.repeats} "
          f"repeats: {[round(m) for m in medians]}")
    print(f"min {min(medians):.1f} us, median {statistics.median(medians):.1f} us, "
          f"max {max(medians):.1f} us, max/min {max(medians) / min(medians):.2f}")


if __name__ == "__main__":
    main()
