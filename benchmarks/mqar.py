"""MQAR recall (Zoology's multi-query associative recall) of tiny 2-layer models: gla, gdn, rla, rdn, softmax.

Trains one ``LinAttnForCausalLM`` per mixer x model dim x number of key-value pairs x seed on fresh
MQAR batches and reports the test accuracy on the answer positions (mean ± std over seeds), a
Markdown table, how often rdn >= gdn and rla >= gla hold (the claim of arXiv 2509.25223), the JSON
report and a PNG beside it. The logic lives in ``hf_linattn.evaluation.mqar``; ``hf-linattn bench
mqar`` runs the same sweep. Default grid: 20 min measured on 2 cores shared with another job (~10 min
idle, estimated from its CPU time); the full range of the issue is e.g.
``--dims 64,128 --pairs 4,8,16,32,64 --seq-len 256 --seeds 3 --steps 1000``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, base_parser, describe, setup, write_report

from hf_linattn.cli import add_mqar_options
from hf_linattn.evaluation.mqar import (
    format_summary,
    mqar_settings_from_args,
    paper_claims_text,
    plot_mqar,
    run_mqar,
    table_title,
)


def main() -> int:
    parser = base_parser("mqar", __doc__)
    add_mqar_options(parser, threads=False)
    args = parser.parse_args()
    if args.quick:  # seconds: every mixer, one tiny cell
        args.dims, args.pairs, args.seeds, args.seq_len, args.steps, args.batch_size = [32], [2], 1, 16, 5, 4
        args.workers = 1
    machine = setup(args)
    settings = mqar_settings_from_args(args)
    report = run_mqar(settings, progress=not args.no_progress, threads=args.threads, workers=args.workers)
    print(f"\n{describe(machine)}; {report['workers']} worker(s); {report['wall_seconds']:.0f} s wall\n")
    print(table_title(settings) + "\n")
    print(format_summary(report["summary"]))
    print("\n" + paper_claims_text(report["paper_claims"]))
    path = write_report("mqar", args, machine, report)
    png = plot_mqar(report["summary"], (path if args.json else RESULTS_DIR / path.name).with_suffix(".png"))
    print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
