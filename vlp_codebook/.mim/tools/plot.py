"""`mim run vlp_codebook plot ...`: mim runs this file from the installed package.

It only forwards to :func:`vlp_codebook.tools.plot.main` (see that module for the options),
through :func:`vlp_codebook.tools.cli.run_main`: an error prints one line and exits with status 1
(mim then adds its own CalledProcessError report), the traceback goes to the log file.
"""
import os
import sys

if __name__ == '__main__':
    # python puts this file's folder first on sys.path; drop it so that our train.py/test.py
    # never shadow a module of the same name (the standard library has a 'test' package)
    if sys.path and os.path.abspath(sys.path[0] or os.curdir) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)
    from vlp_codebook.tools.cli import prepare_process, run_main

    prepare_process()  # before torch is imported
    from vlp_codebook.tools.plot import main

    run_main(main, sys.argv[1:], prog='mim run vlp_codebook plot')
