"""`mim run vlp_codebook train ...`: mim runs this file from the installed package.

It only forwards to :func:`vlp_codebook.tools.train.main` (see that module for the options),
through :func:`vlp_codebook.tools.cli.forward_tool`: an error prints one line and exits with
status 1 (mim then adds its own CalledProcessError report), the traceback goes to the log file.
"""
if __name__ == '__main__':
    from vlp_codebook.tools.cli import forward_tool  # standard library only: safe before the path fix

    forward_tool('train', __file__)
