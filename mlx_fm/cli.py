"""What every mlx_fm command shares: bad input ends in one line and a non-zero exit."""

import functools
import sys

from .utils import ModelLoadError


def fail_cleanly(main):
    """Turn expected errors into `mlx_fm: error: ...` on stderr and exit status 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (ModelLoadError, ValueError, FileNotFoundError, OSError) as error:
            print(f"mlx_fm: error: {error}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper
