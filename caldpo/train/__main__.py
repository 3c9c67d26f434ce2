"""python -m caldpo.train key=value ...: train with Hydra-style overrides."""
import sys

from .config import ConfigError


def cli(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        from .config import describe_options
        print(__doc__.strip() + "\n\nExample: python -m caldpo.train model=pythia28 datasets=[hh] loss=caldpo "
              "loss.beta=0.1 model.archive=<the SFT run's printed LATEST/policy.pt>\n"
              "A run's directory is run_dir, or <local_run_root>/<exp_name>_<hash of the training options>: "
              "the same command resumes, a changed option starts a run of its own.\n")
        print(describe_options())
        return 0
    from .config import load_config, validate
    try:
        validate(load_config(argv), argv=argv)  # the preflight, before the trainer, data and models are imported
    except ConfigError as e:
        print(f"caldpo: config error: {e}", file=sys.stderr)
        return 2
    from .checkpoint import CheckpointError
    from .data import DataError
    from .rundir import RunError
    from .trainer import main
    try:
        result = main(argv)
    except ConfigError as e:
        print(f"caldpo: config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"caldpo: data error: {e}", file=sys.stderr)
        return 2
    except (RunError, CheckpointError) as e:
        print(f"caldpo: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:  # once training runs, Ctrl-C is a stop request handled by the trainer
        print("caldpo: interrupted during setup, before the first training step; nothing was trained "
              "(rerun the same command to start again)", file=sys.stderr)
        return 130
    return 0 if result else 1


if __name__ == "__main__":
    try:
        sys.exit(cli())
    except KeyboardInterrupt:  # Ctrl-C while the preflight or the imports run
        print("caldpo: interrupted", file=sys.stderr)
        sys.exit(130)
