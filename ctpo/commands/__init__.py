"""One module per `ctpo` subcommand: ``add_arguments(parser)`` and ``run(args) -> int``."""
