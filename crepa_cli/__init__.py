"""The application layer: the `crepa` command group and the demo, above the core (`crepa`) and both stages."""
