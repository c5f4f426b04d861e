"""How long a user waits for ``hf-linattn --help`` and for an argument error, as ratios to a bare Python.

Every sample is a fresh process, started and waited for: what a user waits for at the prompt. The
baseline is ``python -c "import argparse"`` (interpreter start plus argparse), so the ratio is the
CLI's own cost over the least any Python CLI pays. For reference, ``python -c "import
hf_linattn.modeling"`` times what the CLI paid before its imports became lazy (torch,
transformers and the models loaded for a list of layer names). All commands are timed side by
side in one run, round-robin, median over rounds. Goal: ``--help`` and the argument error in under
1 second.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    base_parser,
    describe,
    format_table,
    median_ms,
    progress,
    setup,
    time_interleaved,
    verdict,
    write_report,
)

HF_LINATTN = str(Path(sys.executable).parent / "hf-linattn")
BASELINE = "python -c 'import argparse'"
REFERENCE = "python -c 'import hf_linattn.modeling'"
COMMANDS = {
    BASELINE: [sys.executable, "-c", "import argparse"],
    "hf-linattn --help": [HF_LINATTN, "--help"],
    "hf-linattn convert --help": [HF_LINATTN, "convert", "--help"],
    "argument error: hf-linattn convert --keep-softmax -1": [
        HF_LINATTN,
        "convert",
        "--keep-softmax",
        "-1",
        "--output",
        "x",
    ],
    REFERENCE: [sys.executable, "-c", "import hf_linattn.modeling"],
}
GOAL_SECONDS = 1.0


def _runner(command: list[str]) -> Callable[[], None]:
    def run() -> None:
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)

    return run


def main() -> int:
    parser = base_parser("bench_cli", __doc__)
    parser.add_argument("--no-reference", action="store_true", help=f"skip {REFERENCE} (about 5 s a sample)")
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 10)
    machine = setup(args)
    commands = {k: v for k, v in COMMANDS.items() if not (k == REFERENCE and (args.no_reference or args.quick))}
    bar = progress((args.warmup + repeats) * len(commands), "bench_cli", disable=args.no_progress)
    times = time_interleaved({k: _runner(v) for k, v in commands.items()}, repeats, args.warmup, bar, prime=False)
    bar.close()
    base = median_ms(times[BASELINE])
    results = {
        name: {"median_ms": median_ms(samples), "ratio_to_baseline": median_ms(samples) / base,
               "command": " ".join(commands[name]), "seconds": samples}
        for name, samples in times.items()
    }  # fmt: skip
    rows = []
    for name, r in results.items():
        goal = name not in (BASELINE, REFERENCE)
        rows.append([name, r["median_ms"], r["ratio_to_baseline"], f"< {GOAL_SECONDS:.0f} s" if goal else "-",
                     verdict(r["median_ms"] / 1e3, "<=", GOAL_SECONDS) if goal else "-"])  # fmt: skip
    print(f"\n{describe(machine)}; {repeats} rounds, median of fresh processes\n")
    print(format_table(["command", "median ms", f"ratio to {BASELINE}", "goal", "verdict"], rows))
    write_report("bench_cli", args, machine, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
