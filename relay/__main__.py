"""`python -m relay`: the same command as the `relay` console script.

Tests run it with the interpreter that imported the code under test, so a subprocess exercises
exactly that code, whichever copy of the tree it lives in.
"""

from relay.ops.cli import main

if __name__ == "__main__":
    main(prog_name="relay")
