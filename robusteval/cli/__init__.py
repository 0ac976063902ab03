"""The ``robusteval`` command line.

Each command parses its options, calls one library function and renders the result: data (tables,
paths) on stdout, progress and errors on stderr. A user mistake is one line and a non-zero exit.

Commands live in submodules of this package and register themselves on :data:`cli`.
"""

from __future__ import annotations

import importlib
import sys
import warnings

import click

from robusteval import __version__
from robusteval.errors import UserError

_COMMAND_MODULES = ("attack", "report", "models", "train", "gamma", "figures", "demo")


#: What Ctrl-C leaves behind, per command (``train`` prints its own message).
_INTERRUPTED = {
    "attack": "interrupted; the records written so far are kept: "
              "rerun the same command (same --out) to resume",
    "demo": "interrupted; the records written so far are kept: rerun with the same --out to resume",
    "train": None,
}


def _oom():
    """torch's out-of-memory error (a ``RuntimeError`` subclass) once torch is imported, else a stand-in."""
    torch = sys.modules.get("torch")
    return getattr(torch, "OutOfMemoryError", MemoryError) if torch is not None else MemoryError


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings for a person: ``warning: ...`` on one line, no source location."""
    print(f"warning: {message}", file=file or sys.stderr)


class _Group(click.Group):
    """A click group that turns library-level :class:`UserError` (and OS errors) into one clean line."""

    def invoke(self, ctx):
        shown, warnings.showwarning = warnings.showwarning, _one_line_warning
        try:
            return super().invoke(ctx)
        except UserError as exc:
            raise click.ClickException(exc.as_flags()) from None
        except FileNotFoundError as exc:
            raise click.ClickException(f"file not found: {exc.filename or exc}") from None
        except EOFError:  # a reader hit the end of a file early (without this, click prints "Aborted!")
            raise click.ClickException("a file ended early (a truncated download or a damaged file)") \
                from None
        except (MemoryError, _oom()) as exc:
            raise click.ClickException(f"out of memory ({type(exc).__name__}); lower --batch-size or --n") \
                from None
        except OSError as exc:  # permissions, a file where a directory is expected, a full disk, ...
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror or exc}") from None
        except KeyboardInterrupt:
            name = ctx.invoked_subcommand
            message = _INTERRUPTED.get(name, "interrupted")
            if message:
                click.echo(message, err=True)
            sys.exit(130)
        finally:
            warnings.showwarning = shown


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="robusteval")
def cli():
    """robusteval — adversarial robustness evaluation (Adam-PGD attack batteries, local linearity γ,
    and the LLR / adversarial / TRADES reference trainer).

    \b
    Examples:
      robusteval attack --model zoo:fmnist-llr2 --attack untargeted --attack multi-targeted --eps 0.1
      robusteval gamma --model zoo:fmnist-adv2 --model zoo:fmnist-llr2 --eps 0.1
      robusteval train --method llr --arch small_cnn --dataset fashion-mnist --eps 0.1 --out ckpt.pt
      robusteval report runs/records.csv --format markdown
    """


for _name in _COMMAND_MODULES:
    importlib.import_module(f"robusteval.cli.{_name}")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="robusteval")
