"""Command line: ``python -m pyro_ntk demo [options]`` (``make demo`` runs it with defaults)."""

from __future__ import annotations

import argparse
import sys

DEMO_HELP = """\
Adapt a trained network to a new task from a few points, and compare: the NTK-GP of
pyro_ntk (the network as mean, its empirical NTK as kernel, noise and variance fitted by SVI)
against fine-tuning, retraining the last layer, and an RBF-kernel GP (pyro.contrib.gp).
Prints RMSE, NLL, 95% coverage and seconds per method on the target's test points and
writes a PNG of the predictive bands. With --task digits (classification) the NTK method is
the linearized Laplace (pyro_ntk.LinearizedLaplace, prior chosen by the evidence; Bayes and
tempered, T by cross-validation on the labelled images), the GP a
VariationalGP classifier, and the table gives accuracy, NLL, calibration error (ECE) and
seconds, with a PNG of reliability diagrams. The source network is trained once and cached."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m pyro_ntk``.

    Returns:
        The parser, with one sub-command per command (``demo``).
    """
    from pyro_ntk.demo import TASKS, DemoConfig, default_cache_dir

    d = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="python -m pyro_ntk",
        description="pyro_ntk: trained networks as Gaussian processes with their empirical NTK.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="adapt a trained network to a new task; compare with fine-tuning and an RBF GP",
        description=DEMO_HELP,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument(
        "--task",
        choices=TASKS,
        default=d.task,
        help="sine: few-shot regression on the sine family (1-D, plotted as bands); "
        "diabetes: scikit-learn's diabetes table, trained on younger patients and adapted "
        "to older ones; digits: scikit-learn's 8x8 digits, a small CNN trained on 0-4 and "
        "adapted to 5-9 (classification)",
    )
    demo.add_argument(
        "--num-target",
        type=int,
        default=d.num_target,
        metavar="N",
        help="labelled target points used for adaptation (digits: labelled images per new "
        "class, k-shot, so 5N images in all)",
    )
    demo.add_argument("--seed", type=int, default=d.seed, help="seed of the tasks and fits")
    demo.add_argument(
        "--device",
        default=d.device,
        help="torch device: auto (CUDA if available), cpu, cuda, cuda:1, ...",
    )
    demo.add_argument(
        "--out-dir",
        default=d.out_dir,
        metavar="DIR",
        help="folder for the PNG (predictive bands, or reliability diagrams for digits)",
    )
    demo.add_argument(
        "--cache-dir",
        default=argparse.SUPPRESS,
        metavar="DIR",
        help=f"cache of trained source networks (default: {default_cache_dir()}, from "
        "$XDG_CACHE_HOME); an empty string disables the cache",
    )
    demo.add_argument(
        "--svi-steps",
        type=int,
        default=d.svi_steps,
        help="SVI steps fitting each GP (digits: also the Adam steps on the NTK method's "
        "Laplace evidence)",
    )
    demo.add_argument(
        "--finetune-steps",
        type=int,
        default=d.finetune_steps,
        help="Adam steps of fine-tuning and of last-layer retraining (digits: of fine-tuning; "
        "the new last layer is fitted by L-BFGS)",
    )
    demo.add_argument(
        "--source-steps",
        type=int,
        default=argparse.SUPPRESS,
        metavar="N",
        help="Adam steps training the source network (default: 3000 for sine and diabetes; "
        "digits: 1000 minibatches of 64 images)",
    )
    demo.add_argument(
        "--layer-variances",
        action="store_true",
        help="fit one NTK variance per layer instead of a single one (regression tasks; "
        "digits always fits one per layer)",
    )
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bars (tqdm)")
    demo.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from pyro_ntk.demo import DemoConfig, run_demo

        cfg = DemoConfig(
            task=args.task,
            num_target=args.num_target,
            seed=args.seed,
            device=args.device,
            out_dir=args.out_dir,
            cache_dir=getattr(args, "cache_dir", None),
            svi_steps=args.svi_steps,
            finetune_steps=args.finetune_steps,
            source_steps=getattr(args, "source_steps", None),
            layer_variances=args.layer_variances,
            progress=not args.no_progress,
            plot=not args.no_plot,
        )
        try:
            run_demo(cfg)
        except ValueError as err:
            parser.exit(2, f"error: {err}\n")
        return 0
    return 1  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
