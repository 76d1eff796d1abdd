"""The operator's commands (everything but ``run`` and ``sandbox``): what they do, apart from
the argument parsing in :mod:`consumer.cli`."""
