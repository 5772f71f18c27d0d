"""`python -m varattn [demo | info | precompile] [options]`; the demo when no command is named."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": "the PyTorch SDPA tutorial's NestedTensor batch through varattn and torch (the default)",
    "info": "versions, GPUs, the kernel cache and which backend runs a typical call here",
    "precompile": "compile kernel instances into the cache (--arch, --dtype, --head-dim, --backend)",
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.split(";")[0].strip("`") + "\n")
        for name, summary in COMMANDS.items():
            print(f"  {name:<11} {summary}")
        print("\n`python -m varattn <command> --help` for a command's options")
        return 0
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "demo"
    if command not in COMMANDS:
        print(f"python -m varattn: unknown command {command!r}; the commands are {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    # the command's own module only: info and precompile need not build the demo's batch, nor it theirs
    return importlib.import_module(f"varattn.cli.{command}").main(argv)


if __name__ == "__main__":
    sys.exit(main())
