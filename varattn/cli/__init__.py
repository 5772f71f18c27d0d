"""The command-line tools behind `python -m varattn <command>`: info, precompile."""
