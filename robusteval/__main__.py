"""``python -m robusteval``: the command line (also what ``torchrun -m robusteval`` runs)."""

from robusteval.cli import main

if __name__ == "__main__":
    main()
