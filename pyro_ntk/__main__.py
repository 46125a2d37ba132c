"""Command line: ``pyro-ntk demo [options]``, or ``python -m pyro_ntk demo [options]``.

``make demo`` runs it with defaults; ``pyro-ntk demo --quick`` is a smoke check of seconds.
"""

from __future__ import annotations

import argparse
import os
import sys

DEMO_HELP = """\
Adapt a trained network to a new task from a few points, and compare: the NTK-GP of
pyro_ntk (the network as mean, its empirical NTK as kernel, noise and variance fitted by
pyro_ntk.fit on the marginal likelihood)
against fine-tuning, retraining the last layer, and an RBF-kernel GP (pyro.contrib.gp).
Prints RMSE, NLL, 95% coverage and seconds per method on the target's test points and
writes a PNG of the predictive bands. With --task digits (classification) the NTK method is
the linearized Laplace (pyro_ntk.LinearizedLaplace, prior chosen by the evidence; Bayes and
tempered, T by cross-validation on the labelled images), the GP a
VariationalGP classifier, and the table gives accuracy, NLL, calibration error (ECE) and
seconds, with a PNG of reliability diagrams. The source network is trained once and cached.
--quick runs a small, fast configuration for smoke checks (seconds on a CPU, the source
network included; its figures are not the documented ones)."""

CONSOLE_COMMAND = "pyro-ntk"


def program_name(argv0: str | None = None) -> str:
    """``pyro-ntk`` when run through the console script, else ``python -m pyro_ntk``.

    Args:
        argv0: the program's path (default: ``sys.argv[0]``).

    Returns:
        The name the usage and error messages show.

    Example:
        >>> program_name("/venv/bin/pyro-ntk"), program_name("/src/pyro_ntk/__main__.py")
        ('pyro-ntk', 'python -m pyro_ntk')
    """
    argv0 = sys.argv[0] if argv0 is None else argv0
    stem = os.path.splitext(os.path.basename(argv0 or ""))[0]  # pyro-ntk.exe on Windows
    return CONSOLE_COMMAND if stem == CONSOLE_COMMAND else "python -m pyro_ntk"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``pyro-ntk`` (``python -m pyro_ntk``).

    Args:
        prog: the program name in usage and errors (default: :func:`program_name`).

    Returns:
        The parser, with one sub-command per command (``demo``).
    """
    from pyro_ntk.demo import QUICK, TASKS, DemoConfig, default_cache_dir

    d = DemoConfig()
    parser = argparse.ArgumentParser(
        prog=program_name() if prog is None else prog,
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
        "--fit-steps",
        type=int,
        default=argparse.SUPPRESS,
        metavar="N",
        help="step cap of each GP's hyperparameter fit (pyro_ntk.fit stops earlier once "
        "converged, and warns if it reaches the cap first; default: fit's own cap)",
    )
    demo.add_argument(
        "--finetune-steps",
        type=int,
        default=argparse.SUPPRESS,
        metavar="N",
        help=f"Adam steps of fine-tuning and of last-layer retraining (default: "
        f"{d.finetune_steps}; digits: of fine-tuning, the new last layer is fitted by L-BFGS)",
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
    demo.add_argument(
        "--quick",
        action="store_true",
        help=f"a small, fast configuration for smoke checks: {QUICK['num_source']} source "
        f"and {QUICK['num_test']} test points (sine), {QUICK['source_steps']} source steps, "
        f"{QUICK['finetune_steps']} fine-tuning steps, at most {QUICK['fit_steps']} steps per "
        "fit (options given explicitly take precedence); seconds on a CPU including "
        "training the source network; its figures are not the documented ones, and a fit "
        "that reaches its step cap warns",
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

        options = dict(
            task=args.task,
            num_target=args.num_target,
            seed=args.seed,
            device=args.device,
            out_dir=args.out_dir,
            layer_variances=args.layer_variances,
            progress=not args.no_progress,
            plot=not args.no_plot,
        )
        for name in ("cache_dir", "fit_steps", "finetune_steps", "source_steps"):
            if hasattr(args, name):  # given on the command line
                options[name] = getattr(args, name)
        if args.quick:
            cfg = DemoConfig.quick(**options)
            print(
                f"quick  : smoke-check sizes ({cfg.num_source} source points, "
                f"{cfg.resolved_source_steps()} source steps, {cfg.num_test} test points, "
                f"fit <= {cfg.fit_steps} steps, fine-tuning {cfg.finetune_steps} steps); "
                "not the documented figures"
            )
        else:
            cfg = DemoConfig(**options)
        try:
            run_demo(cfg)
        except ValueError as err:
            parser.exit(2, f"error: {err}\n")
        return 0
    return 1  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
