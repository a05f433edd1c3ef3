"""`python -m router --prefill http://p:30000 8998 --decode http://d:30001 ...` (see --help)."""

from router.config import config_from_args


def main() -> None:
    config = config_from_args()
    from router.server import run  # the serving modules load only once the arguments are known to be good

    run(config)


if __name__ == "__main__":
    main()
