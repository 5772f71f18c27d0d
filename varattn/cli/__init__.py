"""The command-line tools behind `python -m varattn <command>`: demo, info, precompile."""
