"""``python -m caldpo.train key=value ...``: train with Hydra-style overrides."""
import sys

from .config import ConfigError


def cli(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() + "\n\nEvery option and its default: caldpo/train/conf/config.yaml "
              "(model presets in conf/model/, losses in conf/loss/).\n"
              "Example: python -m caldpo.train model=pythia28 datasets=[hh] loss=caldpo loss.beta=0.1 "
              "model.archive=runs/sft_hh/LATEST/policy.pt")
        return 0
    from .trainer import main
    try:
        result = main(argv)
    except ConfigError as e:
        print(f"caldpo: config error: {e}", file=sys.stderr)
        return 2
    return 0 if result else 1


if __name__ == "__main__":
    sys.exit(cli())
