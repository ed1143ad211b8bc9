import sys

from .cli import main
from .dist import exit_process, launch_env

status = main()
if launch_env().world_size > 1:
    exit_process(status)  # a rank of a multi-process run leaves without finalization (see there)
sys.exit(status)
