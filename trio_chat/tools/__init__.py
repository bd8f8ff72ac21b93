"""The tools around the server: the terminal client, the conformance checker and the benchmark.

The server never imports this package; the command line imports each tool only when its
command runs.
"""
