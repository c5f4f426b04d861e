"""The ``hf-linattn`` command. Subcommands delegate to the parts of the package."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .modeling import LAYER_TYPES


def _layer_types(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in LAYER_TYPES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown layer type(s) {bad}; expected a comma list of {LAYER_TYPES}")
    return names


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    report = run_demo(
        args.output,
        layer_types=args.layer_types,
        prompt_length=args.prompt_length,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    print(f"layers            : {', '.join(report['layer_types'])}")
    print(f"parameters        : {report['parameters']:,}")
    print(f"generated ids     : {report['generated_ids'][:16]} ...")
    print(f"cached == uncached: {report['cached_equals_uncached']}")
    print(f"reloaded as       : {report['remote_module']} (without hf_linattn importable)")
    print(f"remote == local   : {report['remote_equals_local']}")
    print(f"report            : {Path(args.output) / 'demo_report.json'}")
    return 0 if report["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-linattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build a tiny hybrid model, generate, save, reload through trust_remote_code")
    demo.add_argument("--output", type=Path, default=Path("outputs/demo"), help="folder for checkpoint and report")
    demo.add_argument("--layer-types", type=_layer_types, default=None, help="comma list, e.g. rdn,rdn,full_attention")
    demo.add_argument("--prompt-length", type=int, default=48)
    demo.add_argument("--max-new-tokens", type=int, default=32)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "layer_types", "unset") is None:
        from .demo import DEFAULT_LAYER_TYPES

        args.layer_types = DEFAULT_LAYER_TYPES
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
