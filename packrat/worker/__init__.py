"""What runs inside TorchServe's worker processes: Packrat's handler (`packrat_handler.py`,
shipped as package data and copied into every archive and version directory) and the slot
claiming that pins a worker to its cores. Nothing imports the handler; it is the top of the
worker process, as the CLI is of a command's.
"""
