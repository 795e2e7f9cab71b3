"""``python -m forgetlab``: the ``forgetlab`` command, also as a module (``torchrun ... -m forgetlab cit run``)."""

from forgetlab.cli.main import main

main()
