"""``python -m flexi_export`` is the ``flexi-export`` command."""

from flexi_export.cli import main

if __name__ == "__main__":
    main()
