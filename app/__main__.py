import logging
import os
import sys

from app.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A torchrun worker ends here without the interpreter's teardown: C++ threads of torch's
    # distributed stack (its store, the backends) can still be joinable when static objects are
    # destroyed, which aborts a worker whose work is done and published ("terminate called
    # without an active exception", SIGABRT), and torchrun then fails the phase. Everything that
    # matters is written by now; flush what is buffered and leave.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
