"""`deepseek-ms` as a script path, for launchers that run `python SCRIPT` (msrun) when the
console script is not installed: scripts/msrun_launcher.sh "deepseek-ms bench comm" 2."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from deepseek_ms.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
